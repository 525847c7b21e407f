"""Adapter mixing checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from cotune.algorithms.aggregation import mix_adapters, weighted_average

A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _adapters(n: int = 3, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {A: torch.randn(2, 5, generator=g).to(dtype), B: torch.randn(4, 2, generator=g).to(dtype)}
        for _ in range(n)
    ]


def _copy(adapters: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in a.items()} for a in adapters]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_identity_trust_returns_exact_copies(dtype: torch.dtype) -> None:
    adapters = _adapters(dtype=dtype)
    out = mix_adapters(adapters, torch.eye(3))
    for a, o in zip(adapters, out, strict=True):
        assert list(o) == list(a)
        for key in a:
            assert o[key].dtype == dtype
            assert torch.equal(o[key], a[key])
            assert o[key].data_ptr() != a[key].data_ptr()  # clones, not aliases


def test_uniform_trust_gives_everyone_the_mean() -> None:
    adapters = _adapters()
    out = mix_adapters(adapters, torch.full((3, 3), 1 / 3))
    for key in (A, B):
        mean = (adapters[0][key] + adapters[1][key] + adapters[2][key]) / 3
        for o in out:
            assert torch.allclose(o[key], mean, atol=1e-6)


def test_hand_computed_two_by_two_mix() -> None:
    c0 = {A: torch.tensor([[1.0, 2.0]]), B: torch.tensor([[0.0], [4.0]])}
    c1 = {A: torch.tensor([[3.0, -2.0]]), B: torch.tensor([[8.0], [0.0]])}
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    out = mix_adapters([c0, c1], w)
    # client 0: 0.75*c0 + 0.25*c1
    assert torch.allclose(out[0][A], torch.tensor([[1.5, 1.0]]))
    assert torch.allclose(out[0][B], torch.tensor([[2.0], [3.0]]))
    # client 1: 0.5*c0 + 0.5*c1
    assert torch.allclose(out[1][A], torch.tensor([[2.0, 0.0]]))
    assert torch.allclose(out[1][B], torch.tensor([[4.0], [2.0]]))


def test_inputs_are_not_mutated() -> None:
    adapters = _adapters()
    before = _copy(adapters)
    trust = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    trust_before = trust.clone()
    out = mix_adapters(adapters, trust)
    weighted_average(adapters, [1.0, 2.0, 3.0])
    for a, b in zip(adapters, before, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert torch.equal(trust, trust_before)
    out[0][A].add_(100.0)  # outputs are independent of the inputs
    assert torch.equal(adapters[0][A], before[0][A])


def test_bf16_accumulates_in_float32() -> None:
    # Exact mean of [256, 1, 1, 1] is 64.75, which rounds to 65 in bf16 (spacing 0.5, ties to even).
    # Summing 64 + 0.25 + 0.25 + 0.25 in bf16 would round back to 64 at every step.
    adapters = [{A: torch.full((1, 1), v, dtype=torch.bfloat16)} for v in (256.0, 1.0, 1.0, 1.0)]
    out = weighted_average(adapters)
    assert out[A].dtype == torch.bfloat16
    assert out[A].item() == 65.0


def test_weighted_average_counts_by_hand() -> None:
    c0 = {A: torch.tensor([[4.0, 0.0]]), B: torch.tensor([[1.0]])}
    c1 = {A: torch.tensor([[0.0, 8.0]]), B: torch.tensor([[5.0]])}
    out = weighted_average([c0, c1], [1, 3])
    # weights 1/4, 3/4
    assert torch.allclose(out[A], torch.tensor([[1.0, 6.0]]))
    assert torch.allclose(out[B], torch.tensor([[4.0]]))
    # tensor weights and None (uniform)
    assert torch.allclose(weighted_average([c0, c1], torch.tensor([1.0, 3.0]))[A], out[A])
    assert torch.allclose(weighted_average([c0, c1])[A], torch.tensor([[2.0, 4.0]]))


def test_weighted_average_rejects_bad_weights() -> None:
    adapters = _adapters(2)
    with pytest.raises(ValueError, match="2 weights"):
        weighted_average(adapters, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average(adapters, [1.0, -1.0])
    with pytest.raises(ValueError, match="zero"):
        weighted_average(adapters, [0.0, 0.0])
    with pytest.raises(ValueError):
        weighted_average([])


def test_mismatched_keys_and_shapes_raise_naming_the_key() -> None:
    c0, c1 = _adapters(2)
    with pytest.raises(ValueError, match="lora_B"):
        mix_adapters([c0, {A: c1[A]}], torch.eye(2))
    with pytest.raises(ValueError, match=r"extra\.weight"):
        mix_adapters([c0, {**c1, "extra.weight": torch.zeros(1)}], torch.eye(2))
    with pytest.raises(ValueError, match="lora_A"):
        weighted_average([c0, {A: torch.zeros(3, 5), B: c1[B]}])


def test_trust_shape_is_checked() -> None:
    adapters = _adapters(3)
    with pytest.raises(ValueError, match="square"):
        mix_adapters(adapters, torch.ones(3, 2))
    with pytest.raises(ValueError, match="3 adapters"):
        mix_adapters(adapters, torch.eye(2))


def test_clients_with_the_same_trust_row_share_one_mixed_adapter():
    """FedAvg's N clients hold one copy of the average (memory with many simulated clients), with the same
    bits a separate copy would have; different rows get their own adapters."""
    adapters = [
        {"x.lora_A.weight": torch.randn(3, 5), "x.lora_B.weight": torch.randn(5, 3)} for _ in range(4)
    ]
    uniform = mix_adapters(adapters, torch.full((4, 4), 0.25))
    assert all(out is uniform[0] for out in uniform)
    w = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0.25, 0.25, 0.25, 0.25]])
    mixed = mix_adapters(adapters, w)
    assert mixed[0] is mixed[1] and len({id(m) for m in mixed}) == 3
    assert torch.equal(mixed[2]["x.lora_A.weight"], adapters[2]["x.lora_A.weight"])
    assert torch.equal(mixed[3]["x.lora_B.weight"], uniform[1]["x.lora_B.weight"])
