#!/usr/bin/env bash
# A local Flower deployment of cotune: start a SuperLink and one SuperNode per client on 127.0.0.1,
# run CONFIG on it with `flwr run`, then stop every process (also on an error or Ctrl-C).
#
#   scripts/flower-local.sh CONFIG [key=value ...]     # e.g. examples/tiny-personalized.yaml or
#                                                      #      examples/fedcollm-tiny.yaml
#   OUT=runs/mine scripts/flower-local.sh CONFIG       # run directory (default runs/<stem>-flower)
#   scripts/flower-local.sh --secure CONFIG            # TLS + SuperNode authentication (see below)
#   WORKERS=0 scripts/flower-local.sh CONFIG           # no node workers (see below)
#
# Insecure mode (no TLS, no SuperNode authentication) is for this one-machine demo only. --secure
# makes a throwaway CA and a certificate for 127.0.0.1 (under <run dir>/flower/pki), serves TLS,
# enables SuperNode authentication and registers one key pair per SuperNode: the same steps as a
# real deployment (docs/flower.md) with certificates from your own PKI. Runtime dependency installation is
# disabled: every process uses this checkout's environment (PYTHON, default .venv/bin/python).
# Each SuperNode builds the config's federated split and keeps partition-id i (a real data owner
# passes data-path=<its files> in --node-config instead). run.compare baselines are not run here,
# nor FedCoLLM's centralized/zero_shot (no client step): `cotune run CONFIG --backend flower` runs those.
# Each SuperNode gets a node worker (`cotune flower worker`, node config worker=<socket>): one long-lived
# process that does the work of every message the SuperNode's fresh ClientApp processes forward to it
# (imports, base model and data once). WORKERS=0: the work runs in those fresh processes instead.
set -euo pipefail
set -m # background jobs get their own process group, so cleanup can stop each one with its children

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SECURE=0
WORKERS=${WORKERS:-1}
if [[ ${1:-} == --secure ]]; then
    SECURE=1
    shift
fi
if [[ $# -lt 1 ]]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
CONFIG=$(realpath "$1")
shift
OVERRIDES="$*"

export PATH="$(dirname "$PYTHON"):$PATH" # flower-superlink/-supernode start flwr-* commands by name
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 # no traffic to flower.ai
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2} # a local look; default 1 s

CLIENTS=$("$PYTHON" -c 'import sys
from cotune.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).federation.clients)' "$CONFIG" "$@")
RUN_DIR=$(realpath -m "${OUT:-$ROOT/runs/$(basename "${CONFIG%.*}")-flower}")
if [[ -e $RUN_DIR && -n $(ls -A "$RUN_DIR") ]]; then
    echo "error: run directory $RUN_DIR is not empty; set OUT=<another directory>" >&2
    exit 2
fi
WORK=$RUN_DIR/flower # federation logs and the private FLWR_HOME stay with the run
mkdir -p "$WORK"
export FLWR_HOME=$WORK/flwr-home
read -r -a PORTS <<<"$("$PYTHON" -c 'import sys
from cotune.runtime.flower.deploy import free_port
print(*(free_port() for _ in range(int(sys.argv[1]) + 1)))' "$CLIENTS")"
LINK=${PORTS[0]}

