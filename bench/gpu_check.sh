#!/usr/bin/env bash
# The GPU checks of issue 14 (P9 item 8), in ONE call of the device tool that ends within 8 minutes on one
# H200: (1) the device-marked tests on CUDA in bf16; (2) training throughput and client scaling against a
# plain torch + peft loop, on a random model of SmolLM2-135M's shape (its compute; the real weights cannot
# reach a machine without network inside a 64 MiB call): N = 1 and 16 clients, plain / sequential /
# vectorized (federation.parallel_clients; goal: vectorized >= 4x sequential at N = 16); (3) the
# personalized paper's schedule at full budget (SmolLM2, 4 clients, 500 iterations, 100 local-only, trust
# every 25; local / fedavg / validation / prediction), only when the SmolLM2 asset is on the machine.
#
#
# With --fedcollm, instead, the FedCoLLM table of issue 13 (P8 item 6) at the paper's budgets, also within 8
# minutes: `bench/fedcollm_quality.py` with the Qwen pair on BBC topic and French Wikipedia topic, seeds 0
# and 1, 5 rounds of 1 local epoch and 1 server epoch, CUDA bf16; each task has 210 s and the table keeps
# the seeds that finished. Needs the Qwen and corpus assets on the machine (skipped otherwise: they cannot
# travel in a 64 MiB call).
#
# Here, once (needs PyPI): bash bench/gpu_check.sh --prepare   # wheels the device image lacks -> .whl/
# There (device tool):     run(command="bash bench/gpu_check.sh [--fedcollm]", carry=[".whl"], timeout_s=540)
# Here, without a GPU:     bash bench/gpu_check.sh --cpu-smoke [--fedcollm]  # same steps, tiny budgets, CPU
# Results: $OUT (the device tool's folder) or bench/results/gpu_check/: log.txt, client_scaling_*.{md,json},
# paper_report.md; with --fedcollm fedcollm_quality_*.{md,json}. Commit what a GPU run measured under
# bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu SUITE=scale
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=cpu ;;
    --prepare) MODE=prepare ;;
    --fedcollm) SUITE=fedcollm ;;
    *) echo "usage: bash bench/gpu_check.sh [--cpu-smoke | --prepare] [--fedcollm]" >&2; exit 2 ;;
  esac
done

if [[ $MODE == prepare ]]; then
  # The device image has torch, peft, rich, typer, pyyaml, safetensors; cotune also needs these versions.
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d .whl transformers==5.24.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
    typing-inspection gguf==0.19.0 && du -sh .whl && ls .whl
  exit $?
fi

RESULTS=${OUT:-bench/results/gpu_check}
mkdir -p "$RESULTS"
LOG=$RESULTS/log.txt
PY=python3
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
if [[ -d .whl ]] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ $MODE == gpu ]]; then
  DEVICE=cuda DTYPE=bfloat16 CLIENTS=(1 16) STEPS=4 SEQ=256 BATCH=8 ITER=500 LOCAL=100 EVERY=25
else
  DEVICE=cpu DTYPE=float32 CLIENTS=(1 4) STEPS=1 SEQ=32 BATCH=2 ITER=6 LOCAL=2 EVERY=2
fi
step() {  # step NAME SECONDS CMD...: one timed step; a failure is logged and the next step still runs
  local name=$1 limit=$2; shift 2
  echo "== $(date -u +%T) $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  # a run a timed-out benchmark had started (only this script's: their run directories say so)
  pkill -KILL -f "cotune.cli.main run.*(runs/bench/gpu-|/tmp/gpu_check/)" 2> /dev/null
  echo "== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}
{ echo "gpu_check $SUITE $MODE on $(uname -m), $(nproc) cores"; $PY -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "transformers", transformers.__version__, "peft", peft.__version__)'; } 2>&1 | tee -a "$LOG"

if [[ $SUITE == fedcollm ]]; then
  # The paper's budgets: 5 rounds, 1 local epoch, 1 server epoch (no cap on distillation batches).
  PAPER=(federation.rounds=5 federation.local_epochs=1 distill.epochs=1 distill.max_steps=null run.eval_every=5)
  ASSETS=~/.cache/cotune/assets
  if [[ $MODE == cpu ]]; then
    step fedcollm-tiny 300 $PY bench/fedcollm_quality.py --config examples/fedcollm-tiny.yaml --name gpu-smoke-tiny \
      --fresh "${PAPER[@]}" federation.rounds=2 run.eval_every=2 device=cpu --seeds 0 1
  elif ls $ASSETS/qwen2.5-coder-1.5b-instruct/* $ASSETS/qwen2.5-coder-0.5b-instruct/* > /dev/null 2>&1; then
    for task in bbc wiki-fr; do
      step fedcollm-$task 210 $PY bench/fedcollm_quality.py --config bench/configs/fedcollm-qwen-$task.yaml \
        --name gpu-qwen-$task "${PAPER[@]}" device=cuda model.dtype=bfloat16 llm.model.dtype=bfloat16 \
        run.threads=4 --seeds 0 1
    done
  else
    echo "== fedcollm skipped: no Qwen2.5-Coder weights on this machine (see the header)" | tee -a "$LOG"
  fi
  cp bench/results/fedcollm_quality_gpu-*.{md,json} "$RESULTS"/ 2>/dev/null
  echo "== done $(date -u +%T)" | tee -a "$LOG"
  exit 0
fi

step device-tests 90 env COTUNE_TEST_DEVICE=$DEVICE COTUNE_TEST_DTYPE=$DTYPE $PY -m pytest -q -p no:cacheprovider -m device tests/test_device.py
model=tiny-smollm2
[[ $MODE == cpu ]] && model=tiny
step client-scaling 150 $PY bench/client_scaling.py --model $model --device $DEVICE --dtype $DTYPE \
  --clients "${CLIENTS[@]}" --modes plain sequential vectorized --steps $STEPS --seq $SEQ --batch $BATCH --name "gpu_check_$MODE"
cp bench/results/client_scaling_gpu_check_$MODE.* "$RESULTS"/ 2>/dev/null

# The personalized paper's schedule: 4 clients, ITER iterations, LOCAL local-only, trust every EVERY.
if [[ $MODE == cpu ]] || ls ~/.cache/cotune/assets/smollm2-135m-instruct/*.gguf > /dev/null 2>&1; then
  paper_model=smollm2-135m-instruct
  [[ $MODE == cpu ]] && paper_model=tiny
  rounds=$(( (ITER - LOCAL) / EVERY ))
  rm -rf /tmp/gpu_check && mkdir -p /tmp/gpu_check
  step paper 230 $PY -m cotune.cli.main run examples/quickstart.yaml model.name=$paper_model device=$DEVICE \
    model.dtype=$DTYPE strategy.name=validation "run.compare=[local,fedavg,prediction]" run.eval_every=$rounds \
    federation.warmup_steps=$LOCAL federation.local_steps=$EVERY federation.rounds=$rounds --out /tmp/gpu_check/paper
  $PY -m cotune.cli.main report /tmp/gpu_check/paper /tmp/gpu_check/paper.local /tmp/gpu_check/paper.fedavg \
    /tmp/gpu_check/paper.prediction --out /tmp/gpu_check/report >> "$LOG" 2>&1
  cp /tmp/gpu_check/report/report.md "$RESULTS/paper_report.md" 2>/dev/null
else
  echo "== paper schedule skipped: no SmolLM2 weights on this machine (see the header)" | tee -a "$LOG"
fi
echo "== done $(date -u +%T)" | tee -a "$LOG"
