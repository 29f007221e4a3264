#!/usr/bin/env bash
# The `sab repro` rows a 2-core CPU cannot train to the paper's budget, on a GPU, in one call
# of the device tool (run from the repository root; `sab` need not be installed).
#
#   OUT=$OUT bash benchmarks/gpu_repro.sh                 # the default rows, 7 minutes in all
#   ROWS="copy300-lstm" MINUTES=8 OUT=$OUT bash benchmarks/gpu_repro.sh
#
# Full-BPTT LSTM rows are the ones worth it: cuDNN trains copying T=200 at ~2.4 ms a step on an
# H200 (results/benchmarks/step_time_cuda.log); SAB's step is launch-bound there
# (~0.55 s at T=200, slower than this CPU), so SAB rows stay on the CPU.
#
# Each row resumes from its committed checkpoint (results/runs/<row>/ckpt.pt) and stops with a
# checkpoint after MINUTES (the tool's command limit is 10 minutes); the rows run in turn and
# share the MINUTES.  Every row's run directory is then copied to $OUT/runs/<row>.  Back here:
#   cp -r --no-preserve=mode <files_at>/runs/<row> results/runs/ && sab repro report
# (the tool hands files back read-only; the run appends to metrics.jsonl when it resumes).
# The run's hardware.json keeps one entry per session (CPU or GPU), so the report's hardware
# column says which machines trained the row.  Extra arguments go to `sab repro run`.
set -u
OUT=${OUT:-gpu_results}
ROWS=${ROWS:-copy200-lstm copy300-lstm adding400-lstm}
MINUTES=${MINUTES:-7}
RESULTS=${RESULTS:-results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT/runs"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| cuda:',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available (CPU)')" \
    | tee "$OUT/repro_run.log"
# shellcheck disable=SC2086  # ROWS is a list of names or patterns
"$PYTHON" -m sab repro run $ROWS --max-minutes "$MINUTES" --results "$RESULTS" --no-plot "$@" \
    2>&1 | tee -a "$OUT/repro_run.log"
code=${PIPESTATUS[0]}
for row in $ROWS; do
    for dir in "$RESULTS"/runs/$row; do  # a pattern (copy300-*) names several
        if [ -d "$dir" ]; then cp -r "$dir" "$OUT/runs/"; fi
    done
done
ls "$OUT/runs"
exit "$code"
