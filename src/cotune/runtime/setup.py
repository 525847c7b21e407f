"""Setup shared by the orchestrator and the transports: seeding, device and model, the federated
data or task, the adapter pools, and the ClientWork of each client.

The in-process simulation and a Flower SuperNode build a client with the same functions here, and
the FedCoLLM server is built the same way in one process and in a ServerApp, so both transports
start from the same initial adapters and trainer states.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from cotune.algorithms.compression import Compression
from cotune.algorithms.fedcollm import distill_batches, local_steps, plan_of
from cotune.algorithms.privacy import EvidenceProtection
from cotune.config.names import STRATEGY_SPECS
from cotune.config.schema import ExperimentConfig, ModelConfig
from cotune.data.client_examples import client_data
from cotune.data.corpora import DataError
from cotune.data.generation import gen_format
from cotune.data.task_data import EncodedSet, TaskData, build_task_data, with_llm_encoding
from cotune.data.windows import ClientData, FederatedData, Rows
from cotune.evaluation.generation import SAMPLES, pad_token_id, stop_token_ids
from cotune.models.compat import check_cross_tokenizer, same_tokenizer
from cotune.models.loader import load_base_model, resolve_device, resolve_dtype
from cotune.models.lora import AdapterPool
from cotune.models.vocab_map import TokenizerBridge, build_bridge
from cotune.reporting.text import printable
from cotune.runtime.client import ClientWork, Decoding, EvalMemo
from cotune.runtime.fedcollm import LLM_ADAPTER, SERVER, Server
from cotune.runtime.port import ClientInfo
from cotune.runtime.rundir import client_name
from cotune.runtime.simulated import garbage_data, garbage_examples, is_garbage_attacker
from cotune.seeds import LLM_SLOT, SERVER_SLOT, stream_seed
from cotune.training.learner import Learner


def seed_everything(seed: int) -> None:
    seed = stream_seed("global", seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(
    cfg: ExperimentConfig,
    model: ModelConfig | None = None,
    console: Console | None = None,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, torch.device]:
    """`model` (default: cfg.model) on the configured device and dtype, after seeding the run."""
    console = console or Console(stderr=True)
    model = model or cfg.model
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(model.dtype, device)
    with console.status(f"loading model {model.name} on {device} ({dtype})"):
        base, tokenizer = load_base_model(model, device, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    console.print(f"model {model.name}: {n_params / 1e6:.1f}M parameters on {device} ({dtype})")
    return base, tokenizer, device


def needs_llm(cfg: ExperimentConfig) -> bool:
    """Whether this run loads the server's LLM (zero_shot scores it too, when configured)."""
    return cfg.llm is not None and (plan_of(cfg.algorithm).uses_llm or cfg.algorithm == "zero_shot")


# ---- personalized -------------------------------------------------------------------------------------
def load_windows(
    cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, console: Console
) -> FederatedData:
    with console.status("building client datasets"):
        data = client_data(cfg.data, cfg.federation.clients, tokenizer, cfg.run.seed)
    unit = "windows" if cfg.data.kind == "text" else "examples"
    for i, c in enumerate(data.clients):
        labels = ", ".join(f"{printable(k)}:{v}" for k, v in sorted(c.label_counts.items()))  # owners' names
        test = "" if c.test is None else f" / {len(c.test)} test"
        console.print(
            f"  client {i}: {len(c.train)} train / {len(c.val)} val{test} {unit}  ({labels})", markup=False
        )
    console.print(f"  public reference set: {len(data.public)} {unit} of {cfg.data.seq_len} tokens")
    dropped = duplicates_line(data.duplicate_documents, data.duplicates)
    if dropped:
        console.print(f"  data: {dropped}")
    return data


