"""`python -m cotune.runtime.flower`: run a cotune config on Flower (as `cotune run --backend flower`).

python -m cotune.runtime.flower run CONFIG [key=value ...] [--out DIR] [--superlink HOST:PORT]
python -m cotune.runtime.flower app-dir DIR      # the Flower App for `flwr run DIR <connection>`
python -m cotune.runtime.flower outcome RUN_DIR  # exit 0 if the run completed, 1 if it stopped/failed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cotune.runtime.flower", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment on Flower (a local federation unless --superlink)")
    run.add_argument("config", type=Path)
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. federation.rounds=2")
    run.add_argument("--out", type=Path, default=None, help="run directory (default runs/<name>)")
    run.add_argument(
        "--superlink", default=None, help="host:port of a running SuperLink (default: start one)"
    )
    run.add_argument(
        "--root-certificates", type=Path, default=None, help="CA certificate: TLS to --superlink"
    )
    run.add_argument("--min-clients", type=int, default=None, help="go on while this many clients answer")
    run.add_argument(
        "--round-timeout", type=float, default=None, help="seconds to wait for one exchange (client_timeout)"
    )
    run.add_argument(
        "--connect-timeout", type=float, default=120.0, help="seconds to wait for the SuperNodes"
    )
    app = sub.add_parser("app-dir", help="write the Flower App directory (pyproject.toml) for `flwr run`")
    app.add_argument("path", type=Path)
    outcome = sub.add_parser("outcome", help="how a Flower run ended: exit 0 if it completed")
    outcome.add_argument("run_dir", type=Path)
    outcome.add_argument("--log", type=Path, default=None, help="the `flwr run --stream` log, if remote")
    args = parser.parse_args(argv)

    from cotune.runtime.flower import FlowerRunError, run_flower
    from cotune.runtime.flower.deploy import check_outcome, write_app_dir

    console = Console(stderr=True)
    if args.command == "app-dir":
        print(write_app_dir(args.path))
        return 0
    if args.command == "outcome":
        try:
            check_outcome(args.run_dir.resolve(), args.log)
        except FlowerRunError as e:
            console.print(f"[bold red]{e}[/]", highlight=False)
            return 1
        console.print(f"{args.run_dir}: completed")
        return 0

    from cotune.config import ConfigError, load_config
    from cotune.reporting.report import write_report

    try:
        cfg = load_config(args.config, args.overrides)
        dirs = run_flower(
            cfg,
            args.out,
            console,
            superlink=args.superlink,
            root_certificates=args.root_certificates,
            min_clients=args.min_clients,
            round_timeout=args.round_timeout,
            connect_timeout=args.connect_timeout,
        )
    except (ConfigError, FileExistsError, FlowerRunError, TimeoutError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    if (dirs[0] / "metrics.jsonl").exists():
        console.print(f"report: {write_report(dirs)}")
    print(f"run directory: {dirs[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
