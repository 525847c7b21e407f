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
from cotune.runtime.flower.pki import NodeKeys, make_node_keys, make_server_files
from cotune.runtime.flower.worker import WORKER_KEY


# ---- a local federation ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_socket(path: Path, timeout: float, alive: Callable[[], bool]) -> None:
    """Until a node worker listens at `path` (it listens before its heavy imports: run_worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the node worker meant to listen at {path} exited")
        if path.exists():
            return
        time.sleep(0.05)
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
        time.sleep(0.05)
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
        """The SuperLink and every SuperNode, side by side: the node workers import their libraries
        while the SuperLink, the nodes and a run's ServerApp start. start() returns once every worker
        listens; a message that reaches a worker still importing waits for it (run_worker)."""
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
        names = [f"supernode-{i}" for i in range(self.n_nodes)]
        sockets = {name: self.spawn_worker(name) for name in names} if self.workers else {}
        wait_for_port(self.port, timeout, lambda: link.popen.poll() is None)
        keys = {name: make_node_keys(self.pki_dir, name) for name in names} if self.secure else {}
        self.register({name: k.public for name, k in keys.items()})
        for i, name in enumerate(names):
            self.spawn_node(i, name, sockets.get(name), keys.get(name))
        for name, path in sockets.items():
            self.wait_for_worker(name, path)

    def start_node(
        self, i: int, name: str | None = None, register: bool = True, tls: bool = True, worker: bool = True
    ) -> None:
        """SuperNode `name` (default supernode-i) for partition i, with its node worker (unless the
        federation has none, or `worker` is False) listening before the node starts: a node that joins a
        running federation can get a message at once. In a secure federation it gets its own key pair,
        registered unless `register` is False, and the CA unless `tls` is False (how the tests show that
        strangers are refused: such a node never gets a message, so it needs no worker)."""
        name = name or f"supernode-{i}"
        socket_path = self.spawn_worker(name) if self.workers and worker else None
        keys = make_node_keys(self.pki_dir, name) if self.secure and tls else None
        if keys is not None and register:
            self.register({name: keys.public})  # while the worker imports
        if socket_path is not None:
            self.wait_for_worker(name, socket_path)
        self.spawn_node(i, name, socket_path, keys)

    def register(self, keys: Mapping[str, Path]) -> None:
        """`flwr supernode register` for each node's public key, all at once (each is a `flwr` process)."""
        env = flower_env(self.flwr_home)
        running = {
            name: subprocess.Popen(
                ["flwr", "supernode", "register", str(public), CONNECTION],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name, public in keys.items()
        }
        for name, proc in running.items():
            said, _ = proc.communicate()
            if proc.returncode != 0:
                raise FlowerRunError(f"registering {name}'s key failed: {said[-500:]}")

    def spawn_node(self, i: int, name: str, worker: Path | None, keys: NodeKeys | None) -> None:
        """The `flower-supernode` process `name` of partition i: with `worker` in its node config, and with
        `keys` (registered or not) and the CA when given, plain text otherwise."""
        cfg: dict[str, str | int] = {"partition-id": i, "num-partitions": self.n_nodes}
        cfg["state-dir"] = str(self.work_dir / NODE_STATE_DIR)  # trainer states, kept for a resume
        if worker is not None:
            cfg[WORKER_KEY] = str(worker)
        cfg.update(self.node_config(i) if self.node_config else {})
        pairs = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items())
        security = ["--insecure"]
        if keys is not None:
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

    def spawn_worker(self, node: str) -> Path:
        """Start the node worker of SuperNode `node` (`cotune flower worker`); returns the path of the
        socket it listens at within a second, before its heavy imports (wait_for_worker)."""
        if self.socket_dir is None:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="cotune-workers-"))  # 0700
        path = self.socket_dir / f"{node}.sock"
        self._stop_one(f"{node}-worker")
        path.unlink(missing_ok=True)  # a killed worker's socket file must not pass for the new one's
        cmd = [sys.executable, "-m", "cotune.cli.main", "flower", "worker", "--socket", str(path)]
        self._spawn(f"{node}-worker", cmd)
        return path

    def wait_for_worker(self, node: str, path: Path, timeout: float = 120.0) -> None:
        """Until the node worker of `node` listens at `path` (an error if it exits first)."""
        worker = self.processes[f"{node}-worker"]
        wait_for_socket(path, timeout, lambda: worker.popen.poll() is None)

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
        """Stop every process: the nodes and their workers all at once, then the SuperLink (a node that
        stops tells its SuperLink; it need not wait for an unreachable one)."""
        nodes = [name for name in self.processes if name != "superlink"]
        for group in (nodes, ["superlink"]):
            procs = [self.processes.pop(name) for name in group if name in self.processes]
            _terminate_trees([proc.popen.pid for proc in procs], signal.SIGTERM, 15.0)
            for proc in procs:
                proc.popen.wait()
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
    _terminate_trees([pid], sig, timeout)


def _terminate_trees(pids: Sequence[int], sig: int, timeout: float) -> None:
    """Signal processes and all their descendants (found before any dies), then SIGKILL what is left
    after `timeout` seconds: every tree at once, so a slow one does not make the others wait."""
    tree: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree += [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            continue
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
