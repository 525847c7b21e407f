"""Is a saved adapter one of this run's? Its keys, shapes, dtype and finiteness against the run's spec.

One check for every place that reads an adapter back: a resume (a foreign, partial or non-finite adapter
makes its checkpoint damaged, so the run falls back to the newest intact round) and `eval` / `generate` /
`export` (a refusal naming the file). The spec comes from an adapter the run's own pool builds (its LoRA
config on its model), so it needs no model-specific table.

The rank is not part of the spec: clients may differ in rank (`lora.ranks`) and FLoRA's saved adapters
grow with the merged history; every module's A and B must only agree on one rank. The dtype must be one a
cotune model runs in, not necessarily the writer's: `dtype: auto` depends on the device, and a run trained
on a GPU in bfloat16 may be evaluated on a CPU in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cotune.errors import OrdinaryError

MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
A_PART, B_PART = ".lora_A.", ".lora_B."


class AdapterMismatch(ValueError, OrdinaryError):
    """A saved adapter that is not one of this run's (its message names the file and what is wrong)."""


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter of one model and LoRA config holds: every key and the size of each weight apart
    from the rank (an A's input features, a B's output features)."""

    widths: Mapping[str, int]

    @classmethod
    def of(cls, template: Mapping[str, Tensor]) -> AdapterSpec:
        """The spec of `template`, an adapter the run's own pool made (any rank)."""
        return cls({key: int(t.shape[1] if A_PART in key else t.shape[0]) for key, t in template.items()})


def adapter_problem(state: Mapping[str, Tensor], spec: AdapterSpec | None = None) -> str | None:
    """What makes `state` no adapter of `spec`, in words; None when it fits. Without a spec, only what
    needs no model: LoRA pairs of one rank, a model dtype, finite weights. It names weights by the run's
    own keys only (a foreign file's key names are its writer's text) and never quotes a value."""

    def named(key: str) -> str:
        return f" {key!r}" if spec is not None and key in spec.widths else ""

    if not state:
        return "it holds no weights"
    if spec is not None:
        missing = [k for k in spec.widths if k not in state]
        extra = [k for k in state if k not in spec.widths]
        if missing or extra:
            example = f", e.g.{named(missing[0])}" if missing else ""
            return (
                f"its weights are not this model's LoRA weights ({len(missing)} missing{example}, "
                f"{len(extra)} unexpected): it belongs to another model or LoRA config"
            )
    ranks: set[int] = set()
    for key, t in state.items():
        if t.dtype not in MODEL_DTYPES:
            return f"a weight{named(key)} is {str(t.dtype).removeprefix('torch.')}, not a model dtype"
        is_a, is_b = A_PART in key, B_PART in key
        if t.dim() != 2 or not (is_a or is_b):
            return f"a weight{named(key)} is not a LoRA A or B matrix"
        rank, width = (t.shape[0], t.shape[1]) if is_a else (t.shape[1], t.shape[0])
        if spec is not None and width != spec.widths[key]:
            return f"weight{named(key)} has shape {tuple(t.shape)}, which does not fit this model"
        ranks.add(int(rank))
    swapped = {k.replace(A_PART, B_PART) if A_PART in k else k.replace(B_PART, A_PART) for k in state}
    if swapped != set(state):
        return "a LoRA A or B matrix has no partner"
    if len(ranks) != 1:
        return f"its weights do not agree on one rank ({sorted(ranks)[:5]})"
    bad = [key for key, t in state.items() if not bool(torch.isfinite(t).all())]
    if bad:
        return f"{len(bad)} weight(s) hold NaN or infinite values: training diverged"
    return None


def check_adapter(path: Path, state: Mapping[str, Tensor], spec: AdapterSpec | None = None) -> None:
    """Refuse `state` (read from `path`) unless it is an adapter of `spec`."""
    problem = adapter_problem(state, spec)
    if problem is not None:
        raise AdapterMismatch(f"{path} is not an adapter of this run: {problem}")
