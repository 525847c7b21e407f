"""The embedded runtime for FedCoLLM and its baselines (SPEC A).

One process holds the SLM base (with one adapter per client plus the server's copy of the
SLM adapter) and, when the algorithm needs it, the LLM base with its server-only LoRA.
Every algorithm of the family walks the same round; `PLANS` switches its steps on or off.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from cotune.algorithms.attacks import garbage_tokens
from cotune.algorithms.fedcollm import PLANS, aggregate_slm, check_payload, fedavg_weights, state_bytes
from cotune.config.schema import ExperimentConfig
from cotune.data.task_data import EncodedSet, TaskData
from cotune.data.windows import WindowSampler
from cotune.evaluation.multiple_choice import evaluate_multiple_choice
from cotune.models.lora import AdapterPool
from cotune.reporting.metrics import append_metrics
from cotune.runtime import guard
from cotune.runtime.checkpoint import (
    restore_rng,
    rng_state,
    save_state,
    write_checkpoint,
)
from cotune.runtime.common import (
    config_fingerprint,
    load_adapter,
    open_latest_checkpoint,
    start_or_resume,
    truncate_metrics,
)
from cotune.training.distill import student_step, teacher_signal
from cotune.training.loop import make_optimizer, make_scheduler, train_step

SERVER = "server"  # the server's copy of the SLM adapter (theta), inside the SLM pool
LLM_ADAPTER = "server-llm"  # the LLM's server-only LoRA (omega); never leaves the server


@dataclass
class Learner:
    """An adapter with its optimizer, schedule and data cursor."""

    name: str
    data: EncodedSet
    sampler: WindowSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])


def base_model_bytes(pool: AdapterPool) -> int:
    """Size of the full model without any adapter: what FedCoLLM's payload is compared to."""
    return sum(p.numel() * p.element_size() for n, p in pool.model.named_parameters() if "lora_" not in n)


def adapter_digest(pool: AdapterPool, name: str) -> str:
    """A fingerprint of one adapter's weights (bit-exact: two adapters match only if every value does)."""
    h = hashlib.sha256()
    for key, tensor in sorted(pool.state(name).items()):
        h.update(key.encode())
        h.update(tensor.float().cpu().numpy().tobytes())
    return h.hexdigest()


