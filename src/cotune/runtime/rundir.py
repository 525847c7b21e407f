"""The run directory: its layout, config fingerprint, metrics log and checkpoints, and resume.

Below the round loops and the orchestrator: both loops checkpoint through `RunFiles`, and the
orchestrator names and creates directories with the helpers here.

    <run_dir>/config.yaml         the resolved config
    <run_dir>/metrics.jsonl       one JSON record per line (cotune.reporting.metrics reads it)
    <run_dir>/checkpoints/round-NNNN/
        <adapter>/adapter_model.safetensors + adapter_config.json   (PEFT format)
        state.pt                  round, fingerprint, RNG, the trainer states, the backend
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from safetensors.torch import load_file

from cotune.config.loader import NO_DEFAULT, dump_config, load_config, setting_default
from cotune.config.schema import DEFAULT_DELTA, CompressConfig, ExperimentConfig
from cotune.errors import OrdinaryError
from cotune.layout import ADAPTER_WEIGHTS, CONFIG_FILE, LOCK_FILE, METRICS_FILE, STATE_FILE
from cotune.models.adapter_check import AdapterSpec, adapter_problem
from cotune.records import Record, RunEvent, parse_record
from cotune.reporting.metrics import append_metrics, read_metrics
from cotune.reporting.trackers import Trackers
from cotune.runtime.checkpoint import list_checkpoints, load_state, restore_rng, rng_state, save_state
from cotune.runtime.checkpoint import write_checkpoint as write_round
from cotune.state import AdapterState

R = TypeVar("R", bound=Record)


class ResumeError(RuntimeError, OrdinaryError):
    """A run directory that cannot be resumed with this config."""


def client_name(index: int) -> str:
    return f"client-{index:02d}"


# Settings that change how a run runs, not what it computes: a resume may change them.
RUNTIME_SETTINGS = (
    "run.threads",
    "run.eval_every",
    "federation.parallel_clients",
    "run.loggers",
    "federation.client_timeout",
    "federation.min_clients",
)
BOOKKEEPING = ("run.name", "run.out_dir")  # where the run lives, not what it is


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config tree by dotted key (lists and other values are leaves)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(dict(tree), "")
    return out


def flat_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every setting the run's family reads, by dotted key."""
    return flatten(cfg.family_dump())


def fingerprint_of(settings: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in settings.items() if k not in RUNTIME_SETTINGS + BOOKKEEPING}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """What must match for a checkpoint to be resumed: every setting but runtime ones and bookkeeping."""
    return fingerprint_of(flat_settings(cfg))


def written_fingerprint(cfg: ExperimentConfig, written: Mapping[str, Any]) -> str | None:
    """The fingerprint of `written` (a run's config.yaml as its cotune version wrote it), when `cfg` is that
    config as this version reads it: every setting added since at its default (an added setting defaults
    to what older versions did). None when `cfg` sets an added one, or differs in a setting they share.

    A checkpoint holds only its version's fingerprint, so this lets a newer cotune resume an older run."""
    old, new = flatten(written), flat_settings(cfg)
    runtime = RUNTIME_SETTINGS + BOOKKEEPING
    shared = [k for k in new if k in old and k not in runtime]
    if any(not _same_setting(old[k], new[k]) for k in shared):
        return None
    if any(not _at_default(k, new[k]) for k in new if k not in old and k not in runtime):
        return None
    return fingerprint_of(old)


def record_runtime_settings(path: Path, cfg: ExperimentConfig) -> None:
    """Write `cfg`'s runtime settings into the run's config.yaml and leave every other setting as it was
    written: a config.yaml of an older cotune keeps the settings its checkpoints' fingerprint is over."""
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    settings = flat_settings(cfg)
    for key in RUNTIME_SETTINGS:
        if key in settings:
            *sections, name = key.split(".")
            node = tree
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = settings[key]
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")


def _same_setting(old: Any, new: Any) -> bool:
    """Equal on everything `old` holds. Sections inside lists (data.sources) may have gained settings since;
    those are not compared: `cfg` was loaded from the written file, so they hold their defaults."""
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return all(_same_setting(o, n) for o, n in zip(old, new, strict=True))
    if isinstance(old, dict) and isinstance(new, dict):
        return all(k in new and _same_setting(v, new[k]) for k, v in old.items())
    return bool(old == new)


def _at_default(key: str, value: Any) -> bool:
    default = setting_default(key)
    return default is not NO_DEFAULT and value == default


