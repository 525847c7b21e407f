"""Reading (and appending to) a run's metrics.jsonl, and summarising a run directory.

A run appends one JSON object per line while it trains and may be killed at any moment, so the
writer fsyncs every line and the reader drops a line that does not parse instead of failing. Record
types and fields the reader does not know are ignored, so that later features can add their own.
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

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


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


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _as_matrix(value: Any) -> list[list[float]] | None:
    """A rectangular, non-empty matrix of numbers, or None (a malformed record is ignored, not fatal)."""
    if not isinstance(value, list) or not value:
        return None
    rows: list[list[float]] = []
    for row in value:
        if not isinstance(row, list):
            return None
        floats = [_as_float(v) for v in row]
        if not floats or any(v is None for v in floats):
            return None
        rows.append([v for v in floats if v is not None])
    if len({len(r) for r in rows}) != 1:
        return None
    return rows


def config_value(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """Look up "a.b.c" in a nested config dict; the default when any part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


@dataclass
class RunSummary:
    """What the report needs from one run directory: its config, val perplexities and trust matrices."""

    run_dir: Path
    label: str
    config: dict[str, Any]
    ppl_by_round: dict[int, dict[int, float]] = field(default_factory=dict)
    trust: list[tuple[int, list[list[float]]]] = field(default_factory=list)
    ended: bool = False  # a {"type": "run", "event": "end"} record was seen (False for a killed run)

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
        """Client -> val perplexity at final_round()."""
        last = self.final_round()
        if last is None:
            return {}
        return dict(sorted(self.ppl_by_round[last].items()))

    def mean_ppl_curve(self) -> list[tuple[int, float]]:
        """(round, arithmetic mean over clients of val ppl) for each complete round."""
        return [(r, _mean(list(self.ppl_by_round[r].values()))) for r in self.complete_rounds()]

    def last_trust(self) -> tuple[int, list[list[float]]] | None:
        """The trust matrix of the latest aggregation, or None for strategies that record none."""
        return self.trust[-1] if self.trust else None


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


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

    The label is the config's strategy.name, else the strategy of the run's start record, else the
    directory name. Raises FileNotFoundError naming the path when the directory or its metrics.jsonl
    is missing.
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

    ppl_by_round: dict[int, dict[int, float]] = {}
    trust: list[tuple[int, list[list[float]]]] = []
    run_strategy: str | None = None
    ended = False
    for rec in records:
        kind = rec.get("type")
        if kind == "eval":
            if rec.get("split", "val") != "val":
                continue
            rnd, client, ppl = (
                _as_int(rec.get("round")),
                _as_int(rec.get("client")),
                _as_float(rec.get("ppl")),
            )
            if rnd is None or client is None or ppl is None:
                continue
            ppl_by_round.setdefault(rnd, {})[client] = ppl  # a repeated (round, client): the later one wins
        elif kind == "trust":
            rnd, matrix = _as_int(rec.get("round")), _as_matrix(rec.get("matrix"))
            if rnd is not None and matrix is not None:
                trust.append((rnd, matrix))
        elif kind == "run":
            if rec.get("event") == "start" and isinstance(rec.get("strategy"), str):
                run_strategy = run_strategy or rec["strategy"]
            elif rec.get("event") == "end":
                ended = True

    strategy = config_value(config, "strategy.name")
    label = str(strategy) if strategy else (run_strategy or run_dir.resolve().name)
    return RunSummary(
        run_dir=run_dir,
        label=label,
        config=config,
        ppl_by_round={r: dict(sorted(ppl_by_round[r].items())) for r in sorted(ppl_by_round)},
        trust=sorted(trust, key=lambda item: item[0]),
        ended=ended,
    )


def unique_labels(runs: Sequence[RunSummary]) -> list[str]:
    """Labels that tell runs apart: a label shared by several runs gets the run's directory name appended."""
    counts = Counter(r.label for r in runs)
    labels = [f"{r.label} ({r.run_dir.resolve().name})" if counts[r.label] > 1 else r.label for r in runs]
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
