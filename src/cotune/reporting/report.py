"""A Markdown report with PNG plots comparing finished (or killed) runs.

Only numbers read from the runs' metrics go in: no interpretation. Plots use matplotlib's
object-oriented API on an Agg canvas, so no display is needed and the global pyplot backend of
whoever imports this module is left alone; matplotlib is imported only when plots are drawn, which
keeps `cotune` commands that just print comparison_rows fast.

Personalized runs are compared by test perplexity (validation for runs without a test split) and
trust matrices; FedCoLLM-family runs by multiple-choice test accuracy (cotuning_rows) and adapter
traffic (comm_rows). A report over a mix of both has the sections of each, each over the runs it applies to.
Runs of either family that scored generated text get the generation sections (gen_rows, gen_round_rows):
scores, and a few sample outputs (sample_rows) only from the `gen_sample` records a run on the shipped
public data wrote; never a user's text. Runs of one setting on several seeds add the "Over seeds" section
(`cotune.reporting.seeds`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cotune.caches import confine_caches
from cotune.config.names import ROLES
from cotune.layout import PLOTS_DIR, REPORT_FILE
from cotune.records import (
    SAMPLE_PROMPT_CHARS,
    SAMPLE_TEXT_CHARS,
    CommRecord,
    DistillValRecord,
    GenRecord,
    PrivacySpent,
)
from cotune.reporting.files import replace_atomically, write_text_atomically
from cotune.reporting.metrics import (
    RunSummary,
    client_label,
    client_label_across,
    config_value,
    load_runs,
    unique_labels,
)
from cotune.reporting.seeds import cli_tables as seed_tables
from cotune.reporting.seeds import markdown as seeds_markdown
from cotune.reporting.text import printable

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ANNOTATE_MAX_CLIENTS = 12  # heatmap cells get their value written in up to this many clients
LOG_Y_RATIO = 20.0  # use a log y axis when max/min of the plotted perplexities exceeds this
MISSING = "—"


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.{digits}f}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0): the clients are all of them, not a sample."""
    if not values:
        return math.nan, math.nan
    mean = math.fsum(values) / len(values)
    if not math.isfinite(mean):
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def _fmt_mean_std(values: Sequence[float]) -> str:
    if not values:
        return MISSING
    mean, std = mean_std(values)
    return f"{_fmt(mean)} ± {_fmt(std)}"


def comparison_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the final per-client perplexity table; the last row is "mean ± std" per run.

    Each run contributes the perplexities of its own final evaluated round (RunSummary.final_ppl).
    A client a run never evaluated shows "—".
    """
    finals = [run.final_ppl() for run in runs]
    clients = sorted({c for final in finals for c in final})
    header = ["client", *unique_labels(runs)]
    rows = [[client_label_across(c, runs), *(_fmt(final.get(c)) for final in finals)] for c in clients]
    rows.append(["mean ± std", *(_fmt_mean_std(list(final.values())) for final in finals)])
    return header, rows


def round_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the mean perplexity per round table (one row per evaluated round)."""
    curves = [dict(run.mean_ppl_curve()) for run in runs]
    rounds = sorted({r for curve in curves for r in curve})
    header = ["round", *unique_labels(runs)]
    return header, [[str(r), *(_fmt(curve.get(r)) for curve in curves)] for r in rounds]


# ------------------------------------------------------------------------------- FedCoLLM family


def ppl_split_name(runs: Sequence[RunSummary]) -> str:
    """Which split the perplexities come from: each client's test split (never seen by the trust), or
    validation for runs without one (older runs, data.test_fraction 0: the trust evidence saw it)."""
    splits = {run.ppl_split for run in runs}
    if splits == {"test"}:
        return "test"
    if splits == {"val"}:
        return "validation"
    return "test (validation for runs without a test split)"


def ppl_title(runs: Sequence[RunSummary]) -> str:
    return f"final {ppl_split_name(runs)} perplexity per client (lower is better)"


COTUNING_TITLE = "multiple-choice test accuracy, % (higher is better)"
COMM_TITLE = "adapter traffic per client per round (% of the full SLM)"
COTUNING_HEADER = ["setting", "acc (%)", "acc_norm (%)", "run"]
COMM_HEADER = ["run", "rounds", "clients", "up / client / round", "down / client / round", "total up + down"]
# (setting, model, algorithm whose final round gives the figure); zero-shot rows are filled separately
_TRAINED_ROWS = (
    ("SLM standalone", "slm", "standalone"),
    ("SLM FedAvg", "slm", "fedavg"),
    ("SLM FedAvg + server fine-tuning (λ=0)", "slm", "fedavg_ft"),
    ("SLM FedCoLLM", "slm", "fedcollm"),
    ("LLM centralized", "llm", "centralized"),
    ("LLM FedCoLLM", "llm", "fedcollm"),
)
# Rows of controls outside the paper's table: shown only when such a run is there (no row of "—").
_CONTROL_ALGORITHMS = ("fedavg_ft",)


def _pct(value: float, std: float | None = None) -> str:
    """An accuracy fraction as a percentage, with ± std over clients when there is one."""
    text = _fmt(100.0 * value)
    return text if std is None else f"{text} ± {_fmt(100.0 * std)}"


def _ppl_runs(runs: Sequence[RunSummary]) -> list[RunSummary]:
    """Runs the perplexity sections apply to: personalized ones, and any other that logged perplexity."""
    return [run for run in runs if not run.is_cotuning or run.ppl_by_round]


def _cotuning_runs(runs: Sequence[RunSummary]) -> list[RunSummary]:
    return [run for run in runs if run.is_cotuning]


def _mc_cells(run: RunSummary, model: str, rnd: int) -> tuple[str, str]:
    """acc and acc_norm cells at rnd; std over clients goes on acc_norm too, it spreads the same way."""
    recs = run.mc_at(model, rnd)
    summary = run.mc_summary(model, rnd)
    if summary is None:
        return MISSING, MISSING
    acc, acc_norm, std = summary
    std_norm = None if std is None else mean_std([r.acc_norm for r in recs])[1]
    return _pct(acc, std), _pct(acc_norm, std_norm)


