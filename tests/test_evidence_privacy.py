"""Protected trust evidence (issue 33 item 4): prediction trust's uploaded top-k logits clipped and
noised by the client (`privacy.evidence_clip`, `privacy.evidence_noise_multiplier`), the accountant
charging that release with the adapters' (`algorithms.privacy`, `runtime.pipeline.log_spent`)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file  # noqa: F401  (a fixture)
from tests.test_cotuning import tree as fedcollm_tree

from cotune.algorithms.privacy import (
    EvidenceProtection,
    clip_positions,
    composed_noise_multiplier,
    epsilon_spent,
    protect_topk,
)
from cotune.cli.main import cli
from cotune.config import config_from_dict
from cotune.reporting.metrics import read_metrics
from cotune.runtime import personalized
from cotune.runtime.client import top_values
from cotune.runtime.experiment import run_experiment


def _records(run_dir, kind, **match):
    return [
        m
        for m in read_metrics(run_dir / "metrics.jsonl")
        if m["type"] == kind and all(m.get(k) == v for k, v in match.items())
    ]


# ---- the mechanism, by hand ---------------------------------------------------------------------------
def test_each_position_is_centred_then_clipped_to_the_bound():
    values = torch.tensor([[[13.0, 10.0, 10.0, 7.0], [5.1, 5.0, 5.0, 4.9]]])  # (1, 2, k=4)
    out = clip_positions(values, 3.0)
    # position 0: centred [3, 0, 0, -3], norm sqrt(18) > 3: scaled by 3 / sqrt(18)
    assert torch.allclose(out[0, 0], torch.tensor([3.0, 0.0, 0.0, -3.0]) * 3 / math.sqrt(18))
    # position 1: centred [0.1, 0, 0, -0.1], norm 0.141 <= 3: only centred
    assert torch.allclose(out[0, 1], torch.tensor([0.1, 0.0, 0.0, -0.1]), atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.zeros(1, 2), atol=1e-6)


def test_a_release_is_clipped_to_the_bound_in_equal_shares_of_its_positions():
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 4) * 10, torch.randn(1, 3, 4) * 10]  # P = 10 + 3 = 13 positions
    clip = 2.0
    out = protect_topk(batches, clip, noise_multiplier=0.0)
    share = clip / math.sqrt(13)
    for v in out:
        assert (torch.linalg.vector_norm(v, dim=-1) <= share * (1 + 1e-5)).all()
        assert torch.allclose(torch.linalg.vector_norm(v, dim=-1), torch.full(v.shape[:-1], share))
    total = math.sqrt(sum(float((v**2).sum()) for v in out))
    assert total == pytest.approx(clip, rel=1e-5)  # every position was larger than its share


def test_the_noise_std_is_the_multiplier_times_the_release_bound():
    sigma, clip = 0.7, 3.0
    zeros = [torch.zeros(50, 100, 40)]  # clipping leaves zeros: what is left is the noise alone
    (out,) = protect_topk(zeros, clip, sigma, torch.Generator().manual_seed(0))
    assert float(out.std()) == pytest.approx(sigma * clip, rel=0.01)
    assert float(out.mean()) == pytest.approx(0.0, abs=0.01)


def test_the_support_is_the_base_models_top_k_and_the_values_the_adapters():
    adapter = torch.tensor([[[0.0, 5.0, 1.0, 9.0]]])
    base = torch.tensor([[[4.0, 3.0, 0.0, -1.0]]])
    values, indices = top_values(adapter, 2, base)
    assert indices.tolist() == [[[0, 1]]] and values.tolist() == [[[0.0, 5.0]]]
    values, indices = top_values(adapter, 2)  # unprotected: the adapter's own top-k
    assert indices.tolist() == [[[3, 1]]] and values.tolist() == [[[9.0, 5.0]]]


# ---- the accountant -----------------------------------------------------------------------------------
def test_two_gaussian_releases_compose_into_one_of_the_combined_multiplier():
    assert composed_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert composed_noise_multiplier(2.0, 4.0) == pytest.approx((1 / 4 + 1 / 16) ** -0.5)
    assert composed_noise_multiplier(2.0) == 2.0
    assert composed_noise_multiplier(1.0, 0.0) == 0.0  # one release without noise: no guarantee
    # q = 1: the RDP accountant composing both mechanisms over the rounds gives the same epsilon
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.5, 1.0, 5), (3.0, 1.0, 5)]
    by_hand = accountant.get_epsilon(delta=1e-5)
    assert epsilon_spent(composed_noise_multiplier(1.5, 3.0), 1.0, 5, 1e-5) == pytest.approx(
        by_hand, rel=1e-6
    )


# ---- in a run -----------------------------------------------------------------------------------------
def _tree(corpus_dir, tmp_path, **privacy):
    return tiny_tree(
        corpus_dir,
        tmp_path,
        strategy={"name": "prediction", "logits_topk": 8},
        federation={"rounds": 2},
        privacy=privacy,
    )


def test_the_accounted_epsilon_includes_the_evidence_release(corpus_dir, tmp_path):
    sa, se, delta = 2.0, 3.0, 1e-5
    cfg = config_from_dict(
        _tree(corpus_dir, tmp_path, clip_norm=1.0, noise_multiplier=sa, evidence_clip=5.0,
              evidence_noise_multiplier=se, seed=0)
    )  # fmt: skip
    (run_dir,) = run_experiment(cfg)
    spent = _records(run_dir, "privacy", event="spent")
    assert [m["round"] for m in spent] == [1, 2]
    for m in spent:
        r = m["round"]
        adapters_alone = epsilon_spent(sa, 1.0, r, delta)
        assert m["epsilon"] == pytest.approx(epsilon_spent((sa**-2 + se**-2) ** -0.5, 1.0, r, delta))
        assert m["epsilon"] > adapters_alone * 1.05  # the evidence is charged, not left out
        assert m["evidence_epsilon"] == pytest.approx(epsilon_spent(se, 1.0, r, delta))
        assert (m["evidence_clip"], m["evidence_noise_multiplier"]) == (5.0, se)
        assert "evidence" in m["noise"]


def test_protected_evidence_alone_logs_its_epsilon_and_an_unbounded_total(corpus_dir, tmp_path, capsys):
    tree = _tree(corpus_dir, tmp_path, evidence_clip=5.0, evidence_noise_multiplier=1.0)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit) as exit_:
        cli(["run", str(config)])
    assert exit_.value.code == 0
    assert "warning" not in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "t"
    (last,) = _records(run_dir, "privacy", event="spent", round=2)
    assert last["epsilon"] is None  # the adapters go without DP
    assert last["evidence_epsilon"] == pytest.approx(epsilon_spent(1.0, 1.0, 2, 1e-5))
    section = (run_dir / "report.md").read_text().split("## Differential privacy", 1)[1]
    assert f"| {last['evidence_epsilon']:.2f} |" in section


def test_what_the_server_receives_is_on_one_support_clipped_and_seeded(corpus_dir, tmp_path, monkeypatch):
    seen: list[list] = []
    real = personalized.prediction_distance

    def spy(predictions, k):
        seen.append(predictions)
        return real(predictions, k)

    monkeypatch.setattr(personalized, "prediction_distance", spy)
    clip = 4.0
    cfg = config_from_dict(_tree(corpus_dir, tmp_path / "a", evidence_clip=clip))
    run_experiment(cfg)
    for predictions in seen:
        first = predictions[0].topk
        positions = sum(v.numel() // v.shape[-1] for v, _ in first)
        for p in predictions:  # the base model's tokens: the same for every client, whatever its adapter
            assert all(torch.equal(i, j) for (_, i), (_, j) in zip(p.topk, first, strict=True))
            for v, _ in p.topk:
                assert (torch.linalg.vector_norm(v, dim=-1) <= clip / math.sqrt(positions) * (1 + 1e-5)).all()
        assert any(not torch.equal(p.topk[0][0], first[0][0]) for p in predictions[1:])  # the values differ

    def noised(out):
        seen.clear()
        (run_dir,) = run_experiment(
            config_from_dict(
                _tree(corpus_dir, out, evidence_clip=clip, evidence_noise_multiplier=1.0, seed=3)
            )
        )
        return [[v for v, _ in p.topk] for p in seen[0]], _records(run_dir, "trust")

    (a, trust_a), (b, trust_b) = noised(tmp_path / "b"), noised(tmp_path / "c")
    assert all(torch.equal(x, y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))
    assert [r["matrix"] for r in trust_a] == [r["matrix"] for r in trust_b]  # privacy.seed reproduces it


def test_off_there_is_no_protection_and_on_it_is_the_configured_one(corpus_dir, tmp_path):
    cfg = config_from_dict(_tree(corpus_dir, tmp_path))
    assert EvidenceProtection.of(cfg) is None
    assert EvidenceProtection.of(config_from_dict(_tree(corpus_dir, tmp_path, evidence_clip=1.0))) == (
        EvidenceProtection(1.0, 0.0, None)
    )


def test_a_compare_sibling_that_uploads_no_logits_is_saved_without_the_protection(corpus_dir, tmp_path):
    from cotune.runtime.results import run_config

    privacy = {"evidence_clip": 1.0, "evidence_noise_multiplier": 1.0, "seed": 2}
    tree = tiny_tree(corpus_dir, tmp_path, strategy={"name": "prediction"}, run={"compare": ["fedavg"]})
    cfg = config_from_dict({**tree, "privacy": privacy})
    main, sibling = run_experiment(cfg)
    assert run_config(main).privacy.evidence_clip == 1.0
    saved = run_config(sibling)  # its config.yaml validates: a resume or an audit can read it
    assert saved.strategy.name == "fedavg" and not saved.privacy.protects_evidence
    assert saved.privacy.seed is None and _records(sibling, "privacy") == []


# ---- refusals at the CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sections", "says"),
    [
        ({"strategy": {"name": "validation"}, "privacy": {"evidence_clip": 1.0}}, "upload(s) none"),
        (
            {
                "strategy": {"name": "fedavg"},
                "run": {"compare": ["local"]},
                "privacy": {"evidence_clip": 1.0},
            },
            "fedavg, local upload(s) none",
        ),
        (
            {"strategy": {"name": "prediction"}, "privacy": {"evidence_noise_multiplier": 1.0}},
            "privacy.evidence_noise_multiplier needs privacy.evidence_clip",
        ),
        (
            {"strategy": {"name": "prediction"}, "privacy": {"evidence_clip": 1.0, "delta": 0.5}},
            "privacy.delta 0.5",
        ),
    ],
)
def test_a_meaningless_evidence_setting_is_refused_before_any_model_loads(
    corpus_dir, tmp_path, capsys, sections, says
):
    tree = tiny_tree(corpus_dir, tmp_path, **sections)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit) as exit_:
        cli(["run", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and says in err and "Traceback" not in err


def test_the_fedcollm_family_uploads_no_logits_to_protect(task_file, tmp_path, capsys):  # noqa: F811
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(fedcollm_tree(task_file, tmp_path, privacy={"evidence_clip": 1.0})))
    with pytest.raises(SystemExit) as exit_:
        cli(["run", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "(FedCoLLM family) uploads none" in err


# ---- the audit of the evidence ------------------------------------------------------------------------
def test_the_attacker_reads_the_loss_of_the_true_tokens_off_the_uploaded_top_k():
    from cotune.evaluation.membership_inference import evidence_losses

    values = torch.tensor([[[2.0, 1.0, 0.0], [3.0, 3.0, 3.0], [1.0, 0.0, -1.0]]])  # (1, 3 positions, k=3)
    indices = torch.tensor([[[7, 4, 9], [1, 2, 3], [5, 6, 8]]])
    targets = torch.tensor([[4, 0, -100]])  # position 1's target is not among its k; position 2 unscored
    logz = math.log(math.exp(2) + math.exp(1) + 1)
    first = logz - 1.0  # -log softmax at token 4 (value 1)
    second = math.log(3)  # not sent: the smallest value stands in for it (all equal: log 3)
    got = evidence_losses(values, indices, targets)
    assert got.tolist() == pytest.approx([(first + second) / 2])
    assert math.isnan(float(evidence_losses(values, indices, torch.full((1, 3), -100))[0]))


def test_the_rank_attack_reads_the_true_tokens_rank_whatever_the_scale():
    from cotune.evaluation.membership_inference import evidence_ranks

    values = torch.tensor([[[2.0, 1.0, 0.0], [3.0, 3.0, 1.0], [1.0, 0.0, -1.0]]])
    indices = torch.tensor([[[7, 4, 9], [1, 2, 3], [5, 6, 8]]])
    targets = torch.tensor([[4, 2, 0]])  # rank 2; rank 1 (a tie at the top); not sent: 0
    expected = (1 / 2 + 1 + 0) / 3
    assert evidence_ranks(values, indices, targets).tolist() == pytest.approx([expected])
    clipped = clip_positions(values, 0.01)  # centred and rescaled: the same ranks
    assert evidence_ranks(clipped, indices, targets).tolist() == pytest.approx([expected])


@pytest.fixture(scope="module")
def memorised_predictions(corpus_dir, tmp_path_factory):
    """Two clients that memorise their 8 training windows (prediction trust keeping each to itself,
    `selection: topk`, `topk: 1`) and protect their evidence with sigma_e = 1 (seeded)."""
    tmp = tmp_path_factory.mktemp("memorised-evidence")
    tree = tiny_tree(
        corpus_dir,
        tmp,
        model={"tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}},
        lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        data={"max_train_windows": 8, "max_test_windows": 16, "test_fraction": 0.3},
        train={"lr": 1e-2},
        federation={"clients": 2, "rounds": 1, "local_steps": 80, "warmup_steps": 1},
        strategy={"name": "prediction", "selection": "topk", "topk": 1, "logits_topk": 16},
        privacy={"evidence_clip": 1.0, "evidence_noise_multiplier": 1.0, "seed": 0},
    )
    config = tmp / "c.yaml"
    config.write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit) as exit_:
        cli(["run", str(config)])
    assert exit_.value.code == 0
    return tmp / "runs" / "t"


@pytest.mark.slow
def test_the_audit_finds_members_in_unprotected_evidence_and_not_in_protected(memorised_predictions, capsys):
    import json

    from cotune.layout import AUDIT_FILE

    run_dir = memorised_predictions
    with pytest.raises(SystemExit) as exit_:
        cli(["audit", str(run_dir)])
    assert exit_.value.code == 0
    report = json.loads((run_dir / AUDIT_FILE).read_text())
    assert report["evidence"]["protection"] == {"evidence_clip": 1.0, "evidence_noise_multiplier": 1.0}
    for client in report["clients"]:
        evidence = client["evidence"]
        assert evidence["members"] == evidence["nonmembers"] == 8
        assert client["loss"]["auc"] > 0.9  # the adapter memorised its windows
        for attack in ("loss", "rank"):
            sent, kept = evidence["unprotected"][attack]["auc"], evidence["protected"][attack]["auc"]
            assert sent > 0.9  # its uploaded logits give its windows away
            assert abs(kept - 0.5) < 0.25 and kept < sent - 0.2  # protected: near a coin
    out = capsys.readouterr().out
    assert "uploaded top-k logits" in out
