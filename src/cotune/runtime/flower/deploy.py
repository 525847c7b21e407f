"""Launching cotune on a Flower federation: the Flower App, `flwr run`, and a local demo federation.

- `write_app_dir` writes the Flower App (a pyproject.toml naming the installed cotune ServerApp and
  ClientApp): the FAB that `flwr run` ships carries no code, every machine runs its installed cotune.
- `submit` starts one run on a SuperLink through the Control API (`flwr run ... --stream`), with a
  private FLWR_HOME so the user's own Flower configuration is never read or written.
- `LocalFederation` starts a SuperLink and N SuperNodes on 127.0.0.1 (insecure, no runtime
  dependency installation), each with its node worker (worker.py) unless told not to, and stops
  every process it started, children included.
- `run_on_flower` is what `cotune run CONFIG --backend flower` calls (through the backend registry,
  `runtime/backends.py`, once the orchestrator has prepared the run directories): run each variant,
  and raise if the server stopped or failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import tomli_w
from rich.console import Console

from cotune.config.loader import dump_config
from cotune.config.schema import ExperimentConfig
from cotune.layout import FLOWER_DIR, FLWR_RUN_LOG, METRICS_FILE, NODE_STATE_DIR
from cotune.reporting.metrics import read_metrics
from cotune.runtime.flower import FLOWER_ENV, FlowerRunError
from cotune.runtime.flower.pki import make_node_keys, make_server_files
from cotune.runtime.flower.worker import WORKER_KEY

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
CONNECTION = "cotune"  # the SuperLink connection name in the private FLWR_HOME
APP_NAME = "cotune-flower"

# The [tool.flwr.app] of the Flower App; pyproject.toml carries the same tables (tests check they agree).
APP_COMPONENTS = {
    "serverapp": "cotune.runtime.flower.server_app:app",
    "clientapp": "cotune.runtime.flower.client_app:app",
}
APP_CONFIG: dict[str, str | int | float | bool] = {
    "config": "",
    "config-yaml": "",
    "overrides": "",
    "run-dir": "",
    "min-clients": 0,  # 0: federation.min_clients (default all)
    "round-timeout": 0.0,  # 0: federation.client_timeout (default 600 s)
    "connect-timeout": 120.0,
    "resume": False,  # continue run-dir after its last checkpoint (`cotune run --resume`)
}


def with_run_settings(cfg: ExperimentConfig, run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The config with the run config's min-clients / round-timeout (when > 0) as federation settings."""
    update: dict[str, Any] = {}
    if int(run_config.get("min-clients", 0) or 0) > 0:
        update["min_clients"] = int(run_config["min-clients"])
    if float(run_config.get("round-timeout", 0) or 0) > 0:
        update["client_timeout"] = float(run_config["round-timeout"])
    if not update:
        return cfg
    fed = cfg.federation.model_copy(update=update)
    return cfg.model_copy(update={"federation": type(cfg.federation).model_validate(fed.model_dump())})


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: no telemetry, offline, this venv's commands first."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # flower-superlink / -supernode start flower-superexec, flwr-serverapp and flwr-clientapp by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # A SuperNode's SuperExec looks for a message to start a ClientApp for once a second by default;
    # the look is a local call, so every 0.2 s costs nothing and answers sooner.
    env.setdefault(SUPEREXEC_POLL_ENV, "0.2")
    return env


def write_app_dir(path: Path) -> Path:
    """A Flower App directory for `flwr run PATH <connection>`: the installed cotune's apps."""
    path.mkdir(parents=True, exist_ok=True)
    tree = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": APP_NAME,
            "version": "0.1.0",
            "description": "cotune on Flower: the ServerApp and ClientApp of the installed cotune package",
            "license": {"text": "Apache-2.0"},
            # Installed on every machine beforehand; Flower must not install anything (no network).
            "dependencies": ["flwr>=1.41,<1.42"],
        },
        "tool": {
            "flwr": {"app": {"publisher": "cotune", "components": APP_COMPONENTS, "config": APP_CONFIG}}
        },
    }
    (path / "pyproject.toml").write_text(tomli_w.dumps(tree))
    return path


