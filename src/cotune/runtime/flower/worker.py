"""A SuperNode's node worker: one long-lived process that does the ClientApp's work for every message.

Flower starts a fresh ClientApp process per message; the work in it would pay a cold start each
time (imports, base model, data). The worker holds all of that across messages (the base model and
prepared data caches of node.py) and the ClientApp process only forwards to it (client_app.py).
Each message still restores and saves the node's state on its own disk, exactly as a fresh process
does, so the replies are the same bit for bit and a worker restarted mid-run loses nothing.

The wire: a Unix domain socket, one connection per message, length-prefixed frames of Flower's own
protobuf encodings (no pickle): request = message, context; answer = "ok", reply, context (the
context carries the node's state, e.g. SecAgg+'s, back to Flower) or "error", the reason. The socket
is created private (0600, in a 0700 directory created if missing) and the worker answers only
processes of its own user.

Timeouts, so that a stuck peer never hangs the other side: the ClientApp connects within
CONNECT_TIMEOUT and sends within IO_TIMEOUT, then waits at most `worker-timeout` seconds (node
config; default REPLY_TIMEOUT) for the reply; the worker drops a connection whose request does not
arrive within IO_TIMEOUT (and goes on with the next), and one that does not take its reply as long.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

WORKER_KEY = "worker"  # the SuperNode's --node-config key naming its worker's socket
TIMEOUT_KEY = "worker-timeout"  # --node-config: seconds the ClientApp waits for its worker's reply
CONNECT_TIMEOUT = 10.0  # seconds to connect to a listening worker (a local socket: at once)
IO_TIMEOUT = 60.0  # seconds to move one request or reply (megabytes over a local socket: well under 1 s)
REPLY_TIMEOUT = 3600.0  # seconds of work per message, at most (a round of local training on a CPU)
_LENGTH = struct.Struct(">Q")
_OK, _ERROR = b"ok", b"error"
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path is 108 bytes on Linux, with the terminating NUL

App = Callable[[Message, Context], Message]


class WorkerError(RuntimeError):
    """The node worker could not be reached, or its work failed (the reason says which)."""


# ---- frames -------------------------------------------------------------------------------------------
def send_frames(conn: socket.socket, *parts: bytes) -> None:
    conn.sendall(b"".join(_LENGTH.pack(len(part)) + part for part in parts))


def recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed in the middle of a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(conn: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(recv_exact(conn, _LENGTH.size))
    return recv_exact(conn, size)


def encode(message: Message, context: Context) -> tuple[bytes, bytes]:
    return message_to_proto(message).SerializeToString(), context_to_proto(context).SerializeToString()


def decode(message: bytes, context: bytes) -> tuple[Message, Context]:
    proto_message, proto_context = ProtoMessage(), ProtoContext()
    proto_message.ParseFromString(message)
    proto_context.ParseFromString(context)
    return message_from_proto(proto_message), context_from_proto(proto_context)


# ---- the ClientApp's side -----------------------------------------------------------------------------
def reply_timeout(node_config: Mapping[str, Any]) -> float:
    """`worker-timeout` of the SuperNode's node config (seconds, > 0), or REPLY_TIMEOUT."""
    given = node_config.get(TIMEOUT_KEY)
    if given is None:
        return REPLY_TIMEOUT
    try:
        seconds = float(given)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise WorkerError(f"{TIMEOUT_KEY} in the SuperNode's --node-config must be seconds > 0")
    return seconds


