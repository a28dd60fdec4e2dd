#!/usr/bin/env bash
# The one short GPU check (about 5 minutes on one H100/H200; the session budget is 15).
#
#   bash benchmarks/gpu_check.sh            # writes $OUT (or runs/gpu_check) and prints a table
#
# 1. the CUDA-marked tests (tests/gpu): varlen attention, grouped GEMMs, a CUDA step equal to
#    the CPU one, transformer-engine kernels (when installed), CUDA-event timing;
# 2. `small` for 50 steps in fp32 and in bf16, loss curves side by side;
# 3. tokens/s, TFLOP/s, MFU and peak memory of `small` in bf16, with and without
#    transformer-engine (without only, where TE is not installed).
# Needs the CUDA build of torch. On a machine without internet, carry wheels for what is
# missing in .whl/ (e.g. megatron-core): they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 150 $PY -m pytest -q -m cuda tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log"
timeout 330 $PY benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/runs.log"