def _zero_shot_row(setting: str, model: str, runs: Sequence[RunSummary], labels: Sequence[str]) -> list[str]:
    """From a zero_shot run if there is one, else from round 0 (before training) of another run.

    Among other runs, one whose round 0 is a single global-model record is preferred over per-client
    records (the same base model scored once, rather than a mean ± 0 over identical copies); then run order.
    """
    candidates = [(run, label) for run, label in zip(runs, labels, strict=True) if 0 in run.mc.get(model, {})]

    def rank(item: tuple[RunSummary, str]) -> int:
        run = item[0]
        if run.algorithm == "zero_shot":
            return 0
        return 1 if run.mc_at(model, 0)[0].client is None else 2

    if not candidates:
        return [setting, MISSING, MISSING, MISSING]
    run, label = min(candidates, key=rank)  # min keeps the first of equal rank: run order breaks ties
    source = label if run.algorithm == "zero_shot" else f"{label}, round 0"
    return [setting, *_mc_cells(run, model, 0), source]


def cotuning_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the FedCoLLM paper's table: test accuracy of each model under each setting.

    Figures are percentages at each run's final usable round (RunSummary.final_mc); a setting with
    several runs gets a row per run, a missing one a row of "—" (a missing control, fedavg_ft: no row).
    Zero-shot comes from a zero_shot run, else from round 0 of another run (named in the run column).
    Per-client figures (standalone) are mean ± population std over clients. When FedCoLLM and centralized
    LLM figures both exist, a last row gives FedCoLLM's LLM accuracy as a percent of centralized's (the
    paper's 97–99% claim).
    """
    runs = _cotuning_runs(runs)
    labels = unique_labels(runs)
    rows: list[list[str]] = [_zero_shot_row("SLM zero-shot", "slm", runs, labels)]
    for setting, model, algorithm in _TRAINED_ROWS:
        if setting == "LLM centralized":
            rows.append(_zero_shot_row("LLM zero-shot", "llm", runs, labels))
        found = False
        for run, label in zip(runs, labels, strict=True):
            last = run.final_mc_round(model)
            if run.algorithm != algorithm or last is None:
                continue
            rows.append([setting, *_mc_cells(run, model, last), label])
            found = True
        if not found and algorithm not in _CONTROL_ALGORITHMS:
            rows.append([setting, MISSING, MISSING, MISSING])

    fedcollm = [(r, lab) for r, lab in zip(runs, labels, strict=True) if r.algorithm == "fedcollm"]
    central = [(r, lab) for r, lab in zip(runs, labels, strict=True) if r.algorithm == "centralized"]
    for fed_run, fed_label in fedcollm:
        fed = fed_run.final_mc("llm")
        for cen_run, cen_label in central:
            cen = cen_run.final_mc("llm")
            if fed is None or cen is None:
                continue
            acc, acc_norm = (
                f"{_fmt(100.0 * f / c)}%" if c else MISSING for f, c in zip(fed[:2], cen[:2], strict=True)
            )
            rows.append(["LLM FedCoLLM / centralized", acc, acc_norm, f"{fed_label} / {cen_label}"])
    return list(COTUNING_HEADER), rows


def human_bytes(n: float) -> str:
    """Decimal units (kB = 1000 B), three significant digits: "1.2 MB" reads faster than 1200000."""
    if not math.isfinite(n):
        return _fmt(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 999.5 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000.0
    raise AssertionError("unreachable")


def _bytes_and_share(n: float, full: float) -> str:
    return f"{human_bytes(n)} ({100.0 * n / full:.3g}%)" if full > 0 else human_bytes(n)


def comm_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the traffic table: one row per FedCoLLM-family run.

    Up/down are mean bytes one client sends/receives in one round (over all comm records), with the
    share of the full SLM in brackets; runs that log no traffic (standalone, centralized, zero-shot)
    show "—".
    """
    runs = _cotuning_runs(runs)
    rows: list[list[str]] = []
    for run, label in zip(runs, unique_labels(runs), strict=True):
        if not run.comm:
            rows.append([label, MISSING, MISSING, MISSING, MISSING, MISSING])
            continue
        rounds = {r.round for r in run.comm}
        clients = {r.client for r in run.comm}
        full = math.fsum(r.full_slm_bytes for r in run.comm) / len(run.comm)
        up = math.fsum(r.bytes_up for r in run.comm)
        down = math.fsum(r.bytes_down for r in run.comm)
        rows.append(
            [
                label,
                str(len(rounds)),
                str(len(clients)),
                _bytes_and_share(up / len(run.comm), full),
                _bytes_and_share(down / len(run.comm), full),
                human_bytes(up + down),
            ]
        )
    return list(COMM_HEADER), rows


CLIENT_TRAFFIC_HEADER = ["run", "client", "LoRA rank", "up / round", "down / round", "total up + down"]


def client_rank(run: RunSummary, client: int) -> str:
    """Client `client`'s LoRA rank from the run's config (lora.ranks, through lora.tiers; else lora.r)."""
    ranks, tiers = config_value(run.config, "lora.ranks"), config_value(run.config, "lora.tiers", {})
    rank = config_value(run.config, "lora.r") if ranks is None or client >= len(ranks) else ranks[client]
    rank = tiers.get(rank, rank) if isinstance(rank, str) else rank
    return MISSING if rank is None else str(rank)


def client_traffic_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """One row per (run, client) that logged traffic: its rank and mean bytes per round each way, with the
    share of the full model's size in brackets; clients of different ranks move different bytes."""
    rows: list[list[str]] = []
    for run, label in zip(runs, unique_labels(runs), strict=True):
        by_client: dict[int, list[CommRecord]] = {}
        for rec in run.comm:
            by_client.setdefault(rec.client, []).append(rec)
        for client, recs in sorted(by_client.items()):
            full = math.fsum(r.full_slm_bytes for r in recs) / len(recs)
            up, down = math.fsum(r.bytes_up for r in recs), math.fsum(r.bytes_down for r in recs)
            rows.append(
                [
                    label,
                    run.client_label(client),
                    client_rank(run, client),
                    _bytes_and_share(up / len(recs), full),
                    _bytes_and_share(down / len(recs), full),
                    human_bytes(up + down),
                ]
            )
    return list(CLIENT_TRAFFIC_HEADER), rows


def print_rows_for_cli(runs: Sequence[RunSummary]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table the CLI should print for these runs, in order.

    The perplexity comparison when there are personalized runs, the co-tuning accuracy table and the
    traffic table (when any run logged traffic) when there are FedCoLLM-family runs; each over the
    runs it applies to, so a mixed set prints both without columns of "—". Last, the "Over seeds" tables
    when some setting ran on several seeds (`cotune.reporting.seeds`).
    """
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    ppl_runs = _ppl_runs(runs)
    if ppl_runs:
        tables.append((ppl_title(ppl_runs), *comparison_rows(ppl_runs)))
    cot_runs = _cotuning_runs(runs)
    if cot_runs:
        if _shows_mc(cot_runs):
            tables.append((COTUNING_TITLE, *cotuning_rows(cot_runs)))
        if any(run.comm for run in cot_runs):
            tables.append((COMM_TITLE, *comm_rows(cot_runs)))
    gen_runs = _gen_runs(runs)
    if gen_runs:
        tables.append((gen_title(gen_runs), *gen_rows(gen_runs)))
    tables += seed_tables(runs)
    return tables


# ---- generation ----------------------------------------------------------------------------------------
GEN_HEADER = ("run", "model", "client", "round", "exact match", "F1", "ROUGE-L", "response ppl", "n")


def _gen_runs(runs: Sequence[RunSummary]) -> list[RunSummary]:
    return [run for run in runs if run.gen]


def _shows_mc(runs: Sequence[RunSummary]) -> bool:
    """Whether the multiple-choice sections apply: some run scored choices, or none scored generations
    (then they say that nothing was recorded, as before generation tasks existed)."""
    return any(run.mc for run in runs) or not any(run.gen for run in runs)


def gen_split_name(runs: Sequence[RunSummary]) -> str:
    splits = {run.gen_split() for run in runs}
    return "test" if splits == {"test"} else "validation" if splits == {"val"} else "test or validation"


def gen_title(runs: Sequence[RunSummary]) -> str:
    return f"Generation: final {gen_split_name(runs)} scores"


def _model_name(model: str | None) -> str:
    return MISSING if model is None else model.upper()


def _gen_cells(recs: Sequence[GenRecord]) -> list[str]:
    """exact match, F1, ROUGE-L (%, ± std over clients when several), response ppl and n of records."""
    cells = []
    for values in ([r.exact_match for r in recs], [r.f1 for r in recs], [r.rouge_l for r in recs]):
        mean, std = mean_std(values)
        cells.append(_pct(mean, std if len(recs) > 1 else None))
    ppl = [r.ppl for r in recs]
    cells.append(_fmt(ppl[0]) if len(recs) == 1 else _fmt_mean_std(ppl))
    cells.append(str(sum(r.n for r in recs)) if len(recs) > 1 else str(recs[0].n))
    return cells


def gen_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each run's generation scores at each model's final round, one row per client
    (or the global model), and a mean ± std over clients row when there are several."""
    rows: list[list[str]] = []
    for run, label in zip(runs, unique_labels(runs), strict=True):
        for model, by_round in sorted(run.gen_series().items(), key=lambda item: item[0] or ""):
            last = max(by_round)
            recs = by_round[last]
            for rec in recs:
                who = "global" if rec.client is None else run.client_label(rec.client)
                rows.append([label, _model_name(model), who, str(last), *_gen_cells([rec])])
            if len(recs) > 1:
                rows.append([label, _model_name(model), "mean ± std", str(last), *_gen_cells(recs)])
    return list(GEN_HEADER), rows


def _gen_series(runs: Sequence[RunSummary]) -> list[tuple[str, list[tuple[int, float]]]]:
    """(column name, ROUGE-L curve) for each run and model with generation records."""
    out = []
    for run, label in zip(runs, unique_labels(runs), strict=True):
        for model in sorted(run.gen_series(), key=lambda m: m or ""):
            name = label if model is None else f"{label} {model.upper()}"
            out.append((name, run.gen_curve(model)))
    return out


def gen_round_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """ROUGE-L (%) per round: the global model's, or the mean over clients; a column per (run, model)."""
    columns = [(name, dict(curve)) for name, curve in _gen_series(runs)]
    rounds = sorted({r for _, curve in columns for r in curve})
    header = ["round", *(name for name, _ in columns)]
    rows = [[str(r), *(MISSING if r not in c else _pct(c[r]) for _, c in columns)] for r in rounds]
    return header, rows


def _plot_rouge_per_round(runs: Sequence[RunSummary], path: Path) -> bool:
    """ROUGE-L (%) per round, a line per (run, model)."""
    from matplotlib.ticker import MaxNLocator

    series = [
        (name, [(r, 100.0 * v) for r, v in curve if math.isfinite(v)]) for name, curve in _gen_series(runs)
    ]
    series = [(name, curve) for name, curve in series if curve]
    if not series:
        return False
    fig = _new_figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, (name, curve) in enumerate(series):
        xs, ys = zip(*curve, strict=True)
        ax.plot(xs, ys, "-", marker="o", color=f"C{i % 10}", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel(f"{gen_split_name(runs)} ROUGE-L (%)")
    ax.set_title("ROUGE-L of generated text per round")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)
    return True


def _gen_markdown(runs: Sequence[RunSummary], has_plot: bool) -> list[str]:
    """The generation sections: final scores per model and client, and ROUGE-L per round."""
    split = gen_split_name(runs)
    parts = [f"## {gen_title(runs)}", ""]
    parts += [
        f"Greedy generations on the {split} split, scored against the reference responses at each model's "
        "final round: exact match and F1 after SQuAD's normalisation (lowercase, no punctuation or "
        "articles, whitespace collapsed; F1 over words), ROUGE-L F-measure (rouge-score, no stemmer), all "
        "in % and averaged over examples; response ppl is the perplexity of the reference responses "
        "(teacher-forced, response tokens and the stop token only). Per-client rows are each client's "
        "own figures; the mean row is mean ± std over clients (population std, ddof=0). n = examples.",
        "",
        _md_table(*gen_rows(runs), align_right_from=3),
        "",
        f"## Generation: {split} ROUGE-L per round",
        "",
        "ROUGE-L (%) of the global model, or the mean over clients; round 0 is before any training.",
        "",
        _md_table(*gen_round_rows(runs)),
        "",
    ]
    if has_plot:
        parts += [f"![{split} ROUGE-L per round](plots/rouge_l_per_round.png)", ""]
    return parts + _samples_markdown(runs)


SAMPLE_HEADER = ("run", "model", "client", "round", "example", "prompt (start)", "reference", "generated")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#!~])")


def sample_text(text: str, limit: int) -> str:
    """A sample's text as one safe Markdown table cell: line breaks shown as ↵, control characters escaped
    and the length bounded (`printable`), and Markdown's special characters backslash-escaped, so no
    text (a model's output included) can format the report, embed an image or HTML, or break the table
    (`_md_cell` escapes the pipes)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(text.replace("\r\n", "\n").replace("\n", "↵ "), limit))


def sample_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each run's recorded samples (shipped public data only) at their final round."""
    rows: list[list[str]] = []
    for run, label in zip(runs, unique_labels(runs), strict=True):
        for rec in run.final_gen_samples():
            rows.append(
                [
                    label,
                    _model_name(rec.model),
                    "global" if rec.client is None else run.client_label(rec.client),
                    str(rec.round),
                    str(rec.example),
                    sample_text(rec.prompt, SAMPLE_PROMPT_CHARS),
                    sample_text(rec.reference, SAMPLE_TEXT_CHARS),
                    sample_text(rec.generated, SAMPLE_TEXT_CHARS),
                ]
            )
    return list(SAMPLE_HEADER), rows


def _samples_markdown(runs: Sequence[RunSummary]) -> list[str]:
    """A few test examples with what each model generated, for runs on the shipped public data (the only
    runs that record them); nothing for any other run."""
    header, rows = sample_rows(runs)
    if not rows:
        return []
    return [
        "## Generation: sample outputs",
        "",
        "The first test examples of the shipped public data (runs on a user's own data record none) with "
        "each model's greedy generation at its final round; prompts and texts cut, line breaks shown as ↵.",
        "",
        _md_table(header, rows, align_right_from=len(header)),
        "",
    ]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> str:
    aligns = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    lines = [
        "| " + " | ".join(_md_cell(h) for h in header) + " |",
        "| " + " | ".join(aligns) + " |",
        *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def _setting(run: RunSummary, dotted: str) -> str:
    value = config_value(run.config, dotted)
    return MISSING if value is None else str(value)


# --------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Save the figure as a PNG at `path` atomically (a kill leaves the old plot or the new one)."""
    replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _ppl_y_axis(ax: Axes, values: Sequence[float]) -> None:
    """Log y when the perplexities span a wide range, labelled with plain numbers (not 6×10²)."""
    from matplotlib.ticker import LogFormatter

    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > LOG_Y_RATIO:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=True))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _plot_ppl_per_round(runs: Sequence[RunSummary], labels: Sequence[str], path: Path) -> bool:
    from matplotlib.ticker import MaxNLocator

    curves = [[(r, v) for r, v in run.mean_ppl_curve() if math.isfinite(v)] for run in runs]
    if not any(curves):
        return False
    fig = _new_figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, (curve, label) in enumerate(zip(curves, labels, strict=True)):
        if curve:
            xs, ys = zip(*curve, strict=True)
            ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=label)
    _ppl_y_axis(ax, [v for curve in curves for _, v in curve])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before training)")
    split = ppl_split_name(runs).split(" ")[0]
    ax.set_ylabel(f"mean {split} perplexity")
    ax.set_title(f"Mean {split} perplexity over clients, per round")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)
    return True