def write_connection(
    flwr_home: Path, address: str, *, insecure: bool = True, root_certificates: Path | None = None
) -> None:
    """The private Flower configuration ($FLWR_HOME/config.toml) with one SuperLink connection."""
    conn: dict[str, Any] = {"address": address}
    if root_certificates is not None:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        conn["insecure"] = insecure
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})
    )


def submit(
    app_dir: Path,
    flwr_home: Path,
    run_config: Mapping[str, str | int | float],
    log_path: Path,
    timeout: float | None = None,
    echo: IO[str] | Progress | None = None,
) -> int:
    """`flwr run APP cotune --run-config FILE --stream`: start the run and follow its log until it ends."""
    overrides = log_path.with_suffix(".run-config.toml")
    overrides.write_text(tomli_w.dumps(dict(run_config)))
    cmd = ["flwr", "run", str(app_dir), CONNECTION, "--run-config", str(overrides), "--stream"]
    with log_path.open("a") as log:
        proc = subprocess.Popen(
            cmd, env=flower_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

        def copy() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo is not None:
                    echo.write(line)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"flwr run did not finish within {timeout:g}s (log: {log_path})") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(5)
        return code


OUTCOME_MARK = "cotune-outcome: "  # the ServerApp's last line, for runs whose directory is on another machine


def run_outcome(run_dir: Path, log_path: Path | None = None) -> dict[str, Any]:
    """The last run event the ServerApp wrote (end, stopped, failed), from metrics.jsonl or else its log."""
    path = run_dir / METRICS_FILE
    if path.exists():
        events = [m for m in read_metrics(path) if m.get("type") == "run"]
        if events:
            return events[-1]
    if log_path is not None and log_path.exists():
        marks = [
            ln.split(OUTCOME_MARK, 1)[1] for ln in log_path.read_text().splitlines() if OUTCOME_MARK in ln
        ]
        for text in reversed(marks):
            try:
                outcome = json.loads(text)
            except json.JSONDecodeError:
                continue
            if outcome.get("run_dir") == str(run_dir):
                return outcome
    return {"event": None}


def check_outcome(run_dir: Path, log_path: Path | None = None) -> None:
    """Raise FlowerRunError, naming the cause and what to do, unless the run completed."""
    outcome = run_outcome(run_dir, log_path)
    event = outcome.get("event")
    if event == "end":
        return
    where = f" (log: {log_path})" if log_path else ""
    if event == "stopped":
        causes = node_causes(run_dir)
        raise FlowerRunError(
            f"{run_dir}: the run stopped: {outcome.get('reason')}; "
            f"last complete checkpoint: round {outcome.get('last_checkpoint')}"
            + (f". {causes}" if causes else "")
            + where
        )
    if event == "failed":
        raise FlowerRunError(f"{run_dir}: the ServerApp failed: {outcome.get('error')}{where}")
    cause = log_cause(log_path.read_text(errors="replace") if log_path and log_path.exists() else "")
    raise FlowerRunError(
        f"{run_dir}: the ServerApp did not complete the run{': ' + cause if cause else ''}{where}"
    )


# ---- why a Flower run did not complete --------------------------------------------------------------
# What `flwr run` (flwr 1.41, flwr/cli/utils.py) prints for a SuperLink it cannot reach or that refuses it.
FLWR_UNAVAILABLE = "Connection to the SuperLink is unavailable"
FLWR_AUTH_FAILED = "Authentication failed"
LOG_CAUSES = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the SuperLink's TLS certificate did not verify against the CA certificate given "
        "(--root-certificates): give the CA that signed the SuperLink's certificate",
    ),
    (
        FLWR_UNAVAILABLE,
        "flwr run could not reach the SuperLink (connection refused, unreachable, or a TLS mismatch: "
        "--root-certificates for a SuperLink started with --ssl-*, none for one started with --insecure); "
        "check --superlink HOST:PORT and that the SuperLink runs there",
    ),
    (
        FLWR_AUTH_FAILED,
        "the SuperLink refused this client (authentication failed): it requires a Flower account; "
        "log in with `flwr login` or submit from a machine the SuperLink admits",
    ),
)
# The classes of a node's failure, by the reasons FlowerClients gives (clients.py): what to do for each.
NODE_CAUSES = (
    (
        "joined",
        "not joined: a SuperNode that never joins is not started, points at another --superlink, is "
        "not registered (`flwr supernode register KEY.pub`, with --enable-supernode-auth) or does not "
        "trust the SuperLink's CA (--root-certificates): see its log, or raise --connect-timeout",
    ),
    (
        "unavailable",
        "lost: the SuperLink reports the SuperNode gone (stopped, or its connection dropped)",
    ),
    (
        "no reply within",
        "lost: the SuperNode did not answer within federation.client_timeout (disconnected, or slower "
        "than the timeout)",
    ),
    ("error reply", f"failed: the SuperNode's ClientApp raised (see the fault records in {METRICS_FILE})"),
)


