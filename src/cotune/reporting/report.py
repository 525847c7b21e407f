"""A Markdown report with PNG plots comparing finished (or killed) runs.

Only numbers read from the runs' metrics go in: no interpretation. Plots use matplotlib's
object-oriented API on an Agg canvas, so no display is needed and the global pyplot backend of
whoever imports this module is left alone; matplotlib is imported only when plots are drawn, which
keeps `cotune` commands that just print comparison_rows fast.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cotune.reporting.metrics import RunSummary, config_value, load_runs, unique_labels

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
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
    """Header and rows of the final per-client val perplexity table; the last row is "mean ± std" per run.

    Each run contributes the perplexities of its own final evaluated round (RunSummary.final_ppl).
    A client a run never evaluated shows "—".
    """
    finals = [run.final_ppl() for run in runs]
    clients = sorted({c for final in finals for c in final})
    header = ["client", *unique_labels(runs)]
    rows = [[str(c), *(_fmt(final.get(c)) for final in finals)] for c in clients]
    rows.append(["mean ± std", *(_fmt_mean_std(list(final.values())) for final in finals)])
    return header, rows


def round_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the mean val perplexity per round table (one row per evaluated round)."""
    curves = [dict(run.mean_ppl_curve()) for run in runs]
    rounds = sorted({r for curve in curves for r in curve})
    header = ["round", *unique_labels(runs)]
    return header, [[str(r), *(_fmt(curve.get(r)) for curve in curves)] for r in rounds]


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
    ax.set_ylabel("mean validation perplexity")
    ax.set_title("Mean validation perplexity over clients, per round")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
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
    ax.set_xticks(range(len(clients)), [str(c) for c in clients])
    ax.set_xlabel("client")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Final validation perplexity per client")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncols=min(n, 4), fontsize="small")  # never over the bars
    fig.savefig(path, dpi=120)
    return True


def _plot_trust(matrix: list[list[float]], title: str, path: Path) -> None:
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
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    ax.set_xlabel("client j (gives)")
    ax.set_ylabel("client i (receives)")
    ax.set_title(title)
    fig.savefig(path, dpi=120)


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
    plots = out / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)

    has_round_plot = _plot_ppl_per_round(runs, labels, plots / "ppl_per_round.png")
    has_client_plot = _plot_ppl_per_client(runs, labels, plots / "ppl_per_client.png")
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
        _plot_trust(last[1], f"Trust matrix: {run.label}, round {last[0]}", plots / name)
        trust_plots[i] = f"{PLOTS_DIR}/{name}"

    md = _report_markdown(runs, labels, has_round_plot, has_client_plot, trust_plots)
    path = out / REPORT_FILE
    path.write_text(md, encoding="utf-8")
    return path


def _report_markdown(
    runs: Sequence[RunSummary],
    labels: Sequence[str],
    has_round_plot: bool,
    has_client_plot: bool,
    trust_plots: dict[int, str],
) -> str:
    parts: list[str] = [f"# cotune report: {', '.join(labels)}", "", "## Runs compared", ""]
    run_header = [
        "run",
        "strategy",
        "algorithm",
        "model",
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
            _setting(run, "strategy.name"),
            _setting(run, "algorithm"),
            _setting(run, "model.name"),
            _setting(run, "federation.clients"),
            _setting(run, "federation.rounds"),
            _setting(run, "run.seed"),
            MISSING if run.final_round() is None else str(run.final_round()),
            "yes" if run.ended else "no",
            f"`{run.run_dir.resolve()}`",
        ]
        for run, label in zip(runs, labels, strict=True)
    ]
    parts += [_md_table(run_header, run_rows, align_right_from=len(run_header)), ""]
    parts += [
        '"final eval round" is the last round at which every client was evaluated; '
        '"end recorded" is whether the run logged its end event.',
        "",
    ]

    parts += ["## Final validation perplexity per client", ""]
    parts += [
        "Validation perplexity of each client at its run's final eval round. "
        "mean ± std is over clients (population std, ddof=0).",
        "",
    ]
    header, rows = comparison_rows(runs)
    parts += [_md_table(header, rows), ""]
    if has_client_plot:
        parts += ["![Final validation perplexity per client](plots/ppl_per_client.png)", ""]

    parts += ["## Mean validation perplexity per round", ""]
    parts += [
        "Arithmetic mean over clients of the per-client validation perplexity; "
        "round 0 is the evaluation before any training.",
        "",
    ]
    header, rows = round_rows(runs)
    parts += [_md_table(header, rows) if rows else "No validation evaluations recorded.", ""]
    if has_round_plot:
        parts += ["![Mean validation perplexity per round](plots/ppl_per_round.png)", ""]

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
    return "\n".join(parts).rstrip() + "\n"
