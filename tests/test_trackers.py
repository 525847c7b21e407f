"""run.loggers: the run's records mirrored to TensorBoard and MLflow, read back with their own readers."""

from __future__ import annotations

import sys
import types

import pytest
from tests.conftest import tiny_tree

from cotune.config import ConfigError, config_from_dict
from cotune.records import EvalRecord, TrainRecord, TrustRecord
from cotune.reporting.metrics import read_metrics
from cotune.reporting.trackers import TrackerError, check_trackers, heatmap, scalars
from cotune.runtime.experiment import run_experiment


def _run(corpus_dir, tmp_path, loggers):
    tree = tiny_tree(corpus_dir, tmp_path, strategy={"name": "validation"}, run={"loggers": loggers})
    (run_dir,) = run_experiment(config_from_dict(tree))
    return run_dir


def _expected(run_dir, kind, tag_of):
    return {(tag_of(r), r["round"]): r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == kind}


def test_record_tags_name_the_series_and_leave_identifiers_out():
    tags = dict(scalars(EvalRecord(round=2, client=3, split="test", ppl=12.5, loss=2.5, tokens=64)))
    assert tags == {
        "eval/test/ppl/client-03": 12.5,
        "eval/test/loss/client-03": 2.5,
        "eval/test/tokens/client-03": 64.0,
    }
    assert dict(scalars(TrainRecord(round=1, client=None, model="llm", loss=1.0, lr=0.1))) == {
        "train/llm/loss": 1.0,
        "train/llm/lr": 0.1,
    }
    assert scalars(TrustRecord(round=1, matrix=[[1.0, 0.0], [0.5, 0.5]], strategy="fedavg")) == []
    image = heatmap([[1.0, 0.0], [0.5, 0.5]], cell=2)
    assert (
        image.shape == (4, 4, 3) and image[0, 0, 0] == 255 and image[0, 3, 0] == 0 and image[3, 3, 0] == 128
    )


def test_tensorboard_holds_every_eval_and_the_trust_heatmaps(corpus_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _run(corpus_dir, tmp_path, ["tensorboard"])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    evals = _expected(run_dir, "eval", lambda r: f"eval/{r['split']}/ppl/client-{r['client']:02d}")
    assert len(evals) == 4 * 3 * 2  # clients x rounds 0..2 x {val, test}
    for (tag, rnd), rec in evals.items():
        (point,) = [e for e in events.Scalars(tag) if e.step == rnd]
        assert point.value == pytest.approx(rec["ppl"], rel=1e-6)
    assert [e.step for e in events.Images("trust/matrix")] == [1, 2]


def test_mlflow_holds_every_training_loss(corpus_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets for its own file store
    run_dir = _run(corpus_dir, tmp_path, ["mlflow"])
    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cotune").experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "validation"
    losses = _expected(run_dir, "train", lambda r: f"train/loss/client-{r['client']:02d}")
    assert len(losses) == 4 * 2
    for (tag, rnd), rec in losses.items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert history[rnd] == pytest.approx(rec["loss"], rel=1e-6)


def test_wandb_runs_offline_in_the_run_directory(corpus_dir, tmp_path, monkeypatch):
    """W&B is not installed here: a stand-in module records what cotune asks of it."""
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, data):
            calls["log"].append(data)

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("cotune.reporting.trackers.installed", lambda name: True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = _run(corpus_dir, tmp_path, ["wandb"])
    (init,) = calls["init"]
    assert (
        init["mode"] == "offline"
        and init["dir"] == str(run_dir)
        and init["config"]["strategy"]["name"] == "validation"
    )
    losses = {(k, d["round"]): v for d in calls["log"] for k, v in d.items() if k.startswith("train/loss/")}
    assert len(losses) == 4 * 2 and calls["finish"] == [True]


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("cotune.reporting.trackers.installed", lambda name: False)
    with pytest.raises(TrackerError, match="pip install"):
        check_trackers(["mlflow"])
    with pytest.raises(ConfigError, match="loggers"):
        config_from_dict(tiny_tree(corpus_dir, tmp_path, run={"loggers": ["comet"]}))
    tree = tiny_tree(corpus_dir, tmp_path, run={"loggers": ["mlflow"], "name": "refused"})
    with pytest.raises(TrackerError):
        run_experiment(config_from_dict(tree))
    assert not (tmp_path / "runs" / "refused").exists()
