"""The server side of cotune on Flower: the embedded runtime's round loop, with SuperNodes as clients.

`FederationServer` is the family-independent part: find the SuperNodes and which client each one is,
exchange one message per client with a timeout, report a client that fails or goes silent (dropped
from that round), and stop cleanly when fewer than `min_clients` are left. `PersonalizedServer` is
the personalized round loop: train on the nodes, gather the evidence the trust strategy needs,
`aggregate` (the same pure function the embedded runtime calls), evaluate, log and checkpoint in the
embedded run-directory layout. `FedCoLLMServer` runs `CoTuningRuntime` itself in the ServerApp and
answers its local-training step (`train_clients`) with the SuperNodes, optionally with SecAgg+.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from cotune.algorithms.fedcollm import check_payload
from cotune.algorithms.personalized import REQUIRED_EVIDENCE, TrustEvidence
from cotune.algorithms.trust import PredictionDistance
from cotune.config.loader import dump_config
from cotune.config.schema import ExperimentConfig
from cotune.models.loader import load_base_model, resolve_dtype
from cotune.models.lora import AdapterPool, AdapterState
from cotune.reporting.metrics import append_metrics
from cotune.runtime import guard
from cotune.runtime.checkpoint import latest_checkpoint, save_state, write_checkpoint
from cotune.runtime.cotuning import SERVER as SERVER_SLOT
from cotune.runtime.cotuning import CoTuningRuntime
from cotune.runtime.embedded import PersonalizedRuntime, client_name, config_fingerprint
from cotune.runtime.experiment import seed_everything
from cotune.runtime.flower import FLOWER_STATE_FILE, secagg
from cotune.runtime.flower import protocol as p
from cotune.runtime.flower.deploy import SERVER_ONLY
from cotune.runtime.guard import TooFewClients


class RunStopped(RuntimeError):
    """Too few clients are left: the run ends here, its last complete checkpoint intact."""


@dataclass(frozen=True)
class ServerSettings:
    """How the server treats its SuperNodes: federation.min_clients / client_timeout, connect-timeout."""

    min_clients: int | None = None  # None: every client must answer every exchange
    round_timeout: float = 600.0  # seconds to wait for the replies of one exchange
    connect_timeout: float = 120.0  # seconds to wait for the SuperNodes to connect at the start

    def required(self, n_clients: int) -> int:
        return n_clients if self.min_clients is None else max(1, min(self.min_clients, n_clients))

    @classmethod
    def from_config(
        cls, cfg: ExperimentConfig, run_config: Mapping[str, Any] | None = None
    ) -> ServerSettings:
        """federation.min_clients, federation.client_timeout (default 600 s), run config connect-timeout."""
        fed = cfg.federation
        return cls(
            min_clients=fed.min_clients,
            round_timeout=float(fed.client_timeout or DEFAULT_ROUND_TIMEOUT),
            connect_timeout=float((run_config or {}).get("connect-timeout", 120.0) or 120.0),
        )


DEFAULT_ROUND_TIMEOUT = 600.0  # seconds per exchange when federation.client_timeout is not set


class RoundSchedule:
    """The embedded runtime's round schedule: its own methods, so the two can never disagree."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    steps_in_round = PersonalizedRuntime.steps_in_round
    step_at_end = PersonalizedRuntime.step_at_end
    is_eval_round = PersonalizedRuntime.is_eval_round


def server_pool(cfg: ExperimentConfig) -> AdapterPool:
    """The base model on the server's CPU with the initial adapter every client starts from.

    Seeded exactly as `run_experiment` seeds before building the embedded AdapterPool, whose
    clients all start from client 0's initialisation.
    """
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    device = torch.device("cpu")
    base, _ = load_base_model(cfg.model, device, resolve_dtype(cfg.model.dtype, device))
    seed_everything(cfg.run.seed)
    return AdapterPool(base, cfg.lora, [client_name(0)])


