"""A local Flower federation for a demo or a test: a SuperLink and N SuperNodes on 127.0.0.1.

`LocalFederation` starts them (insecure, or with a throw-away PKI; no runtime dependency installation),
each SuperNode with its node worker (worker.py) unless told not to, runs `submit` against it, and stops
every process it started, children included.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from cotune.layout import FLWR_RUN_LOG, NODE_STATE_DIR
from cotune.runtime.flower import FlowerRunError
from cotune.runtime.flower.app import CONNECTION, Progress, flower_env, submit, write_connection
from cotune.runtime.flower.pki import make_node_keys, make_server_files
from cotune.runtime.flower.worker import WORKER_KEY


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
