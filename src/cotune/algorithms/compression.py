"""Compressed exchanges: how an adapter (or a round's update) is encoded to travel, and decoded.

Codecs (`federation.compress.codec`), each a pure function pair on one tensor, with the exact size of
what it sends:

- `fp16`, `bf16`: 2 bytes a weight.
- `int8`: per block of `block` weights, its float32 absmax and each weight as q = round(127 x / absmax) in
  int8, decoded as (q / 127) * absmax: n + 4 * ceil(n / block) bytes; the error of a weight is at most half
  a step, absmax / 254.
- `nf4`: QLoRA's NormalFloat-4 code book (16 levels at normal quantiles, exact 0, in [-1, 1]), per block a
  float32 absmax and each weight as the index of the level nearest x / absmax, two indices a byte:
  ceil(n / 2) + 4 * ceil(n / block) bytes; the error of a weight is at most half the widest gap between
  levels times the block's absmax (`NF4_MAX_ERROR`).

Every codec is idempotent: what one decodes encodes again to the same payload (a block's largest weight
decodes to exactly its absmax: q = ±127 gives ±1 times it, as NF4's level ±1 does), so an adapter kept as
its receivers decode it can be sent again, encoded, and arrive with the same bits.

A round's update (upload - what the client was sent) can also be sparsified (`topk`): each tensor sends its
ceil(topk * n) largest-magnitude entries, their values through the codec and their positions as int32.
What a lossy encoding drops is kept by the client (`error feedback`: Seide et al. 2014, Karimireddy et al.
2019) and added to its next update, so over the rounds the server receives the sum of the true updates,
up to the last residual (`compress_update`).

Pure: tensors in, tensors out; the runtime decides where an adapter leaves and keeps the residual.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cotune.config.names import Codec
from cotune.config.schema import ExperimentConfig
from cotune.state import AdapterState

__all__ = [
    "NF4_LEVELS",
    "NF4_MAX_ERROR",
    "Compression",
    "Encoded",
    "SentUpdate",
    "applied",
    "compress_update",
    "decode",
    "encode",
    "encoded_size",
    "packed",
    "packed_adapter",
    "roundtrip_state",
    "state_size",
    "unpacked",
    "unpacked_adapter",
]

# QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 table): the 16 NormalFloat-4 levels.
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# the largest |x / absmax - nearest level|: half the widest gap between neighbouring levels
NF4_MAX_ERROR: float = max(b - a for a, b in itertools.pairwise(NF4_LEVELS)) / 2

INDEX_BYTES = 4  # a sparsified entry's position (int32)
SCALE_BYTES = 4  # a block's scale or absmax (float32)


@dataclass(frozen=True)
class Compression:
    """How updates travel: the codec, its block size (int8 / nf4) and the share of an update's entries
    sent (`topk`; None: all). `error_feedback`: the client keeps what the encoding dropped and adds it to
    its next update."""

    codec: Codec = "none"
    block: int = 64
    topk: float | None = None
    error_feedback: bool = True

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> Compression:
        """The run's `federation.compress`; off where the run exchanges nothing (a `run.compare` sibling
        such as local or standalone)."""
        c = cfg.federation.compress
        if not cfg.exchanges:
            return cls()
        return cls(codec=c.codec, block=c.block, topk=c.topk, error_feedback=c.error_feedback)

    @property
    def off(self) -> bool:
        """Nothing changes on the wire: every adapter travels as it is, in float32."""
        return self.codec == "none" and self.topk is None


@dataclass(frozen=True)
class Encoded:
    """One tensor as it travels: the payload tensors (their raw bytes are what is sent) and the shape to
    rebuild; `indices`, for a sparsified update, the positions of the sent entries (int32)."""

    codec: Codec
    shape: tuple[int, ...]
    parts: tuple[Tensor, ...]
    indices: Tensor | None = None
    numel: int = field(default=0)  # how many values the parts encode (all, or the k sent)

    @property
    def nbytes(self) -> int:
        """The exact bytes of the payload (values, scales, positions)."""
        sizes = [t.numel() * t.element_size() for t in self.parts]
        if self.indices is not None:
            sizes.append(self.indices.numel() * self.indices.element_size())
        return sum(sizes)


# ---- one flat vector through a codec ------------------------------------------------------------------


def encode_values(x: Tensor, codec: Codec, block: int) -> tuple[Tensor, ...]:
    """The payload of a flat float vector."""
    x = x.detach().float().flatten()
    if codec == "none":
        return (x.clone(),)
    if codec == "fp16":
        return (x.to(torch.float16),)
    if codec == "bf16":
        return (x.to(torch.bfloat16),)
    blocks = blocked(x, block)
    absmax = blocks.abs().amax(dim=1)
    if codec == "int8":
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        q = torch.round(blocks / safe.unsqueeze(1) * 127).clamp_(-127, 127).to(torch.int8)
        return (q.flatten()[: x.numel()], absmax)
    if codec == "nf4":
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        levels = torch.tensor(NF4_LEVELS)
        midpoints = (levels[1:] + levels[:-1]) / 2  # the nearest level's index, without an n x 16 table
        idx = torch.bucketize((blocks / safe.unsqueeze(1)).flatten(), midpoints)
        idx = idx[: x.numel()].to(torch.uint8)
        if idx.numel() % 2:
            idx = torch.cat([idx, idx.new_zeros(1)])
        packed = idx[0::2] | (idx[1::2] << 4)
        return (packed, absmax)
    raise ValueError(f"unknown codec {codec!r}")


def decode_values(parts: tuple[Tensor, ...], codec: Codec, block: int, n: int) -> Tensor:
    """The flat float32 vector of n values a payload encodes."""
    if codec in ("none", "fp16", "bf16"):
        return parts[0].float()
    if codec == "int8":
        q, absmax = parts
        return (blocked(q.float() / 127, block) * absmax.unsqueeze(1)).flatten()[:n]
    if codec == "nf4":
        packed, absmax = parts
        idx = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()[:n].long()
        values = torch.tensor(NF4_LEVELS)[idx]
        return (blocked(values, block) * absmax.unsqueeze(1)).flatten()[:n]
    raise ValueError(f"unknown codec {codec!r}")


def blocked(x: Tensor, block: int) -> Tensor:
    """x as rows of `block` values, the last row padded with zeros."""
    pad = (-x.numel()) % block
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, block)


def values_size(n: int, codec: Codec, block: int) -> int:
    """The exact bytes `encode_values` sends for n values (computed from the sizes alone)."""
    if n == 0:
        return 0
    blocks = math.ceil(n / block)
    return {
        "none": 4 * n,
        "fp16": 2 * n,
        "bf16": 2 * n,
        "int8": n + SCALE_BYTES * blocks,
        "nf4": math.ceil(n / 2) + SCALE_BYTES * blocks,
    }[codec]


# ---- one tensor, optionally sparsified ----------------------------------------------------------------


def kept(n: int, topk: float | None) -> int:
    """How many of n entries a sparsified tensor sends: ceil(topk * n), at least 1 (all without topk)."""
    return n if topk is None else min(n, max(1, math.ceil(topk * n)))


def encode(t: Tensor, spec: Compression, sparsify: bool = False) -> Encoded:
    """`t` as it travels; `sparsify`: only its `spec.topk` largest-magnitude entries (ties: first)."""
    flat = t.detach().float().flatten()
    shape, n = tuple(t.shape), flat.numel()
    if sparsify and spec.topk is not None:
        k = kept(n, spec.topk)
        order = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
        positions = order.sort().values
        parts = encode_values(flat[positions], spec.codec, spec.block)
        return Encoded(spec.codec, shape, parts, positions.to(torch.int32), k)
    return Encoded(spec.codec, shape, encode_values(flat, spec.codec, spec.block), None, n)


def decode(enc: Encoded, block: int) -> Tensor:
    """The float32 tensor an `Encoded` stands for (zeros where a sparsified tensor sent nothing)."""
    values = decode_values(enc.parts, enc.codec, block, enc.numel)
    if enc.indices is None:
        return values.view(enc.shape)
    out = torch.zeros(math.prod(enc.shape))
    out[enc.indices.long()] = values
    return out.view(enc.shape)


def encoded_size(shape: tuple[int, ...], spec: Compression, sparsify: bool = False) -> int:
    """The exact bytes `encode` sends for a tensor of `shape`, from the shape alone (what a loop counts
    for a message without encoding it again)."""
    n = math.prod(shape)
    if sparsify and spec.topk is not None:
        k = kept(n, spec.topk)
        return values_size(k, spec.codec, spec.block) + INDEX_BYTES * k
    return values_size(n, spec.codec, spec.block)


def state_size(state: Mapping[str, Tensor], spec: Compression, sparsify: bool = False) -> int:
    """The bytes an adapter (`sparsify`: an update) costs on the wire under `spec`."""
    return sum(encoded_size(tuple(t.shape), spec, sparsify) for t in state.values())


# ---- whole adapters ------------------------------------------------------------------------------------


def roundtrip_state(state: Mapping[str, Tensor], spec: Compression) -> AdapterState:
    """What a receiver decodes of an adapter sent whole (no sparsification), in each tensor's dtype and
    device: the adapter a client holds after the server's reply reached it."""
    return {
        k: decode(encode(t, spec), spec.block).to(device=t.device, dtype=t.dtype) for k, t in state.items()
    }