PIDS=()
cleanup() {
    local code=$?
    trap - EXIT INT TERM
    set +m # no job notices
    # SIGTERM to each SuperNode, then the SuperLink: Flower stops its own children (SuperExec, apps);
    # after 10 s, SIGKILL whatever is left in that process group.
    for ((k = ${#PIDS[@]} - 1; k >= 0; k--)); do
        pid=${PIDS[k]}
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [[ -n ${SOCKETS:-} ]] && rm -rf "$SOCKETS"
    echo "stopped the SuperLink and $CLIENTS SuperNode(s)$( ((WORKERS)) && echo " with their node workers"); logs in $WORK" >&2
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --secure: a CA, the SuperLink's certificate, one key pair per SuperNode.
PKI=$WORK/pki
LINK_SECURITY=(--insecure)
NODE_SECURITY=(--insecure)
if ((SECURE)); then
    "$PYTHON" - "$PKI" "$CLIENTS" <<'EOF'
import sys
from pathlib import Path

from cotune.runtime.flower.pki import make_node_keys, make_server_files

make_server_files(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    make_node_keys(Path(sys.argv[1]), f"supernode-{i}")
EOF
    LINK_SECURITY=(--ssl-ca-certfile "$PKI/ca.crt" --ssl-certfile "$PKI/server.crt" --ssl-keyfile "$PKI/server.key"
        --enable-supernode-auth)
fi

# The SuperLink: Fleet, Control and ServerAppIo APIs on one port.
(cd "$ROOT" && exec flower-superlink "${LINK_SECURITY[@]}" --port "$LINK" --disable-runtime-dependency-installation) \
    >"$WORK/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$LINK") 2>/dev/null && break
    kill -0 "${PIDS[0]}" 2>/dev/null || { echo "the SuperLink exited; see $WORK/superlink.log" >&2; exit 1; }
    sleep 0.2
done

# The SuperLink connection `local-deployment` (TLS with --secure) and the run config.
"$PYTHON" - "$FLWR_HOME" "$LINK" "$CONFIG" "$OVERRIDES" "$RUN_DIR" "$SECURE" "$PKI/ca.crt" <<'EOF'
import sys
from pathlib import Path

import tomli_w

home, link, config, overrides, run_dir, secure, ca = sys.argv[1:]
connection = {"address": f"127.0.0.1:{link}"}
connection.update({"root-certificates": ca} if secure == "1" else {"insecure": True})
Path(home, "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "local-deployment", "local-deployment": connection}}))
run_config = {"config": config, "overrides": overrides, "run-dir": run_dir}
Path(home, "run-config.toml").write_text(tomli_w.dumps(run_config))
EOF

# One SuperNode per client: partition-id says which client of the config it is. With --secure, its
# public key is registered first (only registered SuperNodes may connect), and it verifies the CA.
# Node workers: sockets in a private directory under /tmp (a Unix socket path must stay under 108 bytes).
NODE_WORKER=()
if ((WORKERS)); then
    SOCKETS=$(mktemp -d /tmp/cotune-workers-XXXXXX)
fi
for ((i = 0; i < CLIENTS; i++)); do
    if ((WORKERS)); then
        (cd "$ROOT" && exec "$(dirname "$PYTHON")/cotune" flower worker --socket "$SOCKETS/node-$i.sock") \
            >"$WORK/worker-$i.log" 2>&1 &
        PIDS+=($!)
        for _ in $(seq 600); do
            [[ -S $SOCKETS/node-$i.sock ]] && break
            kill -0 "${PIDS[-1]}" 2>/dev/null || { echo "node worker $i exited; see $WORK/worker-$i.log" >&2; exit 1; }
            sleep 0.2
        done
        NODE_WORKER=("worker=\"$SOCKETS/node-$i.sock\"")
    fi
    if ((SECURE)); then
        flwr supernode register "$PKI/supernode-$i.pub" local-deployment >>"$WORK/register.log" 2>&1
        NODE_SECURITY=(--root-certificates "$PKI/ca.crt" --auth-supernode-private-key "$PKI/supernode-$i.key"
            --auth-supernode-public-key "$PKI/supernode-$i.pub")
    fi
    (cd "$ROOT" && exec flower-supernode "${NODE_SECURITY[@]}" --superlink "127.0.0.1:$LINK" --port "${PORTS[i + 1]}" \
        --node-config "partition-id=$i num-partitions=$CLIENTS ${NODE_WORKER[*]}") >"$WORK/supernode-$i.log" 2>&1 &
    PIDS+=($!)
done
MODE=insecure
((SECURE)) && MODE="TLS, SuperNode authentication"
((WORKERS)) && MODE="$MODE, node workers"
echo "SuperLink 127.0.0.1:$LINK ($MODE), $CLIENTS SuperNode(s); run directory $RUN_DIR" >&2
# In the background, so that a signal to this script is handled at once (bash defers traps while a
# foreground command runs); the log is shown as it grows.
flwr run "$ROOT" local-deployment --run-config "$FLWR_HOME/run-config.toml" --stream >"$WORK/flwr-run.log" 2>&1 &
RUN=$!
PIDS+=("$RUN")
tail -n +1 -f --pid="$RUN" "$WORK/flwr-run.log" &
PIDS+=($!)
wait "$RUN"

"$(dirname "$PYTHON")/cotune" flower outcome "$RUN_DIR"
"$(dirname "$PYTHON")/cotune" report "$RUN_DIR"
