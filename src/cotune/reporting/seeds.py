"""The "Over seeds" section of `cotune report`: runs of one setting on several seeds, summarised.

A *setting* is a run's config with `run.seed`, `run.name`, `run.out_dir` and `run.compare` removed: two runs
whose configs are then equal differ only in their seed (and where they were written). The siblings of one
`run.compare` invocation therefore count as the setting of their own strategy (personalized) or algorithm
(FedCoLLM family): each sibling's config names it, and the list they were compared with is removed.

Each run gives one headline figure per model, at its final round: personalized, the final test perplexity
(validation for runs without a test split) or, on a generation task, the final ROUGE-L; FedCoLLM family,
the final test accuracy of each model (SLM, LLM) or, on a generation task, its ROUGE-L. Per-client figures
are averaged within their seed first (`stats.seed_means`): the clients of one run share its seed and are
not independent samples. The statistics are those of `cotune.reporting.stats` (the one place of them).

To stay compact, pairs are formed only against the FIRST setting given (the user names the method first):
the first setting minus each other one, paired by seed on the seeds both ran.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cotune.reporting.metrics import RunSummary, config_value
from cotune.reporting.stats import Summary, paired_difference, seed_means, summarize
from cotune.reporting.text import printable
from cotune.reporting.trackers import flat

# config keys that do not make a different setting: the seed, and where and with what the run was written
NOT_SETTING = (("run", "seed"), ("run", "name"), ("run", "out_dir"), ("run", "compare"))
GLOBAL = -1  # the client key of a global model's figure (one value for the whole run)
SETTINGS_TITLE = "Over seeds: final figure per setting (mean ± s.e. over seeds, 95% t interval)"
PAIRS_TITLE = "Over seeds: the first setting minus each other one, paired by seed"
SETTINGS_HEADER = ["setting", "model", "figure", "seeds", "mean ± s.e. (95% CI)"]
PAIRS_HEADER = ["difference", "model", "figure", "seeds", "mean ± s.e. (95% CI)", "verdict"]
NO_SUMMARY = "a value is not finite: no summary"


def setting_key(config: Mapping[str, Any]) -> str:
    """The config without the keys in NOT_SETTING, as canonical JSON: equal keys, same setting."""
    trimmed = json.loads(json.dumps(config, default=str))  # a deep copy of plain values
    for section, key in NOT_SETTING:
        part = trimmed.get(section)
        if isinstance(part, dict):
            part.pop(key, None)
            if not part:
                trimmed.pop(section)
    return json.dumps(trimmed, sort_keys=True)


@dataclass(frozen=True)
class Figure:
    """One headline figure of a run: per client (GLOBAL for a global model), in its own unit."""

    model: str  # "SLM" / "LLM" (FedCoLLM family), "—" (personalized: the clients' own models)
    name: str  # what is measured, e.g. "test perplexity"
    scale: float  # 100 for fractions shown as percentages
    per_client: dict[int, float]


def headline(run: RunSummary) -> list[Figure]:
    """The run's headline figures at its final round (see the module docstring); [] when it has none."""
    if not run.is_cotuning:
        series = run.gen_series().get(None)
        if series:
            recs = series[max(series)]
            return [Figure("—", "ROUGE-L (%)", 100.0, {_who(r.client): r.rouge_l for r in recs})]
        final = run.final_ppl()
        return [Figure("—", f"{run.ppl_split} perplexity", 1.0, final)] if final else []
    figures = []
    for model in ("slm", "llm"):
        if run.gen:
            by_round = run.gen_series().get(model)
            if by_round:
                recs = by_round[max(by_round)]
                figures.append(
                    Figure(model.upper(), "ROUGE-L (%)", 100.0, {_who(r.client): r.rouge_l for r in recs})
                )
            continue
        last = run.final_mc_round(model)
        if last is not None:
            mc = run.mc_at(model, last)
            figures.append(Figure(model.upper(), "accuracy (%)", 100.0, {_who(r.client): r.acc for r in mc}))
    return figures


def _who(client: int | None) -> int:
    return GLOBAL if client is None else client


@dataclass
class Setting:
    """The runs of one setting: its label and, per (model, figure), {seed: {client: value}}."""

    label: str
    config: Mapping[str, Any]
    values: dict[tuple[str, str], dict[int, dict[int, float]]] = field(default_factory=dict)
    scales: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def seeds(self) -> set[int]:
        return {seed for by_seed in self.values.values() for seed in by_seed}

    def per_seed(self, key: tuple[str, str]) -> dict[int, float]:
        """{seed: value}, the clients of a seed averaged within it (nested, not independent)."""
        return seed_means(self.values[key])


def _base_label(run: RunSummary) -> str:
    """Strategy (personalized) or algorithm, and the model: what tells the settings apart at a glance."""
    method = run.algorithm if run.is_cotuning else config_value(run.config, "strategy.name") or run.algorithm
    model = config_value(run.config, "model.name")
    return printable(f"{method} ({model})" if model else str(method), limit=80)


