"""Every `cotune` command on the real SmolLM2-135M-Instruct asset, around ONE short personalized run.

The tiny model has no chat template, so only a real model shows that `generate` works (it did not with
transformers 5); the exports must load with peft / transformers on the base others would use.
The Flower transport runs here too, in this process (the real ServerApp loop and ClientApp through the
in-process grid of tests/test_flower.py): the same run gives the same adapters. Flower's processes and Ray
run on the tiny model (test_flower_local.py, test_flower_simulation.py): what they add does not depend on
the model, and a SmolLM2 run there would repeat their start-ups.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from tests.test_run_safety import cotune
from transformers import AutoModelForCausalLM

from cotune.cli.main import cli
from cotune.config.schema import ModelConfig
from cotune.models.loader import load_base_model
from cotune.runtime.results import open_tuned

# one xdist worker: the module-scoped SmolLM2 run is trained once
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("smollm2-commands")]

NAME = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The quickstart with tiny budgets: 2 clients, 1 round of 1 local step, 32-token windows (~a minute)."""
    tmp = tmp_path_factory.mktemp("smollm2-commands")
    tree = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    tree["device"] = "cpu"
    tree["data"].update(
        sources=[{"corpus": "bbc", "labels": ["business", "politics"], "max_docs": 12}],
        seq_len=32, max_train_windows=8, max_val_windows=2, max_test_windows=2, public_windows=2,
    )  # fmt: skip
    tree["train"].update(batch_size=2, eval_batch_size=2)
    tree["federation"] = {"clients": 2, "rounds": 1, "local_steps": 2, "warmup_steps": 0}
    tree["run"]["compare"] = []
    config = tmp / "smol.yaml"
    config.write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit) as done:
        cli(["run", str(config), "--out", str(tmp / "run")])
    assert done.value.code in (0, None)
    return tmp / "run"


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1]


def test_report(capsys, run_dir, tmp_path):
    code, text = cotune(capsys, "report", run_dir, "--out", tmp_path)
    assert code == 0, text
    assert (tmp_path / "report.md").is_file()


def test_generate_through_the_chat_template(capsys, run_dir):
    assert open_tuned(run_dir, client=0).tokenizer.chat_template  # the path the tiny model never takes
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli(["generate", str(run_dir), "What is the capital of France?", "--client", "0"])
    cap = capsys.readouterr()
    assert done.value.code in (0, None), cap.err
    assert cap.out.strip(), cap.err  # the continuation, on stdout alone
    assert "warn" not in cap.err.lower() and "error" not in cap.err.lower(), cap.err


def test_eval_on_a_small_task(capsys, run_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    rows = [
        {
            "prompt": f"The car is {c}. What colour is the car?\nAnswer:",
            "choices": [" red", " blue"],
            "answer": i % 2,
        }
        for i, c in enumerate(["red", "blue"] * 3)
    ]
    task.write_text("\n".join(json.dumps(r) for r in rows))
    code, text = cotune(capsys, "eval", run_dir, "--task", task, "--client", "1")
    assert code == 0 and "(n=6)" in text, text


def test_export_loads_with_peft_on_the_base_and_merged(capsys, run_dir, tmp_path):
    tuned = open_tuned(run_dir, client=0)
    ids = tuned.tokenizer("The central bank raised interest rates", return_tensors="pt").input_ids
    want = logits(tuned.pool.model, ids)

    code, text = cotune(capsys, "export", run_dir, tmp_path / "adapter", "--client", "0")
    assert code == 0, text
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert NAME in (tmp_path / "adapter" / "README.md").read_text()
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in (tmp_path / "adapter").iterdir())
    base, _ = load_base_model(ModelConfig(name=NAME), CPU, torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with peft.disable_adapter():
        assert not torch.allclose(logits(peft, ids), want)  # the adapter acts
    torch.testing.assert_close(logits(peft, ids), want, atol=1e-4, rtol=1e-4)

    code, text = cotune(capsys, "export", run_dir, tmp_path / "merged", "--client", "0", "--merge")
    assert code == 0, text
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-3, rtol=1e-3)


def test_assets_list_and_verify(capsys):
    code, text = cotune(capsys, "assets", "list")
    assert code == 0 and NAME in text, text
    code, text = cotune(capsys, "assets", "verify", NAME)
    assert code == 0 and f"{NAME}: intact" in text, text


def test_flower_gives_the_embedded_adapters(run_dir, tmp_path):
    """The same SmolLM2 config through Flower's ServerApp loop and ClientApp (in process): every client's
    adapter equals the embedded run's (the same algorithm code, only the transport differs)."""
    from tests.test_flower import InProcessGrid, _adapters, _run_flower_in_process, max_adapter_diff

    from cotune.config import load_config

    cfg = load_config(str(run_dir.parent / "smol.yaml"), [])
    grid = InProcessGrid(cfg.federation.clients)
    assert _run_flower_in_process(cfg, tmp_path / "flower", grid) == "completed"
    ours, theirs = _adapters(run_dir), _adapters(tmp_path / "flower")
    assert sorted(ours) == ["client-00", "client-01"] and max_adapter_diff(ours, theirs) == 0.0
