"""The embedded runtime for personalized collaborative fine-tuning (SPEC B).

N simulated clients live in one process around ONE frozen base model: a client's state is
its peft adapter, its optimizer + schedule, and its data cursor. Each round every client
trains locally, the runtime gathers the evidence its trust strategy needs, and the pure
algorithm code returns the trust matrix and the new adapters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cotune.algorithms.attacks import garbage_tokens
from cotune.algorithms.personalized import REQUIRED_EVIDENCE, TrustEvidence
from cotune.algorithms.trust import PredictionDistance
from cotune.config.schema import ExperimentConfig
from cotune.data.windows import ClientData, FederatedData, WindowSampler
from cotune.evaluation.lm import evaluate_lm
from cotune.models.lora import AdapterPool, AdapterState
from cotune.reporting.metrics import append_metrics
from cotune.runtime import guard
from cotune.runtime.checkpoint import (
    restore_rng,
    rng_state,
    save_state,
    write_checkpoint,
)
from cotune.runtime.common import (
    ResumeError,
    client_name,
    config_fingerprint,
    load_adapter,
    open_latest_checkpoint,
    start_or_resume,
    truncate_metrics,
)
from cotune.training.loop import make_optimizer, make_scheduler, train_windows

__all__ = ["PersonalizedRuntime", "ResumeError", "client_name", "config_fingerprint"]


@dataclass
class SimClient:
    index: int
    name: str
    data: ClientData
    sampler: WindowSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


class PersonalizedRuntime:
    def __init__(
        self,
        cfg: ExperimentConfig,
        pool: AdapterPool,
        data: FederatedData,
        run_dir: Path,
        device: torch.device,
        console: Console | None = None,
    ) -> None:
        self.cfg, self.pool, self.data, self.run_dir, self.device = cfg, pool, data, run_dir, device
        self.console = console or Console(stderr=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        fed, train = cfg.federation, cfg.train
        if len(data.clients) != fed.clients:
            raise ValueError(f"data has {len(data.clients)} clients, config asks for {fed.clients}")
        self.clients = []
        for i, cd in enumerate(data.clients):
            name = pool.names[i]
            opt = make_optimizer(pool.parameters(name), train)
            sched = make_scheduler(opt, fed.total_steps, train)
            sampler = WindowSampler(
                len(cd.train), train.batch_size * train.grad_accum, cfg.run.seed * 1000 + i
            )
            self.clients.append(SimClient(i, name, cd, sampler, opt, sched))
        if cfg.simulation.attack.kind == "garbage_data":  # simulated attackers train on random tokens
            vocab = pool.model.get_input_embeddings().num_embeddings
            for i in cfg.simulation.attack.clients:
                c = self.clients[i]
                g = guard.generator("garbage", cfg.run.seed, i)
                c.data = replace(c.data, train=garbage_tokens(c.data.train, vocab, g))
        self.round_start: dict[int, dict[str, torch.Tensor]] = {}  # adapters at the start of the round
        self.dropped: set[int] = set()  # clients dropped from the round in progress
        self.uploads: dict[int, dict[str, torch.Tensor]] = {}  # what attackers upload instead

    # ---- schedule -------------------------------------------------------------------------
    def steps_in_round(self, round_: int) -> int:
        fed = self.cfg.federation
        return fed.local_steps + (fed.warmup_steps if round_ == 1 else 0)

    def step_at_end(self, round_: int) -> int:
        fed = self.cfg.federation
        return 0 if round_ == 0 else fed.warmup_steps + round_ * fed.local_steps

    # ---- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False) -> None:
        fed = self.cfg.federation
        start = start_or_resume(self, resume, self.cfg.strategy.name, fed.clients)
        total = sum(self.steps_in_round(r) for r in range(start, fed.rounds + 1)) * len(self.clients)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            task = progress.add_task("training", total=total)
            for r in range(start, fed.rounds + 1):
                t0 = time.perf_counter()
                train_loss = self.train_round(r, progress, task)
                t_train = time.perf_counter() - t0
                self.aggregate(r)
                mean_ppl = self.evaluate(r) if self.is_eval_round(r) else None
                wall = time.perf_counter() - t0
                self.log(
                    {
                        "type": "round",
                        "round": r,
                        "step": self.step_at_end(r),
                        "wall_s": wall,
                        "train_s": t_train,
                        "mean_val_ppl": mean_ppl,
                    }
                )
                shown = f"train loss {train_loss:.3f}"
                shown += f"  mean val ppl {mean_ppl:.2f}" if mean_ppl is not None else ""
                progress.console.print(
                    f"round {r}/{fed.rounds}  step {self.step_at_end(r)}  {shown}  ({wall:.1f}s)"
                )
                self.checkpoint(r)
        self.log({"type": "run", "event": "end", "strategy": self.cfg.strategy.name, "time": time.time()})

    def is_eval_round(self, r: int) -> bool:
        return r % self.cfg.run.eval_every == 0 or r == self.cfg.federation.rounds

    def train_round(self, r: int, progress: Progress, task) -> float:
        """Every client trains its own adapter; returns the mean training loss of the round."""
        tcfg = self.cfg.train
        round_losses = []
        self.round_start = {c.index: self.pool.state(c.name) for c in self.clients}
        self.dropped, self.uploads = set(), {}
        for c in self.clients:

            def work(c: SimClient = c) -> tuple[list[float], int, float]:
                self.pool.activate(c.name)

                def shown(loss: float, c: SimClient = c) -> None:
                    progress.update(task, advance=1, description=f"round {r} · {c.name} · loss {loss:.3f}")

                return train_windows(
                    self.pool.model,
                    c.data.train,
                    c.sampler.next_indices,
                    self.steps_in_round(r),
                    c.optimizer,
                    c.scheduler,
                    tcfg,
                    self.device,
                    shown,
                )

            outcome = guard.run_client(self.cfg, r, c.index, work)
            if not outcome.ok:  # dropped from this round: it keeps the adapter it started with
                self.pool.load_state(c.name, self.round_start[c.index])
                self.dropped.add(c.index)
                guard.log_dropped(self.log, r, c.index, outcome.reason or "")
                progress.console.print(
                    f"[yellow]client {c.index} dropped from round {r}:[/] {outcome.reason}"
                )
                continue
            losses, tokens, dt = outcome.value
            if guard.is_attacker(self.cfg, c.index, r) and self.cfg.simulation.attack.kind != "garbage_data":
                self.uploads[c.index] = guard.attacked(
                    self.cfg, r, c.index, self.pool.state(c.name), self.round_start[c.index]
                )
            round_losses.append(sum(losses) / len(losses))
            self.log(
                {
                    "type": "train",
                    "round": r,
                    "client": c.index,
                    "step": self.step_at_end(r),
                    "loss": sum(losses) / len(losses),
                    "last_loss": losses[-1],
                    "lr": c.scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens / dt if dt else None,
                }
            )
        n = len(self.clients)
        guard.require(self.cfg, self.log, r, n - len(self.dropped), n, "answered")
        return sum(round_losses) / max(1, len(round_losses))

    # ---- aggregation -----------------------------------------------------------------------
    def gather_evidence(self, clients: list[SimClient] | None = None) -> TrustEvidence:
        """What the strategy needs, about `clients` (default: all) in that order."""
        clients = self.clients if clients is None else clients
        need = REQUIRED_EVIDENCE[self.cfg.strategy.name]
        ev = TrustEvidence(n_clients=len(clients))
        if "adapters" in need:
            ev.adapters = [self.pool.state(c.name) for c in clients]
        if "perplexity" in need:
            ev.perplexity = self.peer_perplexity(clients)
        if "prediction_distance" in need:
            ev.prediction_distance = self.prediction_distance(clients)
        if "mixtures" in need:
            ev.mixtures = self.data.mixtures[[c.index for c in clients]]
        return ev

    def peer_perplexity(self, clients: list[SimClient] | None = None) -> torch.Tensor:
        """P[i, j]: perplexity of client j's model on client i's validation windows."""
        clients = self.clients if clients is None else clients
        s = self.cfg.strategy
        n = len(clients)
        ppl = torch.zeros(n, n)
        for j, model_owner in enumerate(clients):
            self.pool.activate(model_owner.name)
            for i, data_owner in enumerate(clients):
                res = evaluate_lm(
                    self.pool.model, data_owner.data.val, self.cfg.train.eval_batch_size, s.val_batches
                )
                ppl[i, j] = res.ppl
        return ppl

    @torch.no_grad()
    def prediction_distance(self, clients: list[SimClient] | None = None) -> torch.Tensor:
        """Every model predicts the same public batches; distances accumulate batch by batch."""
        clients = self.clients if clients is None else clients
        s, bs = self.cfg.strategy, self.cfg.train.eval_batch_size
        public = self.data.public
        if len(public) == 0:
            raise ValueError("prediction trust needs a public reference set: set data.public_windows > 0")
        dist = PredictionDistance(len(clients), k=s.logits_topk)
        self.pool.model.eval()
        for b in range(min(s.public_batches, -(-len(public) // bs))):
            ids = public[b * bs : (b + 1) * bs].to(self.device)
            logits = []
            for c in clients:
                self.pool.activate(c.name)
                logits.append(self.pool.model(input_ids=ids).logits.float())
            dist.add_batch(logits)
        return dist.distances()

    def aggregate(self, r: int) -> None:
        """Screen the uploads, mix the accepted ones; the others keep their adapter (identity rows)."""
        cfg, n = self.cfg, len(self.clients)
        answered = [c.index for c in self.clients if c.index not in self.dropped]
        uploads = [self.uploads.get(i) or self.pool.state(self.clients[i].name) for i in answered]
        refs = [self.round_start[i] for i in answered]
        for i in answered:  # a rejected update is discarded: start from the round's adapter
            self.pool.load_state(self.clients[i].name, self.round_start[i])

        def evidence(accepted: list[int], adapters: list[AdapterState]) -> tuple[list[int], TrustEvidence]:
            for i, state in zip(accepted, adapters, strict=True):  # evidence is taken on what was uploaded
                self.pool.load_state(self.clients[i].name, state)
            return accepted, self.gather_evidence([self.clients[i] for i in accepted])

        accepted, trust, mixed = guard.screened_aggregate(
            cfg, self.log, r, n, answered, uploads, refs, evidence
        )
        members = [self.clients[i] for i in accepted]
        for c, state in zip(members, mixed, strict=True):
            self.pool.load_state(c.name, state)
        full = torch.eye(n)
        if accepted:
            idx = torch.tensor(accepted)
            full[idx.unsqueeze(1), idx.unsqueeze(0)] = trust.to(full.dtype)
        record = {
            "type": "trust",
            "round": r,
            "step": self.step_at_end(r),
            "strategy": cfg.strategy.name,
            "matrix": [[round(float(x), 6) for x in row] for row in full],
        }
        if len(accepted) < n:
            record["participants"] = accepted
        if cfg.strategy.name == "fedavg" and cfg.robustness.aggregator != "mean":
            record["aggregator"] = cfg.robustness.aggregator
        self.log(record)

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self, r: int) -> float:
        ppls = []
        for c in self.clients:
            self.pool.activate(c.name)
            res = evaluate_lm(self.pool.model, c.data.val, self.cfg.train.eval_batch_size)
            ppls.append(res.ppl)
            self.log(
                {
                    "type": "eval",
                    "round": r,
                    "step": self.step_at_end(r),
                    "client": c.index,
                    "split": "val",
                    **res.as_dict(),
                }
            )
        return sum(ppls) / len(ppls)

    # ---- state -----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        append_metrics(self.metrics_path, record)

    def checkpoint(self, r: int) -> None:
        def contents(tmp: Path) -> None:
            for c in self.clients:
                self.pool.save(c.name, tmp / c.name)
            save_state(
                tmp / "state.pt",
                {
                    "round": r,
                    "step": self.step_at_end(r),
                    "fingerprint": config_fingerprint(self.cfg),
                    "rng": rng_state(),
                    "clients": [
                        {
                            "optimizer": c.optimizer.state_dict(),
                            "scheduler": c.scheduler.state_dict(),
                            "sampler": c.sampler.state_dict(),
                        }
                        for c in self.clients
                    ],
                },
            )

        write_checkpoint(self.run_dir, r, contents)

    def restore(self) -> int:
        r, path, state = open_latest_checkpoint(self.run_dir, self.cfg)
        for c, cs in zip(self.clients, state["clients"], strict=True):
            self.pool.load_state(c.name, load_adapter(path / c.name))
            c.optimizer.load_state_dict(cs["optimizer"])
            c.scheduler.load_state_dict(cs["scheduler"])
            c.sampler.load_state_dict(cs["sampler"])
        restore_rng(state["rng"])
        truncate_metrics(self.metrics_path, r)
        self.log({"type": "run", "event": "resume", "after_round": r, "time": time.time()})
        return r
