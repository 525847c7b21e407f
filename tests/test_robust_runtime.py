"""Bad updates, client faults, attackers, robust aggregation and DP through the embedded runtimes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file is a fixture)

from cotune.algorithms.robust import state_norm, update_delta
from cotune.config import config_from_dict
from cotune.reporting.metrics import read_metrics
from cotune.runtime import simulated
from cotune.runtime.checkpoint import latest_checkpoint, list_checkpoints
from cotune.runtime.experiment import run_experiment
from cotune.runtime.quorum import TooFewClients


def _run(corpus_dir, tmp_path, **sections):
    (run_dir,) = run_experiment(config_from_dict(tiny_tree(corpus_dir, tmp_path, **sections)))
    return run_dir


def _records(run_dir, kind, **match):
    return [
        m
        for m in read_metrics(run_dir / "metrics.jsonl")
        if m["type"] == kind and all(m.get(k) == v for k, v in match.items())
    ]


def _adapters(run_dir, round_=None):
    found = dict(list_checkpoints(run_dir))
    path = found[round_] if round_ is not None else latest_checkpoint(run_dir)[1]
    return {p.name: load_file(str(p / "adapter_model.safetensors")) for p in sorted(path.glob("client-*"))}


def _finite(state):
    return all(torch.isfinite(t).all() for t in state.values())


def _poison(monkeypatch, make):
    """Client(s) of simulation.attack upload make(upload) instead of the honest update."""
    monkeypatch.setattr(simulated, "attacked", lambda cfg, r, k, upload, ref: make(upload))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda u: {k: torch.full_like(v, float("nan")) for k, v in u.items()}, "non-finite"),
        (lambda u: {k: v.clone().fill_(float("inf")) for k, v in u.items()}, "non-finite"),
        (lambda u: {**u, "extra.lora_A.weight": torch.zeros(2, 2)}, "unexpected key"),
        (lambda u: {k: v[..., :1].clone() for k, v in u.items()}, "has shape"),
    ],
    ids=["nan", "inf", "wrong-key", "wrong-shape"],
)
def test_a_bad_update_is_rejected_logged_and_the_round_goes_on(
    corpus_dir, tmp_path, monkeypatch, make, reason
):
    _poison(monkeypatch, make)
    run_dir = _run(corpus_dir, tmp_path, simulation={"attack": {"clients": [1], "kind": "scale"}})
    rejected = _records(run_dir, "fault", event="update_rejected")
    assert [(m["round"], m["client"]) for m in rejected] == [(1, 1), (2, 1)]
    assert all(reason in m["reason"] for m in rejected)
    trust = _records(run_dir, "trust")
    assert len(trust) == 2 and all(m["participants"] == [0, 2, 3] for m in trust)
    assert all(m["matrix"][1] == [0.0, 1.0, 0.0, 0.0] for m in trust)  # client 1 kept its own adapter
    adapters = _adapters(run_dir)
    assert all(_finite(a) for a in adapters.values())
    honest = [adapters[f"client-0{i}"] for i in (0, 2, 3)]
    assert all(torch.equal(honest[0][k], h[k]) for h in honest for k in h)  # fedavg among the honest
    assert len(_records(run_dir, "eval", round=2, split="test")) == 4


def test_an_update_above_the_norm_bound_is_rejected(corpus_dir, tmp_path):
    run_dir = _run(
        corpus_dir,
        tmp_path,
        simulation={"attack": {"clients": [3], "kind": "scale", "scale": 1000.0}},
        robustness={"max_update_norm": 5.0},
    )
    rejected = _records(run_dir, "fault", event="update_rejected")
    assert {m["client"] for m in rejected} == {3}
    assert all("exceeds max_update_norm 5" in m["reason"] for m in rejected)


def test_a_client_that_raises_is_dropped_and_the_round_proceeds_above_min_clients(corpus_dir, tmp_path):
    run_dir = _run(
        corpus_dir,
        tmp_path,
        federation={"min_clients": 3},
        simulation={"faults": [{"client": 2, "rounds": [1], "kind": "error"}]},
    )
    dropped = _records(run_dir, "fault", event="client_dropped")
    assert [(m["round"], m["client"]) for m in dropped] == [(1, 2)]
    assert "SimulatedFault" in dropped[0]["reason"]
    trust = _records(run_dir, "trust")
    assert trust[0]["participants"] == [0, 1, 3] and trust[1]["participants"] == [
        0,
        1,
        2,
        3,
    ]  # back in round 2
    assert {m["client"] for m in _records(run_dir, "train", round=1)} == {0, 1, 3}
    assert _records(run_dir, "run", event="end")


def test_a_client_over_the_time_limit_is_dropped(corpus_dir, tmp_path):
    run_dir = _run(
        corpus_dir,
        tmp_path,
        federation={"min_clients": 2, "client_timeout": 60.0},
        simulation={"faults": [{"client": 0, "rounds": [2], "kind": "delay", "seconds": 120.0}]},
    )
    dropped = _records(run_dir, "fault", event="client_dropped")
    assert [(m["round"], m["client"]) for m in dropped] == [(2, 0)]
    assert "over federation.client_timeout 60s" in dropped[0]["reason"]


def test_too_few_clients_stop_the_run_with_the_last_checkpoint_intact(corpus_dir, tmp_path):
    cfg = config_from_dict(
        tiny_tree(
            corpus_dir,
            tmp_path,
            federation={"min_clients": 3},
            simulation={"faults": [{"client": c, "rounds": [2], "kind": "error"} for c in (0, 1)]},
        )
    )
    with pytest.raises(TooFewClients, match=r"only 2 of 4 clients answered, federation\.min_clients is 3"):
        run_experiment(cfg)
    run_dir = tmp_path / "runs" / "t"
    assert latest_checkpoint(run_dir)[0] == 1
    assert _records(run_dir, "run", event="stopped")
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
def test_robust_aggregators_resist_a_scaled_attacker(corpus_dir, tmp_path, aggregator):
    attack = {"attack": {"clients": [0], "kind": "scale", "scale": 1e4}}
    plain = _run(corpus_dir, tmp_path / "mean", simulation=attack)
    robust = _run(
        corpus_dir,
        tmp_path / "robust",
        simulation=attack,
        robustness={"aggregator": aggregator, "trim_fraction": 0.25},
    )
    assert all(m["aggregator"] == aggregator for m in _records(robust, "trust"))
    start = _adapters(robust, 1)["client-01"]
    end_plain, end_robust = _adapters(plain, 2)["client-01"], _adapters(robust, 2)["client-01"]
    # the honest clients' round-2 update stays at the honest scale only with the robust aggregator
    assert state_norm(update_delta(end_robust, start)) < 1.0 < state_norm(update_delta(end_plain, start))


def test_garbage_data_attacker_trains_on_random_tokens(corpus_dir, tmp_path, monkeypatch):
    from cotune.runtime import embedded

    made = []
    real = embedded.personalized_works

    def factory(cfg, pool, data, device, decoding=None, memo=None):
        made.append((real(cfg, pool, data, device, decoding, memo), data))
        return made[-1][0]

    monkeypatch.setattr(embedded, "personalized_works", factory)
    run_dir = _run(
        corpus_dir,
        tmp_path,
        strategy={"name": "local"},
        simulation={"attack": {"clients": [2], "kind": "garbage_data"}},
    )
    works, data = made[0]
    vocab = {w.index: len(torch.unique(w.learner.data)) for w in works}
    assert vocab[2] > 200 and all(vocab[c] < 40 for c in (0, 1, 3))  # random ids vs a few letters
    assert torch.equal(works[2].val, data.clients[2].val)  # its validation data is clean
    assert len(torch.unique(data.clients[2].train)) < 40  # the shared dataset was not modified
    loss = {m["client"]: m["loss"] for m in _records(run_dir, "train", round=2)}
    assert loss[2] > max(loss[c] for c in (0, 1, 3))


def test_dp_clips_every_update_adds_calibrated_noise_and_logs_epsilon(corpus_dir, tmp_path):
    clip = 1e-3
    no_noise = _run(
        corpus_dir,
        tmp_path / "a",
        privacy={"clip_norm": clip, "noise_multiplier": 0.0},
        federation={"rounds": 3},
    )
    # fedavg: all clients share the adapter after round 1; each later round moves it by <= clip
    for r in (2, 3):
        before, after = _adapters(no_noise, r - 1)["client-00"], _adapters(no_noise, r)["client-00"]
        assert state_norm(update_delta(after, before)) <= clip * (1 + 1e-4)
    clips = _records(no_noise, "privacy", event="clip")
    assert len(clips) == 3 and all(max(m["update_norms"]) > clip for m in clips)
    assert all(m["epsilon"] is None for m in _records(no_noise, "privacy", event="spent"))

    sigma = 2.0
    noisy = _run(
        corpus_dir,
        tmp_path / "b",
        privacy={"clip_norm": clip, "noise_multiplier": sigma, "seed": 0},
        federation={"rounds": 3},
    )
    spent = _records(noisy, "privacy", event="spent")
    eps = [m["epsilon"] for m in spent]
    assert [m["round"] for m in spent] == [1, 2, 3] and eps[0] < eps[1] < eps[2]
    # the round-3 change = mean of 4 clipped updates (norm <= clip) + N(0, (sigma * clip / 4)^2)
    before, after = _adapters(noisy, 2)["client-00"], _adapters(noisy, 3)["client-00"]
    delta = update_delta(after, before)
    numel = sum(t.numel() for t in delta.values())
    expected = sigma * clip / 4 * numel**0.5
    assert 0.8 * expected - clip < state_norm(delta) < 1.2 * expected + clip


def test_dp_with_a_trust_strategy_noises_each_upload(corpus_dir, tmp_path):
    run_dir = _run(
        corpus_dir,
        tmp_path,
        strategy={"name": "local"},
        privacy={"clip_norm": 1e-3, "noise_multiplier": 1.0, "seed": 1},
    )
    spent = _records(run_dir, "privacy", event="spent")
    assert len(spent) == 2 and spent[0]["noise"] == "on each clipped upload"


def test_fedcollm_drops_rejects_and_aggregates_robustly(task_file, tmp_path, monkeypatch):  # noqa: F811
    _poison(monkeypatch, lambda u: {k: torch.full_like(v, float("nan")) for k, v in u.items()})
    t = tree(
        task_file,
        tmp_path,
        "fedavg",
        federation={"clients": 4, "min_clients": 2},
        robustness={"aggregator": "median"},
        simulation={
            "attack": {"clients": [3], "kind": "noise"},
            "faults": [{"client": 1, "rounds": [2], "kind": "error"}],
        },
    )
    (run_dir,) = run_experiment(config_from_dict(t))
    assert [(m["round"], m["client"]) for m in _records(run_dir, "fault", event="client_dropped")] == [(2, 1)]
    assert [(m["round"], m["client"]) for m in _records(run_dir, "fault", event="update_rejected")] == [
        (1, 3),
        (2, 3),
    ]
    server = load_file(str(latest_checkpoint(run_dir)[1] / "server" / "adapter_model.safetensors"))
    assert _finite(server)
    assert _records(run_dir, "run", event="end")


def test_fedcollm_with_dp_logs_privacy_spent(task_file, tmp_path):  # noqa: F811
    t = tree(task_file, tmp_path, "fedavg", privacy={"clip_norm": 0.01, "noise_multiplier": 1.0, "seed": 0})
    (run_dir,) = run_experiment(config_from_dict(t))
    spent = _records(run_dir, "privacy", event="spent")
    assert [m["round"] for m in spent] == [1, 2] and spent[1]["epsilon"] > spent[0]["epsilon"] > 0


def test_the_cli_reports_a_stopped_run_without_a_traceback(corpus_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from cotune.cli.main import app

    faults = [{"client": c, "rounds": [2], "kind": "error"} for c in (0, 1)]
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            tiny_tree(corpus_dir, tmp_path, federation={"min_clients": 3}, simulation={"faults": faults})
        )
    )
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert result.exit_code == 3, result.output
    assert "only 2 of 4 clients answered" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert latest_checkpoint(tmp_path / "r")[0] == 1


def test_a_simulated_inflated_claim_is_rejected_and_changes_nothing(task_file, tmp_path):  # noqa: F811
    """A client claiming 10^9 examples would own FedAvg; the server uses its part's real size."""
    honest = run_experiment(config_from_dict(tree(task_file, tmp_path, "fedavg")), tmp_path / "honest")[0]
    attack = {"attack": {"clients": [2], "kind": "inflated_claim"}}
    lied = run_experiment(
        config_from_dict(tree(task_file, tmp_path, "fedavg", simulation=attack)), tmp_path / "lied"
    )[0]
    (claim,) = _records(lied, "fault", event="claim_rejected")
    assert claim["client"] == 2 and claim["reason"].startswith("claimed 1000000000 examples")
    server = [
        load_file(str(latest_checkpoint(d)[1] / "server" / "adapter_model.safetensors"))
        for d in (honest, lied)
    ]
    assert all(torch.equal(server[0][k], server[1][k]) for k in server[0])
