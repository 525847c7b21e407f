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