def log_cause(text: str) -> str | None:
    """What the `flwr run` log says went wrong, in words, or None when it names no known cause."""
    return next((cause for mark, cause in LOG_CAUSES if mark in text), None)


def node_causes(run_dir: Path) -> str:
    """The clients dropped in the last round that lost any (where the run stopped), by cause, with what
    to do; then how to continue. Only cotune's own classes are named, never a ClientApp's error text
    (it could quote data)."""
    path = run_dir / METRICS_FILE
    dropped = [
        m
        for m in (read_metrics(path) if path.exists() else [])
        if m.get("type") == "fault" and m.get("event") == "client_dropped"
    ]
    faults = [m for m in dropped if m.get("round") == dropped[-1].get("round")] if dropped else []
    by_cause: dict[str, list[int]] = {}
    for f in faults:
        reason = str(f.get("reason", ""))
        cause = next((c for mark, c in NODE_CAUSES if mark in reason), f"failed (see {METRICS_FILE})")
        by_cause.setdefault(cause, []).append(int(f.get("client", -1)))
    parts = [f"client(s) {', '.join(map(str, sorted(set(cs))))} {cause}" for cause, cs in by_cause.items()]
    if not parts:
        return ""
    return (
        "; ".join(parts)
        + ". Start the missing SuperNodes (same partition-id and state-dir), then continue with "
        f"`cotune run --resume {run_dir} --backend flower`"
    )