def _flat(config: dict[str, Any]) -> dict[str, str]:
    """Dotted key -> the value as JSON (`trackers.flat`, values made comparable as text)."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in flat(config).items()}


def _differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted config keys whose values differ (named by key only: config values stay out of reports)."""
    fa, fb = _flat(json.loads(setting_key(a))), _flat(json.loads(setting_key(b)))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def group_settings(runs: Sequence[RunSummary]) -> list[Setting]:
    """Runs grouped by setting, in the order their first run was given. Runs without a recorded run.seed
    (no config.yaml) are left out; of two runs of one setting and seed, the first given counts."""
    settings: dict[str, Setting] = {}
    for run in runs:
        seed = config_value(run.config, "run.seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            continue
        key = setting_key(run.config)
        setting = settings.setdefault(key, Setting(_base_label(run), run.config))
        for fig in headline(run):
            by_seed = setting.values.setdefault((fig.model, fig.name), {})
            setting.scales[(fig.model, fig.name)] = fig.scale
            by_seed.setdefault(seed, dict(fig.per_client))
    out = [s for s in settings.values() if s.values]
    _disambiguate(out)
    return out


def _disambiguate(settings: Sequence[Setting]) -> None:
    """Settings of one label (same method and model, other differences) get the keys they differ in."""
    for i, setting in enumerate(settings):
        first = next(s for s in settings if s.label == setting.label)
        if first is setting:
            continue
        keys = _differing_keys(first.config, setting.config)
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        setting.label = f"{setting.label} #{i + 1}, differs in {printable(shown, limit=120)}"


def applies(settings: Sequence[Setting]) -> bool:
    """The section is shown when some setting ran on more than one seed."""
    return any(len(s.seeds) > 1 for s in settings)


def _summary_text(summary: Summary | None, scale: float) -> str:
    return NO_SUMMARY if summary is None else summary.text(scale=scale)


def _safe(values: Mapping[int, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())


def settings_rows(settings: Sequence[Setting]) -> tuple[list[str], list[list[str]]]:
    """One row per (setting, model, figure): mean ± s.e. over seeds and the t interval (n_seeds − 1 df)."""
    rows = []
    for setting in settings:
        for key in setting.values:
            per_seed = setting.per_seed(key)
            summary = summarize(list(per_seed.values())) if _safe(per_seed) else None
            cell = _summary_text(summary, setting.scales[key])
            rows.append([setting.label, key[0], key[1], str(len(per_seed)), cell])
    return list(SETTINGS_HEADER), rows


def pair_rows(settings: Sequence[Setting]) -> tuple[list[str], list[list[str]]]:
    """The first setting minus each other one, per (model, figure) both have, on the seeds both ran."""
    rows: list[list[str]] = []
    if not settings:
        return list(PAIRS_HEADER), rows
    first = settings[0]
    for other in settings[1:]:
        for key in first.values:
            if key not in other.values:
                continue
            a, b = first.per_seed(key), other.per_seed(key)
            if not set(a) & set(b):
                continue
            label = f"{first.label} − {other.label}"
            if not (_safe(a) and _safe(b)):
                rows.append([label, key[0], key[1], str(len(set(a) & set(b))), NO_SUMMARY, "—"])
                continue
            summary = paired_difference(a, b).summary
            scale = first.scales[key]
            rows.append([label, key[0], key[1], str(summary.n), summary.text(scale=scale), summary.verdict()])
    return list(PAIRS_HEADER), rows


def cli_tables(runs: Sequence[RunSummary]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the two tables, or [] when no setting ran on more than one seed."""
    settings = group_settings(runs)
    if not applies(settings):
        return []
    tables = [(SETTINGS_TITLE, *settings_rows(settings))]
    header, rows = pair_rows(settings)
    if rows:
        tables.append((PAIRS_TITLE, header, rows))
    return tables


EXPLANATION = (
    "Runs whose configs are equal once run.seed, run.name, run.out_dir and run.compare are removed are one "
    "setting (the siblings of one run.compare invocation count as the setting of their own strategy or "
    "algorithm). Each seed gives one value per model: the final test perplexity (validation without a test "
    "split) or ROUGE-L of a personalized run, the final test accuracy or ROUGE-L of each FedCoLLM-family "
    "model; per-client values are first averaged within their seed (clients share their seed: they are not "
    "independent samples). Cells are mean ± standard error over seeds and the 95% t interval on "
    "n_seeds − 1 degrees of freedom. Pairs are formed only against the first setting given: it minus each "
    'other setting, difference taken per seed on the seeds both ran; "not significant" when the interval '
    "covers 0. Accuracy and ROUGE-L are in %; a lower perplexity is better."
)


def markdown(
    runs: Sequence[RunSummary], table: Callable[[Sequence[str], Sequence[Sequence[str]], int], str]
) -> list[str]:
    """The "Over seeds" section (`table`: report's table writer); [] when it does not apply."""
    tables = cli_tables(runs)
    if not tables:
        return []
    parts = ["## Over seeds", "", EXPLANATION, ""]
    for title, header, rows in tables:
        parts += [f"**{title}**", "", table(header, rows, 3), ""]
    return parts