def _plot_ppl_per_client(runs: Sequence[RunSummary], labels: Sequence[str], path: Path) -> bool:
    finals = [run.final_ppl() for run in runs]
    clients = sorted({c for final in finals for c in final})
    if not clients:
        return False
    n = len(runs)
    width = 0.8 / n
    fig = _new_figure(max(6.0, min(14.0, 1.0 + 0.3 * len(clients) * n)), 4.5)
    ax = fig.add_subplot()
    annotate = len(clients) * n <= 24
    for i, (final, label) in enumerate(zip(finals, labels, strict=True)):
        xs = [k + (i - (n - 1) / 2) * width for k, c in enumerate(clients) if c in final]
        ys = [final[c] for c in clients if c in final]
        bars = ax.bar(
            xs, ys, width=width, color=f"C{i % 10}", label=f"{label} (round {runs[i].final_round()})"
        )
        if annotate:
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    _ppl_y_axis(ax, [v for final in finals for v in final.values()])
    ax.set_xticks(range(len(clients)), [client_label_across(c, runs) for c in clients], fontsize=8)
    ax.set_xlabel("client")
    split = ppl_split_name(runs).split(" ")[0]
    ax.set_ylabel(f"{split} perplexity")
    ax.set_title(f"Final {split} perplexity per client")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncols=min(n, 4), fontsize="small")  # never over the bars
    save_png(fig, path)
    return True