def decoding_of(
    cfg: ExperimentConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> Decoding | None:
    """How personalized clients decode their test prompts (generation data; None for text): greedy up to
    data.max_new_tokens, stopping at the model's and tokenizer's end tokens and the token that closes a
    response in the data's format (`gen_format`: EOS, or the chat template's end of turn); a few test
    examples sent back with their generations only when the data is the shipped public data
    (data.shows_samples: a Flower node with its own data-path has data.path set, so never)."""
    if cfg.data.kind != "generation":
        return None
    stops = {*stop_token_ids(model, tokenizer), gen_format(tokenizer, cfg.data.chat_template).stop_id}

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    samples = SAMPLES if cfg.data.shows_samples else 0
    return Decoding(tuple(sorted(stops)), pad_token_id(tokenizer), decode, cfg.data.max_new_tokens, samples)


def adapter_pool(
    cfg: ExperimentConfig, base: torch.nn.Module, clients: Sequence[int] | None = None
) -> AdapterPool:
    """An adapter per client of `clients` (default: all), at its rank, on one base, seeded: every
    transport starts from the same LoRA initialisation."""
    seed_everything(cfg.run.seed)
    indices = range(cfg.federation.clients) if clients is None else clients
    ranks = None if cfg.lora.ranks is None else [cfg.lora.rank_of(i) for i in indices]
    return AdapterPool(base, cfg.lora, [client_name(i) for i in indices], ranks, cfg.lora.max_rank)


@dataclass(frozen=True)
class LabelMixture:
    """A client's label proportions: the federation's split gives them, an owner of its own files
    counts them in its windows (`of_windows`)."""

    names: tuple[str, ...]
    shares: tuple[float, ...]

    @classmethod
    def of_split(cls, data: FederatedData, index: int) -> LabelMixture:
        return cls(tuple(data.label_names), tuple(float(x) for x in data.mixtures[index]))

    @classmethod
    def of_windows(cls, data: ClientData) -> LabelMixture:
        names = sorted(data.label_counts)
        total = sum(data.label_counts.values())
        return cls(tuple(names), tuple(data.label_counts[n] / total for n in names))


def client_info(
    index: int,
    device: torch.device,
    *,
    windows: ClientData | None = None,
    labels: LabelMixture | None = None,
    examples: int | None = None,
    own_data: bool = False,
) -> ClientInfo:
    """A client's description, built here for every transport: the personalized family's window counts
    and label mixture, or the FedCoLLM family's n_k; `own_data` for a data owner's own files."""
    return ClientInfo(
        partition=index,
        device=str(device),
        examples=examples,
        own_data=own_data,
        train_windows=None if windows is None else len(windows.train),
        val_windows=None if windows is None else len(windows.val),
        test_windows=None if windows is None else (0 if windows.test is None else len(windows.test)),
        label_names=() if labels is None else labels.names,
        mixture=() if labels is None else labels.shares,
    )


def personalized_work(
    cfg: ExperimentConfig,
    index: int,
    pool: AdapterPool,
    data: ClientData,
    public: Callable[[], Rows],
    device: torch.device,
    labels: LabelMixture,
    own_data: bool = False,
    slot: str | None = None,
    decoding: Decoding | None = None,
    memo: EvalMemo | None = None,
) -> ClientWork:
    """Client `index` of personalized fine-tuning: its windows (or generation examples, with the
    `decoding` of its test prompts), its learner, its description."""
    train = data.train
    if is_garbage_attacker(cfg, index):  # a simulated attacker trains on random tokens
        vocab = pool.model.get_input_embeddings().num_embeddings
        if isinstance(train, torch.Tensor):
            train = garbage_data(cfg, index, train, vocab)
        else:
            train = garbage_examples(cfg, index, train, vocab)
    tcfg = cfg.train
    learner = Learner(
        pool,
        slot or client_name(index),
        train,
        tcfg,
        cfg.federation.total_steps,
        stream_seed("learner", cfg.run.seed, index),
        device,
        frozen=cfg.strategy.spec.frozen_parts,
    )
    return ClientWork(
        index,
        learner,
        val=data.val,
        test=data.test,
        public=public,
        eval_batch_size=tcfg.eval_batch_size,
        info=client_info(index, device, windows=data, labels=labels, own_data=own_data),
        requests=data.test_requests,
        decoding=decoding,
        memo=memo,
        compression=Compression.of(cfg),
        evidence=EvidenceProtection.of(cfg),
    )


def personalized_works(
    cfg: ExperimentConfig,
    pool: AdapterPool,
    data: FederatedData,
    device: torch.device,
    decoding: Decoding | None = None,
    memo: EvalMemo | None = None,
) -> list[ClientWork]:
    """Every client of the federated split as a ClientWork on `pool`'s slots (generation data: with the
    `decoding` of `decoding_of`; `memo`: evaluations kept across the variants of a comparison)."""
    if len(data.clients) != cfg.federation.clients:
        raise ValueError(f"data has {len(data.clients)} clients, config asks for {cfg.federation.clients}")
    return [
        personalized_work(
            cfg,
            i,
            pool,
            c,
            lambda: data.public,
            device,
            LabelMixture.of_split(data, i),
            decoding=decoding,
            memo=memo,
        )
        for i, c in enumerate(data.clients)
    ]


# ---- FedCoLLM family ----------------------------------------------------------------------------------
def load_task(
    cfg: ExperimentConfig,
    tokenizer: PreTrainedTokenizerBase,
    console: Console,
    bridge: TokenizerBridge | None = None,
    owners: bool = True,
) -> TaskData:
    """The task's splits encoded by the SLM's tokenizer (and, with a `bridge` to an LLM of another
    tokenizer, the public set and the union by the LLM's too). Without `owners` (the Flower ServerApp)
    the owners' own files (task.clients) are not read: they are on the SuperNodes."""
    assert cfg.task is not None
    with console.status("building the task splits"):
        task = build_task_data(
            cfg.task, cfg.federation.clients, tokenizer, cfg.run.seed, cfg.distill.val_fraction, owners
        )
        if bridge is not None:
            with_llm_encoding(cfg.task, task, bridge.llm_tokenizer)
    own_files = cfg.task.clients is not None and not owners
    sizes = "each on its own SuperNode" if own_files else ", ".join(str(n) for n in task.client_sizes)
    val = f" (+ {len(task.public_val)} server validation)" if task.public_val else ""
    console.print(
        f"  task: {len(task.public)} public{val}, clients [{sizes}], {len(task.test)} test examples"
    )
    dropped = duplicates_line(task.duplicate_documents, task.duplicates)
    if dropped:
        console.print(f"  task: {dropped}")
    return task


def duplicates_line(documents: int, examples: int) -> str:
    """What was dropped as duplicated before the split ("" when nothing): counts only, never the text,
    which may be the user's data."""
    parts = [f"{documents} duplicated document(s) (same text)"] if documents else []
    parts += [f"{examples} duplicated example(s) (same prompt)"] if examples else []
    return " and ".join(parts) + " dropped before the split" if parts else ""


def load_fedcollm_models(
    cfg: ExperimentConfig, console: Console, with_llm: bool
) -> tuple[
    torch.nn.Module, torch.nn.Module | None, PreTrainedTokenizerBase, torch.device, TokenizerBridge | None
]:
    """The SLM base and, when asked, the LLM base; when the LLM's tokenizer is not the SLM's, the bridge
    between them (`models/vocab_map`: the vocabulary map, built once per pair and cached), else None."""
    slm_base, tokenizer, device = load_model(cfg, console=console)
    llm_base, bridge = None, None
    if with_llm:
        assert cfg.llm is not None
        llm_base, llm_tokenizer, _ = load_model(cfg, cfg.llm.model, console)
        if not same_tokenizer(tokenizer, llm_tokenizer):
            check_cross_tokenizer(cfg.distill.kd_target)
            bridge = build_bridge(tokenizer, llm_tokenizer)
            console.print(bridge_line(bridge))
    return slm_base, llm_base, tokenizer, device, bridge


def bridge_line(bridge: TokenizerBridge) -> str:
    """What the vocabulary map between the two tokenizers covers, for the console."""
    slm, llm = bridge.vocab.matched()
    how = "read from the cache" if bridge.vocab.cached else "built"
    return (
        f"  tokenizers differ: {slm:.1%} of the SLM's tokens and {llm:.1%} of the LLM's have an exact match "
        f"in the other vocabulary (map {bridge.vocab.digest[:12]} {how} in {bridge.seconds:.1f}s); "
        "mutual distillation aligns positions by their text and carries each teacher's top-k through it"
    )


def client_budget(cfg: ExperimentConfig, n_examples: int) -> int:
    fed, t = cfg.federation, cfg.train
    return local_steps(fed.local_epochs, fed.local_steps, n_examples, t.batch_size, t.grad_accum)


def fedcollm_pools(
    cfg: ExperimentConfig, slm_base: torch.nn.Module, llm_base: torch.nn.Module | None
) -> tuple[AdapterPool, AdapterPool | None]:
    """The SLM pool (a slot per client, then theta) and the LLM pool (omega), seeded as every
    transport seeds them: the LLM's LoRA init depends on how many SLM adapters were made first."""
    seed_everything(cfg.run.seed)
    names = [client_name(i) for i in range(cfg.federation.clients)] + [SERVER]
    slm = AdapterPool(slm_base, cfg.lora, names)
    llm = None
    if llm_base is not None and needs_llm(cfg):
        assert cfg.llm is not None
        llm = AdapterPool(llm_base, cfg.llm.lora, [LLM_ADAPTER])
    return slm, llm


def fedcollm_work(
    cfg: ExperimentConfig,
    index: int,
    pool: AdapterPool,
    data: EncodedSet,
    device: torch.device,
    vocab: int,
    own_data: bool = False,
) -> ClientWork:
    """Client `index` of the FedCoLLM family: its SLM slot, its private set D_k, its own budget."""
    if is_garbage_attacker(cfg, index):  # a simulated attacker trains on random answers
        data = garbage_examples(cfg, index, data, vocab)
    budget = client_budget(cfg, len(data))
    learner = Learner(
        pool,
        client_name(index),
        data,
        cfg.train,
        budget * cfg.federation.rounds,
        stream_seed("learner", cfg.run.seed, index),
        device,
        frozen=STRATEGY_SPECS["ffa_lora"].frozen_parts if cfg.federation.ffa_lora else (),
    )
    info = client_info(index, device, examples=len(data), own_data=own_data)
    return ClientWork(index, learner, budget=budget, info=info, compression=Compression.of(cfg))


def fedcollm_works(
    cfg: ExperimentConfig, slm: AdapterPool, task: TaskData, device: torch.device, vocab: int
) -> list[ClientWork]:
    """Every client of the task split as a ClientWork on the SLM pool's client slots."""
    return [fedcollm_work(cfg, k, slm, data, device, vocab) for k, data in enumerate(task.clients)]


def check_choice_tokens(task: TaskData) -> None:
    """distill.kd_target 'choices' ranks the choices by their first answer token: they must differ."""
    choices = task.public.choices
    assert choices is not None
    distinct = (choices >= 0).sum(1)
    if len(distinct) and int(distinct.min()) < 2:
        row = int(distinct.argmin())
        raise DataError(
            f"distill.kd_target 'choices': the choices of public example {row} share their first token, so "
            "the KL over the choices' first tokens would be empty; use distill.kd_target 'vocab'"
        )


def fedcollm_server(
    cfg: ExperimentConfig,
    slm: AdapterPool,
    llm: AdapterPool | None,
    task: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    bridge: TokenizerBridge | None = None,
) -> Server:
    """The server's learners: theta on D_a, and omega on D_a (distillation) or on all data (centralized);
    with a `bridge` (an LLM of another tokenizer), omega's data is the LLM's own encoding of them."""
    t, seed, rounds = cfg.train, cfg.run.seed, cfg.federation.rounds
    multiple_choice = cfg.task is not None and cfg.task.kind == "multiple_choice"
    if cfg.distill.kd_target == "choices" and plan_of(cfg.algorithm).distill and multiple_choice:
        check_choice_tokens(task)  # a generation task has no choices (the config refuses 'choices' there)
    batches = distill_batches(len(task.public), t.batch_size, cfg.distill.max_steps)
    per_round = batches * cfg.distill.epochs
    slm_lr = cfg.distill.slm_lr
    theta = Learner(
        slm,
        SERVER,
        task.public,
        t if slm_lr is None else t.model_copy(update={"lr": slm_lr}),
        per_round * rounds,
        stream_seed("learner", seed, SERVER_SLOT),
        device,
        accumulate=False,
    )
    omega, central = None, sum(client_budget(cfg, len(d)) for d in task.clients)
    if llm is not None:
        llm_lr = cfg.llm.lr if cfg.llm is not None and cfg.llm.lr is not None else t.lr
        lt = t.model_copy(update={"lr": llm_lr})
        if plan_of(cfg.algorithm).central_llm:
            omega = Learner(
                llm,
                LLM_ADAPTER,
                task.union if task.llm_union is None else task.llm_union,
                lt,
                central * rounds,
                stream_seed("learner", seed, LLM_SLOT),
                device,
            )
        else:
            omega = Learner(  # its own seed: its dropout stream differs from theta's
                llm,
                LLM_ADAPTER,
                task.public if task.llm_public is None else task.llm_public,
                lt,
                per_round * rounds,
                stream_seed("learner", seed, LLM_SLOT),
                device,
                accumulate=False,
            )
    return Server(slm, llm, theta, omega, tokenizer, central, batches, bridge)
