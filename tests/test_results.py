"""Using a run's adapters: `cotune generate`, `cotune eval`, `cotune export` (PEFT or merged)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from tests.conftest import tiny_tree
from tests.test_cotuning import task_file, tree  # noqa: F401  (task_file is a fixture)
from tests.test_run_safety import cotune
from transformers import AutoModelForCausalLM

from cotune.config import config_from_dict
from cotune.runtime.experiment import run_experiment
from cotune.runtime.results import open_tuned


@pytest.fixture
def personalized_run(corpus_dir, tmp_path) -> Path:
    cfg = config_from_dict(tiny_tree(corpus_dir, tmp_path, federation={"rounds": 1}))
    return run_experiment(cfg, tmp_path / "run")[0]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_generate_with_a_clients_adapter(capsys, personalized_run):
    capsys.readouterr()  # the run's own output
    code, text = cotune(
        capsys, "generate", personalized_run, "apple banana", "--client", "1", "--max-new-tokens", "5"
    )
    assert code == 0, text
    again = cotune(
        capsys, "generate", personalized_run, "apple banana", "--client", "1", "--max-new-tokens", "5"
    )
    assert again == (code, text)  # greedy: reproducible
    code, text = cotune(capsys, "generate", personalized_run, "x", "--client", "9")
    assert code == 2 and "this run has clients 0..3" in text
    code, text = cotune(capsys, "generate", personalized_run, "x", "--server")
    assert code == 2 and "choose it with --client K" in text


def test_generate_uses_the_evaluations_batched_decoding(capsys, personalized_run, monkeypatch):
    """`cotune generate` prints what generation evaluation would score: `greedy_decode`'s tokens, stopped
    at the model's and the tokenizer's end tokens, decoded without special tokens."""
    from cotune.evaluation.generation import greedy_decode, stop_token_ids
    from cotune.runtime import results

    tuned = open_tuned(personalized_run, client=1)
    ids = results.prompt_ids(tuned.tokenizer, "apple banana")
    stops = stop_token_ids(tuned.pool.model, tuned.tokenizer)
    assert tuned.tokenizer.eos_token_id in stops
    [new] = greedy_decode(tuned.pool.model, [ids], max_new_tokens=6, stop_ids=stops)
    calls: list[int] = []

    def spy(*args, **kwargs):
        calls.append(1)
        return greedy_decode(*args, **kwargs)

    monkeypatch.setattr(results, "greedy_decode", spy)
    capsys.readouterr()
    code, text = cotune(
        capsys, "generate", personalized_run, "apple banana", "--client", "1", "--max-new-tokens", "6"
    )
    assert code == 0 and calls == [1]
    expected = tuned.tokenizer.decode(new, skip_special_tokens=True)
    assert expected and text.startswith(expected)  # then the model's one-line description


def test_export_gives_a_peft_adapter_and_a_merged_model_with_the_same_outputs(
    capsys, personalized_run, tmp_path
):
    tuned = open_tuned(personalized_run, client=2)
    ids = torch.tensor([[5, 17, 33, 64, 80]])
    want = logits(tuned.pool.model, ids)

    code, text = cotune(capsys, "export", personalized_run, tmp_path / "adapter", "--client", "2")
    assert code == 0, text
    base = open_tuned(personalized_run, client=2).pool.unload()
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(peft, ids), want)

    code, text = cotune(capsys, "export", personalized_run, tmp_path / "merged", "--client", "2", "--merge")
    assert code == 0, text
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=1e-5)
    code, text = cotune(capsys, "export", personalized_run, tmp_path / "merged", "--client", "2")
    assert code == 2 and "exists and is not empty" in text  # never over what is there


def test_eval_scores_the_server_and_llm_adapters_on_a_task_file(capsys, task_file, tmp_path):  # noqa: F811
    cfg = config_from_dict(tree(task_file, tmp_path, "fedcollm", federation={"rounds": 1}))
    (run_dir,) = run_experiment(cfg, tmp_path / "run")
    mc = [
        yaml.safe_load(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"mc"' in line
    ]
    for flag, model in (("--server", "slm"), ("--llm", "llm")):
        code, text = cotune(capsys, "eval", run_dir, "--task", task_file, flag)
        assert code == 0, text
        acc = float(text.split(" acc ")[1].split()[0])
        assert 0.0 <= acc <= 1.0 and f"n={len(Path(task_file).read_text().splitlines())}" in text
        assert any(r["model"] == model for r in mc)


def test_reports_name_clients_by_their_data(personalized_run, tmp_path):
    from cotune.reporting.metrics import load_run
    from cotune.reporting.report import comparison_rows, write_report

    run = load_run(personalized_run)
    assert run.client_names == ["alpha", "beta", "delta", "gamma"]  # each client's main label
    _, rows = comparison_rows([run])
    assert [r[0] for r in rows[:-1]] == ["0 (alpha)", "1 (beta)", "2 (delta)", "3 (gamma)"]
    assert "| 2 (delta) |" in write_report([personalized_run], tmp_path / "report").read_text()