def resume_config(run_dir: Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The run directory's own config, with overrides that only change how it runs (else refused)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ResumeError(f"{run_dir} is not a run directory (no config.yaml)")
    saved = load_config(path)
    cfg = load_config(path, overrides) if overrides else saved
    before, after = flat_settings(saved), flat_settings(cfg)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    refused = [k for k in changed if k not in RUNTIME_SETTINGS]
    if refused:
        raise ResumeError(
            f"a resume continues the same experiment, and {', '.join(refused)} would change it: start a "
            f"new run for that (a resume may change only {', '.join(RUNTIME_SETTINGS)})"
        )
    cfg.run.name = run_dir.name
    return cfg


# ---- naming and creating run directories (the orchestrator's) -------------------------------------------
def main_name(cfg: ExperimentConfig) -> str:
    """What a run is called in its family: the strategy (personalized) or the algorithm (FedCoLLM)."""
    return cfg.algorithm if cfg.is_cotuning else cfg.strategy.name


def baseline_names(cfg: ExperimentConfig) -> list[str]:
    """What `run.compare` adds: strategies (personalized) or algorithms (FedCoLLM family)."""
    return [s for s in dict.fromkeys(cfg.run.compare) if s != main_name(cfg)]


def comparison_dirs(run_dir: Path, cfg: ExperimentConfig) -> list[Path]:
    """The main run directory, then one sibling `<run_dir>.<name>` per `run.compare` entry."""
    return [run_dir] + [run_dir.with_name(f"{run_dir.name}.{s}") for s in baseline_names(cfg)]


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """runs/<name> (runs/<name>.<algorithm> for the FedCoLLM family); -2, -3... if taken."""
    name = cfg.run.name or "run"
    suffix = f".{cfg.algorithm}" if cfg.is_cotuning else ""
    candidate, n = cfg.run.out_dir / f"{name}{suffix}", 1
    while any(d.exists() for d in comparison_dirs(candidate, cfg)):
        n += 1
        candidate = cfg.run.out_dir / f"{name}-{n}{suffix}"
    return candidate


def init_run_dir(run_dir: Path, cfg: ExperimentConfig) -> None:
    if run_dir.is_file():
        raise FileExistsError(f"{run_dir} is a file, not a run directory: choose another --out")
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        found = newest_intact(run_dir) if (run_dir / CONFIG_FILE).is_file() else None
        if not (run_dir / CONFIG_FILE).is_file():
            what = "it is not a cotune run directory, so cotune will not write into it"
        elif found is None:
            what = f"it has no completed round: `cotune run --resume {run_dir}` starts it over"
        else:
            what = f"`cotune run --resume {run_dir}` continues it after round {found[0]}"
        raise FileExistsError(f"run directory {run_dir} is not empty; {what}; or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(dump_config(cfg))


def variant(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """The same experiment with another strategy (personalized) or algorithm (FedCoLLM family)."""
    update: dict = {"run": cfg.run.model_copy(update={"compare": []})}
    if cfg.is_cotuning:
        update["algorithm"] = name
    else:
        update["strategy"] = cfg.strategy.model_copy(update={"name": name})
    if not cfg.variant_exchanges(name) and cfg.federation.compress != CompressConfig():
        # nothing travels in it: its config says compression is off
        update["federation"] = cfg.federation.model_copy(update={"compress": CompressConfig()})
    if cfg.privacy.protects_evidence and not cfg.variant_uploads_logits(name):  # nothing to protect there
        off: dict = {"evidence_clip": None, "evidence_noise_multiplier": 0.0}
        if not cfg.privacy.enabled:  # nor any other privacy setting read
            off |= {"delta": DEFAULT_DELTA, "seed": None}
        update["privacy"] = cfg.privacy.model_copy(update=off)
    return cfg.model_copy(update=update, deep=True)


# Where a run's clients keep their trainer states, as each checkpoint records it ("backend"): in the
# checkpoint itself (every client in this process), or on the SuperNodes (both Flower backends, which
# can therefore resume each other's runs).
CLIENTS_IN_PROCESS = "embedded"
CLIENTS_ON_FLOWER = "flower"


def is_flower_run(run_dir: Path) -> bool:
    """A run directory written by a Flower backend (its clients' trainer states live on the nodes)."""
    found = newest_intact(run_dir)
    return found is not None and found[2].get("backend") == CLIENTS_ON_FLOWER


def newest_intact(
    run_dir: Path, expected: Mapping[str, AdapterSpec] | None = None
) -> tuple[int, Path, dict[str, Any], list[str]] | None:
    """The newest checkpoint whose state and adapters all load: (round, path, state, what was skipped).
    With `expected` (adapter name -> the run's spec of it), each of those adapters must also be there
    and be one of this run's (`adapter_problem`: keys, shapes, dtype, finite weights).

    Checkpoints are renamed into place complete, so a damaged one was damaged afterwards (a disk
    fault, a truncated copy, a foreign or diverged adapter put there); the rounds after the intact one
    are simply run again.
    """
    skipped = []
    for r, path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_state(path / STATE_FILE)
            for adapter in sorted(path.glob("*/adapter_model.safetensors")):
                load_file(str(adapter))
            problem = adapters_problem(path, expected or {})
        except Exception as exc:  # any damage: unpickling, safetensors, truncation, permissions
            skipped.append(f"{path.name} ({type(exc).__name__})")
            continue
        if problem is not None:
            skipped.append(f"{path.name} ({problem})")
            continue
        return r, path, state, skipped
    return None if not skipped else (-1, run_dir, {}, skipped)


def adapters_problem(path: Path, expected: Mapping[str, AdapterSpec]) -> str | None:
    """What is wrong with the first of checkpoint `path`'s `expected` adapters that is missing or not one
    of this run's (its name and the problem), or None."""
    for name, spec in expected.items():
        file = path / name / ADAPTER_WEIGHTS
        if not file.is_file():
            return f"{name}: no adapter file"
        problem = adapter_problem(load_file(str(file)), spec)
        if problem is not None:
            return f"{name}: {problem}"
    return None


# ---- what a running loop writes -------------------------------------------------------------------------
class RunFiles:
    """A round loop's view of its run directory: append metrics, write and open checkpoints."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, backend: str = CLIENTS_IN_PROCESS) -> None:
        self.run_dir, self.cfg, self.backend = Path(run_dir), cfg, backend
        self.metrics_path = self.run_dir / METRICS_FILE
        self.fingerprint = config_fingerprint(cfg)
        self.trackers = Trackers(cfg.run.loggers, self.run_dir, cfg.family_dump())

    def log(self, record: Record) -> None:
        append_metrics(self.metrics_path, record.line())
        self.trackers.log(record)

    def logged(self, kind: type[R], round_: int) -> list[R]:
        """The records of class `kind` of round `round_` already in metrics.jsonl (a resumed round's), typed
        (`parse_record`; a line cut short by a stop, or of a kind this version does not know, is skipped)."""
        if not self.metrics_path.is_file():
            return []
        found = (parse_record(m) for m in read_metrics(self.metrics_path))
        return [rec for rec in found if isinstance(rec, kind) and getattr(rec, "round", None) == round_]

    def checkpoint(
        self,
        round_: int,
        adapters: Mapping[str, Callable[[Path], None]],
        state: Mapping[str, Any],
    ) -> None:
        """Round `round_`'s checkpoint, atomically: each `adapters[name](dir)` writes one adapter."""

        def contents(tmp: Path) -> None:
            for name, write in adapters.items():
                write(tmp / name)
            full = {
                "round": round_,
                "fingerprint": self.fingerprint,
                "backend": self.backend,
                "rng": rng_state(),
                **state,
            }
            save_state(tmp / STATE_FILE, full)

        write_round(self.run_dir, round_, contents)

    def open_latest(
        self, warn: bool = True, expected: Mapping[str, AdapterSpec] | None = None
    ) -> tuple[int, Path, dict[str, Any]]:
        """The newest intact checkpoint and its state (damaged newer ones are skipped, with a warning),
        refused if another config wrote it; `expected`: the adapters it must hold (`newest_intact`)."""
        found = newest_intact(self.run_dir, expected)
        if found is None:
            raise ResumeError(f"{self.run_dir} has no completed checkpoint to resume from")
        r, path, state, skipped = found
        if r < 0:
            raise ResumeError(
                f"every checkpoint in {self.run_dir} is damaged ({', '.join(skipped)}); start the run again"
            )
        if skipped and warn:
            print(
                f"warning: skipped damaged checkpoint(s) {', '.join(skipped)}; resuming from round {r}",
                file=sys.stderr,
                flush=True,
            )
        if state.get("fingerprint") not in (self.fingerprint, self.fingerprint_as_written()):
            raise ResumeError(f"the checkpoint in {path} was written by a different config; cannot resume")
        return r, path, state

    def fingerprint_as_written(self) -> str | None:
        """This config's fingerprint under the cotune version that wrote the run's config.yaml."""
        path = self.run_dir / CONFIG_FILE
        try:
            written = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return written_fingerprint(self.cfg, written) if isinstance(written, dict) else None

    def resume(self, expected: Mapping[str, AdapterSpec]) -> tuple[int, Path, dict[str, Any]]:
        """Open the latest checkpoint that holds every `expected` adapter as this run's, restore the RNG,
        drop the metrics of the unfinished round."""
        r, path, state = self.open_latest(expected=expected)
        restore_rng(state["rng"])
        self.truncate_metrics(r)
        self.log(RunEvent(event="resume", after_round=r))
        print(f"resuming {self.run_dir} after round {r}", file=sys.stderr, flush=True)
        return r, path, state

    def truncate_metrics(self, last_round: int) -> None:
        """Drop the records of rounds after `last_round` (the round in progress when a run stopped)."""
        path = self.metrics_path
        kept = [m for m in read_metrics(path) if m.get("type") == "run" or m.get("round", 0) <= last_round]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m, separators=(",", ":")) + "\n" for m in kept))
        tmp.replace(path)


def load_adapter(directory: Path) -> AdapterState:
    """An adapter saved in PEFT format."""
    return load_file(str(directory / ADAPTER_WEIGHTS))
