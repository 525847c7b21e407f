"""FedCoLLM's server validation split (carved from D_a) and the distillation controls that use it."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tests.test_cotuning import records, task_file, tree  # noqa: F401  (task_file is a fixture)

from cotune.algorithms.distillation import answer_positions, choice_logits, kd_kl_choices
from cotune.config import ConfigError, config_from_dict
from cotune.data.corpora import DataError
from cotune.data.task_data import build_task_data, encode
from cotune.models.tiny import byte_tokenizer
from cotune.reporting.metrics import load_runs
from cotune.reporting.report import distill_time_rows, distill_val_rows, write_report
from cotune.runtime import fedcollm
from cotune.runtime.experiment import run_experiment
from cotune.runtime.fedcollm import ValScore, ValTrack, choice_nll
from cotune.training.divergence import TrainingDiverged


def _rows(enc):
    return {
        tuple(ids[mask.bool()].tolist()) for ids, mask in zip(enc.input_ids, enc.attention_mask, strict=True)
    }


def _key(r):
    return (r["acc"], -r["nll"])


def test_the_validation_split_comes_from_the_public_set_only(task_file):  # noqa: F811
    cfg = config_from_dict(tree(task_file, task_file.parent)).task
    tok = byte_tokenizer()
    plain = build_task_data(cfg, 3, tok, 0)
    held = build_task_data(cfg, 3, tok, 0, public_val_fraction=0.3)
    public = plain.splits.public
    n_val = round(0.3 * len(public))
    assert len(held.public_val) == n_val > 0 and len(held.public) == len(public) - n_val
    assert set(held.public_val) <= set(public)
    # nobody trains on it: not in what the server distils on, nor in the centralized union
    assert len(held.union) == len(plain.union) - n_val
    val_rows = _rows(encode(tok, held.public_val, cfg.max_length))
    assert len(val_rows) == n_val and not val_rows & _rows(held.public) and not val_rows & _rows(held.union)
    # the clients' data and the test split do not depend on it
    assert held.test == plain.test
    for a, b in zip(held.clients, plain.clients, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)


def test_a_validation_fraction_that_leaves_nothing_is_refused(task_file):  # noqa: F811
    cfg = config_from_dict(tree(task_file, task_file.parent)).task
    with pytest.raises(DataError, match=r"val_fraction 0\.99"):
        build_task_data(cfg, 3, byte_tokenizer(), 0, public_val_fraction=0.99)


def test_validation_settings_without_a_split_are_config_errors(task_file, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match=r"keep 'best'.*val_fraction"):
        config_from_dict(tree(task_file, tmp_path, distill={"keep": "best", "val_fraction": 0.0}))
    with pytest.raises(ConfigError, match="val_every needs a validation split"):
        config_from_dict(
            tree(task_file, tmp_path, distill={"val_every": 2, "val_fraction": 0.0, "keep": "last"})
        )
    with pytest.raises(ConfigError, match="val_fraction"):
        config_from_dict(tree(task_file, tmp_path, distill={"val_fraction": 1.0}))
    with pytest.raises(ConfigError, match="slm_lr"):
        config_from_dict(tree(task_file, tmp_path, distill={"slm_lr": 0.0}))


@pytest.mark.slow
def test_both_models_are_scored_along_each_rounds_distillation(task_file, tmp_path):  # noqa: F811
    cfg = tree(task_file, tmp_path, distill={"val_fraction": 0.3, "val_every": 2, "keep": "last"})
    (run_dir,) = run_experiment(config_from_dict(cfg))
    val = records(run_dir, "distill_val")
    steps = records(run_dir, "distill")[0]["step"]
    assert steps == 3  # 13 public examples left for distillation, batches of 6
    for r in (1, 2):
        for model in ("slm", "llm"):
            assert [v["step"] for v in val if v["round"] == r and v["model"] == model] == [0, 2, 3]
    assert all(v["n"] == 5 and 0 <= v["acc"] <= 1 and v["nll"] > 0 for v in val)
    assert all(d["slm_kept"] is None and d["llm_kept"] is None for d in records(run_dir, "distill"))
    # the report shows the curves: a row per round and model, and the plot
    report = write_report([run_dir]).read_text()
    assert "## Co-tuning: server validation along distillation" in report
    assert (run_dir / "plots" / "distill_validation.png").is_file()
    _, rows = distill_val_rows(load_runs([run_dir]))
    assert [(r[1], r[2]) for r in rows] == [("1", "SLM"), ("1", "LLM"), ("2", "SLM"), ("2", "LLM")]
    assert all(r[-1] == "step 3 (last)" for r in rows)
    # what the scoring cost: a share of each round's distillation, in the record and the report
    for d in records(run_dir, "distill"):
        assert 0 < d["val_s"] <= d["wall_s"]
    assert "of which validation scoring (s)" in report
    _, rows = distill_time_rows(load_runs([run_dir]))
    assert [r[1] for r in rows] == ["1", "2"] and all(r[-1].endswith("%") for r in rows)


class ScoringSpy(fedcollm.FedCoLLMLoop):
    """After each round's distillation: theta's validation score and its AdamW step counts."""

    def distill(self, r):
        super().distill(r)
        self.after = getattr(self, "after", [])
        if self.task.public_val:
            self.after.append(self.distillation.val_score(self.server.slm, fedcollm.SERVER))
        state = self.server.theta.optimizer.state
        self.adam_steps = getattr(self, "adam_steps", [])
        self.adam_steps.append({int(s["step"]) for s in state.values()})


@pytest.fixture
def scoring_spy(monkeypatch):
    made = []

    def factory(*args, **kwargs):
        made.append(ScoringSpy(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr("cotune.runtime.compose.FedCoLLMLoop", factory)
    return made


@pytest.mark.slow
def test_keep_best_ends_each_round_with_the_best_scored_adapter(task_file, tmp_path, scoring_spy):  # noqa: F811
    distill = {"val_fraction": 0.3, "keep": "best", "slm_lr": 0.3, "reset_optimizer": True}
    (run_dir,) = run_experiment(config_from_dict(tree(task_file, tmp_path, distill=distill)))
    loop = scoring_spy[0]
    val = records(run_dir, "distill_val")
    for r, d in zip((1, 2), records(run_dir, "distill"), strict=True):
        curve = [v for v in val if v["round"] == r and v["model"] == "slm"]
        best = max(curve, key=_key)
        assert d["slm_kept"] == best["step"]
        assert _key(best) >= _key(curve[0])  # never worse on validation than the average it started from
        after = loop.after[r - 1]
        assert (after.acc, after.nll) == pytest.approx((best["acc"], best["nll"]))  # and that one was kept
    # at lr 0.3 some step is worse than the best: keep 'last' would not have kept the best (the test can fail)
    assert any(_key(v) < _key(max(val, key=_key)) for v in val if v["model"] == "slm")
    # reset_optimizer: each round's distillation starts from fresh AdamW moments
    assert loop.adam_steps == [{3}, {3}]


@pytest.mark.slow
def test_without_reset_theta_keeps_its_moments_and_takes_its_own_lr(task_file, tmp_path, scoring_spy):  # noqa: F811
    cfg = tree(task_file, tmp_path, distill={"slm_lr": 0.004}, llm={"lr": 0.002})
    run_experiment(config_from_dict(cfg))
    loop = scoring_spy[0]
    assert loop.adam_steps == [{3}, {6}]
    assert loop.server.theta.optimizer.param_groups[0]["initial_lr"] == 0.004
    assert loop.server.omega is not None
    assert loop.server.omega.optimizer.param_groups[0]["initial_lr"] == 0.002


class FakePool:
    def __init__(self):
        self.weights = {"w": torch.tensor(0.0)}
        self.loaded = []

    def state(self, name):
        return {k: v.clone() for k, v in self.weights.items()}

    def load_state(self, name, state):
        self.loaded.append(float(state["w"]))
        self.weights = dict(state)


@pytest.mark.parametrize("keep_best", [True, False])
def test_val_track_keeps_the_best_scored_step(keep_best):
    pool = FakePool()
    scores = iter(
        [ValScore(0.5, 1.0, 4), ValScore(0.75, 0.9, 4), ValScore(0.75, 0.8, 4), ValScore(0.5, 0.1, 4)]
    )
    logged = []
    track = ValTrack(pool, "x", lambda: next(scores), lambda s, v: logged.append(s), 1, keep_best)  # type: ignore[arg-type]
    for step in (1, 2, 3):
        pool.weights = {"w": torch.tensor(float(step))}
        track.after_step()
    kept = track.finish()
    assert logged == [0, 1, 2, 3]
    if keep_best:  # equal accuracy: the lower loss wins; higher accuracy beats any loss
        assert kept == 2 and pool.loaded == [2.0] and float(pool.weights["w"]) == 2.0
    else:
        assert kept is None and pool.loaded == [] and float(pool.weights["w"]) == 3.0


def test_the_time_spent_scoring_is_counted_for_each_scoring_and_only_then(monkeypatch):
    """val_every 2 over 3 steps: scorings at steps 0, 2 and 3 (finish); the clock advances 1 s per reading
    outside a scoring and `cost` s inside one, so only the scorings' own seconds are summed."""
    clock = [0.0]
    cost = iter([2.0, 3.0, 5.0])

    def perf_counter() -> float:
        clock[0] += 1.0
        return clock[0]

    def score() -> ValScore:
        clock[0] += next(cost)
        return ValScore(0.5, 1.0, 4)

    monkeypatch.setattr(fedcollm.time, "perf_counter", perf_counter)
    track = ValTrack(None, "x", score, lambda s, v: None, 2, False)  # type: ignore[arg-type]
    for _ in range(3):
        track.after_step()
    track.finish()
    track.finish()  # the last step is already scored: nothing more
    assert track.seconds == 3 * 1.0 + 2.0 + 3.0 + 5.0  # each scoring: its cost plus the closing reading


