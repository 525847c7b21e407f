"""A real Flower deployment on 127.0.0.1: one SuperLink and two SuperNodes (free ports, no runtime
dependency installation), compared with the embedded runtime. Group A's federation is secure (TLS with a
CA made here, only registered nodes admitted): validation trust for one round, and strangers refused.
Group B's is insecure: FLoRA for two rounds through `flwr run`, with a SuperNode stopped after the first
and the run resumed. `cotune run --backend flower` starts a federation of its own for one round of the
tiny FedCoLLM config, its LLM of another tokenizer. Each SuperNode has a node worker (the ClientApp's own
path without one runs on every Ray actor of the simulation tests). Every process started here (and every
child Flower started: SuperExec, ServerApp, ClientApp) is stopped at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

# Before flwr is first imported (it reads these at import time): no telemetry, no update check.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
pytest.importorskip("flwr")

from tests.conftest import tiny_tree
from tests.test_flower import _adapters, _records, max_adapter_diff

from cotune.config import config_from_dict, dump_config, load_config
from cotune.runtime.backends import FlowerOptions
from cotune.runtime.checkpoint import list_checkpoints
from cotune.runtime.experiment import resume_experiment, run_experiment
from cotune.runtime.flower import FlowerRunError
from cotune.runtime.flower.app import write_app_dir
from cotune.runtime.flower.federation import LocalFederation
from cotune.runtime.flower.outcome import check_outcome, run_outcome

pytestmark = pytest.mark.slow
# The tests on the module-scoped federation are split in two xdist groups: each group runs on one worker,
# which starts the federation once for it, and the two groups run side by side (one group of all of them
# was the suite's longest path). The others (each with a federation of its own) go to whichever worker is
# free.
FEDERATION_A = pytest.mark.xdist_group("flower-federation-a")
FEDERATION_B = pytest.mark.xdist_group("flower-federation-b")

ROOT = Path(__file__).resolve().parents[2]

CLIENTS = 2
# Max |adapter difference| allowed between Flower and embedded (observed: 0.0, bit-identical, with
# lora.dropout 0 and one torch thread in every process).
TOLERANCE = 1e-6


def _shared(fed: LocalFederation):
    seen: set[int] = set()
    try:
        fed.start()
        yield fed
        seen = fed.pids()
    finally:
        seen |= fed.pids()
        fed.close()
    assert not _alive(seen), f"processes left running: {_alive(seen)}"


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Group B's: insecure (plain text, any node admitted), as a demo or a private network has it."""
    yield from _shared(LocalFederation(CLIENTS, tmp_path_factory.mktemp("federation")))


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory):
    """Group A's: TLS with a CA made here, and only SuperNodes whose key was registered admitted."""
    yield from _shared(LocalFederation(CLIENTS, tmp_path_factory.mktemp("secure"), secure=True))


def _alive(pids: set[int]) -> list[int]:
    left = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
    return left


def test_every_process_is_stopped_also_when_the_test_fails(tmp_path):
    seen: set[int] = set()
    with pytest.raises(RuntimeError, match="a failing test"), LocalFederation(1, tmp_path) as fed:
        deadline = time.monotonic() + 60
        while len(seen := fed.pids()) < 4 and time.monotonic() < deadline:  # + their SuperExec children
            time.sleep(0.1)
        raise RuntimeError("a failing test")
    assert len(seen) >= 4
    assert not _alive(seen)


def test_a_stopped_supernode_takes_its_worker_along_and_a_restart_leaves_nothing_behind(tmp_path):
    """A node stopped (its machine gone) stops its node worker too; starting it again starts a new one,
    and closing the federation leaves no process of either running."""
    with LocalFederation(1, tmp_path) as fed:
        first = fed.processes["supernode-0-worker"].popen.pid
        fed.stop("supernode-0")
        assert not _alive({first}) and "supernode-0-worker" not in fed.processes
        fed.start_node(0)
        second = fed.processes["supernode-0-worker"].popen.pid
        assert second != first and _alive({second})
        node = fed.processes["supernode-0"].popen
        node.kill()  # the node dies on its own: its entry stays until it is started again
        node.wait()
        fed.start_node(0)
        third = fed.processes["supernode-0-worker"].popen.pid
        assert not _alive({second}) and _alive({third})  # the old worker replaced, the new one kept
        assert fed.processes["supernode-0"].popen.poll() is None
        seen = fed.pids()
    assert not _alive(seen | {first, second, third})


def _cfg(corpus_dir: Path, tmp_path: Path, strategy: str, rounds: int = 2):
    tree = tiny_tree(
        corpus_dir,
        tmp_path,
        federation={"clients": CLIENTS, "rounds": rounds},
        strategy={"name": strategy},
        run={"threads": 1, "eval_every": 2},  # rounds 0 and 2 evaluated: one exchange less per run
    )
    return config_from_dict(tree)