def _plot_trust(matrix: list[list[float]], title: str, path: Path, names: Sequence[str] = ()) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import PowerNorm

    n_rows, n_cols = len(matrix), len(matrix[0])
    side = min(12.0, max(4.5, 0.55 * max(n_rows, n_cols) + 2.5))
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    # rows sum to 1, so one fixed 0..1 scale for every run; the square-root norm keeps small
    # weights (about 1/N each with many clients) from all looking alike
    cmap, norm = colormaps["viridis"], PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    image = ax.imshow(matrix, cmap=cmap, norm=norm)
    fig.colorbar(image, ax=ax, label="trust weight", shrink=0.85)
    if max(n_rows, n_cols) <= ANNOTATE_MAX_CLIENTS:
        fontsize = 10 if max(n_rows, n_cols) <= 6 else 8
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                r, g, b, _ = cmap(norm(value))
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=fontsize)
    ticks = [client_label(k, names) for k in range(max(n_rows, n_cols))]
    ax.set_xticks(range(n_cols), ticks[:n_cols], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), ticks[:n_rows], fontsize=8)
    ax.set_xlabel("client j (gives)")
    ax.set_ylabel("client i (receives)")
    ax.set_title(title)
    save_png(fig, path)


def _accuracy_series(run: RunSummary) -> list[tuple[str, list[tuple[int, float]]]]:
    """(model, accuracy curve) for each model worth a curve: not one only evaluated at round 0 while the
    run trained something else (e.g. FedAvg's untouched LLM), whose single point is just its zero-shot figure.
    """
    trained = any(r > 0 for by_round in run.mc.values() for r in by_round)
    out: list[tuple[str, list[tuple[int, float]]]] = []
    for model in ROLES:
        curve = run.mc_curve(model)
        if curve and (not trained or any(r > 0 for r, _ in curve)):
            out.append((model, curve))
    return out


