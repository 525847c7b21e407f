"""The exchange codecs (algorithms/compression): byte counts and error bounds computed by hand, and error
feedback making the sum of what was sent follow the sum of the true updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file is a fixture)
from typer.testing import CliRunner

from cotune.algorithms.compression import (
    NF4_LEVELS,
    NF4_MAX_ERROR,
    Compression,
    compress_update,
    decode,
    encode,
    encoded_size,
    packed,
    roundtrip_state,
    state_size,
    unpacked,
)
from cotune.algorithms.fedcollm import PLANS
from cotune.cli.main import app
from cotune.config.names import EXCHANGING_ALGORITHMS
from cotune.config.schema import ExperimentConfig


def sample(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.03


@pytest.mark.parametrize(
    ("codec", "block", "n", "expected"),
    [
        ("none", 64, 10, 40),  # 4 bytes a weight
        ("fp16", 64, 10, 20),  # 2 bytes a weight
        ("bf16", 64, 10, 20),
        ("int8", 4, 10, 10 + 4 * 3),  # a byte a weight, a float32 scale per block of 4 (3 blocks)
        ("int8", 64, 128, 128 + 4 * 2),
        ("nf4", 4, 10, 5 + 4 * 3),  # two weights a byte, a float32 absmax per block
        ("nf4", 4, 9, 5 + 4 * 3),  # an odd count rounds the packed bytes up
        ("nf4", 64, 4096, 2048 + 4 * 64),
    ],
)
def test_byte_counts_by_hand(codec, block, n, expected):
    spec = Compression(codec=codec, block=block)
    enc = encode(sample(n), spec)
    assert enc.nbytes == expected
    assert encoded_size((n,), spec) == expected


def test_topk_byte_count_by_hand():
    """ceil(0.25 * 10) = 3 entries: 3 int8 values, one block scale (4 bytes), 3 int32 positions."""
    spec = Compression(codec="int8", block=4, topk=0.25)
    enc = encode(sample(10), spec, sparsify=True)
    assert enc.nbytes == 3 + 4 + 3 * 4 == encoded_size((10,), spec, sparsify=True)
    # an adapter sent whole (the server's reply) is never sparsified
    assert encoded_size((10,), spec) == 10 + 4 * 3


def test_fp16_bf16_error_bounds():
    x = sample(1000)
    # round to nearest: half an ulp, relative; below fp16's normal range (6.1e-5) half its subnormal step
    for codec, rel, floor in (("fp16", 2.0**-11, 2.0**-25), ("bf16", 2.0**-8, 0.0)):
        y = decode(encode(x, Compression(codec=codec)), 64)
        assert torch.all((y - x).abs() <= rel * x.abs() + floor), codec


def test_int8_error_bound_and_exact_levels():
    spec = Compression(codec="int8", block=4)
    x = torch.tensor([1.27, -0.5, 0.0, 0.3, 2.54, 0.01, -2.54, 1.0, 0.0, 0.0])
    y = decode(encode(x, spec), 4)
    absmax = torch.tensor([1.27, 1.27, 1.27, 1.27, 2.54, 2.54, 2.54, 2.54, 0.0, 0.0])
    assert torch.all((y - x).abs() <= absmax / 254 + 1e-7)  # half a step of absmax / 127
    assert y[0] == pytest.approx(1.27) and y[6] == pytest.approx(-2.54)  # the absmax is exact
    assert torch.all(y[8:] == 0)  # an all-zero block decodes to zeros (no division by 0)
    big = sample(4096, 1)
    z = decode(encode(big, Compression(codec="int8", block=64)), 64)
    bound = big.abs().view(-1, 64).amax(1).repeat_interleave(64) / 254
    assert torch.all((z - big).abs() <= bound + 1e-7)


def test_nf4_error_bound_and_levels():
    widest = (-0.6961928009986877 + 1.0) / 2  # the widest gap: -1 .. -0.696
    assert pytest.approx(widest) == NF4_MAX_ERROR
    spec = Compression(codec="nf4", block=16)
    on_levels = torch.tensor(NF4_LEVELS) * 0.5  # every level times one absmax decodes exactly
    assert torch.allclose(decode(encode(on_levels, spec), 16), on_levels, atol=1e-7)
    x = sample(4096, 2)
    y = decode(encode(x, Compression(codec="nf4", block=64)), 64)
    bound = x.abs().view(-1, 64).amax(1).repeat_interleave(64) * NF4_MAX_ERROR
    assert torch.all((y - x).abs() <= bound + 1e-7)
    assert (y - x).abs().max() > 0  # lossy indeed


@pytest.mark.parametrize("codec", ["none", "fp16", "bf16", "int8", "nf4"])
def test_every_codec_is_idempotent(codec):
    """What a receiver decodes encodes again to the same payload and decodes to the same bits, so the
    server can keep an adapter as its clients decode it and send it again (on Flower, encoded)."""
    spec = Compression(codec=codec, block=16)
    for seed in range(20):
        x = sample(1000, seed) * (10.0 ** (seed % 7 - 3))
        x[:16] = 0.0  # an all-zero block
        once = decode(encode(x, spec), 16)
        twice = decode(encode(once, spec), 16)
        assert torch.equal(once, twice), seed


def test_topk_keeps_the_largest_entries():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0])
    y = decode(encode(x, Compression(topk=0.3), sparsify=True), 64)  # ceil(1.8) = 2 entries, float32
    assert y.tolist() == [0.0, -5.0, 0.0, 3.0, 0.0, 0.0]


def test_roundtrip_state_keeps_shape_dtype_and_counts():
    state = {"a": sample(12).view(3, 4), "b": sample(6, 3).view(2, 3)}
    spec = Compression(codec="nf4", block=4)
    out = roundtrip_state(state, spec)

    def kinds(s):
        return {k: (v.shape, v.dtype) for k, v in s.items()}

    assert kinds(out) == kinds(state)
    assert state_size(state, spec) == (6 + 4 * 3) + (3 + 4 * 2)


def test_off_is_identity():
    x = {"a": sample(10)}
    assert Compression().off
    assert torch.equal(roundtrip_state(x, Compression())["a"], x["a"])


def drift(spec: Compression, rounds: int = 60) -> float:
    """|sum of what was sent - sum of the true updates| / |sum of the true updates| after `rounds` rounds
    of updates that share a direction (as a client's successive local updates do)."""
    residual = None
    true_sum = torch.zeros(200)
    sent_sum = torch.zeros(200)
    base = sample(200, 7)
    for r in range(rounds):
        delta = base + 0.1 * sample(200, 100 + r)
        sent = compress_update({"w": delta}, residual, spec)
        residual = sent.residual
        true_sum += delta
        sent_sum += sent.decoded["w"]
    return float((sent_sum - true_sum).norm() / true_sum.norm())


@pytest.mark.parametrize("codec", ["none", "int8", "nf4"])
def test_error_feedback_makes_the_sent_sum_converge(codec):
    """With error feedback the gap between the sums is the last residual alone (it does not grow with the
    rounds); without, top-5% sparsification loses most of every update for good."""
    spec = Compression(codec=codec, block=16, topk=0.1)
    early, late = drift(spec, rounds=50), drift(spec, rounds=200)
    assert late < 0.05 and late < early / 2  # the gap (one residual) shrinks against the growing sum
    lossy = Compression(codec=codec, block=16, topk=0.1, error_feedback=False)
    assert drift(lossy, rounds=50) > 0.5 and drift(lossy, rounds=200) > 0.5  # no feedback: lost for good


def test_compress_update_counts_the_bytes_sent():
    spec = Compression(codec="int8", block=64, topk=0.1)
    delta = {"a": sample(100), "b": sample(50, 1)}
    sent = compress_update(delta, None, spec)
    assert sent.nbytes == (10 + 4 + 40) + (5 + 4 + 20) == state_size(delta, spec, sparsify=True)
    assert sent.residual is not None and set(sent.residual) == {"a", "b"}
    assert float(sent.residual["a"].abs().sum()) > 0  # what top-k dropped is kept
    # as a transport carries it: named tensors of exactly those bytes, decoded by the receiver
    tensors = packed(sent.payload)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == sent.nbytes
    got = unpacked(tensors, delta, spec)
    assert all(torch.equal(got[k], sent.decoded[k]) for k in delta)


@pytest.mark.parametrize("codec", ["fp16", "int8", "nf4"])
def test_a_payload_of_another_adapter_is_refused(codec):
    spec = Compression(codec=codec, block=16, topk=0.5)
    delta = {"a": sample(40), "b": sample(20, 1)}
    tensors = packed(compress_update(delta, None, spec).payload)
    wrong_shape = {"a": sample(48), "b": sample(20, 1)}
    with pytest.raises(ValueError, match="another size"):
        unpacked(tensors, wrong_shape, spec)
    with pytest.raises((ValueError, KeyError)):
        unpacked({k: v for k, v in tensors.items() if not k.startswith("b")}, delta, spec)
    with pytest.raises(ValueError, match="does not have"):
        unpacked(tensors, {"a": delta["a"]}, spec)


# ---- the config: meaningless settings refused before any work, through the CLI -------------------------


def refused(tmp_path: Path, tree: dict, *overrides: str) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree))
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(path), *overrides, "--out", str(out / "x")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())  # nothing started
    return " ".join(result.output.split())


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["federation.compress.block=32"], "federation.compress.block 32: codec 'none' has no blocks"),
        (["federation.compress.codec=fp16", "federation.compress.block=32"], "codec 'fp16' has no blocks"),
        (["federation.compress.error_feedback=false"], "nothing is dropped to feed back"),
        (["federation.compress.topk=1.5"], "federation.compress.topk"),
        (["federation.compress.codec=zip"], "federation.compress.codec"),
        (["federation.compress=int8", "strategy.name=local"], "local exchange(s) no adapter"),
    ],
)
def test_meaningless_compress_settings_are_refused(tmp_path, corpus_dir, overrides, fragment):
    text = refused(tmp_path, tiny_tree(corpus_dir, tmp_path), *overrides)
    assert "error:" in text and fragment in text


def test_compress_with_secure_aggregation_is_refused(tmp_path, task_file):  # noqa: F811
    text = refused(
        tmp_path, tree(task_file, tmp_path), "federation.compress=int8", "federation.secure_aggregation=true"
    )
    assert "SecAgg+ sends its own" in text


def test_the_config_reads_a_codec_alone():
    cfg = ExperimentConfig(federation={"compress": "nf4"})  # type: ignore[arg-type]
    assert Compression.of(cfg) == Compression(codec="nf4")
    assert Compression.of(ExperimentConfig()).off


def test_exchanging_algorithms_are_the_plans_that_aggregate():
    assert set(EXCHANGING_ALGORITHMS) == {a for a, plan in PLANS.items() if plan.aggregate}
