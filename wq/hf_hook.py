"""Register wq's transformers quantizer when transformers' quantizer registry is imported, not before.

Importing transformers.quantizers costs seconds (it imports every quantizer and the loading core), and
`import wq` must stay light. install() registers at once if that module is already imported; otherwise
a one-shot import hook runs wq.hf_quantizer.register() right after transformers.quantizers.auto executes
(from_pretrained always imports it first).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

log = logging.getLogger(__name__)

_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from .hf_quantizer import register

        register()
    except Exception as e:  # never break transformers' own import; say why wq checkpoints won't load there
        log.warning("quant_method 'wq' not registered with transformers (%s: %s); load wq checkpoints with "
                    "wq.load", type(e).__name__, e)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_module  # this spec's loader instance only
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