@dataclass(frozen=True)
class SentUpdate:
    """A client's round update through the wire: its payload by key, what the server decodes of it, and
    the residual the client keeps (None without error feedback)."""

    payload: dict[str, Encoded]
    decoded: AdapterState
    residual: AdapterState | None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.payload.values())


def compress_update(
    delta: Mapping[str, Tensor], residual: Mapping[str, Tensor] | None, spec: Compression
) -> SentUpdate:
    """Encode a client's round update. With error feedback the update sent is delta + the residual of
    the rounds before, and what the encoding drops of it is the new residual; without, what is dropped
    is lost."""
    payload: dict[str, Encoded] = {}
    sent: AdapterState = {}
    carry: AdapterState = {}
    for k, d in delta.items():
        u = d.detach().float()
        if spec.error_feedback and residual is not None and k in residual:
            u = u + residual[k].to(u.device).float()
        payload[k] = encode(u, spec, sparsify=True)
        sent[k] = decode(payload[k], spec.block).to(u.device)
        carry[k] = u - sent[k]
    return SentUpdate(payload, sent, carry if spec.error_feedback else None)


def applied(reference: Mapping[str, Tensor], update: Mapping[str, Tensor]) -> AdapterState:
    """reference + a decoded update, in the reference's dtype: the upload as the server sees it (the one
    sum both ends compute, so a node's and the server's are the same bits)."""
    return {k: (ref.float() + update[k].to(ref.device)).to(ref.dtype) for k, ref in reference.items()}


