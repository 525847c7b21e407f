"""The backends a run can use (`cotune run --backend NAME`), in one registry.

Each backend is a small object: its name, a one-line summary (the CLI's `--backend` help), its typed
options (a frozen dataclass; the CLI's `--superlink`, `--client-cpus`, ... fill it), `check` (what it
refuses before any work: before a run directory is made or a model loads), and `run` / `resume`
(the runs to start, or to continue from their checkpoints). The orchestrator
(`runtime/experiment.py`) dispatches through it; a new backend is one class here and one entry in
`BACKENDS`.

The CLI imports this module before it validates a config, so it imports nothing heavy: each backend's
runtime (torch, Flower, Ray) is imported inside `check`, `run` and `resume`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from rich.console import Console

    from cotune.config.schema import ExperimentConfig

Runs = Sequence[tuple[Path, "ExperimentConfig"]]


@dataclass(frozen=True)
class Options:
    """A backend's options; the embedded backend has none."""

    @property
    def local_clients(self) -> bool:
        """Whether the clients (their data, their device) are on this machine: then their data and the
        device are checked here before anything starts."""
        return True

    @property
    def names_a_federation(self) -> bool:
        """Whether these options point at a running federation (which only a Flower run can resume on)."""
        return False


@dataclass(frozen=True)
class EmbeddedOptions(Options):
    pass


@dataclass(frozen=True)
class FlowerOptions(Options):
    superlink: str | None = None  # HOST:PORT of a running SuperLink; None: a local federation for the runs
    root_certificates: Path | None = None  # the CA certificate: TLS to `superlink`
    connect_timeout: float = 120.0  # seconds to wait for the SuperNodes
    timeout: float | None = None  # `flwr run`'s wall-clock limit per run (tests, benchmarks; no CLI option)

    @property
    def local_clients(self) -> bool:
        return self.superlink is None  # a remote federation's data lies on its SuperNodes

    @property
    def names_a_federation(self) -> bool:
        return self.superlink is not None or self.root_certificates is not None


@dataclass(frozen=True)
class SimulationOptions(Options):
    client_cpus: float = 1.0  # each Ray actor's CPUs (actors = CPUs / this)
    client_gpus: float = 0.0  # each actor's GPUs (1, or 0.5 to share one)


class Backend:
    """Where a run's clients run. `federated`: the runs with a client step go to this backend, the others
    (centralized, zero_shot) run embedded."""

    name: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[type[Options]]
    federated: ClassVar[bool]

    def make_options(self, given: Mapping[str, Any]) -> Options:
        """This backend's options from the settings given (by field name); one it does not take is
        refused, naming the backends that do."""
        for key in given:
            if key not in self.option_names():
                owners = " or ".join(b.name for b in BACKENDS.values() if key in b.option_names())
                raise ValueError(f"--{key.replace('_', '-')} needs --backend {owners}, not {self.name}")
        return self.options(**given)

    def option_names(self) -> set[str]:
        return {f.name for f in fields(self.options)}

    def checked(self, options: Options | None) -> Options:
        """`options`, or the defaults; options of another backend are a programming error."""
        if options is None:
            return self.options()
        if not isinstance(options, self.options):
            wanted, got = self.options.__name__, type(options).__name__
            raise TypeError(f"backend {self.name} takes {wanted}, not {got}")
        return options

    def check(self, cfg: ExperimentConfig, options: Options) -> None:
        """Refuse, before any run directory is made or a model loads, what this backend cannot run."""
        if options.local_clients:
            from cotune.data.preflight import check_data

            check_data(cfg)  # every data problem at once

    def run(self, runs: Runs, console: Console, options: Options) -> None:
        """Start each (run directory, config): the directories are prepared, the checks passed."""
        raise NotImplementedError

    def resume(self, runs: Runs, console: Console, options: Options, continues: Sequence[bool]) -> None:
        """Continue each run after its newest intact checkpoint (`continues[i]`) or start it over in place."""
        raise NotImplementedError


class Embedded(Backend):
    name = "embedded"
    summary = "one process"
    options = EmbeddedOptions
    federated = False

    def run(self, runs: Runs, console: Console, options: Options) -> None:
        self.resume(runs, console, options, [False] * len(runs))

    def resume(self, runs: Runs, console: Console, options: Options, continues: Sequence[bool]) -> None:
        from cotune.runtime.embedded import run_embedded  # torch

        run_embedded([v for _, v in runs], [d for d, _ in runs], console, continues)


class OnFlower(Backend):
    """The Flower backends: the ServerApp's loop, the ClientApp on SuperNodes (real or virtual)."""

    federated = True

    def check(self, cfg: ExperimentConfig, options: Options) -> None:
        super().check(cfg, options)
        from cotune.runtime.flower import require_flwr

        require_flwr()  # before anything is created
        from cotune.runtime.flower.deploy import check_flower_config

        check_flower_config(cfg)

    def resume(self, runs: Runs, console: Console, options: Options, continues: Sequence[bool]) -> None:
        from cotune.runtime.flower import require_flwr

        require_flwr()
        for run, resume in zip(runs, continues, strict=True):
            self.launch([run], console, options, resume)

    def run(self, runs: Runs, console: Console, options: Options) -> None:
        self.launch(runs, console, options, False)

    def launch(self, runs: Runs, console: Console, options: Options, resume: bool) -> None:
        raise NotImplementedError


class Flower(OnFlower):
    name = "flower"
    summary = "SuperLink + SuperNodes"
    options = FlowerOptions

    def launch(self, runs: Runs, console: Console, options: Options, resume: bool) -> None:
        from cotune.runtime.flower.deploy import run_on_flower

        assert isinstance(options, FlowerOptions)
        run_on_flower(
            runs,
            console,
            superlink=options.superlink,
            root_certificates=options.root_certificates,
            connect_timeout=options.connect_timeout,
            timeout=options.timeout,
            resume=resume,
        )


class FlowerSimulation(OnFlower):
    name = "flower-simulation"
    summary = "Ray actors"
    options = SimulationOptions

    def launch(self, runs: Runs, console: Console, options: Options, resume: bool) -> None:
        from cotune.runtime.flower.simulation import run_on_simulation

        assert isinstance(options, SimulationOptions)
        cpus, gpus = options.client_cpus, options.client_gpus
        run_on_simulation(runs, console, client_cpus=cpus, client_gpus=gpus, resume=resume)


BACKENDS: dict[str, Backend] = {b.name: b for b in (Embedded(), Flower(), FlowerSimulation())}
EMBEDDED, FLOWER = BACKENDS["embedded"], BACKENDS["flower"]


def described() -> str:
    """The backends in words, for `--backend`'s help: "embedded (one process), flower (...) or ..."."""
    parts = [f"{b.name} ({b.summary})" for b in BACKENDS.values()]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def backend_named(name: str) -> Backend:
    """The backend called `name`, or a ValueError listing the names there are."""
    if name not in BACKENDS:
        shown = name if len(name) <= 40 else name[:40] + "..."
        names = list(BACKENDS)
        raise ValueError(f"unknown --backend {shown!r}: {', '.join(names[:-1])} or {names[-1]}")
    return BACKENDS[name]


def resuming_on(name: str) -> Backend:
    """The backend a resumed Flower run continues on: the one named, or for embedded (the default: a run
    resumes where it ran) a Flower deployment. A run that ran embedded resumes embedded whatever this is."""
    chosen = backend_named(name)
    return chosen if chosen.federated else FLOWER
