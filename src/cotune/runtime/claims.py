"""FedAvg weights n_k that a client cannot inflate.

FedAvg weighs each upload by the number of examples its client says it holds. A client that claims
a billion takes over the average, and update screening does not see it: the update itself is
ordinary. So the server checks each claim against what it can know, and records every claim it
does not take as it came (a `FaultRecord`, event `claim_rejected`, like a rejected update):

* a client training on its part of the config's split (the simulation, the Flower demo): the
  server computes that part itself, so the claim must equal it; another claim is replaced by it;
* a client with its own data (a SuperNode with `data-path`): unverifiable, so it is capped at
  `federation.max_examples`; without that bound, every client weighs the same (uniform FedAvg),
  which one liar cannot sway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cotune.config.schema import ExperimentConfig
from cotune.records import FaultRecord
from cotune.runtime.port import ClientInfo
from cotune.runtime.quorum import Log


def checked_sizes(
    cfg: ExperimentConfig, infos: Mapping[int, ClientInfo], expected: Sequence[int], log: Log
) -> list[int]:
    """n_k for every client (0 for those that did not join) from their descriptions, checked."""
    sizes = [0] * cfg.federation.clients
    bound = cfg.federation.max_examples
    unverifiable = []
    for k, info in sorted(infos.items()):
        claimed = info.examples or 0
        if not info.own_data:
            sizes[k] = expected[k]
            if claimed != expected[k]:
                reason = f"claimed {claimed} examples, its part of the config's split has {expected[k]}"
                log(FaultRecord(event="claim_rejected", round=0, phase="connect", client=k, reason=reason))
        elif bound is not None and claimed > bound:
            sizes[k] = bound
            reason = f"claimed {claimed} examples, capped at federation.max_examples {bound}"
            log(FaultRecord(event="claim_rejected", round=0, phase="connect", client=k, reason=reason))
        else:
            sizes[k] = claimed
            unverifiable += [k] if bound is None else []
    if unverifiable and cfg.federation.weighting == "examples":
        for k in unverifiable:
            reason = "its own data, no federation.max_examples to bound the claim: FedAvg weighs uniformly"
            log(FaultRecord(event="claim_rejected", round=0, phase="connect", client=k, reason=reason))
        return [1 if k in infos else 0 for k in range(cfg.federation.clients)]
    return sizes
