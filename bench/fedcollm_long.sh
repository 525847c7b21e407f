#!/usr/bin/env bash
# The long FedCoLLM quality sweep of issue 13 (hours on a 2-core CPU): Qwen pair, BBC topic then French
# Wikipedia topic, seeds 0 and 1, one run at a time on one torch thread. Each finished seed rewrites
# bench/results/fedcollm_quality_<name>.{md,json}; progress goes to bench/results/fedcollm_long.log.
#   nohup bench/fedcollm_long.sh > /dev/null 2>&1 &
# PYTHON (default: python) must have cotune's dependencies; the source tree is put on PYTHONPATH.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=bench/results/fedcollm_long.log
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
run() {
    echo "== $(date -u +%FT%TZ) start: $*" >> "$LOG"
    "$PY" bench/fedcollm_quality.py "$@" >> "$LOG" 2>&1
    echo "== $(date -u +%FT%TZ) end (rc $?): $*" >> "$LOG"
}
run --config bench/configs/fedcollm-qwen-bbc.yaml --name qwen-bbc --seeds 0 1
run --config bench/configs/fedcollm-qwen-wiki-fr.yaml --name qwen-wiki-fr --seeds 0 1
echo "== $(date -u +%FT%TZ) sweep done" >> "$LOG"
