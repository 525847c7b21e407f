"""One vocabulary: names spelled once, a config per family, typed metric records read back as written."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import get_args

import pytest
import yaml

from cotune.algorithms.fedcollm import PLANS
from cotune.algorithms.personalized import MIX_RULES, TRUST_RULES, TrustEvidence
from cotune.algorithms.robust import AGGREGATORS
from cotune.config import ConfigError, config_from_dict, dump_config, load_config
from cotune.config.names import (
    FAMILY_SECTIONS,
    FEDCOLLM_ALGORITHMS,
    STRATEGIES,
    STRATEGY_SPECS,
    Aggregator,
    Evidence,
    MixRule,
    TrustRule,
)
from cotune.records import (
    KINDS,
    AlignRecord,
    CommRecord,
    DistillRecord,
    DistillValRecord,
    EvalRecord,
    FaultRecord,
    GenRecord,
    GenSampleRecord,
    McRecord,
    PrivacyClip,
    PrivacySpent,
    Record,
    RoundRecord,
    RunEvent,
    TrainRecord,
    TrustRecord,
    parse_record,
)
from cotune.reporting.metrics import append_metrics, read_metrics

FEDCOLLM_TREE = {
    "algorithm": "fedcollm",
    "llm": {"model": {"name": "tiny"}},
    "task": {"source": {"corpus": "bbc"}},
}


def test_every_name_has_its_table_entry() -> None:
    assert set(PLANS) == set(FEDCOLLM_ALGORITHMS)
    assert set(AGGREGATORS) == set(get_args(Aggregator)) and all(map(callable, AGGREGATORS.values()))


def test_every_strategy_row_is_complete() -> None:
    """One row per strategy name, and everything a row names exists: its trust and mix functions, its
    evidence as a field the runtime fills, the shared part a shared_part mix needs."""
    assert list(STRATEGY_SPECS) == list(STRATEGIES)  # the Literal's order: run.compare, error messages
    assert set(TRUST_RULES) == set(get_args(TrustRule)) and set(MIX_RULES) == set(get_args(MixRule))
    assert all(map(callable, [*TRUST_RULES.values(), *MIX_RULES.values()]))
    evidence_fields = {f.name for f in fields(TrustEvidence)}
    assert set(get_args(Evidence)) <= evidence_fields
    for name, spec in STRATEGY_SPECS.items():
        assert spec.trust in TRUST_RULES and spec.mix in MIX_RULES, name
        assert spec.evidence <= set(get_args(Evidence)), name
        assert (spec.mix == "shared_part") == (spec.shared_part is not None), name
        assert spec.dp_noise in ("central", "per_upload") and spec.tau > 0, name


@pytest.mark.parametrize(
    ("name", "compare", "refused"),
    [("prediction", [], True), ("validation", ["prediction"], True), ("validation", [], False)],
)
def test_the_config_reads_what_a_row_needs(name: str, compare: list[str], refused: bool) -> None:
    """The config refuses on the rows (before any work): prediction evidence needs a public set."""
    tree = {"strategy": {"name": name}, "run": {"compare": compare}}
    tree |= {"federation": {"clients": 2}, "data": {"clients": ["a", "b"]}}
    if refused:
        with pytest.raises(ValueError, match="public reference set"):
            config_from_dict(tree)
    else:
        config_from_dict(tree)


def test_a_fedcollm_config_holds_only_what_its_family_reads() -> None:
    dumped = yaml.safe_load(dump_config(config_from_dict(FEDCOLLM_TREE)))
    assert set(dumped) == set(FAMILY_SECTIONS["fedcollm"])
    assert "strategy" not in dumped and "data" not in dumped
    assert "warmup_steps" not in dumped["federation"]
    personalized = yaml.safe_load(dump_config(config_from_dict({})))
    assert set(personalized) == set(FAMILY_SECTIONS["personalized"])
    assert "weighting" not in personalized["federation"] and "local_epochs" not in personalized["federation"]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"strategy": {"name": "weight"}}, "strategy"),
        ({"data": {"seq_len": 64}}, "data"),
        ({"federation": {"warmup_steps": 3}}, "federation.warmup_steps"),
    ],
)
def test_a_section_the_family_does_not_read_is_refused(extra: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"does not read {named}"):
        config_from_dict({**FEDCOLLM_TREE, **extra})


def test_personalized_refuses_fedcollm_settings(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"distill": {"lam": 0.5}, "federation": {"weighting": "uniform"}}))
    with pytest.raises(ConfigError, match=r"does not read distill, federation\.weighting"):
        load_config(path)


def test_a_dumped_config_loads_back_equal(tmp_path: Path) -> None:
    for tree in (FEDCOLLM_TREE, {"strategy": {"name": "prediction"}}):
        cfg = config_from_dict(tree)
        again = config_from_dict(yaml.safe_load(dump_config(cfg)))
        assert dump_config(again) == dump_config(cfg)


RECORDS: list[Record] = [
    RunEvent(event="start", algorithm="fedcollm", strategy="fedcollm", clients=3, backend="embedded"),
    RoundRecord(round=1, step=4, wall_s=0.5, train_s=0.25, mean_val_ppl=12.5, participants=[0, 1]),
    TrainRecord(round=1, client=0, loss=2.5, lr=1e-3, step=4, last_loss=2.4, tokens_per_s=100.0),
    TrainRecord(round=1, client=None, model="llm", loss=2.0, lr=1e-4),
    EvalRecord(round=1, step=4, client=2, loss=2.0, ppl=math.exp(2.0), acc=0.3, tokens=64),
    TrustRecord(
        round=1,
        step=4,
        strategy="weight",
        aggregator="mean",
        matrix=[[1.0, 0.0], [0.5, 0.5]],
        participants=[0, 1],
    ),
    McRecord(round=0, model="slm", client=None, acc=0.5, acc_norm=0.55, n=20),
    GenRecord(round=1, n=8, exact_match=0.125, f1=0.5, rouge_l=0.25, ppl=9.5, model="slm", client=None),
    GenRecord(round=1, n=8, exact_match=0.0, f1=0.25, rouge_l=0.5, ppl=12.0, client=2, step=4),
    GenSampleRecord(round=2, model="llm", example=0, prompt="p\n", reference="r", generated="g"),
    CommRecord(round=1, client=0, bytes_up=10, bytes_down=10, full_slm_bytes=1000, ratio=0.01),
    DistillRecord(
        round=1, step=2, slm_ce=1, slm_kd=0.5, llm_ce=1, llm_kd=0.4, teacher_bytes=64, topk=None, wall_s=0.1
    ),
    DistillValRecord(round=1, model="slm", step=0, acc=0.5, nll=0.9, n=12),
    AlignRecord(
        round=1,
        model="slm",
        positions=40,
        paired=36,
        exact_share=0.8,
        merged=4,
        unaligned=0,
        carried_share=0.9,
        unmatched_share=0.1,
        empty=0,
        vocab_matched=0.26,
        map_digest="0123abcd",
        map_s=1.4,
    ),
    FaultRecord(event="client_dropped", round=1, phase="train", client=1, reason="took too long"),
    PrivacyClip(round=1, clients=[0, 1], update_norms=[0.5, 2.0], clipped=1, clip_norm=1.0),
    PrivacySpent(
        round=1, epsilon=None, delta=1e-5, noise_multiplier=0.0, clip_norm=1.0, sample_rate=1.0, noise="x"
    ),
]


def test_every_kind_reads_back_as_written(tmp_path: Path) -> None:
    assert {type(r) for r in RECORDS} == set(KINDS.values())
    path = tmp_path / "metrics.jsonl"
    for record in RECORDS:
        append_metrics(path, record.line())
    assert [parse_record(obj) for obj in read_metrics(path)] == RECORDS


@pytest.mark.parametrize(
    "line",
    [
        {"type": "eval", "round": True, "client": 0, "ppl": 3.0},  # a boolean is not a round
        {"type": "eval", "round": 1.5, "client": 0, "ppl": 3.0},
        {"type": "eval", "round": 1, "client": 0},  # no ppl
        {"type": "trust", "round": 1, "matrix": [[1.0], [0.5, 0.5]]},  # not rectangular
        {"type": "trust", "round": 1, "matrix": []},
        {"type": "mc", "round": 1, "model": "xl", "client": None, "acc": 0.5},
        {"type": "privacy", "event": "other", "round": 1},
        {"type": "no_such_kind", "round": 1},
        ["not", "an", "object"],
    ],
)
def test_a_malformed_or_unknown_line_is_skipped(line: object) -> None:
    assert parse_record(json.loads(json.dumps(line))) is None


def test_reading_is_lenient_with_older_and_newer_writers() -> None:
    old_comm = parse_record(
        {"type": "comm", "round": 1, "client": 0, "bytes_up": 5, "bytes_down": 5, "full_slm_bytes": 500}
    )
    assert isinstance(old_comm, CommRecord) and old_comm.ratio == pytest.approx(0.01)  # filled in
    newer = parse_record({"type": "eval", "round": 2.0, "client": 1, "ppl": 4.0, "future_field": {"x": 1}})
    assert isinstance(newer, EvalRecord) and newer.round == 2 and newer.split == "val"


SRC = Path(__file__).resolve().parents[1] / "src" / "cotune"


def string_constants(path: Path) -> set[str]:
    """Every string literal of a module (f-string parts included), read with `ast` (nothing imported)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_run_directory_names_are_spelled_only_in_layout() -> None:
    """config.yaml, metrics.jsonl, checkpoints/, state.pt, the adapter files, ...: one constant each in
    cotune/layout.py, imported wherever a path is built (a name that is also a tracker's is left out)."""
    import cotune.layout as layout

    names = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}
    names -= {"tensorboard", "flower"}  # also a tracker name (run.loggers) and a backend name (--backend)
    spelled = {
        f"{path.relative_to(SRC)}: {name}"
        for path in SRC.rglob("*.py")
        if path.name != "layout.py"
        for name in names & string_constants(path)
    }
    assert not spelled, sorted(spelled)
