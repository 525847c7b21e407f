"""The cotune ClientApp that Flower starts for each message: it does the work here, or hands the
message to this SuperNode's long-lived node worker.

Flower runs every message in a fresh ClientApp process. Doing the work there costs a cold start
each time: importing torch, transformers and peft, loading the base model, rebuilding the data. A
SuperNode whose operator starts a node worker beside it (`cotune flower worker --socket PATH`, and
`worker=PATH` in the SuperNode's `--node-config`) pays that once: this process, which imports only
Flower, forwards the message and the node's context to the worker over a local socket and returns
its reply (worker.py). Without `worker`, the work runs in this process (`handlers.node_app`),
imported only then. Either way the reply is the same, bit for bit.
"""

from __future__ import annotations

import sys
import time

import psutil
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from cotune.runtime.flower.worker import WORKER_KEY, forward

app = ClientApp()


def dispatch(message: Message, context: Context) -> Message:
    """The node's reply, from its worker when it has one, else from this process. One log line per
    message says where the time went (what bench/deployment_overhead.py reads)."""
    started = time.time()
    socket_path = context.node_config.get(WORKER_KEY)
    if socket_path:
        reply = forward(str(socket_path), message, context)
    else:
        from cotune.runtime.flower.handlers import node_app  # torch, transformers, peft: only when needed

        reply = node_app(message, context)
    print(
        f"cotune node {context.node_config.get('partition-id')}: {message.metadata.message_type} "
        f"handled in {time.time() - started:.2f} s {'by its worker' if socket_path else 'here'}; "
        f"this process started {started - psutil.Process().create_time():.2f} s before",
        file=sys.stderr,
        flush=True,
    )
    return reply


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    return dispatch(message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    return dispatch(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return dispatch(message, context)


@app.evaluate("peers")
def evaluate_peers(message: Message, context: Context) -> Message:
    return dispatch(message, context)


@app.query("predict")
def predict(message: Message, context: Context) -> Message:
    return dispatch(message, context)