def forward(
    socket_path: str,
    message: Message,
    context: Context,
    timeout: float | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> Message:
    """The worker's reply to `message`; the worker's updated node state is written into `context`.
    Waits at most `timeout` seconds for the reply (default: the node config's worker-timeout)."""
    timeout = reply_timeout(context.node_config) if timeout is None else timeout
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(connect_timeout)
        conn.connect(socket_path)
    except OSError as exc:
        conn.close()
        why = f"no answer within {connect_timeout:g}s" if isinstance(exc, TimeoutError) else exc.strerror
        raise WorkerError(
            f"no cotune node worker answers at {socket_path} ({why or exc}): start it with "
            f"`cotune flower worker --socket {socket_path}` on this SuperNode's machine, or remove "
            f"{WORKER_KEY}= from the SuperNode's --node-config"
        ) from None
    with conn:
        try:
            conn.settimeout(IO_TIMEOUT)
            send_frames(conn, *encode(message, context))
            conn.settimeout(timeout)
            status = recv_frame(conn)
            conn.settimeout(IO_TIMEOUT)
            if status == _ERROR:
                raise WorkerError(recv_frame(conn).decode())
            reply, state = decode(recv_frame(conn), recv_frame(conn))
        except TimeoutError:
            raise WorkerError(
                f"the cotune node worker at {socket_path} did not reply within {conn.gettimeout():g}s "
                f"(stuck, or busy with another message: see its log; if its work takes longer, raise "
                f"{TIMEOUT_KEY}= in the SuperNode's --node-config)"
            ) from None
        except ConnectionError:
            raise WorkerError(
                f"the cotune node worker at {socket_path} closed the connection before replying "
                "(stopped or crashed: see its log)"
            ) from None
    context.state = state.state
    return reply


# ---- the worker's side ---------------------------------------------------------------------------------
def open_socket(path: Path) -> socket.socket:
    """A listening socket at `path` that only this user can reach. An existing file is never replaced
    unless it is a socket nobody listens on (a stopped worker's)."""
    path = path.expanduser().absolute()
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"the socket path {path} is {len(os.fsencode(path))} bytes long; a Unix socket path may have at "
            f"most {MAX_SOCKET_PATH}: choose a shorter --socket path (e.g. under /tmp)"
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ValueError(f"{path} exists and is not a socket: choose another --socket path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a stopped worker's socket
        else:
            raise ValueError(f"a worker already listens at {path}: stop it, or choose another --socket path")
        finally:
            probe.close()
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is born 0600: no window where others could connect
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(8)
    return server


def same_user(conn: socket.socket) -> bool:
    """Whether the connecting process runs as this user (Linux: SO_PEERCRED; elsewhere the 0600 file
    mode is the guard)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def answer(conn: socket.socket, app: App) -> str:
    """Do one message's work and send the answer; returns what it was, for the worker's log."""
    message, context = decode(recv_frame(conn), recv_frame(conn))
    kind = message.metadata.message_type
    try:
        reply = app(message, context)
    except Exception as exc:  # what Flower does with a ClientApp exception: the server gets the reason
        send_frames(conn, _ERROR, f"{type(exc).__name__}: {exc}".encode())
        return f"{kind} failed ({type(exc).__name__})"
    send_frames(conn, _OK, *encode(reply, context))
    return kind


class NodeWorker:
    """Answers messages at a socket path, one at a time, until `stop()` (the CLI: SIGTERM / SIGINT)."""

    def __init__(
        self,
        path: Path,
        app: App,
        log: Callable[[str], None] = print,
        io_timeout: float = IO_TIMEOUT,
        server: socket.socket | None = None,
    ) -> None:
        """`server`: the socket already listening at `path` (run_worker opens it first), else opened here."""
        self.path, self.app, self.log = path.expanduser().absolute(), app, log
        self.io_timeout = io_timeout  # for reading a request and sending a reply; the work itself has none
        self.server = server if server is not None else open_socket(self.path)
        self.server.settimeout(0.5)  # how often serve_forever looks at the stop flag
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True

    def serve_forever(self) -> None:
        self.log(f"cotune node worker listening at {self.path}")
        try:
            while not self.stopping:
                try:
                    conn, _ = self.server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(self.io_timeout)  # a ClientApp that sends nothing does not hold us
                    self.serve_one(conn)
        finally:
            self.server.close()
            self.path.unlink(missing_ok=True)
            self.log("cotune node worker stopped")

    def serve_one(self, conn: socket.socket) -> None:
        if not same_user(conn):
            self.log("refused a connection from another user")
            return
        start = time.perf_counter()
        try:
            what = answer(conn, self.app)
        except TimeoutError:
            what = f"dropped a connection: no complete request or reply within {self.io_timeout:g}s"
        except (ConnectionError, OSError) as exc:
            what = f"connection lost ({type(exc).__name__})"
        except Exception as exc:  # a request that is not two of Flower's frames: the worker goes on
            what = f"unreadable request ({type(exc).__name__})"
        self.log(f"{what} in {time.perf_counter() - start:.2f} s")


def run_worker(path: Path, load_app: Callable[[], App]) -> None:
    """The `cotune flower worker` process: listen first, then load the app, then serve until SIGTERM /
    SIGINT. Listening first refuses a bad --socket path at once rather than after seconds of imports
    (torch, transformers, peft), and lets the SuperNode start while they run: a message that arrives
    meanwhile waits in the socket's backlog (its ClientApp sends within IO_TIMEOUT, far more than
    the imports take) and is answered once the app is loaded."""
    server = open_socket(path)
    try:
        app = load_app()
    except BaseException:
        server.close()
        path.expanduser().absolute().unlink(missing_ok=True)
        raise
    worker = NodeWorker(path, app, log=lambda line: print(line, flush=True), server=server)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop())
    worker.serve_forever()