PROBE_TIMEOUT = 10.0  # seconds for the TCP connect and the TLS handshake with a --superlink


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) of --superlink, refused when it is not one."""
    shown = address if len(address) <= 80 else address[:80] + "..."
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FlowerRunError(f"--superlink {shown!r} is not HOST:PORT (e.g. coordinator.example.org:8000)")
    return host, int(port)


def probe_superlink(address: str, root_certificates: Path | None, timeout: float = PROBE_TIMEOUT) -> None:
    """Before a run is submitted: can this machine reach the SuperLink, and (with a CA certificate)
    does its TLS certificate verify? `flwr run` reports every such failure as "Connection to the
    SuperLink is unavailable"; this names the cause and what to do, in seconds."""
    host, port = split_address(address)
    shown = f"{host}:{port}" if len(host) <= 80 else f"{host[:80]}...:{port}"
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        raise FlowerRunError(
            f"--superlink {shown}: the host name does not resolve: check the address "
            "(HOST:PORT of the SuperLink)"
        ) from None
    except ConnectionRefusedError:
        raise FlowerRunError(
            f"--superlink {shown}: connection refused, nothing listens there: start the SuperLink "
            "(flower-superlink) or give its host and --port (default 8000)"
        ) from None
    except (TimeoutError, OSError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise FlowerRunError(
            f"--superlink {shown} is unreachable ({why} within {timeout:g}s): check the address, the "
            "network and any firewall between this machine and the SuperLink's port"
        ) from None
    with conn:
        if root_certificates is not None:
            check_tls(conn, host, shown, Path(root_certificates), timeout)


def check_tls(conn: socket.socket, host: str, shown: str, ca: Path, timeout: float) -> None:
    """A TLS handshake with the SuperLink, verified against `ca` as Flower verifies it."""
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise FlowerRunError(
            f"--root-certificates {ca}: not a readable PEM CA certificate "
            f"({getattr(exc, 'reason', None) or getattr(exc, 'strerror', None) or type(exc).__name__}): "
            "give the CA certificate the SuperLink's certificate was signed with"
        ) from None
    conn.settimeout(timeout)
    try:
        context.wrap_socket(conn, server_hostname=host).close()
    except ssl.SSLCertVerificationError as exc:
        raise FlowerRunError(
            f"--superlink {shown}: the SuperLink's TLS certificate does not verify against "
            f"--root-certificates {ca} ({exc.verify_message}): give the CA that signed the SuperLink's "
            "certificate (its --ssl-ca-certfile), and a certificate that names this host"
        ) from None
    except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
        raise FlowerRunError(
            f"--superlink {shown}: no TLS handshake ({getattr(exc, 'reason', None) or type(exc).__name__}): "
            "the SuperLink probably runs with --insecure; leave out --root-certificates only if it is "
            "meant to (127.0.0.1 demos), otherwise start it with --ssl-*"
        ) from None


ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


class Progress:
    """Where `submit` copies the `flwr run --stream` lines, so the terminal follows the run as it goes
    (the ServerApp's rounds, clients and evaluation lines): to `console`'s file, without colour codes
    unless that is a terminal, without the outcome marker (read from the log afterwards)."""

    def __init__(self, console: Console) -> None:
        self.file, self.keep_colour = console.file, console.is_terminal

    def write(self, line: str) -> None:
        if OUTCOME_MARK in line or not line.strip():
            return
        self.file.write(line if self.keep_colour else ANSI_ESCAPE.sub("", line))
        self.file.flush()


# ---- a local federation ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_socket(path: Path, timeout: float, alive: Callable[[], bool]) -> None:
    """Until a node worker listens at `path` (it creates the socket once its imports are done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the node worker meant to listen at {path} exited")
        if path.exists():
            return
        time.sleep(0.1)
    raise TimeoutError(f"no node worker listens at {path} after {timeout:g}s")


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process meant to listen on 127.0.0.1:{port} exited")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class LocalFederation:
    """A SuperLink and `n_nodes` SuperNodes on 127.0.0.1, for the demo and the tests.

    Insecure mode (no TLS, no node authentication) unless `secure`: then the SuperLink serves TLS
    with a certificate from a throwaway CA (`pki.py`) and admits only SuperNodes whose public key was
    registered (`--enable-supernode-auth`, `flwr supernode register`). No runtime dependency
    installation: every process uses this Python environment. Node i gets `partition-id=i
    num-partitions=n_nodes` plus `node_config(i)`, and (with `workers`) a node worker of its own
    that does its ClientApp's work (`worker=` a socket in a private temporary directory: a Unix
    socket path must stay under 108 bytes). Use as a context manager: every process it started,
    and every child those started (SuperExec, ServerApp, ClientApp), is stopped on exit, also
    after a failure.
    """

    n_nodes: int
    work_dir: Path
    node_config: Callable[[int], Mapping[str, str | int]] | None = None
    secure: bool = False
    workers: bool = True
    port: int = 0
    processes: dict[str, _Process] = field(default_factory=dict)
    socket_dir: Path | None = None

    @property
    def flwr_home(self) -> Path:
        return self.work_dir / "flwr-home"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pki_dir(self) -> Path:
        return self.work_dir / "pki"

    @property
    def ca(self) -> Path | None:
        """The CA certificate clients verify the SuperLink with (secure federations only)."""
        return self.pki_dir / "ca.crt" if self.secure else None

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, name: str, cmd: Sequence[str]) -> _Process:
        self._stop_one(name)  # one process per name: a replaced one must not be left running
        log_path = self.work_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(cmd),
                cwd=self.work_dir,
                env=flower_env(self.flwr_home),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals to the test never reach it
            )
        proc = _Process(name, popen, log_path)
        self.processes[name] = proc
        return proc

    def start(self, timeout: float = 60.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        security = ["--insecure"]
        if self.secure:
            tls = make_server_files(self.pki_dir)
            security = ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert)]
            security += ["--ssl-keyfile", str(tls.key), "--enable-supernode-auth"]
        write_connection(self.flwr_home, self.address, insecure=not self.secure, root_certificates=self.ca)
        link = self._spawn(
            "superlink",
            [
                "flower-superlink",
                *security,
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(self.port, timeout, lambda: link.popen.poll() is None)
        for i in range(self.n_nodes):
            self.start_node(i)

    def start_node(self, i: int, name: str | None = None, register: bool = True, tls: bool = True) -> None:
        """SuperNode `name` (default supernode-i) for partition i. In a secure federation it gets its
        own key pair, registered unless `register` is False, and the CA unless `tls` is False (the
        last two are how the tests show that strangers are refused)."""
        name = name or f"supernode-{i}"
        cfg: dict[str, str | int] = {"partition-id": i, "num-partitions": self.n_nodes}
        cfg["state-dir"] = str(self.work_dir / NODE_STATE_DIR)  # trainer states, kept for a resume
        if self.workers:
            cfg[WORKER_KEY] = str(self.start_worker(name))
        cfg.update(self.node_config(i) if self.node_config else {})
        pairs = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items())
        security = ["--insecure"]
        if self.secure and tls:
            keys = make_node_keys(self.pki_dir, name)
            if register:
                done = subprocess.run(
                    ["flwr", "supernode", "register", str(keys.public), CONNECTION],
                    env=flower_env(self.flwr_home),
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    raise FlowerRunError(f"registering {name}'s key failed: {done.stdout[-500:]}")
            security = ["--root-certificates", str(self.ca)]
            security += ["--auth-supernode-private-key", str(keys.private)]
            security += ["--auth-supernode-public-key", str(keys.public)]
        self._spawn(
            name,
            [
                "flower-supernode",
                *security,
                "--superlink",
                self.address,
                "--port",
                str(free_port()),  # the node's own Runtime API, where its ClientApp processes connect
                "--node-config",
                pairs,
            ],
        )

    def start_worker(self, node: str, timeout: float = 120.0) -> Path:
        """The node worker of SuperNode `node` (`cotune flower worker`); returns its socket path."""
        if self.socket_dir is None:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="cotune-workers-"))  # 0700
        path = self.socket_dir / f"{node}.sock"
        cmd = [sys.executable, "-m", "cotune.cli.main", "flower", "worker", "--socket", str(path)]
        worker = self._spawn(f"{node}-worker", cmd)
        wait_for_socket(path, timeout, lambda: worker.popen.poll() is None)
        return path

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop one process (e.g. "supernode-1") and everything it started; a SuperNode's node worker
        with it (its machine went away: starting the node again starts a new worker)."""
        for key in (name, f"{name}-worker"):
            self._stop_one(key, sig, timeout)

    def _stop_one(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        proc = self.processes.pop(name, None)
        if proc is not None:
            _terminate_tree(proc.popen.pid, sig, timeout)
            proc.popen.wait()

    def pids(self) -> set[int]:
        """Every live process this federation started, and their children (SuperExec, apps)."""
        found: set[int] = set()
        for proc in self.processes.values():
            try:
                root = psutil.Process(proc.popen.pid)
                found |= {root.pid, *(c.pid for c in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                continue
        return found

    def close(self) -> None:
        for name in sorted(self.processes, key=lambda n: n == "superlink"):  # nodes first, then the link
            self.stop(name)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, str | int | float],
        timeout: float | None = None,
        echo: IO[str] | Progress | None = None,
    ) -> int:
        return submit(app_dir, self.flwr_home, run_config, self.work_dir / FLWR_RUN_LOG, timeout, echo)

    def logs(self) -> str:
        """The tail of every log, for a failure message."""
        parts = []
        for path in sorted(self.work_dir.glob("*.log")):
            parts.append(
                f"==> {path.name} <==\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:])
            )
        return "\n".join(parts)


def _terminate_tree(pid: int, sig: int, timeout: float) -> None:
    """Signal a process and all its descendants (found before any dies), then SIGKILL what is left."""
    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


# ---- the entry point for `cotune run --backend flower` ---------------------------------------------------
def check_flower_config(cfg: ExperimentConfig) -> None:
    """Refuse, before any process starts, what cannot run on SuperNodes (SecAgg+ where it cannot apply,
    clients trained together: each SuperNode holds one client)."""
    if cfg.federation.parallel_clients > 1:
        raise FlowerRunError(
            f"federation.parallel_clients {cfg.federation.parallel_clients} trains several simulated clients "
            "of one process together; on Flower each SuperNode (or simulation actor) holds one client: set "
            "federation.parallel_clients: 1, or use --backend embedded"
        )
    if not cfg.federation.secure_aggregation:
        return
    from cotune.algorithms.fedcollm import PLANS  # torch: only where a run is about to start

    averaged = [name for name, plan in PLANS.items() if plan.local_training and plan.aggregate]
    if not cfg.is_cotuning or cfg.algorithm not in averaged:
        raise FlowerRunError(
            "federation.secure_aggregation is implemented for the FedAvg step of algorithm "
            f"{' or '.join(averaged)} (FedCoLLM family), not for {cfg.algorithm}/{cfg.strategy.name}"
        )
    rob = cfg.robustness
    if rob.max_update_norm is not None or rob.aggregator != "mean" or cfg.privacy.enabled:
        raise FlowerRunError(
            "federation.secure_aggregation hides the individual uploads, so they cannot be screened "
            "(robustness.max_update_norm), robustly aggregated (robustness.aggregator) or clipped "
            "(privacy.clip_norm): turn those off"
        )


def run_on_flower(
    runs: Sequence[tuple[Path, ExperimentConfig]],
    console: Console,
    *,
    superlink: str | None = None,
    root_certificates: Path | None = None,
    connect_timeout: float = 120.0,
    timeout: float | None = None,
    resume: bool = False,
) -> None:
    """Run each (run directory, config) on Flower, one after the other; raise if one did not complete.

    With `superlink` (host:port of a running SuperLink's Control API), the runs go to that federation:
    TLS with `root_certificates`, insecure without. Without it, a LocalFederation of
    `federation.clients` SuperNodes on 127.0.0.1 is started for the duration (the demo). Run
    directories are paths on the SuperLink's machine. With `resume`, each run continues after its
    last complete checkpoint (its SuperNodes reload their trainer states from their state-dir).
    """
    if not runs:
        return
    if superlink is not None:  # the cause of a failure to reach it, before anything is written or sent
        probe_superlink(superlink, root_certificates)
    run_dir, cfg = runs[0]
    with tempfile.TemporaryDirectory(prefix="cotune-flower-") as tmp:
        work = run_dir / FLOWER_DIR  # logs of the federation and of `flwr run` stay with the run
        work.mkdir(parents=True, exist_ok=True)
        app_dir = write_app_dir(Path(tmp) / APP_NAME)
        settings: dict[str, Any] = {"connect-timeout": connect_timeout, "resume": resume}
        # min-clients and round-timeout come with the config
        log = work / FLWR_RUN_LOG
        if superlink is None:
            with LocalFederation(cfg.federation.clients, work) as fed:
                console.print(f"local Flower federation: SuperLink {fed.address}, {fed.n_nodes} SuperNodes")
                for d, v in runs:
                    console.print(f"[bold]{_label(v)}[/] on Flower -> {d}")
                    run_config = {"config-yaml": dump_config(v), "run-dir": str(d), **settings}
                    fed.run(app_dir, run_config, timeout, echo=Progress(console))
                    check_outcome(d, log)
            return
        home = Path(tmp) / "flwr-home"
        write_connection(
            home, superlink, insecure=root_certificates is None, root_certificates=root_certificates
        )
        for d, v in runs:
            console.print(f"[bold]{_label(v)}[/] on Flower ({superlink}) -> {d}")
            run_config = {"config-yaml": dump_config(v), "run-dir": str(d), **settings}
            submit(app_dir, home, run_config, log, timeout, echo=Progress(console))
            check_outcome(d, log)


def _label(cfg: ExperimentConfig) -> str:
    return f"algorithm {cfg.algorithm}" if cfg.is_cotuning else f"strategy {cfg.strategy.name}"
