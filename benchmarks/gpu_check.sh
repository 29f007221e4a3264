#!/usr/bin/env bash
# CUDA correctness and GPU timings in one go (for a machine with a GPU; `sab` need not be
# installed: run from the repository root).  Writes logs to ${OUT:-gpu_results}/.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 5 | tee "$OUT/cuda_tests.log"
python3 -m benchmarks.step_time --device cuda --T 100 200 1000 \
    --methods lstm tbptt sab-ref sab-sparse sab-sparse-dot naive --repeats 3 \
    --json "$OUT/step_time_cuda.json" 2>&1 | tee "$OUT/step_time_cuda.log"
python3 -m benchmarks.peak_memory --device cuda --batch 64 --T 1000 5000 20000 \
    --methods lstm sab-ref sab-sparse --json "$OUT/peak_memory_cuda.json" 2>&1 \
    | tee "$OUT/peak_memory_cuda.log"
