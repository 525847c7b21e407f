#!/usr/bin/env bash
# The long FedCoLLM quality sweep of issue 13 (hours on a 2-core CPU, ~1.8 h per task and seed): Qwen pair,
# BBC topic then French Wikipedia topic, one run at a time on one torch thread. Each finished seed rewrites
# bench/results/fedcollm_quality_<name>.{md,json}; progress goes to bench/results/fedcollm_long.log.
#   nohup bench/fedcollm_long.sh > /dev/null 2>&1 &
#   SEEDS=2 TASKS=qwen-bbc nohup bench/fedcollm_long.sh > /dev/null 2>&1 &    # one part of a split sweep
# A sweep split over sessions or machines adds up: the results file keeps the seeds it records when this
# clone has no runs for them (same config up to the seed), so commit it after each finished seed.
# PYTHON (default: python) must have cotune's dependencies; the source tree is put on PYTHONPATH.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SEEDS=${SEEDS:-0 1 2}
TASKS=${TASKS:-qwen-bbc qwen-wiki-fr}
LOG=bench/results/fedcollm_long.log
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
run() {
    echo "== $(date -u +%FT%TZ) start: $*" >> "$LOG"
    "$PY" bench/fedcollm_quality.py "$@" >> "$LOG" 2>&1
    echo "== $(date -u +%FT%TZ) end (rc $?): $*" >> "$LOG"
}
for task in $TASKS; do
    # shellcheck disable=SC2086  # SEEDS is a list of numbers
    run --config "bench/configs/fedcollm-$task.yaml" --name "$task" --seeds $SEEDS
done
echo "== $(date -u +%FT%TZ) sweep done" >> "$LOG"
