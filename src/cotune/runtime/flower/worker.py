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
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

WORKER_KEY = "worker"  # the SuperNode's --node-config key naming its worker's socket
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
def forward(socket_path: str, message: Message, context: Context) -> Message:
    """The worker's reply to `message`; the worker's updated node state is written into `context`."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(socket_path)
    except OSError as exc:
        raise WorkerError(
            f"no cotune node worker answers at {socket_path} ({exc.strerror or exc}): start it with "
            f"`cotune flower worker --socket {socket_path}` on this SuperNode's machine, or remove "
            f"{WORKER_KEY}= from the SuperNode's --node-config"
        ) from None
    with conn:
        send_frames(conn, *encode(message, context))
        try:
            status = recv_frame(conn)
            if status == _ERROR:
                raise WorkerError(recv_frame(conn).decode())
            reply, state = decode(recv_frame(conn), recv_frame(conn))
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

    def __init__(self, path: Path, app: App, log: Callable[[str], None] = print) -> None:
        self.path, self.app, self.log = path.expanduser().absolute(), app, log
        self.server = open_socket(self.path)
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
                    conn.settimeout(None)
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
        except (ConnectionError, OSError) as exc:
            what = f"connection lost ({type(exc).__name__})"
        except Exception as exc:  # a request that is not two of Flower's frames: the worker goes on
            what = f"unreadable request ({type(exc).__name__})"
        self.log(f"{what} in {time.perf_counter() - start:.2f} s")


def run_worker(path: Path, app: App) -> None:
    """The `cotune flower worker` process: serve until SIGTERM / SIGINT."""
    worker = NodeWorker(path, app, log=lambda line: print(line, flush=True))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop())
    worker.serve_forever()
