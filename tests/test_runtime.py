"""The embedded runtime: one shared base, aggregation invariants, checkpoints and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tests.conftest import tiny_tree

from cotune.config import config_from_dict
from cotune.models.lora import AdapterPool
from cotune.models.tiny import build_tiny_model, byte_tokenizer
from cotune.reporting.metrics import read_metrics
from cotune.runtime.checkpoint import latest_checkpoint
from cotune.runtime.experiment import resume_experiment, run_experiment


def _adapters(run_dir):
    _, path = latest_checkpoint(run_dir)
    return {p.name: load_file(str(p / "adapter_model.safetensors")) for p in sorted(path.glob("client-*"))}


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def test_sixteen_clients_share_one_base_model():
    cfg = config_from_dict({"model": {"name": "tiny"}})
    base = build_tiny_model(cfg.model.tiny, len(byte_tokenizer()))
    base_bytes = _tensor_bytes(base.state_dict().values())
    ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}

    pool = AdapterPool(base, cfg.lora, [f"c{i}" for i in range(16)])
    optims = [torch.optim.AdamW(pool.parameters(f"c{i}")) for i in range(16)]
    ids = torch.randint(0, 200, (2, 16))
    for i, opt in enumerate(optims):  # a step for every client creates every optimizer state
        pool.activate(f"c{i}")
        pool.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    adapter = pool.adapter_bytes()
    model_bytes = _tensor_bytes(pool.model.state_dict().values())
    optim_bytes = _tensor_bytes(
        t for o in optims for s in o.state.values() for t in s.values() if t.dim() > 0
    )
    client_bytes = _tensor_bytes(p for i in range(16) for p in pool.parameters(f"c{i}"))
    assert model_bytes == base_bytes  # no copy of the base; the lanes run views of the clients' weights
    assert client_bytes == 16 * adapter  # exactly one adapter each
    assert optim_bytes == 16 * 2 * adapter  # AdamW: two moments per adapter weight
    base_now = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p.data_ptr()
        for n, p in pool.model.named_parameters()
        if "lora_" not in n
    }
    assert all(base_now[n] == ptr for n, ptr in ptrs.items())  # switching clients never moved base weights


def test_a_client_costs_its_weights_not_modules_and_switching_copies_nothing():
    """A simulated client is its LoRA weights in one flat parameter, bound into one of peft's adapters when
    it runs: the model has as many modules with 64 clients as with one, and activating a client points the
    modules at views of its own parameter (what its optimizer holds), without copying it."""
    cfg = config_from_dict({"model": {"name": "tiny"}})

    def pool_of(n: int) -> AdapterPool:
        return AdapterPool(
            build_tiny_model(cfg.model.tiny, len(byte_tokenizer())), cfg.lora, [f"c{i}" for i in range(n)]
        )

    one, many = pool_of(1), pool_of(64)
    assert len(list(many.model.modules())) == len(list(one.model.modules()))
    ids = torch.randint(0, 200, (2, 16))
    for name in ("c3", "c7", "c3"):
        many.activate(name)
        (flat,) = many.parameters(name)
        ptr = flat.data_ptr()
        lane = many.lanes[many.lane_of(name)]
        assert {m.weight.untyped_storage().data_ptr() for _, m in lane} == {ptr}  # views of its own weights
        assert not [n for n, p in many.model.named_parameters() if p.requires_grad]  # the base never trains
        assert flat.requires_grad and not many.parameters("c5")[0].requires_grad
        for _ in range(2):  # the second forward after an in-place update of the weights, as a step makes
            many.model(input_ids=ids, labels=ids).loss.backward()
            assert flat.grad is not None and flat.grad.abs().sum() > 0
            with torch.no_grad():
                flat.add_(0.01)
            flat.grad = None
        assert many.parameters("c5")[0].grad is None
        assert flat.data_ptr() == ptr


def test_one_dropout_module_serves_every_layer_and_adapter_with_the_same_masks():
    """peft makes a LoRA dropout module per layer per adapter (~0.27 MiB of module objects per SmolLM2
    client); the pool keeps one, which draws the same masks in the same order."""
    import copy

    from peft import get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    from cotune.models.lora import lora_config

    cfg = config_from_dict({"model": {"name": "tiny"}, "lora": {"dropout": 0.3}})
    base = build_tiny_model(cfg.model.tiny, len(byte_tokenizer()))
    plain = get_peft_model(copy.deepcopy(base), lora_config(cfg.lora), adapter_name="c1")  # peft's own
    pool = AdapterPool(base, cfg.lora, ["c0", "c1", "c2"])
    with pool.lanes_for(["c0", "c1", "c2"]) as lanes:  # three of peft's adapters
        pass
    layers = [m for m in pool.model.modules() if isinstance(m, LoraLayer)]
    assert len({id(m.lora_dropout[lane]) for m in layers for lane in lanes}) == 1
    assert len({id(m) for m in plain.modules() if isinstance(m, torch.nn.Dropout)}) == len(layers)
    g = torch.Generator().manual_seed(1)  # B is zero at initialisation: make the adapter matter
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in pool.state("c1").items()}
    pool.load_state("c1", state)
    set_peft_model_state_dict(plain, state, adapter_name="c1")
    pool.activate("c1")
    pool.model.train(), plain.train()
    ids = torch.randint(0, 200, (2, 16))
    torch.manual_seed(5)
    ours = pool.model(input_ids=ids).logits
    torch.manual_seed(5)
    theirs = plain(input_ids=ids).logits
    assert torch.equal(ours, theirs)
    torch.manual_seed(6)
    assert not torch.equal(pool.model(input_ids=ids).logits, ours)  # dropout is on: the masks matter


def test_in_process_uploads_are_the_clients_slots_not_copies(corpus_dir, tmp_path):
    """N simulated clients hold no second copy of their uploads: an upload is the client's slot itself, valid
    until that client's next exchange (Clients.train); peers scored for validation trust are copies."""
    from cotune.data.windows import federated_data
    from cotune.runtime.inprocess import InProcessClients
    from cotune.runtime.setup import adapter_pool, load_model, personalized_works

    cfg = config_from_dict(tiny_tree(corpus_dir, tmp_path, strategy={"name": "validation"}))
    base, tokenizer, device = load_model(cfg)
    pool = adapter_pool(cfg, base)
    data = federated_data(cfg.data, cfg.federation.clients, tokenizer, cfg.run.seed)
    clients = InProcessClients(cfg, personalized_works(cfg, pool, data, device))
    sent = {i: pool.initial for i in range(cfg.federation.clients)}
    ups = clients.train(1, sent, 2).ok
    slot = {n: v.data_ptr() for n, v in pool.view("client-01").items()}
    assert {v.data_ptr() for v in ups[1].adapter.values()} == set(slot.values())
    before = {k: v.clone() for k, v in ups[1].adapter.items()}
    rows = clients.evaluate_peers(1, {i: u.adapter for i, u in ups.items()}, 1).ok
    # scoring peers left every slot as it was
    assert all(torch.equal(before[k], v) for k, v in ups[1].adapter.items())
    alone = [
        clients.works[1].peer_perplexity([{k: v.clone() for k, v in ups[j].adapter.items()}], 1).ppl[0]
        for j in ups
    ]
    assert (
        list(rows[1].ppl) == alone
    )  # each peer scored as itself, though the uploads live in the slots being written


