"""What pulls FedCoLLM's SLM below the FedAvg average? Server-side validation curves, never the test split.

One FedAvg round of the clients (as every algorithm of the family walks it) gives the average theta^{1,0};
from that same start, the server's SLM step is run with one factor changed at a time, and the SLM is scored
after every step on a validation split carved from the public set D_a (multiple-choice accuracy and the
choice-level NLL, -log softmax over the choices' log-likelihoods of the right one). The LLM teacher is the
round-1 LLM (base + fresh omega), its signal computed once per batch: the SLM side is what is diagnosed.

Factors: the KD target (top-k over the full vocabulary vs the task's choices at the answer position), EOS
inside the answer labels, the server learning rate, lambda, T; then, in round 2, theta's AdamW moments
carried over from round 1 (what the loop does) against a fresh optimizer.

    PYTHONPATH=src python bench/fedcollm_diagnose.py --config examples/fedcollm-qwen.yaml \
        train.lr=1.0e-3 run.threads=1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from rich.console import Console  # noqa: E402

from cotune.algorithms.distillation import (  # noqa: E402
    kd_kl_from_topk,
    shift_for_causal_lm,
    supervised_mask,
    task_ce,
    teacher_topk,
)
from cotune.algorithms.fedcollm import aggregate_slm  # noqa: E402
from cotune.config.loader import load_config  # noqa: E402
from cotune.data.task_data import build_task_data  # noqa: E402
from cotune.evaluation.multiple_choice import encode_pair, evaluate_multiple_choice  # noqa: E402
from cotune.runtime.fedcollm import LLM_ADAPTER, SERVER  # noqa: E402
from cotune.runtime.setup import fedcollm_pools, fedcollm_works, load_fedcollm_models  # noqa: E402
from cotune.training.loop import make_optimizer, make_scheduler, optimizer_step  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    lr: float
    lam: float = 1.0
    temperature: float = 1.0
    kd: str = "vocab"  # vocab (top-k of the full vocabulary) | choices (the task's choices, answer position)
    eos: bool = True  # EOS inside the answer labels (CE and KD at that position)


def val_scores(pool, name, tokenizer, examples, cfg) -> tuple[float, float]:
    pool.activate(name)
    res = evaluate_multiple_choice(
        pool.model, tokenizer, examples, batch_size=cfg.train.eval_batch_size, max_length=cfg.task.max_length
    )
    nll = 0.0
    for ll, ex in zip(res.logliks, examples, strict=True):
        t = torch.tensor(ll)
        nll += float(torch.logsumexp(t, 0) - t[ex.answer])
    return res.acc, nll / len(examples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "fedcollm-qwen.yaml")
    ap.add_argument("--val-fraction", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--val-every", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, ["algorithm=fedcollm", *args.overrides])
    out = args.out or HERE / "results" / f"fedcollm_diagnose_{args.config.stem}.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("")
    console = Console(stderr=True)
    t_start = time.perf_counter()

    def log(obj: dict) -> None:
        obj["t"] = round(time.perf_counter() - t_start, 1)
        print(json.dumps(obj), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(obj) + "\n")

    slm_base, llm_base, tok, device = load_fedcollm_models(cfg, console, True)
    assert cfg.task is not None
    task = build_task_data(cfg.task, cfg.federation.clients, tok, cfg.run.seed, args.val_fraction)
    public, val = task.splits.public, task.public_val  # the server's split, as distill.val_fraction makes it
    n_val, enc = len(val), task.public
    vocab = len(tok)
    eos = tok.eos_token_id
    choice_ids = torch.tensor(
        sorted({encode_pair(tok, val[0].prompt, c)[1][0] for c in val[0].choices}), device=device
    )
    log(
        {
            "event": "setup",
            "public": len(public),
            "val": n_val,
            "distill_train": len(enc),
            "clients": task.client_sizes,
            "choice_ids": choice_ids.tolist(),
            "config": str(args.config),
            "overrides": args.overrides,
        }
    )

    slm, llm = fedcollm_pools(cfg, slm_base, llm_base)
    assert llm is not None
    works = fedcollm_works(cfg, slm, task, device, vocab)
    theta0 = slm.state(SERVER)
    acc, nll = val_scores(slm, SERVER, tok, val, cfg)
    log({"event": "ref", "model": "slm zero-shot", "val_acc": acc, "val_nll": nll})
    acc, nll = val_scores(llm, LLM_ADAPTER, tok, val, cfg)
    log({"event": "ref", "model": "llm zero-shot", "val_acc": acc, "val_nll": nll})

    def client_round(start):
        ups = []
        for w in works:
            w.adopt(start)
            m = w.train()
            ups.append(w.adapter())
            log({"event": "client", "client": w.index, "loss": m["loss"]})
        return aggregate_slm(ups, task.client_sizes, cfg.federation.weighting)

    avg1 = client_round(theta0)
    slm.load_state(SERVER, avg1)
    acc, nll = val_scores(slm, SERVER, tok, val, cfg)
    log({"event": "ref", "model": "slm fedavg round 1", "val_acc": acc, "val_nll": nll})

    # the teacher's signal once per batch (fixed batches, the same for every variant)
    bs = cfg.train.batch_size
    batches = []
    llm.activate(LLM_ADAPTER)
    llm.model.eval()
    with torch.no_grad():
        for i in range(args.steps):
            idx = torch.arange(i * bs, (i + 1) * bs) % len(enc)
            b = enc.batch(idx, device)
            logits = llm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logits = logits[:, :-1, :vocab]
            values, indices = teacher_topk(logits, cfg.distill.topk or 128)
            batches.append((b, values, indices, logits[..., choice_ids].float()))
            del logits

    def step(v: Variant, b, values, indices, tchoice, opt, sched) -> tuple[float, float]:
        slm.activate(SERVER)
        model = slm.model
        model.train()
        labels = b["labels"] if v.eos else torch.where(b["labels"] == eos, -100, b["labels"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[..., :vocab]
        ce = task_ce(logits, labels)
        shifted, lab = shift_for_causal_lm(logits, labels)
        mask = supervised_mask(lab)
        if v.kd == "vocab":
            kd = kd_kl_from_topk(shifted, values, indices, mask, v.temperature)
        else:
            pos = mask & torch.isin(lab, choice_ids)  # the answer position (its first token)
            s = F.log_softmax(shifted[pos][:, choice_ids].float() / v.temperature, -1)
            t = F.log_softmax(tchoice[pos] / v.temperature, -1)
            kd = (t.exp() * (t - s)).sum(-1).mean() * v.temperature**2
        (ce + v.lam * kd).backward()
        optimizer_step(opt, sched, cfg.train.max_grad_norm)
        return ce.item(), kd.item()

    def run(v: Variant, start, opt_state=None, sched_state=None, steps=None, tag="round 1", skip=0):
        slm.load_state(SERVER, start)
        tcfg = cfg.train.model_copy(update={"lr": v.lr})
        opt = make_optimizer(slm.parameters(SERVER), tcfg)
        sched = make_scheduler(opt, args.steps, tcfg)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
            sched.load_state_dict(sched_state)
        with warnings.catch_warnings():  # a fresh optimizer at the same point of the schedule
            warnings.simplefilter("ignore")
            for _ in range(skip):
                sched.step()
        acc, nll = val_scores(slm, SERVER, tok, val, cfg)
        curve = [(0, acc, nll, None, None)]
        torch.manual_seed(cfg.run.seed)
        for i, (b, values, indices, tchoice) in enumerate(batches[: steps or args.steps], 1):
            ce, kd = step(v, b, values, indices, tchoice, opt, sched)
            if i % args.val_every and i != (steps or args.steps):
                log({"event": "step", "variant": v.name, "tag": tag, "step": i, "ce": ce, "kd": kd})
                continue
            acc, nll = val_scores(slm, SERVER, tok, val, cfg)
            curve.append((i, acc, nll, ce, kd))
            log(
                {
                    "event": "step",
                    "variant": v.name,
                    "tag": tag,
                    "step": i,
                    "val_acc": acc,
                    "val_nll": nll,
                    "ce": ce,
                    "kd": kd,
                    "lr": sched.get_last_lr()[0],
                }
            )
        return curve, opt.state_dict(), sched.state_dict()

    lr = cfg.train.lr
    variants = [
        Variant("as-is (top-k vocab KD, EOS, train.lr)", lr),
        Variant("lam=0 (CE only)", lr, lam=0.0),
        Variant("KD over the choices", lr, kd="choices"),
        Variant("no EOS in labels", lr, eos=False),
        Variant("lr/10", lr / 10),
        Variant("KD choices, no EOS, lr/10", lr / 10, kd="choices", eos=False),
    ]
    for v in variants:
        run(v, avg1)

    # round 2: theta's AdamW moments from round 1 carried over (the loop today) vs a fresh optimizer
    base_v = variants[0]
    _, opt_state, sched_state = run(base_v, avg1, steps=4, tag="round 1 (4 steps, for its optimizer)")
    avg2 = client_round(avg1)  # the FedAvg path's round 2
    slm.load_state(SERVER, avg2)
    acc, nll = val_scores(slm, SERVER, tok, val, cfg)
    log({"event": "ref", "model": "slm fedavg round 2", "val_acc": acc, "val_nll": nll})
    run(base_v, avg2, opt_state, sched_state, steps=4, tag="round 2, moments carried")
    run(base_v, avg2, None, None, steps=4, tag="round 2, fresh optimizer (same lr)", skip=4)
    log({"event": "done", "minutes": (time.perf_counter() - t_start) / 60, "finite": math.isfinite(acc)})


if __name__ == "__main__":
    main()
