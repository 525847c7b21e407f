"""`cotune audit RUN_DIR`: membership inference on each client's released adapter (runtime/audit.py).

Two tiny runs: one whose adapters are audited before any training (the round-0 checkpoint: the base,
which never saw any document, so members and non-members are exchangeable: AUC near 0.5), and one
whose clients memorise a few training windows (many steps at a high learning rate: AUC near 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tests.conftest import WORDS, tiny_tree

from cotune.cli.main import cli
from cotune.layout import AUDIT_FILE, CHECKPOINTS_DIR

CANARY = "CANARY-7f3a-do-not-print"


def run_tiny(corpus_dir: Path, tmp_path: Path, name: str, **sections) -> Path:
    tree = tiny_tree(corpus_dir, tmp_path, **sections)
    tree["run"] = {**tree["run"], "name": name}
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit) as exit_:
        cli(["run", str(config)])
    assert exit_.value.code == 0
    return Path(tree["run"]["out_dir"]) / name


def audit(run_dir: Path, *options: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        cli(["audit", str(run_dir), *options])
    return int(exit_.value.code or 0)


@pytest.fixture(scope="module")
def untrained(corpus_dir, tmp_path_factory) -> Path:
    """A run cut back to its round-0 checkpoint: every adapter is the LoRA initialisation (B = 0)."""
    tmp = tmp_path_factory.mktemp("untrained")
    run_dir = run_tiny(
        corpus_dir,
        tmp,
        "untrained",
        data={"max_train_windows": 64, "max_test_windows": 64, "test_fraction": 0.5},
        federation={"clients": 2, "rounds": 1, "local_steps": 1, "warmup_steps": 1},
        strategy={"name": "local"},
    )
    for later in sorted((run_dir / CHECKPOINTS_DIR).iterdir())[1:]:
        shutil.rmtree(later)
    return run_dir


@pytest.fixture(scope="module")
def memorised(corpus_dir, tmp_path_factory) -> Path:
    """Each client trains 60 steps at a high learning rate on 4 windows: it memorises them."""
    tmp = tmp_path_factory.mktemp("memorised")
    return run_tiny(
        corpus_dir,
        tmp,
        "memorised",
        model={"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}},
        lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        data={"max_train_windows": 4, "max_test_windows": 16, "test_fraction": 0.3},
        train={"lr": 1e-2},
        federation={"clients": 2, "rounds": 1, "local_steps": 60, "warmup_steps": 1},
        strategy={"name": "local"},
    )


@pytest.mark.slow
def test_an_untrained_model_tells_members_from_non_members_no_better_than_chance(untrained, capsys):
    assert audit(untrained) == 0
    report = json.loads((untrained / AUDIT_FILE).read_text())
    assert report["checkpoint"] == "round-0000"
    for client in report["clients"]:
        assert client["members"] == client["nonmembers"] >= 30
        assert abs(client["loss"]["auc"] - 0.5) < 0.2
        assert client["calibrated"]["auc"] == 0.5  # the adapter is the base: every score ties


@pytest.mark.slow
def test_a_model_that_memorised_its_documents_gives_them_away(memorised, capsys):
    assert audit(memorised) == 0
    report = json.loads((memorised / AUDIT_FILE).read_text())
    assert report["strategy"] == "local" and report["privacy"] is None
    for client in report["clients"]:
        assert client["members"] == client["nonmembers"] == 4
        assert client["loss"]["auc"] > 0.9
        assert client["calibrated"]["auc"] > 0.9
    captured = capsys.readouterr()
    assert "membership inference" in captured.out and AUDIT_FILE in captured.out
    shown = captured.out + captured.err + (memorised / AUDIT_FILE).read_text()
    assert not any(word in shown for words in WORDS.values() for word in words)  # no document text


@pytest.mark.slow
def test_each_client_is_audited_with_its_own_adapter(memorised):
    """The audit loads the base once and switches adapters: client 1's figures are those of client 1's
    adapter loaded on its own (not client 0's, still active), and differ from client 0's on its data."""
    from cotune.data.client_examples import client_data
    from cotune.runtime.audit import audit_client, plan_audit, run_audit
    from cotune.runtime.results import open_tuned

    plan = plan_audit(memorised, 4)
    together = {r.client: r.audit for r in run_audit(plan)}
    alone = open_tuned(memorised, client=1)
    cfg = alone.cfg
    data = client_data(cfg.data, cfg.federation.clients, alone.tokenizer, cfg.run.seed)
    assert audit_client(alone, 1, data.clients[1], 4) == together[1]
    other = open_tuned(memorised, client=0)
    assert audit_client(other, 1, data.clients[1], 4) != together[1]


@pytest.mark.slow
def test_the_reference_is_the_base_without_any_adapter(memorised):
    """The calibrated attack's reference losses are the untrained model's: those of the round-0 adapter
    (the LoRA initialisation, B = 0), not the trained adapter's."""
    import torch

    from cotune.data.client_examples import client_data
    from cotune.evaluation.lm import example_losses
    from cotune.runtime.audit import losses_of
    from cotune.runtime.results import Adapter, open_tuned, switch_adapter

    tuned = open_tuned(memorised, client=0)
    cfg = tuned.cfg
    train = client_data(cfg.data, cfg.federation.clients, tuned.tokenizer, cfg.run.seed).clients[0].train
    rows = torch.arange(len(train))
    losses = losses_of(tuned, train, rows)
    first = sorted((memorised / CHECKPOINTS_DIR).iterdir())[0] / "client-00"
    untrained = switch_adapter(tuned, Adapter(cfg, "client-00", first))
    base = example_losses(untrained.pool.model, train, rows, 4)
    assert torch.allclose(losses.reference, base, rtol=1e-5)
    assert (losses.target < losses.reference).all()  # it memorised every training window


def copied_run(untrained: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the untrained run, its config.yaml changed by `edit` (a function of the tree)."""
    run_dir = tmp_path / "copy"
    shutil.copytree(untrained, run_dir)
    (run_dir / AUDIT_FILE).unlink(missing_ok=True)  # the audit of the untrained run may have written one
    if edit is not None:
        config = run_dir / "config.yaml"
        tree = yaml.safe_load(config.read_text())
        edit(tree)
        config.write_text(yaml.safe_dump(tree))
    return run_dir


def refused(run_dir: Path, capsys, *options: str) -> str:
    """The audit's refusal: exit 2, one error paragraph, no audit.json, no canary."""
    assert audit(run_dir, *options) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and "Traceback" not in captured.err
    assert CANARY not in captured.out + captured.err
    assert not (run_dir / AUDIT_FILE).exists()
    return captured.err


@pytest.mark.slow
def test_a_garbage_data_attacker_is_skipped_and_said_so(untrained, tmp_path, capsys):
    """It trained on random tokens, not on its documents: its row would say nothing about them."""
    attack = {"simulation": {"attack": {"clients": [1], "kind": "garbage_data"}}}
    run_dir = copied_run(untrained, tmp_path, lambda tree: tree.update(attack))
    assert audit(run_dir, "--max-examples", "8") == 0
    assert "client 1 not audited: a simulated garbage_data attacker" in capsys.readouterr().out
    report = json.loads((run_dir / AUDIT_FILE).read_text())
    assert [c["client"] for c in report["clients"]] == [0]
    assert [s["client"] for s in report["skipped"]] == [1]


def test_refuses_what_is_not_a_run_directory(tmp_path, capsys):
    assert "does not exist" in refused(tmp_path / "nowhere", capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text(f"model: [{CANARY}\n")
    assert "not valid YAML" in refused(bad, capsys)


@pytest.mark.slow
def test_refuses_a_run_without_adapters(untrained, tmp_path, capsys):
    run_dir = copied_run(untrained, tmp_path)
    shutil.rmtree(run_dir / CHECKPOINTS_DIR)
    assert "no intact checkpoint" in refused(run_dir, capsys)


@pytest.mark.slow
def test_refuses_a_run_without_held_out_documents(untrained, tmp_path, capsys):
    run_dir = copied_run(untrained, tmp_path, lambda tree: tree["data"].update(test_fraction=0.0))
    assert "data.test_fraction 0" in refused(run_dir, capsys)


@pytest.mark.slow
def test_refuses_a_run_whose_data_cannot_be_rebuilt(untrained, corpus_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    (corpus / "alpha" / "zzz.txt").write_bytes(CANARY.encode() + b"\xff\xfe not UTF-8")
    run_dir = copied_run(untrained, tmp_path, lambda tree: tree["data"].update(path=str(corpus)))
    assert "zzz.txt" in refused(run_dir, capsys)
    (corpus / "alpha" / "zzz.txt").unlink()
    shutil.rmtree(corpus / "beta")
    shutil.rmtree(corpus / "alpha")
    shutil.rmtree(corpus / "gamma")
    shutil.rmtree(corpus / "delta")
    assert "data" in refused(run_dir, capsys)


@pytest.mark.slow
def test_refuses_a_run_on_a_flower_deployment(untrained, tmp_path, capsys):
    run_dir = copied_run(untrained, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    for line in lines:
        if line.get("type") == "run" and line.get("event") == "start":
            line["backend"] = "flower"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert "Flower deployment" in refused(run_dir, capsys)


def test_refuses_a_fedcollm_run(tmp_path, capsys):
    run_dir = tmp_path / "fedcollm"
    run_dir.mkdir()
    shutil.copy(
        Path(__file__).resolve().parents[1] / "examples" / "fedcollm-tiny.yaml", run_dir / "config.yaml"
    )
    assert "FedCoLLM-family run" in refused(run_dir, capsys)


@pytest.mark.slow
def test_refuses_no_examples(untrained, capsys):
    assert audit(untrained, "--max-examples", "0") == 2


@pytest.mark.slow
def test_audits_generation_data_without_quoting_it(tmp_path, capsys):
    """Generation examples (data.kind generation): members and non-members are the clients' training and
    test examples, scored on their response tokens; none of their text reaches the output or audit.json."""
    from tests.test_personalized_generation import CANARY as PLANTED
    from tests.test_personalized_generation import gen_tree

    tree = gen_tree(
        tmp_path,
        data={"test_fraction": 0.3, "max_test_windows": 4},
        federation={"rounds": 1, "local_steps": 1, "warmup_steps": 1},
        strategy={"name": "fedavg"},
    )
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit) as exit_:
        cli(["run", str(config)])
    assert exit_.value.code == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "g"
    assert audit(run_dir) == 0
    captured = capsys.readouterr()
    report = (run_dir / AUDIT_FILE).read_text()
    assert PLANTED not in captured.out + captured.err + report
    clients = json.loads(report)["clients"]
    assert len(clients) == 4 and all(c["members"] == c["nonmembers"] >= 1 for c in clients)
