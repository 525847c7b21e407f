"""Reading (and appending to) a run's metrics.jsonl, and summarising a run directory.

A run appends one JSON object per line while it trains and may be killed at any moment, so the
writer fsyncs every line and the reader drops a line that does not parse instead of failing. Record
types and fields the reader does not know are ignored, so that later features can add their own.

The records are the typed classes of `cotune.records`. Two algorithm families write here: the
personalized one (test or val perplexity `EvalRecord`, `TrustRecord`) and the FedCoLLM family
(multiple-choice accuracy `McRecord`, communication `CommRecord`); either may score generated text
(`GenRecord`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cotune.config.names import PERSONALIZED, family_of
from cotune.layout import CONFIG_FILE, METRICS_FILE
from cotune.records import (
    AlignRecord,
    CommRecord,
    DistillRecord,
    DistillValRecord,
    EvalRecord,
    GenRecord,
    GenSampleRecord,
    McRecord,
    PrivacySpent,
    RunEvent,
    TrustRecord,
    parse_record,
)
from cotune.reporting.text import printable


def _json_default(obj: Any) -> Any:
    """Let numpy/torch scalars and paths through json.dumps without the caller converting them."""
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"metrics record value of type {type(obj).__name__} is not JSON serialisable")


def append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line and fsync it, so a killed run loses at most the line being written.

    If the file ends without a newline (a writer was killed mid-line), a newline is written first, so
    that only the cut record is lost and not this one with it. Non-finite floats are written as
    NaN/Infinity, which read_metrics accepts.
    """
    line = json.dumps(dict(record), separators=(",", ":"), default=_json_default)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = "\n" + line
        fh.write((line + "\n").encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, in file order.

    The last line is skipped silently when it does not parse (a run killed mid-write). A broken line
    elsewhere (a killed run that was later appended to) is skipped with a warning rather than making
    the whole run unreadable. Lines that are valid JSON but not objects are ignored.
    """
    path = Path(path)
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    nonempty = [i for i, line in enumerate(lines) if line.strip()]
    last = nonempty[-1] if nonempty else -1
    records: list[dict[str, Any]] = []
    for i in nonempty:
        try:
            obj = json.loads(lines[i])
        except json.JSONDecodeError:
            if i != last:
                warnings.warn(f"{path}, line {i + 1}: skipping a line that is not valid JSON", stacklevel=2)
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


def config_value(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """Look up "a.b.c" in a nested config dict; the default when any part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def client_label(client: int, names: Sequence[str]) -> str:
    """A client as reports show it: "3 (business)" when the run named it by its data, else "3"."""
    name = printable(names[client]) if client < len(names) else ""
    return f"{client} ({name})" if name else str(client)


def client_label_across(client: int, runs: Sequence[RunSummary]) -> str:
    """Client `client` in a table or plot shared by several runs: named by each run's own data.

    "3 (business)" when every run that names it agrees; "3 (fedavg: business; local: sport)" when runs of
    different owners (data.clients) are compared, so no row carries another run's name.
    """
    named = [(run.label, run.client_names[client]) for run in runs if client < len(run.client_names)]
    named = [(label, name) for label, name in named if name]
    if len({name for _, name in named}) <= 1:
        return f"{client} ({printable(named[0][1])})" if named else str(client)
    return f"{client} ({'; '.join(f'{label}: {printable(name)}' for label, name in named)})"


@dataclass
class RunSummary:
    """What the report needs from one run directory: its config, perplexities and trust matrices.

    FedCoLLM-family runs add multiple-choice accuracies (mc) and per-client traffic (comm).
    """

    run_dir: Path
    label: str
    config: dict[str, Any]
    # round -> client -> perplexity on `ppl_split`: each client's test split (data.test_fraction), or its
    # validation split for runs without one (the trust evidence saw it: reports say so)
    ppl_by_round: dict[int, dict[int, float]] = field(default_factory=dict)
    ppl_split: str = "test"
    trust: list[tuple[int, list[list[float]]]] = field(default_factory=list)
    ended: bool = False  # a {"type": "run", "event": "end"} record was seen (False for a killed run)
    algorithm: str = PERSONALIZED
    # model ("slm" | "llm") -> round -> one record per client (client None = the global/server model),
    # sorted with the global one first
    mc: dict[str, dict[int, list[McRecord]]] = field(default_factory=dict)
    comm: list[CommRecord] = field(default_factory=list)  # sorted by (round, client)
    client_names: list[str] = field(default_factory=list)  # by index, from the start record ("" unknown)
    privacy: PrivacySpent | None = None  # client-level DP: the privacy spent after the last aggregation
    # generated text judged (either family): one record per (round, split, model, client), the last logged
    # winning, sorted by (split, round, model, client) with the global model (client None) first
    gen: list[GenRecord] = field(default_factory=list)
    # examples of shipped public data with the generations (written only for those runs), one per (split,
    # round, model, client, example), the last logged winning, sorted by that key
    gen_samples: list[GenSampleRecord] = field(default_factory=list)

    def client_label(self, client: int) -> str:
        return client_label(client, self.client_names)

    # FedCoLLM: the server's validation split along each round's distillation, sorted by (round, model, step),
    # and each round's distillation summary (which step each model kept), sorted by round
    distill_val: list[DistillValRecord] = field(default_factory=list)
    distill: list[DistillRecord] = field(default_factory=list)
    # FedCoLLM with an LLM of another tokenizer: each round's alignment figures per student, by (round, model)
    align: list[AlignRecord] = field(default_factory=list)

    @property
    def dp_enabled(self) -> bool:
        """Client-level DP was on: the config sets privacy.clip_norm, or the run logged privacy spent."""
        return self.privacy is not None or config_value(self.config, "privacy.clip_norm") is not None

    @property
    def is_cotuning(self) -> bool:
        """A FedCoLLM-family run, whose report is accuracy-based rather than perplexity-based."""
        return family_of(self.algorithm) == "fedcollm"

    @property
    def clients(self) -> list[int]:
        """Every client that has at least one val evaluation."""
        return sorted({c for per_client in self.ppl_by_round.values() for c in per_client})

    def complete_rounds(self) -> list[int]:
        """Evaluated rounds in which every client was evaluated.

        A run killed during evaluation leaves a partial round whose mean is not comparable; if no
        round is complete (e.g. clients evaluated on a rota), every evaluated round counts.
        """
        everyone = set(self.clients)
        complete = [r for r, per_client in self.ppl_by_round.items() if set(per_client) == everyone]
        return sorted(complete) if complete else sorted(self.ppl_by_round)

    def final_round(self) -> int | None:
        """The last round at which every client was evaluated (see complete_rounds); None if no evals."""
        rounds = self.complete_rounds()
        return rounds[-1] if rounds else None

    def final_ppl(self) -> dict[int, float]:
        """Client -> perplexity (on ppl_split) at final_round()."""
        last = self.final_round()
        if last is None:
            return {}
        return dict(sorted(self.ppl_by_round[last].items()))

    def mean_ppl_curve(self) -> list[tuple[int, float]]:
        """(round, arithmetic mean over clients of perplexity on ppl_split) for each complete round."""
        return [(r, _mean(list(self.ppl_by_round[r].values()))) for r in self.complete_rounds()]

    def last_trust(self) -> tuple[int, list[list[float]]] | None:
        """The trust matrix of the latest aggregation, or None for strategies that record none."""
        return self.trust[-1] if self.trust else None

    # ------------------------------------------------------------------ multiple-choice accuracy

    def mc_rounds(self, model: str) -> list[int]:
        """Rounds with a usable accuracy figure for model ("slm" | "llm").

        A round counts when it has a global record (client None) or a record for every client seen for
        that model, so a run killed mid-evaluation does not report a mean over some clients only; if no
        round qualifies, every round with records counts (as for complete_rounds).
        """
        by_round = self.mc.get(model, {})
        everyone = {r.client for recs in by_round.values() for r in recs if r.client is not None}
        complete = [
            rnd
            for rnd, recs in by_round.items()
            if any(r.client is None for r in recs) or (everyone and {r.client for r in recs} >= everyone)
        ]
        return sorted(complete) if complete else sorted(by_round)

    def mc_at(self, model: str, rnd: int) -> list[McRecord]:
        """The records behind model's figure at rnd: the global one if logged, else the per-client ones."""
        recs = self.mc.get(model, {}).get(rnd, [])
        global_recs = [r for r in recs if r.client is None]
        return global_recs[-1:] if global_recs else recs

    def mc_summary(self, model: str, rnd: int) -> tuple[float, float, float | None] | None:
        """(mean acc, mean acc_norm, population std of acc over clients or None for a global model) at rnd."""
        recs = self.mc_at(model, rnd)
        if not recs:
            return None
        accs = [r.acc for r in recs]
        std = None if recs[0].client is None else _pstdev(accs)
        return _mean(accs), _mean([r.acc_norm for r in recs]), std

    def final_mc_round(self, model: str | None = None) -> int | None:
        """The last usable accuracy round of model (of any model when None); None without mc records."""
        models = [model] if model is not None else list(self.mc)
        rounds = [rnd for m in models for rnd in self.mc_rounds(m)]
        return max(rounds) if rounds else None

    def final_mc(self, model: str) -> tuple[float, float, float | None] | None:
        """(mean acc, mean acc_norm, std of acc over clients or None) at model's final usable round."""
        last = self.final_mc_round(model)
        return None if last is None else self.mc_summary(model, last)

    def zero_shot_mc(self, model: str) -> tuple[float, float, float | None] | None:
        """Like final_mc, at round 0 (evaluated before any training, i.e. the zero-shot model)."""
        return self.mc_summary(model, 0) if 0 in self.mc.get(model, {}) else None

    def mc_curve(self, model: str) -> list[tuple[int, float]]:
        """(round, mean acc over clients, or the global model's acc) for each usable round of model."""
        out: list[tuple[int, float]] = []
        for rnd in self.mc_rounds(model):
            summary = self.mc_summary(model, rnd)
            if summary is not None:
                out.append((rnd, summary[0]))
        return out

    # ------------------------------------------------------------------ generation

    def gen_split(self) -> str | None:
        """The split the generation figures come from: test where the run logged it, else validation."""
        splits = {r.split for r in self.gen}
        return "test" if "test" in splits else ("val" if splits else None)

    def gen_series(self) -> dict[str | None, dict[int, list[GenRecord]]]:
        """model (None for a personalized run) -> round -> the records behind that round's figure on
        gen_split(): the global model's if logged, else every client's; rounds missing a client that
        other rounds have are left out (as mc_rounds), unless no round is complete."""
        split = self.gen_split()
        out: dict[str | None, dict[int, list[GenRecord]]] = {}
        for rec in self.gen:
            if rec.split == split:
                out.setdefault(rec.model, {}).setdefault(rec.round, []).append(rec)
        for model, by_round in out.items():
            everyone = {r.client for recs in by_round.values() for r in recs if r.client is not None}
            for rnd, recs in list(by_round.items()):
                global_recs = [r for r in recs if r.client is None]
                by_round[rnd] = global_recs[-1:] if global_recs else recs
            complete = {  # a round killed mid-evaluation would give a mean over some clients only
                rnd: recs
                for rnd, recs in by_round.items()
                if recs[0].client is None or {r.client for r in recs} >= everyone
            }
            out[model] = complete or by_round
        return out

    def final_gen_round(self) -> int | None:
        """The last round with a generation figure on gen_split(); None without gen records."""
        rounds = [rnd for by_round in self.gen_series().values() for rnd in by_round]
        return max(rounds) if rounds else None

    def final_gen_samples(self) -> list[GenSampleRecord]:
        """The samples of each (split, model, client) at its last round that has some, in key order."""

        def who(rec: GenSampleRecord) -> tuple[str, str, int]:
            return (rec.split, rec.model or "", -1 if rec.client is None else rec.client)

        last: dict[tuple[str, str, int], int] = {}
        for rec in self.gen_samples:
            last[who(rec)] = max(last.get(who(rec), rec.round), rec.round)
        return [rec for rec in self.gen_samples if rec.round == last[who(rec)]]

    def gen_curve(self, model: str | None) -> list[tuple[int, float]]:
        """(round, ROUGE-L of the global model, or the mean over clients) for each round of model."""
        by_round = self.gen_series().get(model, {})
        return [(rnd, _mean([r.rouge_l for r in by_round[rnd]])) for rnd in sorted(by_round)]

    def comm_per_round(self) -> list[dict[str, Any]]:
        """Per round: client count and means over clients of bytes_up, bytes_down, full_slm_bytes, ratio."""
        by_round: dict[int, list[CommRecord]] = {}
        for rec in self.comm:
            by_round.setdefault(rec.round, []).append(rec)
        return [
            {
                "round": rnd,
                "clients": len(recs),
                "bytes_up": _mean([r.bytes_up for r in recs]),
                "bytes_down": _mean([r.bytes_down for r in recs]),
                "full_slm_bytes": _mean([r.full_slm_bytes for r in recs]),
                "ratio": _mean([r.ratio for r in recs]),
            }
            for rnd, recs in sorted(by_round.items())
        ]


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _pstdev(values: Sequence[float]) -> float:
    """Population std (ddof=0): the clients are all of them, not a sample."""
    if not values:
        return math.nan
    mean = _mean(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def _read_config(path: Path) -> dict[str, Any]:
    """The run's config.yaml as a dict; {} when absent (the metrics alone still make a report)."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot parse {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a mapping, got {type(data).__name__}")
    return data


def load_run(run_dir: Path) -> RunSummary:
    """Summarise one run directory (config.yaml + metrics.jsonl).

    The algorithm is the config's top-level algorithm, else that of the run's start record, else
    "personalized". A personalized run's label is the config's strategy.name, else the strategy of the
    run's start record, else the directory name; any other algorithm's label is the algorithm name
    (its strategy, if any, would not tell FedCoLLM from its baselines). Raises FileNotFoundError naming
    the path when the directory or its metrics.jsonl is missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise NotADirectoryError(f"not a run directory (it is a file): {run_dir}")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        nested = sorted(p.parent.name for p in run_dir.glob(f"*/{METRICS_FILE}"))
        hint = f"; run directories inside it: {', '.join(nested)}" if nested else ""
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a cotune run directory?{hint}")

    config = _read_config(run_dir / CONFIG_FILE)
    records = read_metrics(metrics_path)

    by_split: dict[str, dict[int, dict[int, float]]] = {}  # split -> round -> client -> perplexity
    trust: list[tuple[int, list[list[float]]]] = []
    mc: dict[str, dict[int, dict[int | None, McRecord]]] = {}
    comm: dict[tuple[int, int], CommRecord] = {}
    distill_val: dict[tuple[int, str, int], DistillValRecord] = {}
    distill: dict[int, DistillRecord] = {}
    align: dict[tuple[int, str], AlignRecord] = {}
    gen: dict[tuple[str, int, str, int], GenRecord] = {}
    samples: dict[tuple[str, int, str, int, int], GenSampleRecord] = {}
    run_strategy: str | None = None
    run_algorithm: str | None = None
    client_names: list[str] = []
    privacy: PrivacySpent | None = None
    ended = False
    for rec in filter(None, map(parse_record, records)):  # later records of the same key win
        match rec:
            case EvalRecord():
                by_split.setdefault(rec.split, {}).setdefault(rec.round, {})[rec.client] = rec.ppl
            case TrustRecord():
                trust.append((rec.round, rec.matrix))
            case McRecord():
                mc.setdefault(rec.model, {}).setdefault(rec.round, {})[rec.client] = rec
            case CommRecord():
                comm[(rec.round, rec.client)] = rec
            case DistillValRecord():
                distill_val[(rec.round, rec.model, rec.step)] = rec
            case DistillRecord():
                distill[rec.round] = rec
            case AlignRecord():
                align[(rec.round, rec.model)] = rec
            case GenRecord():
                gen[(rec.split, rec.round, rec.model or "", -1 if rec.client is None else rec.client)] = rec
            case GenSampleRecord():
                who = -1 if rec.client is None else rec.client
                samples[(rec.split, rec.round, rec.model or "", who, rec.example)] = rec
            case PrivacySpent():
                if privacy is None or rec.round >= privacy.round:
                    privacy = rec
            case RunEvent(event="start"):
                run_strategy = run_strategy or rec.strategy
                run_algorithm = run_algorithm or rec.algorithm
                client_names = client_names or list(rec.client_names or [])
            case RunEvent(event="end"):
                ended = True

    algorithm = str(config_value(config, "algorithm") or run_algorithm or PERSONALIZED)
    if algorithm == PERSONALIZED:
        strategy = config_value(config, "strategy.name")
        label = str(strategy) if strategy else (run_strategy or run_dir.resolve().name)
    else:
        label = algorithm
    label = printable(label)  # a directory name, or config text: shown on terminals and in reports
    ppl_split = "test" if "test" in by_split else "val"
    ppl_by_round = by_split.get(ppl_split, {})
    return RunSummary(
        run_dir=run_dir,
        label=label,
        config=config,
        ppl_by_round={r: dict(sorted(ppl_by_round[r].items())) for r in sorted(ppl_by_round)},
        ppl_split=ppl_split,
        trust=sorted(trust, key=lambda item: item[0]),
        ended=ended,
        algorithm=algorithm,
        mc={
            model: {
                rnd: sorted(per_client.values(), key=lambda r: (r.client is not None, r.client or 0))
                for rnd, per_client in sorted(by_round.items())
            }
            for model, by_round in sorted(mc.items())
        },
        comm=[comm[key] for key in sorted(comm)],
        client_names=client_names,
        privacy=privacy,
        distill_val=[distill_val[key] for key in sorted(distill_val)],
        distill=[distill[key] for key in sorted(distill)],
        align=[align[key] for key in sorted(align)],
        gen=[gen[key] for key in sorted(gen)],
        gen_samples=[samples[key] for key in sorted(samples)],
    )


def unique_labels(runs: Sequence[RunSummary]) -> list[str]:
    """Labels that tell runs apart: a label shared by several runs gets the run's directory name appended."""
    counts = Counter(r.label for r in runs)
    labels = [
        f"{r.label} ({printable(r.run_dir.resolve().name)})" if counts[r.label] > 1 else r.label for r in runs
    ]
    still = Counter(labels)
    seen: Counter[str] = Counter()
    out: list[str] = []
    for label in labels:
        if still[label] > 1:  # same strategy and same directory name (different parents)
            seen[label] += 1
            label = f"{label} #{seen[label]}"
        out.append(label)
    return out


def load_runs(run_dirs: Sequence[Path]) -> list[RunSummary]:
    """load_run for each directory, with labels made unique across the set."""
    runs = [load_run(Path(d)) for d in run_dirs]
    for run, label in zip(runs, unique_labels(runs), strict=True):
        run.label = label
    return runs
