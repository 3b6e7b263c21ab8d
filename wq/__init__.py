"""wq: post-training weight-only quantization for LLMs.

    import wq
    report = wq.quantize_model(model, "W4G128", algo="rtn")
    wq.save(model, "out", tokenizer=tok)
    model = wq.load("out")
"""

__version__ = "0.1.0"

import logging as _logging  # noqa: E402

from .threads import configure_openmp, hint_if_too_late  # noqa: E402

hint_if_too_late(_logging.getLogger(__name__))  # torch already loaded without a policy on a busy machine
configure_openmp()  # before torch loads: OpenMP threads sleep while they wait (a busy machine; see threads.py)

from .api import QuantReport, quantize_model  # noqa: E402
from .cast import cast_model  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .hf_hook import install as _install_hf_quantizer  # noqa: E402
from .io import load, save  # noqa: E402
from .scheme import QuantScheme, SchemeError  # noqa: E402

_install_hf_quantizer()  # quant_method "wq" in transformers' from_pretrained

__all__ = ["QuantConfig", "cast_model", "QuantReport", "QuantScheme", "SchemeError", "__version__", "load",
           "quantize_model", "save"]