def _run(corpus_dir, tmp_path, name, **sections):
    tree = tiny_tree(corpus_dir, tmp_path, **sections)
    tree["run"] = {**tree["run"], "name": name}
    cfg = config_from_dict(tree)
    return run_experiment(cfg)


def test_local_strategy_changes_nothing_but_local_training(corpus_dir, tmp_path):
    (run_dir,) = _run(corpus_dir, tmp_path, "local", strategy={"name": "local"})
    trust = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    matrices = [r["matrix"] for r in trust if r["type"] == "trust"]
    assert len(matrices) == 2 and all(m == torch.eye(4).tolist() for m in matrices)
    adapters = _adapters(run_dir)
    a, b = adapters["client-00"], adapters["client-01"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # each trained on its own data


def test_fedavg_makes_all_clients_equal_and_leaves_the_base_untouched(corpus_dir, tmp_path):
    base_before = build_tiny_model(
        config_from_dict(tiny_tree(corpus_dir, tmp_path)).model.tiny, 258
    ).state_dict()
    (run_dir,) = _run(corpus_dir, tmp_path, "fedavg", strategy={"name": "fedavg"})
    adapters = list(_adapters(run_dir).values())
    for other in adapters[1:]:
        for k in adapters[0]:
            torch.testing.assert_close(adapters[0][k], other[k], rtol=0, atol=1e-7)
    # checkpoints are PEFT adapters that load onto a fresh, identical base
    fresh = build_tiny_model(config_from_dict(tiny_tree(corpus_dir, tmp_path)).model.tiny, 258)
    peft_model = PeftModel.from_pretrained(fresh, latest_checkpoint(run_dir)[1] / "client-00")
    merged = peft_model.merge_and_unload()
    changed = [n for n, t in merged.state_dict().items() if not torch.equal(t, base_before[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)


@pytest.mark.parametrize("strategy", ["weight", "validation", "prediction", "oracle"])
def test_every_trust_strategy_runs_and_logs_stochastic_matrices(corpus_dir, tmp_path, strategy):
    (run_dir,) = _run(
        corpus_dir, tmp_path, strategy, strategy={"name": strategy, "selection": "topk", "topk": 2}
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    matrices = [torch.tensor(r["matrix"]) for r in records if r["type"] == "trust"]
    assert len(matrices) == 2
    for w in matrices:
        torch.testing.assert_close(w.sum(1), torch.ones(4), atol=1e-5, rtol=0)
        assert ((w > 0).sum(1) <= 2).all()
    evals = [r for r in records if r["type"] == "eval"]
    assert {(r["round"], r["client"]) for r in evals} == {(r, c) for r in range(3) for c in range(4)}
    if strategy == "oracle":  # one label per client: no one shares data, so no one is trusted
        assert torch.equal(matrices[-1], torch.eye(4))


def test_trust_never_sees_the_test_split_and_reports_score_it(corpus_dir, tmp_path):
    """Validation trust is computed on validation windows only: a different test split (more of the same
    held-out documents' windows) leaves every trust matrix bit-equal and changes the test perplexities;
    the report's perplexities are the test ones and say so."""
    from cotune.reporting.metrics import load_run
    from cotune.reporting.report import comparison_rows, ppl_title

    runs = {}
    for n in (1, 3):
        data = {"test_fraction": 0.25, "max_test_windows": n}
        (runs[n],) = _run(corpus_dir, tmp_path, f"test{n}", strategy={"name": "validation"}, data=data)

    def records(run_dir, kind):
        return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == kind]

    assert [r["matrix"] for r in records(runs[1], "trust")] == [
        r["matrix"] for r in records(runs[3], "trust")
    ]
    tests = {
        n: {(r["round"], r["client"]): r["ppl"] for r in records(d, "eval") if r["split"] == "test"}
        for n, d in runs.items()
    }
    vals = {
        n: {(r["round"], r["client"]): r["ppl"] for r in records(d, "eval") if r["split"] == "val"}
        for n, d in runs.items()
    }
    assert set(tests[1]) == {(r, c) for r in range(3) for c in range(4)}
    assert vals[1] == vals[3] and tests[1] != tests[3]
    summary = load_run(runs[3])
    assert summary.ppl_split == "test" and summary.final_ppl() == {c: tests[3][(2, c)] for c in range(4)}
    assert ppl_title([summary]).startswith("final test perplexity")
    _, rows = comparison_rows([summary])
    assert float(rows[0][1]) == pytest.approx(tests[3][(2, 0)], abs=0.01)


def test_runs_without_a_test_split_report_validation_and_say_so(corpus_dir, tmp_path):
    from cotune.reporting.metrics import load_run
    from cotune.reporting.report import ppl_title

    (run_dir,) = _run(corpus_dir, tmp_path, "notest", data={"test_fraction": 0.0})
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "eval"]
    assert evals and {r["split"] for r in evals} == {"val"}
    summary = load_run(run_dir)
    assert summary.ppl_split == "val" and ppl_title([summary]).startswith("final validation perplexity")


@pytest.mark.parametrize("strategy", ["validation", "prediction"])
@pytest.mark.slow
def test_clients_trained_together_end_as_one_by_one(corpus_dir, tmp_path, strategy):
    """federation.parallel_clients: 3 (groups of 3 and 1) gives the adapters, losses and trust of training
    one client after another."""
    dirs = {
        k: _run(
            corpus_dir, tmp_path, f"p{k}", strategy={"name": strategy}, federation={"parallel_clients": k}
        )[0]
        for k in (1, 3)
    }
    one, three = _adapters(dirs[1]), _adapters(dirs[3])
    assert set(one) == set(three) == {f"client-{i:02d}" for i in range(4)}
    for name in one:
        assert max((one[name][k] - three[name][k]).abs().max().item() for k in one[name]) < 1e-5

    def losses(d):
        return [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["type"] == "train"]

    assert losses(dirs[3]) == pytest.approx(losses(dirs[1]), abs=1e-5)
    trust = [
        [r["matrix"] for r in read_metrics(d / "metrics.jsonl") if r["type"] == "trust"]
        for d in dirs.values()
    ]
    torch.testing.assert_close(torch.tensor(trust[1]), torch.tensor(trust[0]), atol=1e-5, rtol=0)


def test_flower_refuses_clients_trained_together(corpus_dir, tmp_path):
    from cotune.runtime.flower import FlowerRunError
    from cotune.runtime.flower.deploy import check_flower_config

    cfg = config_from_dict(tiny_tree(corpus_dir, tmp_path, federation={"parallel_clients": 2}))
    with pytest.raises(FlowerRunError, match="backend embedded"):
        check_flower_config(cfg)


@pytest.mark.slow
def test_resume_ends_with_the_same_adapters(corpus_dir, tmp_path):
    sections = {"strategy": {"name": "validation"}, "federation": {"rounds": 3}, "lora": {"dropout": 0.1}}
    (full,) = _run(corpus_dir, tmp_path, "full", **sections)

    (partial,) = _run(corpus_dir, tmp_path, "partial", **sections)
    # simulate a crash after round 1: drop later checkpoints and append a half-written record
    for name in ("round-0002", "round-0003"):
        shutil.rmtree(partial / "checkpoints" / name)
    with (partial / "metrics.jsonl").open("a") as f:
        f.write('{"type": "eval", "round": 2, "cli')
    resume_experiment(partial)

    a, b = _adapters(full), _adapters(partial)
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)

    def evals(run_dir):
        return [m for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == "eval"]

    assert evals(full) == evals(partial)


def test_resume_refuses_a_checkpoint_from_another_config(corpus_dir, tmp_path):
    from cotune.runtime.rundir import ResumeError

    (run_dir,) = _run(corpus_dir, tmp_path, "x", federation={"rounds": 1})
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("lr: 0.01", "lr: 0.02"))
    with pytest.raises(ResumeError, match="different config"):
        resume_experiment(run_dir)


def test_a_run_on_per_owner_data_names_its_clients_by_their_data(corpus_dir, tmp_path):
    long_file = tmp_path / "notes.txt"
    long_file.write_text(" ".join((corpus_dir / "delta" / f"{i:03d}.txt").read_text() for i in range(12)))
    owners = [str(corpus_dir / "alpha"), str(corpus_dir / "beta"), str(corpus_dir / "gamma"), str(long_file)]
    tree = tiny_tree(corpus_dir, tmp_path, strategy={"name": "prediction"})
    tree["data"] = {k: v for k, v in tree["data"].items() if k != "path"}
    tree["data"] |= {"clients": owners, "public": str(corpus_dir / "delta")}
    (run_dir,) = run_experiment(config_from_dict(tree))
    records = read_metrics(run_dir / "metrics.jsonl")
    (start,) = [r for r in records if r["type"] == "run" and r["event"] == "start"]
    assert start["client_names"] == ["alpha", "beta", "gamma", "notes"]
    tests = [r for r in records if r["type"] == "eval" and r["split"] == "test" and r["round"] == 2]
    assert sorted(r["client"] for r in tests) == [0, 1, 2, 3]
    from cotune.reporting.metrics import load_run

    assert "alpha" in load_run(run_dir).client_label(0)