def _plot_accuracy_per_round(runs: Sequence[RunSummary], labels: Sequence[str], path: Path) -> bool:
    """SLM accuracy per round (solid) and LLM accuracy per round (dashed), one colour per run.

    A run evaluated only at round 0 (zero_shot) is drawn as horizontal lines across the rounds (SLM dotted,
    LLM dash-dot).
    """
    from matplotlib.ticker import MaxNLocator

    series: list[tuple[int, str, str, list[tuple[int, float]]]] = []
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        for model, curve in _accuracy_series(run):
            finite = [(r, 100.0 * v) for r, v in curve if math.isfinite(v)]
            if finite:
                series.append((i, model, label, finite))
    if not series:
        return False
    fig = _new_figure(7.5, 4.5)
    ax = fig.add_subplot()
    any_trained = any(r > 0 for _, _, _, curve in series for r, _ in curve)
    for i, model, label, curve in series:
        xs, ys = zip(*curve, strict=True)
        colour, name = f"C{i % 10}", f"{label} ({model.upper()})"
        if any_trained and max(xs) == 0:  # a zero-shot run: a reference level, not a point under the others
            ax.axhline(
                ys[-1], linestyle=":" if model == "slm" else "-.", color=colour, label=f"{name}, round 0"
            )
            continue
        style, marker = ("-", "o") if model == "slm" else ("--", "s")
        ax.plot(xs, ys, style, marker=marker, color=colour, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Multiple-choice test accuracy per round (SLM solid, LLM dashed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)
    return True


def distill_time_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Per run and round: the distillation's wall time and the seconds of it spent scoring the server's
    validation split (what keep 'best' and the validation curve cost; distill.val_every trades it)."""
    header = ["run", "round", "distillation (s)", "of which validation scoring (s)", "share"]
    rows = []
    for run, label in zip(runs, unique_labels(runs), strict=True):
        for d in run.distill:
            if d.val_s is None:  # a run written before the split was recorded
                continue
            share = f"{100 * d.val_s / d.wall_s:.0f}%" if d.wall_s > 0 else "-"
            rows.append([label, str(d.round), f"{d.wall_s:.1f}", f"{d.val_s:.1f}", share])
    return header, rows


def distill_val_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Per run, round and model: the server's validation accuracy (%) and choice-level loss (a generation
    task: its response loss alone) at the start of the round's distillation, after its last step, at its
    best scored step, and the step the round kept."""
    header = ["run", "round", "model", "start", "last step", "best step", "kept"]
    rows = []
    for run, label in zip(runs, unique_labels(runs), strict=True):
        kept = {(d.round, "slm"): d.slm_kept for d in run.distill} | {
            (d.round, "llm"): d.llm_kept for d in run.distill
        }
        for rnd in sorted({v.round for v in run.distill_val}):
            for model in ROLES:
                curve = [v for v in run.distill_val if v.round == rnd and v.model == model]
                if not curve:
                    continue
                best = max(curve, key=lambda v: v.merit)

                def cell(v: DistillValRecord) -> str:
                    return f"{v.nll:.3f}" if v.acc is None else f"{_pct(v.acc)} / {v.nll:.3f}"

                k = kept.get((rnd, model))
                rows.append(
                    [
                        label,
                        str(rnd),
                        model.upper(),
                        cell(curve[0]),
                        f"{cell(curve[-1])} (step {curve[-1].step})",
                        f"{cell(best)} (step {best.step})",
                        f"step {curve[-1].step} (last)" if k is None else f"step {k}",
                    ]
                )
    return header, rows


def align_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Per run, round and student model (an LLM of another tokenizer): what the distillation across the
    tokenizers covered (`AlignRecord`)."""
    header = ["run", "round", "student", "positions", "exact", "merged", "unaligned", "carried", "unmatched"]
    rows = []
    for run, label in zip(runs, unique_labels(runs), strict=True):
        for a in run.align:
            rows.append(
                [
                    label,
                    str(a.round),
                    a.model.upper(),
                    str(a.positions),
                    _pct(a.exact_share),
                    str(a.merged),
                    str(a.unaligned),
                    _pct(a.carried_share),
                    _pct(a.unmatched_share),
                ]
            )
    return header, rows


def _plot_distill_validation(runs: Sequence[RunSummary], labels: Sequence[str], path: Path) -> bool:
    """Validation accuracy (a generation task: response loss) along each round's distillation (round r
    spans r-1..r on the x axis), SLM solid, LLM dashed, one colour per run; a star marks the step each
    round kept."""
    drawn = False
    loss = any(v.acc is None for run in runs for v in run.distill_val)

    def y(v: DistillValRecord) -> float:
        return v.nll if loss or v.acc is None else 100.0 * v.acc

    fig = _new_figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        kept = {(d.round, "slm"): d.slm_kept for d in run.distill} | {
            (d.round, "llm"): d.llm_kept for d in run.distill
        }
        for model, style in (("slm", "-"), ("llm", "--")):
            first = True
            for rnd in sorted({v.round for v in run.distill_val}):
                curve = [v for v in run.distill_val if v.round == rnd and v.model == model]
                if not curve:
                    continue
                last = max(1, curve[-1].step)
                xs = [rnd - 1 + v.step / last for v in curve]
                ys = [y(v) for v in curve]
                ax.plot(
                    xs,
                    ys,
                    style,
                    marker=".",
                    color=f"C{i % 10}",
                    label=f"{label} ({model.upper()})" if first else None,
                )
                first, drawn = False, True
                k = kept.get((rnd, model))
                at = next((v for v in curve if v.step == k), None) if k is not None else None
                if at is not None:
                    ax.plot([rnd - 1 + at.step / last], [y(at)], "*", color=f"C{i % 10}", markersize=12)
    if not drawn:
        return False
    ax.set_xlabel("round (each round: from its start, the FedAvg average, to its last distillation step)")
    what = "response loss" if loss else "accuracy"
    ax.set_ylabel("server validation response loss" if loss else "server validation accuracy (%)")
    ax.set_title(f"Validation {what} along distillation (SLM solid, LLM dashed, * kept)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)
    return True


# -------------------------------------------------------------------------------------------- report


def write_report(run_dirs: Sequence[Path], out_dir: Path | None = None) -> Path:
    """Write report.md and plots/*.png comparing the runs; returns the report.md path.

    out_dir defaults to the first run directory. Image links in report.md are relative to out_dir,
    so the folder can be moved or shared as a whole.
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    runs = load_runs([Path(d) for d in run_dirs])
    labels = [run.label for run in runs]
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    confine_caches(out)  # matplotlib's font cache goes next to the report, not under ~
    plots = out / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)

    ppl_runs = _ppl_runs(runs)
    ppl_labels = [run.label for run in ppl_runs]
    has_round_plot = bool(ppl_runs) and _plot_ppl_per_round(ppl_runs, ppl_labels, plots / "ppl_per_round.png")
    has_client_plot = bool(ppl_runs) and _plot_ppl_per_client(
        ppl_runs, ppl_labels, plots / "ppl_per_client.png"
    )
    cot_runs = _cotuning_runs(runs)
    has_acc_plot = bool(cot_runs) and _plot_accuracy_per_round(
        cot_runs, [run.label for run in cot_runs], plots / "accuracy_per_round.png"
    )
    gen_runs = _gen_runs(runs)
    has_gen_plot = bool(gen_runs) and _plot_rouge_per_round(gen_runs, plots / "rouge_l_per_round.png")
    val_runs = [run for run in cot_runs if run.distill_val]
    if val_runs:
        _plot_distill_validation(val_runs, unique_labels(val_runs), plots / "distill_validation.png")
    trust_plots: dict[int, str] = {}
    used: set[str] = set()
    for i, run in enumerate(runs):
        last = run.last_trust()
        if last is None:
            continue
        name = f"trust_{_slug(run.label)}.png"
        if name in used:  # two labels that differ only in characters the slug drops
            name = f"trust_{_slug(run.label)}_{i}.png"
        used.add(name)
        _plot_trust(last[1], f"Trust matrix: {run.label}, round {last[0]}", plots / name, run.client_names)
        trust_plots[i] = f"{PLOTS_DIR}/{name}"

    md = _report_markdown(
        runs, labels, has_round_plot, has_client_plot, trust_plots, has_acc_plot, has_gen_plot
    )
    path = out / REPORT_FILE
    write_text_atomically(path, md)
    return path


def _report_markdown(
    runs: Sequence[RunSummary],
    labels: Sequence[str],
    has_round_plot: bool,
    has_client_plot: bool,
    trust_plots: dict[int, str],
    has_acc_plot: bool = False,
    has_gen_plot: bool = False,
) -> str:
    any_cotuning = any(run.is_cotuning for run in runs)
    parts: list[str] = [f"# cotune report: {', '.join(labels)}", "", "## Runs compared", ""]
    run_header = [
        "run",
        "strategy",
        "algorithm",
        "model",
        *(["LLM"] if any_cotuning else []),
        "clients",
        "rounds",
        "seed",
        "final eval round",
        "end recorded",
        "run dir",
    ]
    run_rows = [
        [
            label,
            MISSING if run.is_cotuning else _setting(run, "strategy.name"),  # FedCoLLM has no strategy
            _setting(run, "algorithm"),
            _setting(run, "model.name"),
            *([_setting(run, "llm.model.name")] if any_cotuning else []),
            _setting(run, "federation.clients"),
            _setting(run, "federation.rounds"),
            _setting(run, "run.seed"),
            _final_eval_round(run),
            "yes" if run.ended else "no",
            f"`{printable(run.run_dir.resolve(), limit=1000)}`",
        ]
        for run, label in zip(runs, labels, strict=True)
    ]
    parts += [_md_table(run_header, run_rows, align_right_from=len(run_header)), ""]
    parts += [
        '"final eval round" is the last round at which every client was evaluated; '
        '"end recorded" is whether the run logged its end event.',
        "",
    ]
    if any_cotuning:
        parts[-1:] = [
            "For FedCoLLM-family runs it is the last round with a multiple-choice accuracy (on a generation "
            "task: generation scores) for every client (or for the global model).",
            "",
        ]

    ppl_idx = [i for i, run in enumerate(runs) if not run.is_cotuning or run.ppl_by_round]
    if ppl_idx:
        parts += _ppl_markdown(
            [runs[i] for i in ppl_idx],
            [labels[i] for i in ppl_idx],
            has_round_plot,
            has_client_plot,
            [trust_plots.get(i) for i in ppl_idx],
        )
    if any_cotuning:
        parts += _cotuning_markdown([run for run in runs if run.is_cotuning], has_acc_plot)
    gen_runs = _gen_runs(runs)
    if gen_runs:
        parts += _gen_markdown(gen_runs, has_gen_plot)
    parts += seeds_markdown(runs, _md_table)
    parts += privacy_markdown(runs, labels)
    return "\n".join(parts).rstrip() + "\n"


PRIVACY_HEADER = [
    "run",
    "ε",
    "δ",
    "clipping norm C",
    "noise multiplier σ",
    "sample rate q",
    "rounds",
    "noise",
    "evidence ε",
]
ACCOUNTANT = "Opacus RDP accountant (client level: one step per aggregation round)"


def privacy_rows(runs: Sequence[RunSummary], labels: Sequence[str]) -> list[list[str]]:
    """One row per run with DP on: the privacy spent after its last aggregation, else its settings."""
    rows = []
    for run, label in zip(runs, labels, strict=True):
        if not run.dp_enabled:
            continue
        spent = run.privacy
        if spent is None:  # no aggregation recorded yet (killed early): the configured settings
            sigma = config_value(run.config, "privacy.noise_multiplier", 0.0)
            rows.append(
                [
                    label,
                    MISSING,
                    _setting(run, "privacy.delta"),
                    _setting(run, "privacy.clip_norm"),
                    str(sigma),
                    MISSING,
                    "0",
                    MISSING,
                    MISSING,
                ]
            )
            continue
        eps = "∞ (no noise: no privacy guarantee)" if spent.epsilon is None else _fmt(spent.epsilon)
        rows.append(
            [
                label,
                eps,
                f"{spent.delta:g}",
                MISSING if spent.clip_norm is None else f"{spent.clip_norm:g}",
                f"{spent.noise_multiplier:g}",
                f"{spent.sample_rate:.3g}",
                str(spent.round),
                spent.noise,
                evidence_epsilon(spent),
            ]
        )
    return rows


def evidence_epsilon(spent: PrivacySpent) -> str:
    """The privacy spent by prediction trust's protected logits alone ('—': sent unprotected)."""
    if spent.evidence_clip is None:
        return MISSING
    if spent.evidence_epsilon is None:
        return "∞ (clipped, no noise)"
    return _fmt(spent.evidence_epsilon)


def privacy_markdown(runs: Sequence[RunSummary], labels: Sequence[str]) -> list[str]:
    """The differential-privacy section: present whenever a run had client-level DP on."""
    rows = privacy_rows(runs, labels)
    if not rows:
        return []
    return [
        "## Differential privacy",
        "",
        "Client-level DP (DP-FedAvg): each client's update clipped to L2 norm ≤ C, Gaussian noise of "
        "std σ·C on the sum. ε is the privacy spent at δ after the rounds shown, computed by the "
        f"{ACCOUNTANT} with sample rate q (clients asked per round / clients). Peer perplexities "
        "(validation trust) are not noised; prediction trust's uploaded logits are where "
        "privacy.evidence_clip is set (each client clips them to C_e and adds noise σ_e·C_e): ε then "
        "charges both releases of a round, and the evidence's own ε is shown beside it.",
        "",
        _md_table(PRIVACY_HEADER, rows, align_right_from=1),
        "",
    ]


def _final_eval_round(run: RunSummary) -> str:
    """The perplexity final round; for a FedCoLLM-family run, its last usable accuracy round; else the
    last round with generation scores."""
    last = run.final_round()
    if last is None and run.is_cotuning:
        last = run.final_mc_round()
    if last is None:
        last = run.final_gen_round()
    return MISSING if last is None else str(last)


def _ppl_markdown(
    runs: Sequence[RunSummary],
    labels: Sequence[str],
    has_round_plot: bool,
    has_client_plot: bool,
    trust_plots: Sequence[str | None],
) -> list[str]:
    """The perplexity and trust sections (everything a personalized-only report had after the runs table)."""
    parts: list[str] = []

    split = ppl_split_name(runs)
    unseen = (
        "each client's held-out test split, which no training step and no trust evidence saw"
        if split == "test"
        else "validation windows; the validation-trust strategy chose its weights on them, so its lead "
        "there is measured on data it used (set data.test_fraction > 0 for a test split)"
        if split == "validation"
        else "each run's test split where it has one, else its validation windows"
    )
    parts += [f"## Final {split} perplexity per client", ""]
    parts += [
        f"Perplexity of each client at its run's final eval round, on {unseen}. "
        "mean ± std is over clients (population std, ddof=0).",
        "",
    ]
    header, rows = comparison_rows(runs)
    parts += [_md_table(header, rows), ""]
    if has_client_plot:
        parts += [f"![Final {split} perplexity per client](plots/ppl_per_client.png)", ""]

    parts += [f"## Mean {split} perplexity per round", ""]
    parts += [
        f"Arithmetic mean over clients of the per-client {split} perplexity; "
        "round 0 is the evaluation before any training.",
        "",
    ]
    header, rows = round_rows(runs)
    parts += [_md_table(header, rows) if rows else "No perplexity evaluations recorded.", ""]
    if has_round_plot:
        parts += [f"![Mean {split} perplexity per round](plots/ppl_per_round.png)", ""]

    parts += ["## Trust matrices", ""]
    parts += [
        "Last trust matrix of each run. Entry (i, j) is the weight client i (receives) put on the "
        "adapter of client j (gives) when aggregating; rows sum to 1.",
        "",
    ]
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        last = run.last_trust()
        if last is None:
            parts += [f"### {label}", "", "No trust records.", ""]
            continue
        rnd, matrix = last
        header = ["i \\ j", *(str(j) for j in range(len(matrix[0])))]
        rows = [[str(r), *(_fmt(v, 3) for v in row)] for r, row in enumerate(matrix)]
        parts += [f"### {label} (round {rnd})", "", _md_table(header, rows), ""]
        parts += [f"![Trust matrix of {label}]({trust_plots[i]})", ""]

    traffic = [run for run in runs if run.comm]
    if traffic:
        parts += ["## Communication per client", ""]
        parts += [
            "Bytes each client sends (up) and receives (down) per round, mean over rounds, with the share "
            "of the full model's size in brackets: every adapter the server sent it (to train, to evaluate, "
            "peers' adapters as validation-trust evidence, FLoRA's stacked update to merge into its base) "
            "and everything it sent back (its trained adapter, prediction-trust logits). Clients of "
            "different LoRA ranks (lora.ranks) move different bytes. Units are decimal (1 MB = 10^6 bytes).",
            "",
            _md_table(*client_traffic_rows(traffic), align_right_from=2),
            "",
        ]
        quiet = [
            label for run, label in zip(traffic, unique_labels(traffic), strict=True) if moves_nothing(run)
        ]
        if quiet:
            parts += [
                f"Nothing travels in {', '.join(quiet)}: each client keeps its own adapter (0 bytes).",
                "",
            ]
        parts += compression_lines(traffic)
    return parts


def moves_nothing(run: RunSummary) -> bool:
    """Whether a run's traffic records are all zero (a strategy that exchanges nothing: local)."""
    return all(r.bytes_up == 0 and r.bytes_down == 0 for r in run.comm)


def _cotuning_markdown(runs: Sequence[RunSummary], has_acc_plot: bool) -> list[str]:
    """The FedCoLLM sections: the paper's accuracy table, accuracy per round (left out when the runs
    scored generations and no choices), and adapter traffic."""
    parts: list[str] = _mc_markdown(runs, has_acc_plot) if _shows_mc(runs) else []
    val_runs = [run for run in runs if run.distill_val]
    if val_runs:
        parts += ["## Co-tuning: server validation along distillation", ""]
        parts += [
            "Accuracy (%) / choice-level loss on the server's validation split (distill.val_fraction of the "
            "public set, never trained on): at the start of each round's distillation (the SLM: the clients' "
            "FedAvg average), after its last step, at its best scored step, and the step the round kept "
            "(distill.keep). A generation task is not decoded there: its cells are the teacher-forced loss "
            "per response token.",
            "",
            _md_table(*distill_val_rows(val_runs)),
            "",
            "![Validation along distillation](plots/distill_validation.png)",
            "",
        ]
        header, rows = distill_time_rows(val_runs)
        if rows:
            parts += [
                "What the scoring costs: each round's distillation wall time and the part of it spent "
                "scoring the validation split (every `distill.val_every` steps and after the last; a "
                "model's weights already scored are not scored again).",
                "",
                _md_table(header, rows),
                "",
            ]

    align_runs = [run for run in runs if run.align]
    if align_runs:
        parts += ["## Co-tuning across tokenizers", ""]
        parts += [
            "The LLM has another tokenizer than the SLM: per round and student model, its supervised "
            "positions on the public set, the share (%) whose span agrees with one teacher token (exact), "
            "the groups of several tokens merged where the splits differ (each pairs its first tokens), "
            "positions in no group (the texts differ), and the mean share (%) of the teacher's top-k "
            "probability mass carried into the student's vocabulary (the unmatched rest is dropped).",
            "",
            _md_table(*align_rows(align_runs)),
            "",
        ]

    parts += ["## Co-tuning: communication", ""]
    parts += [
        "Bytes one client sends (up) or receives (down) per round, mean over rounds and clients, with "
        "the share of the full SLM's size in brackets; total is over all clients and rounds. "
        "Units are decimal (1 MB = 10^6 bytes).",
        "",
    ]
    header, rows = comm_rows(runs)
    parts += [_md_table(header, rows), ""]
    parts += compression_lines(runs)
    return parts


def compression_note(run: RunSummary) -> str | None:
    """How a run's adapters travelled, when compressed (`federation.compress`), else None (also for a
    run whose config names a codec but that moved nothing: the local main run of a comparison)."""
    c = config_value(run.config, "federation.compress")
    if not isinstance(c, Mapping) or (c.get("codec", "none") == "none" and c.get("topk") is None):
        return None
    if not run.comm or moves_nothing(run):
        return None
    codec = str(c.get("codec", "none"))
    what = {"none": "float32 values", "fp16": "fp16", "bf16": "bf16"}.get(
        codec, f"{codec}, {c.get('block')}-weight blocks"
    )
    if c.get("topk") is not None:
        what += f", the top {100 * float(c['topk']):.3g}% of each update"
        what += " with error feedback" if c.get("error_feedback", True) else " without error feedback"
    return what


def compression_lines(runs: Sequence[RunSummary]) -> list[str]:
    """A line naming each compressed run's encoding (its bytes are the encoded payload's)."""
    notes = [
        f"{label}: {note}"
        for run, label in zip(runs, unique_labels(runs), strict=True)
        if (note := compression_note(run)) is not None
    ]
    if not notes:
        return []
    return [f"Compressed exchanges (federation.compress; bytes as encoded): {'; '.join(notes)}.", ""]


def _mc_markdown(runs: Sequence[RunSummary], has_acc_plot: bool) -> list[str]:
    """The paper's accuracy table and accuracy per round."""
    parts: list[str] = ["## Co-tuning: multiple-choice test accuracy", ""]
    parts += [
        "Accuracy (%) on the held-out test split at each run's final eval round; acc_norm normalises "
        "each choice's log-likelihood by its length. Standalone figures are mean ± std over clients "
        "(population std, ddof=0). Zero-shot rows come from a zero_shot run, or else from round 0 "
        '(before training) of the run named. "LLM FedCoLLM / centralized" is FedCoLLM\'s LLM accuracy '
        "as a percent of the centralized LLM's.",
        "",
    ]
    header, rows = cotuning_rows(runs)
    parts += [_md_table(header, rows, align_right_from=1), ""]

    parts += ["## Co-tuning: accuracy per round", ""]
    curve_rows = _accuracy_round_rows(runs)
    if curve_rows[1]:
        parts += [
            "Test accuracy (%) per round: the global model's, or the mean over clients for per-client "
            "runs; round 0 is the evaluation before any training.",
            "",
            _md_table(*curve_rows),
            "",
        ]
    else:
        parts += ["No multiple-choice evaluations recorded.", ""]
    if has_acc_plot:
        parts += ["![Test accuracy per round](plots/accuracy_per_round.png)", ""]

    return parts


def _accuracy_round_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Round-by-round accuracy (%), a column per (run, model) curve that the plot also draws."""
    columns: list[tuple[str, dict[int, float]]] = []
    for run, label in zip(runs, unique_labels(runs), strict=True):
        for model, curve in _accuracy_series(run):
            columns.append((f"{label} {model.upper()}", dict(curve)))
    rounds = sorted({r for _, curve in columns for r in curve})
    header = ["round", *(name for name, _ in columns)]
    rows = [
        [str(r), *(MISSING if r not in curve else _pct(curve[r]) for _, curve in columns)] for r in rounds
    ]
    return header, rows