class CoTuningRuntime:
    def __init__(
        self,
        cfg: ExperimentConfig,
        slm: AdapterPool,
        llm: AdapterPool | None,
        task: TaskData,
        tokenizer: PreTrainedTokenizerBase,
        run_dir: Path,
        device: torch.device,
        console: Console | None = None,
        eval_cache: dict | None = None,
    ) -> None:
        self.cfg, self.slm, self.llm, self.task = cfg, slm, llm, task
        # Test accuracy by (model, adapter weights, eval settings): run.compare variants share one
        # so the zero-shot evaluation that every variant starts with runs once, not once each.
        self.eval_cache = eval_cache if eval_cache is not None else {}
        self.tokenizer, self.run_dir, self.device = tokenizer, run_dir, device
        self.console = console or Console(stderr=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.plan = PLANS[cfg.algorithm]
        if self.plan.uses_llm and llm is None:
            raise ValueError(f"algorithm '{cfg.algorithm}' needs the server LLM")
        self.vocab_size = len(tokenizer)
        self.full_slm_bytes = base_model_bytes(slm)
        self.slm_shapes = {k: v.shape for k, v in slm.state(SERVER).items()}
        t, fed, seed = cfg.train, cfg.federation, cfg.run.seed
        rounds = fed.rounds

        self.clients = [
            self._learner(
                slm, f"client-{k:02d}", data, self.local_steps(len(data)) * rounds, t.lr, seed * 1000 + k
            )
            for k, data in enumerate(task.clients)
        ]
        if cfg.simulation.attack.kind == "garbage_data":  # simulated attackers train on random tokens
            for k in cfg.simulation.attack.clients:
                d = self.clients[k].data
                g = guard.generator("garbage", seed, k)
                ids = garbage_tokens(d.input_ids, self.vocab_size, g, mask=d.attention_mask)
                labels = torch.where(d.labels != -100, ids, d.labels)
                self.clients[k].data = EncodedSet(ids, d.attention_mask, labels)
        self.distill_steps = self.distill_batches() * cfg.distill.epochs
        self.server_slm = self._learner(
            slm, SERVER, task.public, self.distill_steps * rounds, t.lr, seed * 1000 + 999, accumulate=False
        )
        self.server_llm: Learner | None = None
        if llm is not None:
            llm_lr = cfg.llm.lr if cfg.llm is not None and cfg.llm.lr is not None else t.lr
            if self.plan.central_llm:
                steps = sum(self.local_steps(len(d)) for d in task.clients)
                self.central_steps = steps
                self.server_llm = self._learner(
                    llm, LLM_ADAPTER, task.union, steps * rounds, llm_lr, seed * 1000 + 998
                )
            else:
                self.server_llm = self._learner(
                    llm,
                    LLM_ADAPTER,
                    task.public,
                    self.distill_steps * rounds,
                    llm_lr,
                    seed * 1000 + 999,
                    accumulate=False,
                )

    def _learner(
        self,
        pool: AdapterPool,
        name: str,
        data: EncodedSet,
        total_steps: int,
        lr: float,
        seed: int,
        accumulate: bool = True,
    ) -> Learner:
        train = self.cfg.train.model_copy(update={"lr": lr})
        opt = make_optimizer(pool.parameters(name), train)
        per_step = train.batch_size * (train.grad_accum if accumulate else 1)
        sampler = WindowSampler(len(data), per_step, seed)
        return Learner(name, data, sampler, opt, make_scheduler(opt, max(1, total_steps), train))

    # ---- budgets ---------------------------------------------------------------------------
    def local_steps(self, n_examples: int) -> int:
        fed, t = self.cfg.federation, self.cfg.train
        if fed.local_epochs is None:
            return fed.local_steps
        return fed.local_epochs * math.ceil(n_examples / (t.batch_size * t.grad_accum))

    def distill_batches(self) -> int:
        """Distillation batches per pass over D_a (one optimizer step each, no accumulation)."""
        n = math.ceil(len(self.task.public) / self.cfg.train.batch_size)
        return min(n, self.cfg.distill.max_steps) if self.cfg.distill.max_steps else n

    # ---- the round -------------------------------------------------------------------------
    def run(self, resume: bool = False) -> None:
        start = start_or_resume(self, resume, self.cfg.algorithm, len(self.clients))
        rounds = self.cfg.federation.rounds if self.plan.trains else 0
        for r in range(start, rounds + 1):
            t0 = time.perf_counter()
            self.run_round(r)
            t_work = time.perf_counter() - t0
            shown = self.evaluate(r) if self.is_eval_round(r) else ""
            wall = time.perf_counter() - t0
            self.log({"type": "round", "round": r, "step": r, "wall_s": wall, "train_s": t_work})
            self.console.print(f"round {r}/{rounds}  {shown}  ({wall:.1f}s)")
            self.checkpoint(r)
        self.log({"type": "run", "event": "end", "algorithm": self.cfg.algorithm, "time": time.time()})

    def is_eval_round(self, r: int) -> bool:
        return r % self.cfg.run.eval_every == 0 or r == self.cfg.federation.rounds

    def run_round(self, r: int) -> None:
        plan = self.plan
        payload = self.slm.state(SERVER) if plan.broadcast else None
        down = state_bytes(payload) if payload is not None else 0
        if payload is not None:
            check_payload(payload, self.slm_shapes)  # 1. broadcast theta^t: SLM adapter keys only
            for c in self.clients:
                self.slm.load_state(c.name, payload)
        # 2. local training on private data, answer-only loss: {client index: its trained adapter}
        updates = self.train_clients(r) if plan.local_training else {}
        if plan.local_training:
            guard.require(self.cfg, self.log, r, len(updates), len(self.clients), "answered")
        if plan.aggregate:  # 3. upload + weighted FedAvg -> theta^{t,0}
            assert payload is not None
            for k, u in updates.items():
                self.log(
                    {
                        "type": "comm",
                        "round": r,
                        "client": k,
                        "bytes_up": state_bytes(u),
                        "bytes_down": down,
                        "full_slm_bytes": self.full_slm_bytes,
                        "ratio": state_bytes(u) / self.full_slm_bytes,
                    }
                )
            self.slm.load_state(SERVER, self.aggregate_updates(r, updates, payload))
        if plan.distill:  # 4. mutual distillation on D_a; 5. the distilled theta is broadcast next round
            self.distill(r)
        if plan.central_llm:
            assert self.llm is not None and self.server_llm is not None
            loss = self.train_learner(self.llm, self.server_llm, self.central_steps)
            self.log(
                {
                    "type": "train",
                    "model": "llm",
                    "round": r,
                    "client": None,
                    "loss": loss,
                    "lr": self.server_llm.scheduler.get_last_lr()[0],
                }
            )

    def train_clients(self, r: int) -> dict[int, dict[str, torch.Tensor]]:
        """Every client trains the SLM adapter in its slot on its own data; their adapters by client.

        The Flower runtime (cotune.runtime.flower) overrides this to train on the SuperNodes.
        """
        updates = {}
        for k, c in enumerate(self.clients):
            before = self.slm.state(c.name)
            outcome = guard.run_client(
                self.cfg, r, k, lambda c=c: self.train_learner(self.slm, c, self.local_steps(len(c.data)))
            )
            if not outcome.ok:  # dropped from this round: its slot goes back to what it started with
                self.slm.load_state(c.name, before)
                guard.log_dropped(self.log, r, k, outcome.reason or "")
                continue
            self.log(
                {
                    "type": "train",
                    "model": "slm",
                    "round": r,
                    "client": k,
                    "loss": outcome.value,
                    "lr": c.scheduler.get_last_lr()[0],
                }
            )
            updates[k] = self.slm.state(c.name)
            if guard.is_attacker(self.cfg, k, r) and self.cfg.simulation.attack.kind != "garbage_data":
                updates[k] = guard.attacked(self.cfg, r, k, updates[k], before)
        return updates

    def aggregate_updates(
        self, r: int, updates: dict[int, dict[str, torch.Tensor]], payload: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Screen the uploads against the broadcast theta, then FedAvg (robust / DP when configured)."""
        ks = sorted(updates)
        accepted, kept = guard.screen_and_clip(
            self.cfg, self.log, r, ks, [updates[k] for k in ks], [payload] * len(ks)
        )
        guard.require(
            self.cfg, self.log, r, len(accepted), len(self.clients), "sent an acceptable update", default=1
        )
        for u in kept:
            check_payload(u, self.slm_shapes)
        sizes = [self.client_sizes()[k] for k in accepted]
        weighting, rob = self.cfg.federation.weighting, self.cfg.robustness
        averaged = aggregate_slm(kept, sizes, weighting, rob.aggregator, rob.trim_fraction)
        if self.cfg.privacy.enabled:
            w = fedavg_weights(sizes, weighting)
            averaged = guard.dp_noise(self.cfg, r, averaged, max(w) / sum(w))
            guard.log_privacy(self.cfg, self.log, r, "central: on the (weighted) mean of clipped updates")
        return averaged

    def client_sizes(self) -> list[int]:
        """n_k, the FedAvg weights (on Flower: what each SuperNode reports)."""
        return self.task.client_sizes

    def next_batches(self, learner: Learner) -> list[dict[str, torch.Tensor]]:
        idx = learner.sampler.next_indices()
        return [learner.data.batch(part, self.device) for part in idx.split(self.cfg.train.batch_size)]

    def train_learner(self, pool: AdapterPool, learner: Learner, steps: int) -> float:
        pool.activate(learner.name)
        t = self.cfg.train
        losses = [
            train_step(
                pool.model, self.next_batches(learner), learner.optimizer, learner.scheduler, t.max_grad_norm
            )
            for _ in range(steps)
        ]
        return sum(losses) / max(1, len(losses))

    def distill(self, r: int) -> None:
        assert self.llm is not None and self.server_llm is not None
        d, t = self.cfg.distill, self.cfg.train
        slm_model, llm_model = self.slm.model, self.llm.model
        self.slm.activate(SERVER)
        self.llm.activate(LLM_ADAPTER)
        sums = {"slm_ce": 0.0, "slm_kd": 0.0, "llm_ce": 0.0, "llm_kd": 0.0}
        teacher_bytes, n, t0 = 0, 0, time.perf_counter()

        def step(student, teacher, learner: Learner, prefix: str, batch) -> int:
            signal = teacher_signal(teacher, batch, self.vocab_size, d.topk)
            ce, kd = student_step(
                student,
                signal,
                batch,
                learner.optimizer,
                learner.scheduler,
                d,
                self.vocab_size,
                t.max_grad_norm,
            )
            sums[f"{prefix}_ce"] += ce
            sums[f"{prefix}_kd"] += kd
            return signal.nbytes

        def slm_step(batch) -> int:  # the LLM teaches the SLM
            return step(slm_model, llm_model, self.server_slm, "slm", batch)

        def llm_step(batch) -> int:  # the SLM teaches the LLM
            return step(llm_model, slm_model, self.server_llm, "llm", batch)

        steps = self.distill_batches()
        for _ in range(d.epochs):
            batches = [b for _ in range(steps) for b in self.next_batches(self.server_slm)]
            if d.order == "batch":  # SLM step then LLM step on each batch
                for batch in batches:
                    teacher_bytes = max(teacher_bytes, slm_step(batch), llm_step(batch))
            else:  # alternate by epoch: a full SLM pass, then a full LLM pass
                teacher_bytes = max([teacher_bytes] + [slm_step(b) for b in batches])
                teacher_bytes = max([teacher_bytes] + [llm_step(b) for b in batches])
            n += len(batches)
        self.log(
            {
                "type": "distill",
                "round": r,
                "step": n,
                **{k: v / max(1, n) for k, v in sums.items()},
                "teacher_bytes": teacher_bytes,
                "topk": d.topk,
                "wall_s": time.perf_counter() - t0,
            }
        )

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self, r: int) -> str:
        """Multiple-choice accuracy on the held-out test split of whatever this algorithm trains."""
        plan, shown = self.plan, []
        if r == 0 or plan.local_training:
            per_client = plan.local_training and not plan.aggregate and r > 0  # standalone
            targets = list(enumerate(c.name for c in self.clients)) if per_client else [(None, SERVER)]
            accs = []
            for client, name in targets:
                res = self.mc(self.slm, name)
                self.log({"type": "mc", "round": r, "model": "slm", "client": client, **res.as_dict()})
                accs.append(res.acc)
            shown.append(f"SLM acc {sum(accs) / len(accs):.3f}")
        if self.llm is not None and (r == 0 or plan.uses_llm):
            res = self.mc(self.llm, LLM_ADAPTER)
            self.log({"type": "mc", "round": r, "model": "llm", "client": None, **res.as_dict()})
            shown.append(f"LLM acc {res.acc:.3f}")
        return "  ".join(shown)

    def mc(self, pool: AdapterPool, name: str):
        """Accuracy of adapter ``name``; an adapter whose weights were already scored is not rescored."""
        t = self.cfg.train
        key = (
            "llm" if pool is self.llm else "slm",
            adapter_digest(pool, name),
            self.cfg.task.max_length,
            t.eval_batch_size,
        )
        if key not in self.eval_cache:
            pool.activate(name)
            self.eval_cache[key] = evaluate_multiple_choice(
                pool.model,
                self.tokenizer,
                self.task.test,
                batch_size=t.eval_batch_size,
                max_length=self.cfg.task.max_length,
            )
        return self.eval_cache[key]

    # ---- state -----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        append_metrics(self.metrics_path, record)

    def learners(self) -> list[tuple[AdapterPool, Learner]]:
        pairs = [(self.slm, c) for c in self.clients] + [(self.slm, self.server_slm)]
        if self.llm is not None and self.server_llm is not None:
            pairs.append((self.llm, self.server_llm))
        return pairs

    def checkpoint(self, r: int) -> None:
        def contents(tmp: Path) -> None:
            for pool, learner in self.learners():
                pool.save(learner.name, tmp / learner.name)
            save_state(
                tmp / "state.pt",
                {
                    "round": r,
                    "fingerprint": config_fingerprint(self.cfg),
                    "rng": rng_state(),
                    "learners": {learner.name: learner.state_dict() for _, learner in self.learners()},
                },
            )

        write_checkpoint(self.run_dir, r, contents)

    def restore(self) -> int:
        r, path, state = open_latest_checkpoint(self.run_dir, self.cfg)
        for pool, learner in self.learners():
            pool.load_state(learner.name, load_adapter(path / learner.name))
            learner.load_state_dict(state["learners"][learner.name])
        restore_rng(state["rng"])
        truncate_metrics(self.metrics_path, r)
        self.log({"type": "run", "event": "resume", "after_round": r, "time": time.time()})
        return r
