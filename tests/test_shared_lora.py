"""FFA-LoRA and FedSA-LoRA: strategies that share one of the two LoRA matrices (issue 16 items 1-2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file: the FedCoLLM task fixture)

from cotune.algorithms.aggregation import mix_part
from cotune.config import config_from_dict
from cotune.config.loader import ConfigError
from cotune.runtime.checkpoint import list_checkpoints
from cotune.runtime.experiment import run_experiment


def test_mix_part_shares_one_matrix_by_hand():
    a = {"x.lora_A.weight": torch.tensor([1.0, 2.0]), "x.lora_B.weight": torch.tensor([10.0])}
    b = {"x.lora_A.weight": torch.tensor([3.0, 6.0]), "x.lora_B.weight": torch.tensor([30.0])}
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    fedsa = mix_part([a, b], w, "lora_A")
    assert fedsa[0]["x.lora_A.weight"].tolist() == [2.0, 4.0] and fedsa[1]["x.lora_A.weight"].tolist() == [
        2.5,
        5.0,
    ]
    assert fedsa[0]["x.lora_B.weight"].tolist() == [10.0] and fedsa[1]["x.lora_B.weight"].tolist() == [30.0]
    ffa = mix_part([a, b], w, "lora_B")
    assert ffa[0]["x.lora_B.weight"].tolist() == [20.0] and ffa[1]["x.lora_B.weight"].tolist() == [25.0]
    assert ffa[1]["x.lora_A.weight"].tolist() == [3.0, 6.0]
    assert ffa[1]["x.lora_A.weight"] is not b["x.lora_A.weight"]  # a copy, never the caller's tensor


def _adapters(run_dir, which=-1):
    _, path = list_checkpoints(run_dir)[which]
    return [load_file(str(p / "adapter_model.safetensors")) for p in sorted(path.glob("client-*"))]


def _run(corpus_dir, tmp_path, strategy):
    (run_dir,) = run_experiment(
        config_from_dict(tiny_tree(corpus_dir, tmp_path, strategy={"name": strategy}))
    )
    return run_dir


def _part(adapter, part):
    return {k: v for k, v in adapter.items() if part in k}


def test_ffa_lora_keeps_every_a_at_the_shared_start_and_averages_b(corpus_dir, tmp_path):
    run_dir = _run(corpus_dir, tmp_path, "ffa_lora")
    start, final = _adapters(run_dir, 0), _adapters(run_dir)
    for client in final:
        for k, v in _part(client, "lora_A").items():
            assert torch.equal(v, start[0][k])  # never trained: the common initialisation
        for k, v in _part(client, "lora_B").items():
            torch.testing.assert_close(v, final[0][k], rtol=0, atol=0)  # the average, the same for all
    assert any(v.abs().max() > 0 for v in _part(final[0], "lora_B").values())  # B did train
    trust = [
        json.loads(x)["matrix"]
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"trust"' in x
    ]
    assert trust and all(m == [[0.25] * 4] * 4 for m in trust)


def test_fedsa_lora_shares_a_and_keeps_each_b(corpus_dir, tmp_path):
    final = _adapters(_run(corpus_dir, tmp_path, "fedsa_lora"))
    for client in final[1:]:
        for k, v in _part(client, "lora_A").items():
            torch.testing.assert_close(v, final[0][k], rtol=0, atol=0)
    b0, b1 = _part(final[0], "lora_B"), _part(final[1], "lora_B")
    assert any(not torch.equal(b0[k], b1[k]) for k in b0)  # each client's own B


def test_differential_privacy_covers_only_the_shared_matrix(corpus_dir, tmp_path):
    """FFA-LoRA with client-level DP: the clipping and the noise go on B, what the clients share; every A
    stays exactly the common initialisation and every client ends with the same (noised) B."""
    private = {"clip_norm": 0.05, "noise_multiplier": 1.0}
    tree = tiny_tree(corpus_dir, tmp_path, strategy={"name": "ffa_lora"}, privacy=private, run={"name": "dp"})
    (run_dir,) = run_experiment(config_from_dict(tree))
    start, final = _adapters(run_dir, 0), _adapters(run_dir)
    plain = _adapters(_run(corpus_dir, tmp_path / "plain", "ffa_lora"))
    for client in final:
        for k, v in _part(client, "lora_A").items():
            assert torch.equal(v, start[0][k])
        for k, v in _part(client, "lora_B").items():
            torch.testing.assert_close(v, final[0][k], rtol=0, atol=0)
    b, b_plain = _part(final[0], "lora_B"), _part(plain[0], "lora_B")
    assert max((b[k] - b_plain[k]).abs().max().item() for k in b) > 1e-3  # the noise is there
    kinds = [json.loads(x)["type"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("privacy") >= 2


def _all(run_dir, which=-1):
    _, path = list_checkpoints(run_dir)[which]
    return {
        p.name: load_file(str(p / "adapter_model.safetensors")) for p in sorted(path.iterdir()) if p.is_dir()
    }


@pytest.mark.slow
def test_ffa_lora_in_the_fedavg_step_of_the_fedcollm_family(task_file, tmp_path):  # noqa: F811
    """federation.ffa_lora: FedAvg's clients train only B, so theta's A stays the initial one and the average
    is exact; with DP the noise goes on B only. The personalized family refuses it (strategy ffa_lora)."""
    private = {"clip_norm": 0.05, "noise_multiplier": 1.0}
    for name, extra in (("ffa", {}), ("ffa-dp", {"privacy": private})):
        cfg = config_from_dict(
            tree(task_file, tmp_path, "fedavg", federation={"ffa_lora": True}, run={"name": name}, **extra)
        )
        (run_dir,) = run_experiment(cfg)
        start, final = _all(run_dir, 0), _all(run_dir)
        assert len(final) > 1
        for adapter, initial in ((final[n], start[n]) for n in final):
            assert all(torch.equal(v, initial[k]) for k, v in _part(adapter, "lora_A").items())
            assert max((v - initial[k]).abs().max().item() for k, v in _part(adapter, "lora_B").items()) > 0
    (plain,) = run_experiment(config_from_dict(tree(task_file, tmp_path, "fedavg", run={"name": "plain"})))
    moved = _all(plain)
    assert any(
        not torch.equal(v, _all(plain, 0)[n][k]) for n in moved for k, v in _part(moved[n], "lora_A").items()
    )

    with pytest.raises(ConfigError, match=r"federation\.ffa_lora"):
        config_from_dict(tiny_tree(task_file.parent, tmp_path, federation={"ffa_lora": True}))