def test_choice_nll_is_the_loss_of_the_right_choice_among_the_choices():
    assert choice_nll([[0.0, 0.0]], [1]) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert choice_nll([[-1.0, -50.0], [-50.0, -1.0]], [0, 1]) < 1e-6


def test_kd_over_the_choices_is_the_kl_of_the_softmax_over_the_choices():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, 3.0, float("-inf")]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, float("-inf")]])
    expected = []
    for s, t in ((student[0], teacher[0]), (student[1, :2], teacher[1, :2])):
        p, q = torch.softmax(t, -1), torch.softmax(s, -1)
        expected.append((p * (p.log() - q.log())).sum())
    got = kd_kl_choices(student, teacher)
    assert torch.isfinite(got) and got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert kd_kl_choices(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    at_t2 = kd_kl_choices(student, teacher, temperature=2.0)
    assert at_t2.item() != pytest.approx(got.item())


def test_choice_logits_are_read_at_the_answer_position():
    labels = torch.tensor([[-100, -100, 7, 9], [-100, 5, 9, -100]])
    shifted = torch.arange(2 * 4 * 10, dtype=torch.float).reshape(2, 4, 10)
    positions = answer_positions(labels)
    assert positions.tolist() == [2, 1]
    choices = torch.tensor([[7, 3], [5, -1]])
    picked = choice_logits(shifted, positions, choices)
    assert picked[0].tolist() == [shifted[0, 2, 7].item(), shifted[0, 2, 3].item()]
    assert picked[1, 0].item() == shifted[1, 1, 5].item() and picked[1, 1].item() == float("-inf")


def test_the_public_set_carries_each_examples_choice_tokens(task_file):  # noqa: F811
    cfg = config_from_dict(tree(task_file, task_file.parent)).task
    tok = byte_tokenizer()
    data = build_task_data(cfg, 3, tok, 0)
    assert data.public.choices is not None and data.clients[0].choices is None
    # " red", " green", " blue": one first token (the space) shared by all three -> one entry
    assert data.public.choices.shape == (len(data.public), 1)
    batch = data.public.batch(torch.arange(2), torch.device("cpu"))
    first = answer_positions(batch["labels"][:, 1:])
    assert all(batch["labels"][i, 1 + first[i]] == batch["choices"][i, 0] for i in range(2))


@pytest.fixture(scope="module")
def bare_choices_file(tmp_path_factory):
    """The colour task with choices that differ from their first byte (no leading space)."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("bare") / "task.jsonl"
    words = ["red", "green", "blue"]
    rows = []
    for i in range(90):
        noise = " ".join(rng.choice("abcd") for _ in range(6))
        rows.append(
            {"prompt": f"{noise} colour {words[i % 3]}. Which colour?", "choices": words, "answer": i % 3}
        )
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.slow
def test_fedcollm_distils_over_the_choices(bare_choices_file, tmp_path):
    tree_ = tree(bare_choices_file, tmp_path, distill={"kd_target": "choices"})
    (run_dir,) = run_experiment(config_from_dict(tree_))
    d = records(run_dir, "distill")
    assert len(d) == 2 and all(r["slm_kd"] > 0 and r["llm_kd"] > 0 for r in d)
    assert all(r["teacher_bytes"] == 6 * 3 * 4 for r in d)  # a batch of 6 rows x 3 choice tokens, fp32


def test_kd_over_choices_that_share_their_first_token_is_refused(task_file, tmp_path):  # noqa: F811
    cfg = config_from_dict(tree(task_file, tmp_path, distill={"kd_target": "choices"}))
    with pytest.raises(DataError, match="share their first token"):
        run_experiment(cfg)


@pytest.mark.slow
def test_when_every_distillation_is_rejected_fedcollms_slm_is_fedavgs(task_file, tmp_path):  # noqa: F811
    """keep 'best' with a server lr that wrecks theta: each round keeps the average (step 0), and since the
    clients draw the same batches and dropout in both algorithms, the SLM ends bit-equal to FedAvg's."""
    from safetensors.torch import load_file

    lora = {"r": 2, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    distill = {"val_fraction": 0.3, "keep": "best", "slm_lr": 50.0}
    cfg = tree(task_file, tmp_path, lora=lora, distill=distill, run={"compare": ["fedavg"]})
    fed, avg = run_experiment(config_from_dict(cfg))
    assert [d["slm_kept"] for d in records(fed, "distill")] == [0, 0]
    last = "checkpoints/round-0002/server/adapter_model.safetensors"
    a, b = load_file(str(fed / last)), load_file(str(avg / last))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # with keep 'last' the wrecked theta is what the clients get (the test can fail): it differs from the
    # average after round 1, and every client's round-2 training from it explodes, which stops the run
    cfg["distill"]["keep"] = "last"
    cfg["run"] = {**cfg["run"], "name": "last", "compare": []}
    with pytest.raises(TrainingDiverged, match=r"distill\.slm_lr"):
        run_experiment(config_from_dict(cfg), tmp_path / "last")
    first = "checkpoints/round-0001/server/adapter_model.safetensors"
    c, b = load_file(str(tmp_path / "last" / first)), load_file(str(avg / first))
    assert not all(torch.equal(c[k], b[k]) for k in c)
