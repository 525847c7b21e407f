"""A learner's own random stream: it draws apart from torch's global generator and resumes exactly."""

from __future__ import annotations

import torch

from cotune.training.rng import RandomStream


def test_stream_draws_apart_from_the_global_generator_and_leaves_it_untouched():
    torch.manual_seed(123)
    expected_global = torch.rand(3)
    torch.manual_seed(123)
    a, b = RandomStream(7, "cpu"), RandomStream(7, "cpu")
    with a.active():
        first = torch.rand(4)
    torch.rand(100)  # whatever runs between a stream's uses does not shift it
    with a.active():
        second = torch.rand(4)
    with b.active():
        same = torch.rand(8)
    assert torch.equal(torch.cat([first, second]), same)
    torch.manual_seed(123)
    torch.rand(100)
    assert not torch.equal(torch.rand(3), expected_global)  # sanity: the global stream did move there
    torch.manual_seed(123)
    with a.active():
        torch.rand(50)
    assert torch.equal(torch.rand(3), expected_global)  # ...but a stream's draws never move it
    other = RandomStream(8, "cpu")
    with other.active():
        assert not torch.equal(torch.rand(4), first)  # another seed, another stream


def test_stream_state_resumes_the_same_draws():
    a = RandomStream(3, "cpu")
    with a.active():
        torch.rand(5)
    saved = a.state_dict()
    with a.active():
        after = torch.rand(4)
    b = RandomStream(99, "cpu")
    b.load_state_dict(saved)
    with b.active():
        assert torch.equal(torch.rand(4), after)


def test_every_stream_keeps_the_seed_it_had_before_one_function_derived_them():
    """cotune.seeds.stream_seed gives each stream exactly its old seed (the adapter digests depend on it)."""
    import hashlib

    import numpy as np

    from cotune.seeds import LLM_SLOT, SERVER_SLOT, numpy_rng, stream_seed, torch_generator

    def old_hash(*parts: object) -> int:  # runtime/guard.py's generator before
        return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)

    seed = 42
    assert stream_seed("learner", seed, 3) == seed * 1000 + 3
    assert stream_seed("learner", seed, SERVER_SLOT) == seed * 1000 + 999
    assert stream_seed("learner", seed, LLM_SLOT) == seed * 1000 + 998
    assert stream_seed("batches", 42003, 2) == 42003 * 100_003 + 2
    assert stream_seed("global", seed) == stream_seed("model", seed) == seed
    for stream, at in [("attack", (2, 1)), ("garbage", (1,)), ("flora", (3,)), ("participants", (2,))]:
        assert stream_seed(stream, seed, *at) == old_hash(stream, seed, *at)  # type: ignore[arg-type]
    assert stream_seed("privacy", 9, 2, 0) == old_hash("privacy", 9, 2, 0)
    assert stream_seed("participants", 2**62 + 5, 10) == 4798808633872535878  # the old formula's value
    g = torch.Generator().manual_seed(old_hash("attack", seed, 1, 0))
    assert torch.equal(
        torch.rand(3, generator=torch_generator("attack", seed, 1, 0)), torch.rand(3, generator=g)
    )
    assert (numpy_rng("partition", seed).permutation(50) == np.random.default_rng(seed).permutation(50)).all()
    assert (
        numpy_rng("documents", seed, 4).permutation(50) == np.random.default_rng([seed, 4]).permutation(50)
    ).all()


def test_no_module_seeds_a_generator_but_through_cotune_seeds():
    """Every random stream's seed comes from `stream_seed`: no other module builds a seeded generator."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "cotune"
    found = [
        f"{path.relative_to(src)}: {mark}"
        for path in src.rglob("*.py")
        if path.name != "seeds.py"
        for mark in ("default_rng(", "Generator().manual_seed(", "* 1000 +", "100_003")
        if mark in path.read_text(encoding="utf-8")
    ]
    assert not found, found
