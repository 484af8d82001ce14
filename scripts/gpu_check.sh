#!/usr/bin/env bash
# One prepared GPU check of the deployment path; at most 8 minutes. See scripts/gpu_check.py for the steps.
#   scripts/gpu_check.sh [OUT_DIR]      (default: $OUT when set, else out/gpu_check)
# Writes OUT_DIR/gpu_check.{json,md,log} and OUT_DIR/bench.{txt,json,png}.
# Python: the system one when it already has a CUDA PyTorch (the lent GPU machines do, and cannot download);
# otherwise a venv (.venv-gpu) filled from carried wheels in .whl/ when present, else from the package index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-out/gpu_check}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRITON_DEFAULT_FP_FUSION=1
START=$(date +%s)

has_cuda_torch() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

PY=""
for cand in python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && has_cuda_torch "$cand"; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then
  echo "no python with a CUDA PyTorch; creating .venv-gpu" >&2
  python3 -m venv .venv-gpu || exit 1
  PKGS="torch triton onnx onnxruntime numpy pillow safetensors tokenizers transformers tqdm rich pyyaml"
  if [ -d .whl ]; then
    .venv-gpu/bin/pip install -q --no-index --find-links .whl $PKGS || exit 1
  else
    .venv-gpu/bin/pip install -q $PKGS || exit 1
  fi
  PY=.venv-gpu/bin/python
  has_cuda_torch "$PY" || { echo "error: PyTorch sees no CUDA device" >&2; exit 1; }
fi
# The repository is used in place (no install step): nothing to download, nothing left behind.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2>&1 | tee "$OUT_DIR/gpu_check.log"

# 8 minutes in all: what setup used comes off the check's budget.
LEFT=$((480 - ($(date +%s) - START) - 15))
timeout --kill-after=10 "$LEFT" "$PY" scripts/gpu_check.py --out "$OUT_DIR" --budget $((LEFT - 15)) 2>&1 \
  | tee -a "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