class FederationServer:
    """Family-independent plumbing: node discovery, exchanges with fault handling, metrics."""

    family = ""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: Path,
        grid: Grid,
        settings: ServerSettings | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.grid = cfg, Path(run_dir), grid
        self.settings = settings or ServerSettings()
        self.say = say or (lambda text: print(text, flush=True))
        self.n = cfg.federation.clients
        self.schedule = RoundSchedule(cfg)
        self.config_yaml = dump_config(cfg)
        self.fingerprint = config_fingerprint(cfg)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.nodes: dict[int, int] = {}  # client index -> SuperNode id, for every client that joined
        self.dropped: set[int] = set()  # clients dropped from the current round (asked again next round)
        self.infos: dict[int, dict[str, Any]] = {}  # client index -> its describe() answer

    # ---- messages ------------------------------------------------------------------------------
    def job(self, round_: int, **args: Any) -> p.Job:
        return p.Job(self.family, self.config_yaml, self.fingerprint, round_, args)

    def exchange(
        self, round_: int, phase: str, message_type: str, bodies: Mapping[int, RecordDict]
    ) -> dict[int, RecordDict]:
        """One message per client, replies by client; a client that errs or stays silent is dropped.

        A dropped client takes no further part in this round and is asked again in the next one
        (a SuperNode that is gone for good is reported every round; the SuperLink answers for it
        with an error once it misses its heartbeats).
        """
        messages = {
            i: Message(body, dst_node_id=self.nodes[i], message_type=message_type, group_id=str(round_))
            for i, body in bodies.items()
        }
        replies = list(
            self.grid.send_and_receive(list(messages.values()), timeout=self.settings.round_timeout)
        )
        # By the message replied to, not the sender: the SuperLink itself answers for an unavailable node.
        by_id = {m.metadata.message_id: i for i, m in messages.items()}
        got: dict[int, RecordDict] = {}
        for reply in replies:
            i = by_id.get(reply.metadata.reply_to_message_id)
            if i is None or i in got or i in self.dropped:
                continue
            if reply.has_error():
                self.fault(round_, phase, i, f"error reply (code {reply.error.code}): {reply.error.reason}")
            else:
                got[i] = reply.content
        for i in bodies:
            if i not in got and i not in self.dropped:
                self.fault(
                    round_, phase, i, f"no reply within {self.settings.round_timeout:g}s (disconnected?)"
                )
        self.require(round_, phase)
        return got

    def fault(self, round_: int, phase: str, client: int, reason: str) -> None:
        node = self.nodes.get(client)
        self.dropped.add(client)
        self.log(
            {
                "type": "fault",
                "event": "client_dropped",
                "round": round_,
                "phase": phase,
                "client": client,
                "node_id": node,
                "reason": reason,
                "time": time.time(),
            }
        )
        self.say(
            f"WARNING client {client} (SuperNode {node}) dropped from round {round_} ({phase}): {reason}"
        )

    def require(self, round_: int, phase: str) -> None:
        need = self.settings.required(self.n)
        if len(self.active()) < need:
            raise RunStopped(
                f"round {round_} ({phase}): {len(self.active())} of {self.n} clients left, "
                f"min_clients is {need}"
            )

    def active(self) -> list[int]:
        """The clients taking part in the current round: joined and not dropped from this round."""
        return sorted(set(self.nodes) - self.dropped)

    def begin_round(self) -> None:
        """A new round: clients dropped from the previous one are asked again."""
        self.dropped.clear()

    def connect(self) -> None:
        """Wait for the SuperNodes, ask each which client (partition-id) it is, and map clients to nodes."""
        deadline = time.monotonic() + self.settings.connect_timeout
        node_ids = list(self.grid.get_node_ids())
        while len(node_ids) < self.n and time.monotonic() < deadline:
            time.sleep(1.0)
            node_ids = list(self.grid.get_node_ids())
        self.say(f"{len(node_ids)} SuperNode(s) connected; asking which client each one is")
        messages = [Message(p.content(self.job(0)), dst_node_id=n, message_type=p.DESCRIBE) for n in node_ids]
        replies = list(self.grid.send_and_receive(messages, timeout=self.settings.round_timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            if reply.has_error():
                self.say(f"WARNING SuperNode {node} could not join: {reply.error.reason}")
                self.log(
                    {
                        "type": "fault",
                        "round": 0,
                        "phase": "connect",
                        "node_id": node,
                        "reason": reply.error.reason,
                    }
                )
                continue
            record = reply.content.config_records[p.INFO]
            info = {k: record[k] for k in record}
            info["label_names"] = json.loads(str(info["label_names"]))
            info["mixture"] = json.loads(str(info["mixture"]))
            i = int(info["partition"])
            if i in self.nodes:
                raise ValueError(f"SuperNodes {self.nodes[i]} and {node} both have partition-id {i}")
            self.nodes[i], self.infos[i] = node, info
        for i in range(self.n):
            if i not in self.nodes:
                self.log(
                    {"type": "fault", "round": 0, "phase": "connect", "client": i, "reason": "no SuperNode"}
                )
                self.say(f"WARNING no SuperNode with partition-id {i} joined")
        self.require(0, "connect")
        for i in sorted(self.nodes):
            inf = self.infos[i]
            if "examples" in inf:
                holds = f"{inf['examples']} examples"
            else:
                holds = f"{inf['train_windows']} train / {inf['val_windows']} val windows"
            self.say(f"  client {i}: SuperNode {self.nodes[i]}, {holds}")

    # ---- bookkeeping ---------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        append_metrics(self.metrics_path, record)

    # ---- the run -------------------------------------------------------------------------------------
    def run(self) -> str:
        """Connect, run the family's rounds; "completed", or "stopped" when too few clients are left."""
        try:
            self.start()
            self.connect()
            self.rounds()
        except (RunStopped, TooFewClients) as stop:
            last = latest_checkpoint(self.run_dir)
            self.log(
                {
                    "type": "run",
                    "event": "stopped",
                    "reason": str(stop),
                    "last_checkpoint": last[0] if last else None,
                    "time": time.time(),
                }
            )
            where = f"round {last[0]} ({last[1]})" if last else "none written"
            self.say(f"STOPPED {stop}; last complete checkpoint: {where}")
            return "stopped"
        except Exception as exc:
            self.log(
                {
                    "type": "run",
                    "event": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "time": time.time(),
                }
            )
            raise
        return "completed"

    def start(self) -> None:
        """Before the SuperNodes are asked anything (the personalized family logs its start here)."""

    def rounds(self) -> None:
        raise NotImplementedError


class PersonalizedServer(FederationServer):
    """Personalized trust-weighted fine-tuning with the SuperNodes as clients (SPEC B)."""

    family = "personalized"

    def start(self) -> None:
        cfg = self.cfg
        self.log(
            {
                "type": "run",
                "event": "start",
                "strategy": cfg.strategy.name,
                "algorithm": cfg.algorithm,
                "clients": cfg.federation.clients,
                "backend": "flower",
                "time": time.time(),
            }
        )

    def rounds(self) -> None:
        """The embedded loop (PersonalizedRuntime.run) over Flower."""
        cfg, fed = self.cfg, self.cfg.federation
        self.pool = server_pool(cfg)
        initial = self.pool.state(self.pool.names[0])
        self.adapters: list[AdapterState] = [initial for _ in range(self.n)]
        self.evaluate(0)
        self.checkpoint(0)
        for r in range(1, fed.rounds + 1):
            self.begin_round()
            t0 = time.perf_counter()
            train_loss = self.train_round(r)
            t_train = time.perf_counter() - t0
            self.aggregate(r)
            mean_ppl = self.evaluate(r) if self.schedule.is_eval_round(r) else None
            wall = time.perf_counter() - t0
            self.log(
                {
                    "type": "round",
                    "round": r,
                    "step": self.schedule.step_at_end(r),
                    "wall_s": wall,
                    "train_s": t_train,
                    "mean_val_ppl": mean_ppl,
                    "participants": self.active(),
                }
            )
            shown = f"train loss {train_loss:.3f}"
            shown += f"  mean val ppl {mean_ppl:.2f}" if mean_ppl is not None else ""
            self.say(f"round {r}/{fed.rounds}  step {self.schedule.step_at_end(r)}  {shown}  ({wall:.1f}s)")
            self.checkpoint(r)
        self.log({"type": "run", "event": "end", "strategy": cfg.strategy.name, "time": time.time()})

    # ---- phases ----------------------------------------------------------------------------------
    def train_round(self, r: int) -> float:
        steps = self.schedule.steps_in_round(r)
        job = self.job(r, steps=steps)
        self.round_start = list(self.adapters)  # the references that uploads are screened against
        bodies = {
            i: p.content(job, {p.ADAPTER: p.tensors_to_record(self.adapters[i])}) for i in self.active()
        }
        replies = self.exchange(r, "train", p.TRAIN, bodies)
        losses = []
        for i in sorted(replies):
            self.adapters[i] = p.record_to_tensors(replies[i].array_records[p.ADAPTER])
            m = replies[i].metric_records[p.METRICS]
            losses.append(float(m["loss"]))  # type: ignore[arg-type]
            self.log(
                {
                    "type": "train",
                    "round": r,
                    "client": i,
                    "step": self.schedule.step_at_end(r),
                    "loss": m["loss"],
                    "last_loss": m["last_loss"],
                    "lr": m["lr"],
                    "tokens_per_s": m["tokens_per_s"],
                }
            )
        return sum(losses) / len(losses)

    def gather_evidence(self, r: int, members: list[int]) -> tuple[list[int], TrustEvidence]:
        """What the strategy needs about `members`, from those still in the run; returns them and it."""
        s = self.cfg.strategy
        need = REQUIRED_EVIDENCE[s.name]
        sent = [i for i in members if i in self.active()]
        ppl_rows: dict[int, list[float]] | None = None
        predictions: dict[int, RecordDict] | None = None
        if "perplexity" in need:
            peers = {f"{p.PEER_PREFIX}{j}": p.tensors_to_record(self.adapters[j]) for j in sent}
            job = self.job(r, peers=sent, val_batches=s.val_batches)
            replies = self.exchange(r, "evidence", p.EVALUATE_PEERS, {i: p.content(job, peers) for i in sent})
            ppl_rows = {i: list(body.metric_records[p.METRICS]["ppl"]) for i, body in replies.items()}  # type: ignore[arg-type]
        if "prediction_distance" in need:
            job = self.job(
                r, public_batches=s.public_batches, batch_size=self.cfg.train.eval_batch_size, k=s.logits_topk
            )
            predictions = self.exchange(r, "evidence", p.PREDICT, {i: p.content(job) for i in sent})
        participants = [i for i in sent if i in self.active()]
        ev = TrustEvidence(n_clients=len(participants))
        if "adapters" in need:
            ev.adapters = [self.adapters[i] for i in participants]
        if ppl_rows is not None:
            column = {j: c for c, j in enumerate(sent)}
            ppl = torch.zeros(len(participants), len(participants))
            for a, i in enumerate(participants):
                for b, j in enumerate(participants):
                    ppl[a, b] = ppl_rows[i][column[j]]
            ev.perplexity = ppl
        if predictions is not None:
            ev.prediction_distance = self.prediction_distance([predictions[i] for i in participants])
        if "mixtures" in need:
            ev.mixtures = self.mixtures(participants)
        return participants, ev

    def prediction_distance(self, replies: list[RecordDict]) -> torch.Tensor:
        """PredictionDistance over the nodes' top-k logits, batch by batch as the embedded runtime does."""
        infos = [body.config_records[p.INFO] for body in replies]
        if len({str(info["public_hash"]) for info in infos}) > 1:
            raise ValueError(
                "the SuperNodes do not have the same public reference set, so their predictions cannot be "
                "compared: build it from the same config (or give every node the same public-path)"
            )
        vocab = int(infos[0]["vocab"])  # type: ignore[arg-type]
        batches = [p.record_to_topk(body.array_records[p.LOGITS]) for body in replies]
        dist = PredictionDistance(len(replies), k=self.cfg.strategy.logits_topk)
        for b in range(len(batches[0])):
            dist.add_batch([p.dense_from_topk(*client[b], vocab) for client in batches])
        return dist.distances()

    def mixtures(self, participants: list[int]) -> torch.Tensor:
        names: list[str] = []
        for i in participants:
            names += [n for n in self.infos[i]["label_names"] if n not in names]
        m = torch.zeros(len(participants), len(names))
        for a, i in enumerate(participants):
            for name, x in zip(self.infos[i]["label_names"], self.infos[i]["mixture"], strict=True):
                m[a, names.index(name)] = x
        return m

    def aggregate(self, r: int) -> None:
        """The embedded aggregation point (guard.screened_aggregate) on the SuperNodes' uploads."""
        answered = self.active()
        uploads = [self.adapters[i] for i in answered]
        refs = [self.round_start[i] for i in answered]
        for i in answered:  # a rejected update is discarded: the client keeps its round-start adapter
            self.adapters[i] = self.round_start[i]

        def evidence(accepted: list[int], adapters: list[AdapterState]) -> tuple[list[int], TrustEvidence]:
            for i, state in zip(accepted, adapters, strict=True):  # evidence is taken on what was uploaded
                self.adapters[i] = state
            return self.gather_evidence(r, accepted)

        participants, trust, mixed = guard.screened_aggregate(
            self.cfg, self.log, r, self.n, answered, uploads, refs, evidence
        )
        for i, state in zip(participants, mixed, strict=True):
            self.adapters[i] = state
        # Clients that left keep their own adapter: identity rows, so the matrix stays N x N.
        full = torch.eye(self.n)
        idx = torch.tensor(participants)
        full[idx.unsqueeze(1), idx.unsqueeze(0)] = trust
        self.log(
            {
                "type": "trust",
                "round": r,
                "step": self.schedule.step_at_end(r),
                "strategy": self.cfg.strategy.name,
                "matrix": [[round(float(x), 6) for x in row] for row in full],
                "participants": participants,
            }
        )

    def evaluate(self, r: int) -> float:
        job = self.job(r)
        bodies = {
            i: p.content(job, {p.ADAPTER: p.tensors_to_record(self.adapters[i])}) for i in self.active()
        }
        replies = self.exchange(r, "evaluate", p.EVALUATE, bodies)
        ppls = []
        for i in sorted(replies):
            m = replies[i].metric_records[p.METRICS]
            ppls.append(float(m["ppl"]))  # type: ignore[arg-type]
            self.log(
                {
                    "type": "eval",
                    "round": r,
                    "step": self.schedule.step_at_end(r),
                    "client": i,
                    "split": "val",
                    "loss": m["loss"],
                    "ppl": m["ppl"],
                    "acc": m["acc"],
                    "tokens": int(m["tokens"]),  # type: ignore[arg-type]
                }
            )
        return sum(ppls) / len(ppls)

    def checkpoint(self, r: int) -> None:
        """Every client's latest adapter (PEFT format, as the embedded runtime writes them), atomically."""
        slot = self.pool.names[0]

        def contents(tmp: Path) -> None:
            for i in range(self.n):
                self.pool.load_state(slot, self.adapters[i])
                self.pool.save(slot, tmp / client_name(i))
            save_state(
                tmp / FLOWER_STATE_FILE,
                {
                    "round": r,
                    "step": self.schedule.step_at_end(r),
                    "fingerprint": self.fingerprint,
                    "backend": "flower",
                    "participants": self.active(),
                },
            )

        write_checkpoint(self.run_dir, r, contents)


class FlowerCoTuningRuntime(CoTuningRuntime):
    """The embedded FedCoLLM runtime with step 2, local training, done by the SuperNodes.

    Everything else (broadcast with check_payload, FedAvg with aggregate_slm, mutual distillation,
    evaluation, logging) is CoTuningRuntime's own code, on the ServerApp: the LLM and its LoRA only
    ever exist here.
    """

    def __init__(self, server: FedCoLLMServer, *args: Any, **kwargs: Any) -> None:
        self.server = server
        super().__init__(*args, **kwargs)

    def train_clients(self, r: int) -> dict[int, AdapterState]:
        return self.server.train_clients(r)

    def aggregate_updates(
        self, r: int, updates: dict[int, AdapterState], payload: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """With SecAgg+ the mean was computed by the protocol: the server never held the uploads."""
        mean, self.server.secure_mean = self.server.secure_mean, None
        return super().aggregate_updates(r, updates, payload) if mean is None else mean

    def client_sizes(self) -> list[int]:
        return self.server.client_sizes()

    def checkpoint(self, r: int) -> None:
        """The server's adapters (PEFT format, as embedded); the clients' trainer states are on the nodes."""

        def contents(tmp: Path) -> None:
            for pool, learner in self.learners():
                pool.save(learner.name, tmp / learner.name)
            save_state(
                tmp / FLOWER_STATE_FILE,
                {
                    "round": r,
                    "fingerprint": self.server.fingerprint,
                    "backend": "flower",
                    "participants": self.server.active(),
                },
            )

        write_checkpoint(self.run_dir, r, contents)


class FedCoLLMServer(FederationServer):
    """FedCoLLM (and its fedavg / standalone baselines) with the SuperNodes as clients (SPEC A).

    The ServerApp holds the SLM (the server's copy theta) and, for fedcollm, the LLM with its
    server-only LoRA omega; it builds the task split as `cotune run` does (D_a, the test set, the
    initialisation). Every round it sends each node the SLM adapter (theta, or for standalone the
    node's own), the node trains it on its private shard and sends it back; both ends check that the
    payload is exactly the SLM adapter.
    """

    family = "fedcollm"
    secure_mean: AdapterState | None = None  # this round's SecAgg+ result, until the runtime takes it

    def rounds(self) -> None:
        from cotune.data.task_data import build_task_data
        from cotune.models.compat import check_same_tokenizer
        from cotune.runtime.cotuning import LLM_ADAPTER, SERVER
        from cotune.runtime.experiment import _load_model, _needs_llm

        cfg = self.cfg
        console = Console(stderr=True)
        # as experiment._run_cotuning builds them, so the initial adapters are the embedded ones
        slm_base, tokenizer, device = _load_model(cfg, console)
        llm = None
        if _needs_llm(cfg):
            assert cfg.llm is not None
            llm_base, llm_tokenizer, _ = _load_model(cfg.model_copy(update={"model": cfg.llm.model}), console)
            check_same_tokenizer(tokenizer, llm_tokenizer, (cfg.model.name, cfg.llm.model.name))
        assert cfg.task is not None
        task = build_task_data(cfg.task, cfg.federation.clients, tokenizer, cfg.run.seed)
        seed_everything(cfg.run.seed)
        slm = AdapterPool(slm_base, cfg.lora, [client_name(i) for i in range(self.n)] + [SERVER])
        if _needs_llm(cfg):
            assert cfg.llm is not None
            llm = AdapterPool(llm_base, cfg.llm.lora, [LLM_ADAPTER])
        rt = FlowerCoTuningRuntime(self, cfg, slm, llm, task, tokenizer, self.run_dir, device, console)
        self.runtime = rt
        rt.run()

    def train_clients(self, r: int) -> dict[int, AdapterState]:
        """Step 2 on the nodes: send each its SLM adapter slot, get it back trained (by client)."""
        rt = self.runtime
        job = self.job(r)  # no steps: a node's budget is local_steps, or local_epochs over its own shard
        self.begin_round()
        if self.cfg.federation.secure_aggregation:
            return self.secure_train_clients(r)
        bodies = {}
        for i in self.active():
            state = rt.slm.state(rt.clients[i].name)
            check_payload(state, rt.slm_shapes)
            bodies[i] = p.content(job, {p.ADAPTER: p.tensors_to_record(state)})
        replies = self.exchange(r, "train", p.TRAIN, bodies)
        updates: dict[int, AdapterState] = {}
        for i in sorted(replies):
            state = p.record_to_tensors(replies[i].array_records[p.ADAPTER])
            try:
                check_payload(state, rt.slm_shapes)
            except ValueError as e:
                self.fault(r, "train", i, f"refused upload: {e}")
                continue
            name = rt.clients[i].name
            rt.slm.load_state(name, {k: v.to(rt.device) for k, v in state.items()})
            m = replies[i].metric_records[p.METRICS]
            rt.log(
                {"type": "train", "model": "slm", "round": r, "client": i, "loss": m["loss"], "lr": m["lr"]}
            )
            updates[i] = rt.slm.state(name)
        self.require(r, "train")
        return updates

    def secure_train_clients(self, r: int) -> dict[int, AdapterState]:
        """Step 2 + the FedAvg of step 3 as one SecAgg+ round: the server learns only the weighted mean."""
        rt = self.runtime
        payload = rt.slm.state(SERVER_SLOT)  # theta, broadcast to every client
        check_payload(payload, rt.slm_shapes)
        clients = self.active()
        client_of = {self.nodes[i]: i for i in clients}
        weighted = self.cfg.federation.weighting == "examples"
        sizes = self.client_sizes()
        record = self.job(r).to_record()
        result = secagg.secure_average(
            self.grid,
            [self.nodes[i] for i in clients],
            {k: record[k] for k in record},
            payload,
            round_=r,
            max_weight=float(max(sizes[i] for i in clients)) if weighted else 1.0,
            min_nodes=self.settings.required(self.n),
            timeout=self.settings.round_timeout,
        )
        answered = sorted(client_of[n] for n in result.metrics if n in client_of)
        for i in clients:
            if i not in answered:
                self.fault(r, "train", i, "did not complete the SecAgg+ round")
        if result.average is None:
            raise RunStopped(f"round {r}: the SecAgg+ round did not complete ({len(answered)} clients)")
        self.require(r, "train")
        check_payload(result.average, rt.slm_shapes)
        self.secure_mean = result.average
        node_of = {i: n for n, i in client_of.items()}
        for i in answered:
            m = result.metrics[node_of[i]]
            rt.log(
                {"type": "train", "model": "slm", "round": r, "client": i, "loss": m["loss"], "lr": m["lr"]}
            )
        # The individual uploads are never seen; comm accounting counts the same-sized masked vectors.
        return {i: payload for i in answered}

    def client_sizes(self) -> list[int]:
        """n_k as each SuperNode reported it (0 for a client that never joined: it never uploads)."""
        return [int(self.infos[i]["examples"]) if i in self.infos else 0 for i in range(self.n)]  # type: ignore[arg-type]


SERVERS: dict[str, type[FederationServer]] = {"personalized": PersonalizedServer, "fedcollm": FedCoLLMServer}


def check_secure_aggregation(cfg: ExperimentConfig) -> None:
    """SecAgg+ hides each upload: only the plain weighted mean of the FedCoLLM family can use it."""
    if not cfg.is_cotuning or cfg.algorithm not in ("fedcollm", "fedavg"):
        raise ValueError(
            "federation.secure_aggregation is implemented for the FedAvg step of algorithm fedcollm or "
            f"fedavg (FedCoLLM family), not for {cfg.algorithm}/{cfg.strategy.name}"
        )
    rob = cfg.robustness
    if rob.max_update_norm is not None or rob.aggregator != "mean" or cfg.privacy.enabled:
        raise ValueError(
            "federation.secure_aggregation hides the individual uploads, so they cannot be screened "
            "(robustness.max_update_norm), robustly aggregated (robustness.aggregator) or clipped "
            "(privacy.clip_norm): turn those off"
        )


def family_of(cfg: ExperimentConfig) -> str:
    return "fedcollm" if cfg.is_cotuning else "personalized"


def server_for(
    cfg: ExperimentConfig,
    run_dir: Path,
    grid: Grid,
    settings: ServerSettings | None = None,
    say: Callable[[str], None] | None = None,
) -> FederationServer:
    if cfg.federation.secure_aggregation:
        check_secure_aggregation(cfg)
    if cfg.algorithm in SERVER_ONLY:
        raise ValueError(
            f"algorithm {cfg.algorithm!r} has no client step, so nothing runs on the SuperNodes: run it "
            "with the embedded runtime (`cotune run CONFIG`; `cotune run --backend flower` does so for it)"
        )
    return SERVERS[family_of(cfg)](cfg, run_dir, grid, settings, say)