# ---- the payload as named tensors (a transport's message) -------------------------------------------------
PART = "::part"  # a payload tensor's name: the adapter key, then PART and its index (or INDICES)
INDICES = "::indices"


def packed(payload: Mapping[str, Encoded]) -> dict[str, Tensor]:
    """An update's payload as named tensors, what a transport carries (its bytes: `SentUpdate.nbytes`)."""
    out: dict[str, Tensor] = {}
    for key, enc in payload.items():
        out.update({f"{key}{PART}{j}": part for j, part in enumerate(enc.parts)})
        if enc.indices is not None:
            out[f"{key}{INDICES}"] = enc.indices
    return out


def unpacked(
    tensors: Mapping[str, Tensor], reference: Mapping[str, Tensor], spec: Compression
) -> AdapterState:
    """The update a `packed` payload encodes, for the adapter `reference` it was taken from (its keys and
    shapes); a payload of other keys, or parts of other sizes, is refused (ValueError)."""
    out: AdapterState = {}
    for key, ref in reference.items():
        parts = tuple(tensors[name] for j in range(2) if (name := f"{key}{PART}{j}") in tensors)
        indices = tensors.get(f"{key}{INDICES}")
        n = ref.numel()
        numel = kept(n, spec.topk) if indices is not None else n
        if not parts:
            raise ValueError(f"a compressed update without its payload for {key}")
        sizes = tuple(p.numel() for p in parts) + (() if indices is None else (indices.numel(),))
        expected = encode_sizes(numel, spec) + (() if indices is None else (numel,))
        if sizes != expected:
            raise ValueError(f"a compressed update of another size for {key}")
        enc = Encoded(spec.codec, tuple(ref.shape), parts, indices, numel)
        out[key] = decode(enc, spec.block).to(ref.device)
    extra = {name.split("::")[0] for name in tensors} - set(reference)
    if extra:
        raise ValueError(f"a compressed update with {len(extra)} tensor(s) the adapter does not have")
    return out


SHAPE = "::shape"  # a whole adapter's tensor shape (int64), beside its payload


def packed_adapter(state: Mapping[str, Tensor], spec: Compression) -> dict[str, Tensor]:
    """An adapter sent whole (the server's reply), encoded, as named tensors with each tensor's shape
    (framing: not counted in `state_size`). Float32 tensors only: another dtype (a bf16 pool) travels as
    it is, since its decoded values were cast and need not encode to the same bits again."""
    if any(t.dtype != torch.float32 for t in state.values()):
        return dict(state)
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        out.update(packed({key: encode(t, spec)}))
        out[f"{key}{SHAPE}"] = torch.tensor(t.shape, dtype=torch.int64)
    return out


def unpacked_adapter(tensors: Mapping[str, Tensor], spec: Compression) -> AdapterState:
    """The adapter a `packed_adapter` message encodes (or the adapter itself, sent as it is)."""
    if not any(name.endswith(SHAPE) for name in tensors):
        return dict(tensors)
    shapes = {
        name[: -len(SHAPE)]: tuple(int(d) for d in t.tolist())
        for name, t in tensors.items()
        if name.endswith(SHAPE)
    }
    reference = {key: torch.empty(shape) for key, shape in shapes.items()}
    return unpacked({k: v for k, v in tensors.items() if not k.endswith(SHAPE)}, reference, spec)


def encode_sizes(n: int, spec: Compression) -> tuple[int, ...]:
    """How many elements each payload part of n values has (what `unpacked` checks a message by)."""
    if spec.codec in ("none", "fp16", "bf16"):
        return (n,)
    blocks = math.ceil(n / spec.block)
    return (n, blocks) if spec.codec == "int8" else (math.ceil(n / 2), blocks)