def _run(fed: LocalFederation, cfg, tmp_path: Path, **settings) -> Path:
    run_dir = tmp_path / "flower"
    run_config = {
        "config-yaml": dump_config(cfg),
        "run-dir": str(run_dir),
        "round-timeout": 300.0,
        **settings,
    }
    code = fed.run(write_app_dir(tmp_path / "cotune-flower"), run_config, timeout=900)
    if code != 0 or run_outcome(run_dir).get("event") is None:
        pytest.fail(f"flwr run exited {code}, outcome {run_outcome(run_dir)}\n{fed.logs()}")
    return run_dir


@FEDERATION_A
def test_two_supernodes_give_the_embedded_adapters(secure_federation, corpus_dir, tmp_path):
    """One round of validation trust (every kind of exchange a personalized round has: training, the peers'
    adapters scored, evaluation) through what `cotune run CONFIG --backend flower --superlink HOST:PORT
    --root-certificates CA` calls, over TLS to registered nodes: the embedded run's adapters, trust and
    perplexities. (`flwr run` on the app directory, the other way in, is group B's.)"""
    federation = secure_federation
    cfg = _cfg(corpus_dir, tmp_path, "validation", rounds=1)
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    t0 = time.perf_counter()
    try:
        (run_dir,) = run_experiment(
            cfg,
            tmp_path / "flower",
            backend="flower",
            options=FlowerOptions(superlink=federation.address, root_certificates=federation.ca, timeout=900),
        )
    except FlowerRunError as e:
        pytest.fail(f"{e}\n{federation.logs()}")
    diff = max_adapter_diff(_adapters(embedded), _adapters(run_dir))
    print(
        f"\nvalidation: Flower run {time.perf_counter() - t0:.0f}s, max |adapter diff| vs embedded {diff:.3g}"
    )
    assert diff <= TOLERANCE
    trust = [_records(d, "trust") for d in (embedded, run_dir)]
    assert trust[0] and len(trust[0]) == len(trust[1])
    for a, b in zip(*trust, strict=True):
        torch.testing.assert_close(torch.tensor(a["matrix"]), torch.tensor(b["matrix"]), atol=1e-6, rtol=0)
    ppl = [[r["ppl"] for r in _records(d, "eval")] for d in (embedded, run_dir)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


@FEDERATION_B
def test_a_supernode_that_disconnects_stops_the_run_and_the_run_resumes_exactly(
    federation, corpus_dir, tmp_path
):
    """FLoRA for two rounds on the plain-text federation; supernode-1 is stopped after round 1's checkpoint.
    With min_clients = all, round 2 cannot go on; the node is restarted and `cotune run --resume` ends with
    the uninterrupted embedded run's adapters. FLoRA because its round 2 asks the most of a node: the
    restarted node's new worker rebuilds the base from a freshly loaded model plus the merged history kept on
    its disk (the SuperNode's state-dir)."""
    cfg = _cfg(corpus_dir, tmp_path, "flora", rounds=2)
    (embedded,) = run_experiment(cfg, tmp_path / "embedded")
    run_dir = tmp_path / "flower"

    def disconnect() -> None:
        deadline = time.monotonic() + 600
        while not (run_dir / "checkpoints" / "round-0001").is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        federation.stop("supernode-1")

    killer = threading.Thread(target=disconnect, daemon=True)
    killer.start()
    _run(federation, cfg, tmp_path, **{"round-timeout": 120.0})
    killer.join(5)
    deadline = time.monotonic() + 30  # `flwr run --stream` may end a moment before the ServerApp's last line
    while run_outcome(run_dir).get("last_checkpoint") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    outcome = run_outcome(run_dir)
    assert outcome["event"] == "stopped" and outcome["last_checkpoint"] == 1, outcome
    (fault,) = _records(run_dir, "fault")
    assert (fault["round"], fault["client"]) == (2, 1)
    assert [r for r, _ in list_checkpoints(run_dir)] == [0, 1]
    assert len(_adapters(run_dir)) == CLIENTS
    with pytest.raises(FlowerRunError, match="stopped"):
        check_outcome(run_dir)

    federation.start_node(1)  # the owner brings its node back, with its state-dir
    t0 = time.perf_counter()
    try:
        resume_experiment(run_dir, options=FlowerOptions(superlink=federation.address, timeout=900))
    except FlowerRunError as e:
        pytest.fail(f"{e}\n{federation.logs()}")
    diff = max_adapter_diff(_adapters(embedded), _adapters(run_dir))
    print(f"\nresumed Flower run {time.perf_counter() - t0:.0f}s, max |adapter diff| vs embedded {diff:.3g}")
    assert diff <= TOLERANCE
    assert [r for r, _ in list_checkpoints(run_dir)][-1] == 2
    evals = [_records(d, "eval") for d in (embedded, run_dir)]
    assert [r["round"] for r in evals[0]] == [r["round"] for r in evals[1]]
    assert [r["ppl"] for r in evals[0]] == pytest.approx(
        [r["ppl"] for r in evals[1]], rel=1e-6
    )  # merged base


@FEDERATION_A
def test_a_secure_federation_admits_only_its_members(secure_federation, tmp_path):
    """TLS (a CA made here) and SuperNode authentication on 127.0.0.1: a node with an unregistered key and a
    node without the CA are refused, each after it tried; so is a `flwr` client without the CA; only the
    registered members are online. The members' round over this federation is the other test of its
    group, equal to the embedded run."""
    import json
    import subprocess

    from cotune.runtime.flower.app import CONNECTION, flower_env, write_connection

    fed = secure_federation
    fed.start_node(1, name="stranger", register=False, worker=False)  # its key is not registered
    fed.start_node(1, name="no-ca", tls=False, worker=False)  # plain text to a TLS SuperLink
    plain = tmp_path / "plain-home"  # the Control API refuses a client that does not verify it
    write_connection(plain, fed.address, insecure=True)
    ls = ["flwr", "supernode", "ls", CONNECTION]
    refused = subprocess.Popen(
        ls, env=flower_env(plain), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    tried = {"stranger": "Failed to activate SuperNode", "no-ca": "Connection attempt failed"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        said in (fed.work_dir / f"{name}.log").read_text(errors="replace") for name, said in tried.items()
    ):
        time.sleep(0.2)
    for name, said in tried.items():
        log = (fed.work_dir / f"{name}.log").read_text(errors="replace")
        assert said in log, f"{name} never tried to connect:\n{log[-2000:]}"
        assert "SuperNode ID" not in log  # never admitted

    def online() -> int:
        listed = subprocess.run(
            [*ls, "--format", "json"],
            env=flower_env(fed.flwr_home),
            capture_output=True,
            text=True,
            check=True,
        )
        nodes = json.loads(listed.stdout[listed.stdout.index("{") :])["nodes"]
        return sum(n["status"] == "online" for n in nodes)

    while (count := online()) < CLIENTS and time.monotonic() < deadline:  # the members may still be joining
        time.sleep(0.5)
    assert count == CLIENTS  # the two members only
    assert refused.wait(timeout=60) != 0  # the strangers are stopped with the federation, at the group's end


def test_cli_backend_flower_runs_fedcollm_on_its_own_federation_and_streams_the_rounds(tmp_path, monkeypatch):
    """`cotune run --backend flower` with no SuperLink given starts a local federation of its own (the
    demo), output piped: one round of examples/fedcollm-tiny.yaml (2 clients) with an LLM of another
    tokenizer gives the embedded run's adapters, figures and alignment, the LLM, its LoRA and the vocabulary
    map staying in the ServerApp, and the ServerApp's lines (nodes, rounds) reach the terminal while it runs,
    without colour codes, library warnings or the outcome marker."""
    import subprocess
    import sys

    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "cache"))  # the vocabulary map's, built once
    config = str(ROOT / "examples" / "fedcollm-tiny.yaml")
    overrides = [f"federation.clients={CLIENTS}", "federation.rounds=1", "run.threads=1", "device=cpu"]
    overrides += ["llm.model.tiny.tokenizer=merges"]
    (embedded,) = run_experiment(load_config(config, overrides), tmp_path / "embedded")
    run_dir = tmp_path / "flower"
    cmd = [sys.executable, "-m", "cotune.cli.main", "run", config, *overrides]
    done = subprocess.run(
        [*cmd, "--out", str(run_dir), "--backend", "flower"], capture_output=True, text=True, timeout=600
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert f"{CLIENTS} SuperNode(s) connected" in said and "round 1/1" in said, said[-3000:]
    for noise in ("\x1b[", "cotune-outcome:", "FutureWarning", "warnings.warn"):  # the ServerApp's too
        assert noise not in said, (noise, said[-3000:])
    assert (run_dir / "report.md").is_file()
    ours, theirs = _adapters(embedded, pattern="*"), _adapters(run_dir, pattern="*")
    assert {"client-00", "client-01", "server", "server-llm"} <= set(theirs)
    assert max_adapter_diff(ours, theirs) <= TOLERANCE
    keys = ("round", "model", "client", "acc", "acc_norm")
    mc = [[{k: r[k] for k in keys} for r in _records(d, "mc")] for d in (embedded, run_dir)]
    assert mc[0] == mc[1]
    assert len(_records(run_dir, "distill")) == 1 and len(_records(run_dir, "comm")) == 2
    keys = ("round", "model", "positions", "exact_share", "carried_share", "unmatched_share")
    align = [[{k: r[k] for k in keys} for r in _records(d, "align")] for d in (embedded, run_dir)]
    assert align[0] and align[0] == align[1]  # across tokenizers, on the ServerApp as embedded
