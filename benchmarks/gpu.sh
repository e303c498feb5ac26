#!/usr/bin/env bash
# One prepared GPU check for a single H200 (or any one CUDA GPU), all within 8 minutes:
#   1. train-step throughput of TCL, UNITER, MVPTR and BridgeTower at base size with the paper's shapes and per-GPU
#      batch (synthetic data made on the device), bf16 autocast, SDPA attention, torch.compile off and then on:
#      samples/s, MFU (FLOPs counted once / the H200's dense bf16 peak), peak CUDA memory (benchmarks/train_step.py);
#   2. the test suite with CUDA visible, for the time that is left (`timeout`; what finished is counted);
#   3. one JSON, gpu.json, in $OUT when set (the device tool copies back what is under $OUT), else
#      benchmarks/results/ (benchmarks/gpu_report.py; it checks the goal: MFU >= 40 % for TCL and BridgeTower).
#
#   bash benchmarks/gpu.sh             # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run   # the same steps on CPU at unit size, 1 step, no compile, tests not run,
#                                      # into a temp dir (tests/test_benchmarks.py runs it: the script cannot rot)
#
# Environment: PY (the interpreter; default .venv/bin/python, else python3), GPU_BENCH_BUDGET_S (480),
# GPU_BENCH_TEST_JOBS (pytest-xdist processes for the suite, 8).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
DRY_FLAG=()
case "${1:-}" in
  --dry-run) DRY_RUN=1; DRY_FLAG=(--dry-run) ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac

if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

BUDGET_S=${GPU_BENCH_BUDGET_S:-480}
START=$SECONDS
elapsed() { echo $((SECONDS - START)); }

if ((DRY_RUN)); then
  DEST=$(mktemp -d "${TMPDIR:-/tmp}/vlp-gpu-dry-run.XXXXXX")
  TRAIN_ARGS=(--device cpu --sizes unit --precision fp32 --compile off --steps 1 --warmup 1)
  TRAIN_LIMIT_S=60
else
  DEST=${OUT:-benchmarks/results}
  # 5 timed steps after 2 warm-ups (the first compiled call compiles); no new model after 270 s, none running
  # past 330 s, so that the suite keeps at least ~2 minutes of the 8.
  TRAIN_ARGS=(--device cuda --sizes base --precision bf16 --compile off on --steps 5 --warmup 2 --budget-s 270)
  TRAIN_LIMIT_S=330
fi
mkdir -p "$DEST"
TRAIN_JSON="$DEST/gpu_train_step.json"

echo "== train steps (${TRAIN_ARGS[*]})"
train_rc=0
timeout -k 10 "$TRAIN_LIMIT_S" "$PY" benchmarks/train_step.py "${TRAIN_ARGS[@]}" --out "$TRAIN_JSON" || train_rc=$?

# The suite: CUDA is visible to it; a margin of 20 s is kept for the report.
TEST_CMD=("$PY" -m pytest -q -x -p no:cacheprovider -n "${GPU_BENCH_TEST_JOBS:-8}" --ignore=tests/test_benchmarks.py
          --junitxml="$DEST/gpu_tests.xml")
tests_rc=0
tests_skipped=()
left=$((BUDGET_S - $(elapsed) - 20))
if ((DRY_RUN)); then
  tests_skipped=(--tests-skipped "dry run: the suite is not run from itself")
elif ((left < 30)); then
  tests_skipped=(--tests-skipped "no time left: ${left} s of the ${BUDGET_S} s budget")
else
  echo "== test suite (${left} s left)"
  timeout -s INT -k 15 "$left" "${TEST_CMD[@]}" || tests_rc=$?
fi

"$PY" benchmarks/gpu_report.py --train-step "$TRAIN_JSON" --train-step-rc "$train_rc" \
  --junit "$DEST/gpu_tests.xml" --tests-rc "$tests_rc" --tests-command "${TEST_CMD[*]}" "${tests_skipped[@]}" \
  --budget-s "$BUDGET_S" --wall-s "$(elapsed)" "${DRY_FLAG[@]}" --out "$DEST/gpu.json"
echo "$DEST/gpu.json"
