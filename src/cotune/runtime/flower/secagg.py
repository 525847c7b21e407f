"""SecAgg+ for the FedAvg step on Flower (`federation.secure_aggregation: true`).

Flower 1.41 ships the SecAgg+ protocol as a server workflow (`flwr.server.workflow.SecAggPlusWorkflow`)
and a ClientApp mod (`flwr.client.mod.secaggplus_mod`). Both run on the Message API (every stage is a
`train` message), but they speak the legacy fit format: the workflow gets its round's instructions
from a legacy `Strategy.configure_fit` through a `LegacyContext` and hands the unmasked aggregate to
`Strategy.aggregate_fit`; the mod calls the ClientApp's `train` handler with `fitins.*` records and
expects `fitres.*` records back. This module is that adapter and nothing more:

- `secure_average` (server): one SecAgg+ round over the given SuperNodes. Each node trains the
  broadcast adapter and uploads it masked; the server only ever sees the sum, dequantized and divided
  by the total weight: the weighted mean sum_k w_k theta_k / sum_k w_k that `aggregate_slm` computes.
- `maybe_secaggplus` (client mod): routes the protocol's messages through `secaggplus_mod` and leaves
  every other message alone, so one ClientApp serves plain and secure runs.
- `is_fit_message`, `fit_request`, `fit_reply`: the legacy format on the ClientApp side.

SecAgg+ quantizes: values are clipped to +-`CLIPPING_RANGE` and mapped to `QUANTIZATION_RANGE`
levels, and the weights w_k / `max_weight` to the same grid, so the secure mean equals the plain one
up to about CLIPPING_RANGE / QUANTIZATION_RANGE per coordinate (tests/test_flower.py measures it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from cotune.state import AdapterState

CLIPPING_RANGE = (
    8.0  # adapter values are clipped to [-8, 8] before quantization (LoRA weights are far smaller)
)
QUANTIZATION_RANGE = 2**22  # levels over [-8, 8]: a step of 16 / 2**22 ~ 3.8e-6
MODULUS_RANGE = 2**32


# ---- server ----------------------------------------------------------------------------------------------
class _Proxy(ClientProxy):
    """The workflow only reads `node_id` from a proxy; nothing is ever sent through it."""

    def get_properties(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def get_parameters(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def reconnect(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


@dataclass
class _OneRound(FedAvg):
    """The legacy strategy the workflow asks: these nodes, this instruction; keep the aggregate."""

    node_ids: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    result: list[np.ndarray] | None = None
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        pairs: list[tuple[ClientProxy, FitIns]] = []
        for n in self.node_ids:
            proxy = _Proxy(str(n))
            proxy.node_id = n
            pairs.append((proxy, FitIns(parameters, dict(self.config))))
        return pairs

    def aggregate_fit(
        self, server_round: int, results: list, failures: list
    ) -> tuple[Parameters | None, dict]:
        # every result carries the unmasked weighted mean (the workflow sets them all to it)
        for proxy, res in results:
            self.metrics[int(proxy.cid)] = dict(res.metrics)
        if results:
            self.result = parameters_to_ndarrays(results[0][1].parameters)
        return (ndarrays_to_parameters(self.result) if self.result is not None else None), {}


@dataclass
class SecureResult:
    average: AdapterState | None  # None: too few nodes finished the protocol
    metrics: dict[int, dict[str, Any]]  # node id -> the node's training metrics (loss, lr, ...)


def secure_average(
    grid: Grid,
    node_ids: list[int],
    config: Mapping[str, Any],
    broadcast: Mapping[str, torch.Tensor],
    *,
    round_: int,
    max_weight: float,
    min_nodes: int,
    timeout: float | None,
) -> SecureResult:
    """One SecAgg+ round: `broadcast` to every node with `config`, the weighted mean of what they train.

    `min_nodes` is the reconstruction threshold: below it the protocol stops and nothing is revealed.
    """
    keys = list(broadcast)
    arrays = [broadcast[k].detach().cpu().numpy() for k in keys]
    strategy = _OneRound(node_ids=list(node_ids), config={**config, "keys": json.dumps(keys)})
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays), True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every node holds a share of every other node's secrets
        # shares needed to unmask: min_nodes (at least 2) of the nodes, as a proportion of them
        reconstruction_threshold=min(max(min_nodes, 2), len(node_ids)) / len(node_ids),
        max_weight=max_weight,
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    workflow(grid, context)
    if strategy.result is None:
        return SecureResult(None, strategy.metrics)
    average = {
        k: torch.from_numpy(np.asarray(a, dtype=arrays[i].dtype)).reshape(arrays[i].shape)
        for i, (k, a) in enumerate(zip(keys, strategy.result, strict=True))
    }
    return SecureResult(average, strategy.metrics)


# ---- client ----------------------------------------------------------------------------------------------
def maybe_secaggplus(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: SecAgg+ protocol messages go through `secaggplus_mod`, all others straight on."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def is_fit_message(message: Message) -> bool:
    return "fitins.parameters" in message.content.array_records


def fit_request(message: Message) -> tuple[dict[str, Any], AdapterState]:
    """The instruction (the job's fields) and the broadcast adapter of a SecAgg+ train message."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config.pop("keys")))
    arrays = parameters_to_ndarrays(fitins.parameters)
    return config, {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}


def fit_reply(
    message: Message, adapter: Mapping[str, torch.Tensor], keys: list[str], weight: int, metrics: dict
) -> Message:
    """The trained adapter in the order of the request's `keys`, for secaggplus_mod to mask."""
    arrays = [adapter[k].detach().cpu().numpy() for k in keys]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(weight), dict(metrics))
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=message)
