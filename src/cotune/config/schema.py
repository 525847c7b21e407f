"""The experiment config: one validated tree, one YAML file per experiment.

Every section forbids unknown keys so that a typo stops the run before any training
instead of silently falling back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from cotune.config.names import (
    BLOCK_CODECS,
    EXCHANGING_ALGORITHMS,
    FAMILY_FEDERATION_FIELDS,
    FAMILY_SECTIONS,
    FEDCOLLM_ALGORITHMS,
    LLM_ALGORITHMS,
    MIXED_RANK_STRATEGIES,
    STRATEGIES,
    STRATEGY_SPECS,
    Aggregator,
    Algorithm,
    AttackKind,
    Codec,
    Family,
    FaultKind,
    Selection,
    StrategyName,
    StrategySpec,
    TrackerName,
    Weighting,
    family_of,
    strategy_spec,
)


class Section(BaseModel):
    # No NaN or infinity anywhere: `train.lr: .inf` would pass a > 0 check and train on garbage.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TinyModelConfig(Section):
    """A randomly initialised Llama-style model built from a config: no download, for tests."""

    hidden_size: PositiveInt = Field(
        64, description="model width (divisible by num_heads; each head's share even)"
    )
    num_layers: PositiveInt = Field(2, description="decoder layers")
    num_heads: PositiveInt = Field(4, description="attention heads")
    intermediate_size: PositiveInt = Field(128, description="width of each layer's MLP")
    max_position_embeddings: PositiveInt = Field(
        512, description="longest sequence the model takes, in tokens"
    )
    num_kv_heads: PositiveInt | None = Field(None, description="grouped-query attention (default: num_heads)")
    vocab_size: PositiveInt | None = Field(
        None,
        description="embedding rows (default: the byte tokenizer's 258); more gives a real model's output "
        "layer cost, e.g. 49152 for a SmolLM2-shaped benchmark model",
    )
    seed: int = Field(0, description="seed of the random weights")
    tokenizer: Literal["bytes", "merges"] = Field(
        "bytes",
        description="'bytes': one token per byte; 'merges': the same bytes with some letter pairs merged "
        "(another tokenizer, for a FedCoLLM pair of different tokenizers)",
    )

    @model_validator(mode="after")
    def _attention_shape(self) -> TinyModelConfig:
        """A shape Llama attention cannot split is refused here, not as a crash when the model is built."""
        kv = self.num_kv_heads or self.num_heads
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.tiny.hidden_size {self.hidden_size} is not divisible by model.tiny.num_heads "
                f"{self.num_heads}: each head gets hidden_size / num_heads dimensions"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"model.tiny.hidden_size / num_heads = {self.hidden_size // self.num_heads} must be even "
                "(rotary position embeddings rotate pairs of dimensions)"
            )
        if self.num_heads % kv:
            raise ValueError(
                f"model.tiny.num_heads {self.num_heads} is not divisible by model.tiny.num_kv_heads {kv}: "
                "grouped-query attention shares each key/value head among a whole number of heads"
            )
        return self


class ModelConfig(Section):
    """The base model every client fine-tunes (FedCoLLM: the clients' small model, SLM)."""

    name: str = Field(
        "tiny",
        description="'tiny', an asset name (cotune assets list), a hub id, a local directory or a .gguf file",
    )
    tiny: TinyModelConfig = Field(
        TinyModelConfig(), description="name: tiny: the sizes of the random test model"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="compute dtype; auto: bfloat16 on a CUDA GPU that supports it natively, else float32",
    )


class LoraSettings(Section):
    """The LoRA adapter each client trains: its shape is what travels."""

    r: PositiveInt = Field(8, description="the LoRA rank (with lora.ranks: the rank lora.alpha refers to)")
    alpha: PositiveFloat = Field(16, description="LoRA scale: the weight update is alpha / r x B A")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA branch's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="the linear modules that get a LoRA (a name the model lacks is an error listing its own)",
    )
    ranks: list[PositiveInt | str] | None = Field(
        None,
        description="a rank per client (a number, or a name from lora.tiers): clients of different hardware "
        f"(strategies {', '.join(MIXED_RANK_STRATEGIES)}); every "
        "client's LoRA scale stays alpha / r",
    )
    tiers: dict[str, PositiveInt] = Field(
        default_factory=dict, description="named device tiers and their rank, for lora.ranks (phone: 4)"
    )

    @model_validator(mode="after")
    def _ranks_name_tiers(self) -> LoraSettings:
        unknown = sorted({x for x in self.ranks or [] if isinstance(x, str) and x not in self.tiers})
        if unknown:
            known = ", ".join(sorted(self.tiers)) or "none"
            raise ValueError(f"lora.ranks names tier(s) {unknown} that lora.tiers does not define ({known})")
        if self.tiers and self.ranks is None:
            raise ValueError("lora.tiers is read only through lora.ranks: give each client its tier there")
        return self

    def rank_of(self, client: int) -> int:
        """Client `client`'s LoRA rank: its entry in lora.ranks (a number or a tier), else lora.r."""
        if self.ranks is None:
            return self.r
        x = self.ranks[client]
        return self.tiers[x] if isinstance(x, str) else x

    @property
    def mixed_ranks(self) -> bool:
        return self.ranks is not None and len({self.rank_of(i) for i in range(len(self.ranks))}) > 1

    @property
    def max_rank(self) -> int:
        """The largest rank of any client: where every client's initialisation is cut from."""
        return max([self.r] if self.ranks is None else [self.rank_of(i) for i in range(len(self.ranks))])


class SourceConfig(Section):
    """One labelled text source; its documents are tagged with a label that partitioners use."""

    corpus: Literal["bbc", "wikipedia", "python", "files"] = Field(
        description="bbc news, wikipedia vital articles, python (the standard library's source), or files"
    )
    path: Path | None = Field(
        None,
        description="for corpus=files: a .txt/.jsonl/.parquet/.csv/.json/.arrow file, a directory of "
        "them, or a datasets save_to_disk folder",
    )
    text_column: str = Field("text", description="tables and .jsonl: the column holding a document's text")
    label_column: str = Field(
        "label", description="tables and .jsonl: the label column (optional in the data)"
    )
    languages: list[Literal["en", "fr", "es"]] = Field(
        default_factory=lambda: ["en"],  # type: ignore[arg-type]
        description="wikipedia: the languages to read",
    )
    label_by: Literal["topic", "language", "source"] = Field(
        "topic", description="what a document's label is: its topic, its language or its source"
    )
    labels: list[str] | None = Field(None, description="keep only documents with these labels")
    label: str | None = Field(None, description="override: give every document of this source this label")
    max_docs: PositiveInt | None = Field(None, description="read at most this many documents")

    @model_validator(mode="after")
    def _files_need_path(self) -> SourceConfig:
        if self.corpus == "files" and self.path is None:
            raise ValueError("corpus 'files' needs 'path' (a .txt/.jsonl file or a directory)")
        return self


class PartitionConfig(Section):
    """How the documents (or examples) are dealt to the clients by label."""

    kind: Literal["one_label", "mixed", "dirichlet", "iid"] = Field(
        "one_label",
        description="one_label: one label per client; mixed: major_fraction of one label, the rest the next; "
        "dirichlet: label shares drawn with concentration alpha; iid: at random",
    )
    labels: list[str] | None = Field(
        None, description="label order for client assignment (default: sorted labels)"
    )
    major_fraction: float = Field(0.75, gt=0.0, le=1.0, description="mixed: share of the client's own label")
    alpha: PositiveFloat = Field(0.5, description="dirichlet concentration")


class TaskColumns(Section):
    """Where a file of examples (a task's, or generation data's) keeps each field (parquet / CSV / JSON /
    arrow / save_to_disk, and .jsonl keys)."""

    prompt: str = Field("prompt", description="the question")
    choices: str = Field("choices", description="the list of choices (a CSV holds it as JSON text)")
    answer: str = Field("answer", description="the right answer: its index or the choice itself")
    label: str = Field(
        "label", description="the example's label (optional; task.partition / data.partition deal by it)"
    )
    response: str = Field(
        "response",
        description="generation, prompt layout: the reference response (the prompt is in 'prompt')",
    )
    instruction: str = Field("instruction", description="generation, Alpaca layout: the instruction")
    input: str = Field(
        "input", description="generation, Alpaca layout: the optional input, joined to the instruction"
    )
    output: str = Field("output", description="generation, Alpaca layout: the reference response")
    messages: str = Field(
        "messages",
        description="generation, chat layout: the list of {role, content} turns (a CSV holds it as JSON "
        "text); the last assistant turn is the response",
    )


TaskKind = Literal["multiple_choice", "generation"]
GenLayout = Literal["auto", "prompt", "alpaca", "chat"]
# the shipped generation task of each corpus (task.kind generation with task.source)
GENERATION_CORPORA: dict[str, str] = {"bbc": "headline", "python": "docstring"}
DEFAULT_MAX_NEW_TOKENS = 48


def shipped_generation(sources: list[SourceConfig]) -> bool:
    """Whether generation examples built from `sources` are the shipped public data (each a corpus with a
    shipped generation task, no path of the user's): the one rule for when a run may record and show a
    few of its examples with what a model generated for them (`gen_sample` records). Anything a user
    brings (a path, per-owner files, corpus files) is private and never shown."""
    return bool(sources) and all(s.corpus in GENERATION_CORPORA and s.path is None for s in sources)


DataKind = Literal["text", "generation"]


class GenerationSettings(Section):
    """How generation examples are read, formatted and decoded: the one definition a generation task
    (`task`, FedCoLLM family) and a client's generation data (`data`, personalized family) share."""

    max_chars: PositiveInt = Field(
        600,
        description="examples built from a corpus (task.source, data.sources): article text cut to this many "
        "characters (on a word boundary; python docstring task: the function's code, by whole lines)",
    )
    columns: TaskColumns = Field(
        default_factory=TaskColumns, description="the files' column (or key) for each field"
    )
    layout: GenLayout = Field(
        "auto",
        description="generation files: prompt {prompt, response}, alpaca {instruction, input, output} or "
        "chat {messages}; auto: by the columns present (messages, else instruction, else prompt)",
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto",
        description="generation: auto applies the tokenizer's chat template when it has one; none (or a "
        "tokenizer without one): the plain format 'User:\\n<prompt>\\n\\nAssistant:\\n'",
    )
    max_new_tokens: PositiveInt = Field(
        DEFAULT_MAX_NEW_TOKENS,
        description="generation: the decoding budget, tokens generated at most per example",
    )

    def changed_generation_settings(self, every: bool = False) -> list[str]:
        """The generation-only settings (layout, chat_template, max_new_tokens; `every`: max_chars and
        columns too, which a multiple-choice task also reads) set away from their defaults: what a section
        that holds no generation examples would ignore. Compared with the defaults, not model_fields_set:
        a saved config.yaml spells out every field."""
        names = ["layout", "chat_template", "max_new_tokens"] + (["max_chars", "columns"] if every else [])
        fields = GenerationSettings.model_fields
        return [k for k in names if getattr(self, k) != fields[k].get_default(call_default_factory=True)]


class DataConfig(GenerationSettings):
    """The personalized family's data: where it comes from, how it is split across clients, and what a
    client trains on (token windows of text, or generation examples)."""

    kind: DataKind = Field(
        "text",
        description="text: documents packed into token windows (next-token loss on every token); generation: "
        "(prompt, response) examples, the loss on the response only and judged by what the model generates "
        "(data.sources bbc: headlines, python: docstrings; data.path / data.clients: generation files)",
    )
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(corpus="bbc")],
        min_length=1,
        description="the labelled text sources, read in order",
    )
    path: Path | None = Field(
        None, description="shortcut for your own data: replaces 'sources' by one files source at this path"
    )
    seq_len: PositiveInt = Field(
        128,
        description="tokens per window (documents are packed, EOS-separated); generation: tokens per example "
        "(prompt cut from the left, response from the right)",
    )
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="share of each client's documents for validation (validation trust)"
    )
    test_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="share of each client's documents held out as its test set: never trained on and never "
        "seen by any trust evidence; reports score it (0: no test split, reports fall back to validation)",
    )
    max_train_windows: PositiveInt | None = Field(
        None, description="cap per client (generation: on its training examples)"
    )
    max_val_windows: PositiveInt = Field(
        32, description="cap on each client's validation windows (generation: examples)"
    )
    max_test_windows: PositiveInt = Field(
        32,
        description="cap on each client's test windows (generation: test examples, each decoded and scored "
        "on every evaluation round)",
    )
    public_windows: int = Field(
        32, ge=0, description="shared public reference set (prediction trust; generation: examples)"
    )
    partition: PartitionConfig = PartitionConfig()
    clients: list[Path] | None = Field(
        None,
        min_length=1,
        description="per-owner data: one .txt/.jsonl file or directory per client, each client's own "
        "documents (generation: one generation file per client; what a Flower SuperNode's data-path is); "
        "replaces sources/path/partition",
    )
    public: Path | None = Field(
        None, description="with data.clients: the public reference files (prediction trust needs them)"
    )
    text_column: str = Field(
        "text",
        description="with data.clients: the column (or .jsonl key) of the owners' and data.public's text",
    )

    @model_validator(mode="after")
    def _owners_bring_their_own(self) -> DataConfig:
        if self.clients is None:
            if self.public is not None:
                raise ValueError("data.public is the public set of per-owner data: it needs data.clients")
            if self.text_column != "text":
                raise ValueError(
                    "data.text_column names per-owner data's column: it needs data.clients "
                    "(a source names its own: data.sources[].text_column)"
                )
            return self
        # compared with the defaults, not model_fields_set: a saved config.yaml (a resumed run's, the
        # config a Flower ServerApp sends its nodes) spells out every field
        fields = DataConfig.model_fields
        shared = [
            k
            for k in ("partition", "path", "sources")
            if getattr(self, k) != fields[k].get_default(call_default_factory=True)
        ]
        if shared:
            raise ValueError(
                f"data.clients gives every client its own data, so data.{', data.'.join(shared)} would be "
                "ignored: remove it"
            )
        return self

    @model_validator(mode="after")
    def _training_documents_left(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction ({self.val_fraction}) + data.test_fraction ({self.test_fraction}) "
                "leave no documents to train on: keep their sum below 1"
            )
        return self

    @model_validator(mode="after")
    def _kind_fits_the_settings(self) -> DataConfig:
        """Settings one data kind reads and the other would ignore, and sources without generation
        examples. Compared with the defaults: a saved config.yaml spells out every field."""
        if self.kind == "text":
            unread = self.changed_generation_settings(every=True)
            if unread:
                raise ValueError(
                    f"data.{', data.'.join(unread)} {'is' if len(unread) == 1 else 'are'} read by generation "
                    "data only: set data.kind: generation, or remove it"
                )
            return self
        if self.text_column != "text":
            raise ValueError(
                "data.text_column names the text of text data; generation files name their fields with "
                "data.columns"
            )
        if self.path is None and self.clients is None:
            for i, src in enumerate(self.sources):
                if src.corpus == "files":
                    raise ValueError(
                        f"data.sources[{i}]: with data.kind generation a generation file is given as "
                        "data.path (or one per client as data.clients)"
                    )
                if src.corpus not in GENERATION_CORPORA:
                    raise ValueError(
                        f"data.sources[{i}]: corpus '{src.corpus}' has no generation task (shipped: "
                        f"{', '.join(f'{c} ({t})' for c, t in GENERATION_CORPORA.items())}); give your own "
                        "generation file with data.path or data.clients"
                    )
        return self

    @property
    def shows_samples(self) -> bool:
        """Generation examples from shipped corpora only (data.sources; not data.path / data.clients):
        a few sample generations may be recorded and shown (`shipped_generation`)."""
        generated = self.kind == "generation" and self.path is None and self.clients is None
        return generated and shipped_generation(self.sources)

    def resolved_sources(self) -> list[SourceConfig]:
        if self.path is not None:
            return [SourceConfig(corpus="files", path=self.path, label_by="source")]
        return list(self.sources)


class TrainConfig(Section):
    """Each client's local training: AdamW with a warmup + cosine learning-rate schedule."""

    lr: PositiveFloat = Field(2e-3, description="peak learning rate")
    batch_size: PositiveInt = Field(8, description="windows (FedCoLLM: examples) per forward/backward pass")
    grad_accum: PositiveInt = Field(1, description="forward/backward passes per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping norm (null: no clipping)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1)")
    warmup_ratio: float = Field(
        0.02, ge=0.0, lt=1.0, description="share of the steps that warm the learning rate up"
    )
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="the cosine schedule ends at this share of lr"
    )
    eval_batch_size: PositiveInt = Field(8, description="windows (examples) per evaluation forward pass")

    @model_validator(mode="after")
    def _betas_in_range(self) -> TrainConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas {list(self.betas)}: each must be in [0, 1) (AdamW refuses others)")
        return self


DEFAULT_BLOCK = 64


class CompressConfig(Section):
    """How adapters travel between the server and the clients (off by default: float32, as trained).

    Written as a mapping, or as a codec's name alone (`compress: int8`, `compress: none`)."""

    codec: Codec = Field(
        "none",
        description="none (float32), fp16, bf16, int8 (a float32 scale per block) or nf4 (QLoRA's 4-bit "
        "NormalFloat levels, a float32 absmax per block): both directions, the server's reply and each "
        "client's update",
    )
    block: PositiveInt = Field(
        DEFAULT_BLOCK, description="int8 / nf4: weights per block sharing one scale (4 bytes each)"
    )
    topk: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="send only this fraction of each tensor of a client's round update, its largest entries "
        "(values through the codec, positions as int32); the server's reply is never sparsified",
    )
    error_feedback: bool = Field(
        True,
        description="each client keeps what the encoding dropped of its update and adds it to the next "
        "(its own state, checkpointed with its optimizer)",
    )

    @model_validator(mode="before")
    @classmethod
    def _codec_alone(cls, data: Any) -> Any:
        """`compress: int8` stands for `compress: {codec: int8}`."""
        return {"codec": data} if isinstance(data, str) else data

    @property
    def off(self) -> bool:
        return self.codec == "none" and self.topk is None

    @model_validator(mode="after")
    def _settings_it_reads(self) -> CompressConfig:
        # compared with the defaults, not model_fields_set: a saved config.yaml spells out every field
        if self.block != DEFAULT_BLOCK and self.codec not in BLOCK_CODECS:
            raise ValueError(
                f"federation.compress.block {self.block}: codec {self.codec!r} has no blocks; set codec "
                f"int8 or nf4, or remove block"
            )
        if not self.error_feedback and self.off:
            raise ValueError(
                "federation.compress.error_feedback false: compression is off (codec none, no topk), so "
                "nothing is dropped to feed back; set a codec or topk, or remove it"
            )
        return self


class FederationConfig(Section):
    """The federation's schedule: clients, rounds, who takes part and how long they may take."""

    clients: PositiveInt = Field(4, description="number of clients (data owners)")
    rounds: PositiveInt = Field(16, description="aggregation rounds")
    local_steps: PositiveInt = Field(
        25, description="local optimizer steps between aggregations (trust_every)"
    )
    warmup_steps: int = Field(
        100, ge=0, description="personalized: local-only steps before the first aggregation"
    )
    local_epochs: PositiveInt | None = Field(
        None, description="fedcollm family: local epochs per round (overrides local_steps when set)"
    )
    weighting: Weighting = Field(
        "examples", description="fedcollm family: FedAvg weights n_k (local examples) or uniform"
    )
    ffa_lora: bool = Field(
        False,
        description="fedcollm family: FFA-LoRA (arXiv 2403.12313) in the FedAvg step: the clients train only "
        "B and keep A as the server sent it, so the mean of their B A is exactly the mean B times that A; "
        "DP clipping and noise cover B only. The server's distillation still trains theta's A and B",
    )
    max_examples: PositiveInt | None = Field(
        None,
        description="fedcollm family: the largest n_k a client with its own data may claim (more is "
        "capped); unset, such claims cannot be checked and FedAvg weighs every client the same",
    )
    clients_per_round: PositiveFloat | None = Field(
        None,
        description="partial participation: clients drawn (seeded) to train in each round, a count (>= 1) "
        "or a fraction of federation.clients (< 1); default every client",
    )
    min_clients: PositiveInt | None = Field(
        None,
        description="an aggregation goes on when at least this many clients answered (default: all); "
        "fewer stops the run cleanly with the last checkpoint intact",
    )
    client_timeout: float | None = Field(
        None, gt=0, description="seconds a client may spend on one round's work before it is dropped"
    )
    parallel_clients: PositiveInt = Field(
        1,
        description="embedded runtime: train up to this many clients' local steps as one forward/backward "
        "over the shared base (each row through its own client's adapter; same results as one by one), "
        "and score this many peers per forward for validation trust. Pays on a GPU, not on a CPU; needs "
        "lora.dropout 0",
    )
    secure_aggregation: bool = Field(
        False,
        description="flower backend, fedcollm/fedavg algorithms: the FedAvg step runs SecAgg+ (the server "
        "sees only the weighted mean of the uploads); the embedded runtime computes the same mean in clear",
    )
    compress: CompressConfig = Field(
        CompressConfig(),
        description="compressed exchanges (codec, block, topk, error_feedback); the comm records count the "
        "encoded bytes",
    )

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.rounds * self.local_steps

    @property
    def sampled_per_round(self) -> int:
        """How many clients train in a round (all unless clients_per_round says otherwise)."""
        m = self.clients_per_round
        if m is None:
            return self.clients
        return int(m) if m >= 1 else max(1, round(m * self.clients))

    @model_validator(mode="after")
    def _clients_per_round_fits(self) -> FederationConfig:
        m = self.clients_per_round
        if m is not None and m >= 1 and (m != int(m) or m > self.clients):
            raise ValueError(
                f"federation.clients_per_round {m:g}: a count must be a whole number <= federation.clients "
                f"({self.clients}), or a fraction below 1"
            )
        return self


class StrategyConfig(Section):
    """Personalized family: how each client's adapter is mixed from the others' (the trust matrix W)."""

    name: StrategyName = Field(
        "fedavg", description="the strategy: what W is (the strategy table in Methods)"
    )
    tau: PositiveFloat | None = Field(
        None, description="softmax temperature (default: 0.1 prediction, else 1)"
    )
    selection: Selection = Field(
        "all",
        description="all: softmax over every score; topk: over each row's topk largest (the rest get 0); "
        "threshold: over the scores above threshold, always keeping the 2 largest",
    )
    topk: PositiveInt = Field(3, description="selection topk: scores kept per row")
    threshold: float | None = Field(
        None, description="on pre-softmax scores (default: 0.5 weight, -30 validation, -50 prediction)"
    )
    logits_topk: PositiveInt = Field(100, description="prediction trust: keep this many logits per position")
    val_batches: PositiveInt = Field(2, description="validation trust: batches of each client's val set")
    public_batches: PositiveInt = Field(2, description="prediction trust: batches of the public set")

    @property
    def spec(self) -> StrategySpec:
        """This strategy's row of `config.names.STRATEGY_SPECS`."""
        return STRATEGY_SPECS[self.name]

    @property
    def temperature(self) -> float:
        return self.spec.tau if self.tau is None else self.tau

    @property
    def score_threshold(self) -> float:
        return self.spec.threshold if self.threshold is None else self.threshold


class RunConfig(Section):
    """The run as a whole: its seed, where it is written, what it is compared with and reported to."""

    seed: int = Field(0, description="seed of the data partition, initialisation and every client's batches")
    out_dir: Path = Field(Path("runs"), description="the directory run directories are created in")
    name: str | None = Field(
        None,
        description="run directory name inside run.out_dir (default: the config file's stem)",
        pattern=r"^[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*$",  # a plain name: no path separators, no leading dot
    )
    compare: list[str] = Field(
        default_factory=list,
        description="also run these on identical data: strategies (personalized) or algorithms (fedcollm)",
    )
    threads: PositiveInt | None = Field(None, description="torch CPU threads (default: torch's choice)")
    eval_every: PositiveInt = Field(1, description="evaluate every this many rounds (and always at the end)")
    loggers: list[TrackerName] = Field(
        default_factory=list,
        description="experiment trackers that mirror metrics.jsonl (offline, under the run directory)",
    )


class LLMConfig(Section):
    """The server's large model (FedCoLLM): its frozen base and its server-only LoRA."""

    model: ModelConfig = Field(ModelConfig(), description="the LLM's base model (keys as model)")
    lora: LoraSettings = Field(LoraSettings(), description="the LLM's server-only LoRA omega (keys as lora)")
    lr: PositiveFloat | None = Field(None, description="LLM learning rate (default: train.lr)")


class TaskConfig(GenerationSettings):
    """The FedCoLLM family's task: multiple choice (a topic task or the user's file) or generation."""

    kind: TaskKind = Field(
        "multiple_choice",
        description="multiple_choice: pick one of the example's choices (accuracy); generation: write the "
        "response (prompt / Alpaca / chat files; with task.source: bbc headlines, python docstrings)",
    )
    source: SourceConfig | None = Field(
        None,
        description="a task built from a corpus (e.g. corpus: bbc): a topic task, or with kind generation "
        "bbc's article -> headline or python's function -> docstring first line",
    )
    path: Path | None = Field(
        None,
        description='task file: JSONL {"prompt": ..., "choices": [...], "answer": ...} (kind generation: '
        "a layout of task.layout), or a parquet / CSV / JSON / arrow file or save_to_disk folder with those "
        "columns (task.columns renames them)",
    )
    labels: list[str] | None = Field(None, description="choices of a topic task (default: every label)")
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="share held out as the test set (stratified)"
    )
    max_test_examples: PositiveInt | None = Field(None, description="evaluate on at most this many")
    partition: PartitionConfig | None = Field(
        None, description="None/iid: the paper's split (train set into 1 public + K client parts)"
    )
    max_length: PositiveInt = Field(512, description="tokens per example (prompt cut from the left)")
    clients: list[Path] | None = Field(
        None,
        min_length=1,
        description="per-owner data: one JSONL task file per client (what a Flower SuperNode's data-path "
        "is); needs task.public and task.test",
    )
    public: Path | None = Field(None, description="with task.clients: the server's public set D_a (JSONL)")
    test: Path | None = Field(None, description="with task.clients: the held-out test set (JSONL)")

    @model_validator(mode="after")
    def _one_source(self) -> TaskConfig:
        given = [k for k in ("source", "path", "clients") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "task needs exactly one of 'source' (a corpus topic task), 'path' (one JSONL task split "
                "into public, client and test parts) or 'clients' (one JSONL file per client)"
            )
        if self.clients is None:
            if self.public is not None or self.test is not None:
                raise ValueError("task.public and task.test go with per-owner data: they need task.clients")
            return self
        if self.public is None or self.test is None:
            raise ValueError(
                "with task.clients, FedCoLLM's server needs its own data: task.public (D_a, the public set "
                "it distils on) and task.test (the held-out set every result is scored on)"
            )
        # compared with the defaults, not model_fields_set: a saved config.yaml spells out every field
        fields = TaskConfig.model_fields
        split = [k for k in ("partition", "test_fraction") if getattr(self, k) != fields[k].get_default()]
        if split:
            raise ValueError(f"task.clients is already split by owner: remove task.{', task.'.join(split)}")
        return self

    @model_validator(mode="after")
    def _kind_fits_the_settings(self) -> TaskConfig:
        """Settings one task kind reads and the other would ignore, and a corpus without a generation task.

        Compared with the defaults, not model_fields_set: a saved config.yaml spells out every field."""
        if self.kind == "multiple_choice":
            unread = self.changed_generation_settings()
            if unread:
                raise ValueError(
                    f"task.{', task.'.join(unread)} {'is' if len(unread) == 1 else 'are'} read by generation "
                    "tasks only: set task.kind: generation, or remove it"
                )
            return self
        if self.labels is not None:
            raise ValueError(
                "task.labels are the choices of a multiple-choice topic task; a generation task has no "
                "choices: keep only some labels with task.source.labels"
            )
        corpus = self.source.corpus if self.source is not None else None
        if corpus is not None and corpus not in GENERATION_CORPORA:
            raise ValueError(
                f"task.kind generation: corpus '{corpus}' has no generation task (shipped: "
                f"{', '.join(f'{c} ({t})' for c, t in GENERATION_CORPORA.items())}); give your own "
                "generation file with task.path"
            )
        return self

    @property
    def shows_samples(self) -> bool:
        """A generation task built from a shipped corpus (task.source; not task.path / task.clients): a
        few sample generations may be recorded and shown (`shipped_generation`)."""
        return self.kind == "generation" and self.source is not None and shipped_generation([self.source])


class DistillConfig(Section):
    """Server-side mutual knowledge distillation (FedCoLLM step 4)."""

    lam: float = Field(1.0, ge=0.0, description="weight of the KL term")
    temperature: PositiveFloat = Field(
        1.0, description="temperature T of both KL terms (scaled by T squared)"
    )
    topk: PositiveInt | None = Field(None, description="keep only the teacher's top-k logits (ref: 128)")
    kd_target: Literal["vocab", "choices"] = Field(
        "vocab",
        description="vocab: KL over the vocabulary at every answer token (the paper); choices: KL over the "
        "task's choices (their first tokens) at the answer's first token, what the evaluation ranks",
    )
    epochs: PositiveInt = Field(1, description="passes over the public set per round")
    max_steps: PositiveInt | None = Field(None, description="cap distillation batches per pass")
    order: Literal["batch", "epoch"] = Field(
        "batch", description="batch: SLM step then LLM step on each batch; epoch: alternate by epoch"
    )
    val_fraction: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="share of the public set D_a held out as the server's validation split (never trained "
        "on, by any algorithm): SLM and LLM validation accuracy and loss are recorded along each round's "
        "distillation steps; keep 'best' chooses on it",
    )
    val_every: PositiveInt | None = Field(
        None,
        description="score the validation split every this many distillation steps and after the last "
        "(default: every step)",
    )
    keep: Literal["last", "best"] = Field(
        "best",
        description="last: each model keeps its adapter after the round's last distillation step (the "
        "paper); best: the one with the best validation score among the round's start and its scored steps",
    )
    slm_lr: PositiveFloat | None = Field(
        None, description="theta's learning rate on the server (default: train.lr)"
    )
    reset_optimizer: bool = Field(
        False,
        description="start each round's distillation with fresh AdamW moments for theta and omega (theta was "
        "just replaced by the clients' average: moments of last round's theta no longer describe it)",
    )

    @model_validator(mode="after")
    def _validation_settings_need_a_split(self) -> DistillConfig:
        if self.val_fraction == 0.0:
            if self.keep == "best":
                raise ValueError(
                    "distill.keep 'best' chooses on the server's validation split: "
                    "set distill.val_fraction > 0"
                )
            if self.val_every is not None:
                raise ValueError("distill.val_every needs a validation split: set distill.val_fraction > 0")
        return self


class RobustnessConfig(Section):
    """Screening of client uploads and the aggregator of the FedAvg step (defaults change nothing)."""

    max_update_norm: PositiveFloat | None = Field(
        None, description="reject an upload whose update (upload - round's reference) has a larger L2 norm"
    )
    aggregator: Aggregator = Field(
        "mean",
        description="the FedAvg step (strategy fedavg; FedCoLLM-family SLM average): weighted mean, "
        "coordinate-wise median or trimmed mean",
    )
    trim_fraction: float = Field(
        0.1, ge=0.0, lt=0.5, description="trimmed_mean: share of clients dropped at each end, per coordinate"
    )


DEFAULT_DELTA = 1e-5


class PrivacyConfig(Section):
    """Client-level differential privacy: per-client update clipping + Gaussian noise (DP-FedAvg)."""

    clip_norm: PositiveFloat | None = Field(None, description="L2 bound C on each client's update; None: off")
    noise_multiplier: float = Field(0.0, ge=0.0, description="noise std = noise_multiplier x C (per sum)")
    delta: float = Field(DEFAULT_DELTA, gt=0.0, lt=1.0, description="epsilon is reported at this delta")
    seed: int | None = Field(
        None, description="seed of the noise (reproducible runs); None: fresh OS entropy every round"
    )
    evidence_clip: PositiveFloat | None = Field(
        None,
        description="prediction trust: L2 bound C_e on the top-k logits a client uploads in a round (on the "
        "base model's top-k tokens, each position's values centred and clipped to C_e/sqrt(positions)); "
        "None: sent as computed",
    )
    evidence_noise_multiplier: float = Field(
        0.0, ge=0.0, description="noise std on those logits = evidence_noise_multiplier x C_e (client-side)"
    )

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None

    @property
    def protects_evidence(self) -> bool:
        """The uploaded top-k logits (prediction trust) are clipped (and noised) before leaving a client."""
        return self.evidence_clip is not None

    @property
    def no_guarantee(self) -> str | None:
        """Clipping without noise bounds each client's influence (a robustness measure, also used to
        measure update norms) but gives no privacy: the warning a run prints then, else None."""
        if self.clip_norm is not None and self.noise_multiplier == 0:
            return (
                "privacy.clip_norm without privacy.noise_multiplier clips updates but gives NO differential "
                "privacy guarantee (epsilon is unbounded); set privacy.noise_multiplier > 0 for one"
            )
        if self.evidence_clip is not None and self.evidence_noise_multiplier == 0:
            return (
                "privacy.evidence_clip without privacy.evidence_noise_multiplier clips the uploaded logits "
                "but gives them NO differential privacy guarantee; set privacy.evidence_noise_multiplier > 0 "
                "for one"
            )
        return None

    @model_validator(mode="after")
    def _noise_needs_clipping(self) -> PrivacyConfig:
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError(
                "privacy.noise_multiplier needs privacy.clip_norm (the noise is calibrated to it)"
            )
        if self.evidence_noise_multiplier > 0 and self.evidence_clip is None:
            raise ValueError(
                "privacy.evidence_noise_multiplier needs privacy.evidence_clip (the noise is calibrated "
                "to it)"
            )
        # compared with the defaults, not model_fields_set: a saved config.yaml spells out every field
        changed = {"delta": self.delta != DEFAULT_DELTA, "seed": self.seed is not None}
        off = self.clip_norm is None and self.evidence_clip is None
        unread = sorted(k for k, v in changed.items() if v and off)
        if unread:
            raise ValueError(
                f"privacy.{' and privacy.'.join(unread)} without privacy.clip_norm or "
                "privacy.evidence_clip: differential privacy is off, so nothing reads it; set "
                "privacy.clip_norm (and noise_multiplier) or remove it"
            )
        return self


class AttackConfig(Section):
    """Simulated malicious clients (embedded runtimes only)."""

    clients: list[int] = Field(default_factory=list, description="indices of the attacking clients")
    kind: AttackKind = Field(
        "noise",
        description="upload transforms, garbage_data (trains on random tokens), inflated_claim "
        "(FedCoLLM family: claims 10^9 examples, the FedAvg weight)",
    )
    scale: PositiveFloat = Field(10.0, description="noise: RMS relative to the honest update; others: factor")
    start_round: PositiveInt = Field(1, description="first round in which the attackers attack")


class FaultConfig(Section):
    """An injected fault (embedded runtimes only): the client raises, or takes `seconds` longer."""

    client: int = Field(ge=0, description="index of the faulty client")
    rounds: list[PositiveInt] | None = Field(None, description="rounds it happens in (None: every round)")
    kind: FaultKind = Field("error", description="error: its round work raises; delay: it waits")
    seconds: float = Field(0.0, ge=0.0, description="delay: extra seconds of the client's round work")


class SimulationConfig(Section):
    """Simulated attacks and faults, for experiments (embedded runtimes only)."""

    attack: AttackConfig = AttackConfig()
    faults: list[FaultConfig] = Field(default_factory=list)


class ExperimentConfig(Section):
    """One experiment: the whole YAML file."""

    algorithm: Algorithm = Field(
        "personalized",
        description="personalized (a LoRA per client, mixed by strategy), or fedcollm and its baselines",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: CUDA (bf16 where supported), else MPS, else CPU"
    )
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    strategy: StrategyConfig = StrategyConfig()
    run: RunConfig = RunConfig()
    llm: LLMConfig | None = None
    task: TaskConfig | None = None
    distill: DistillConfig = DistillConfig()
    robustness: RobustnessConfig = RobustnessConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    simulation: SimulationConfig = SimulationConfig()

    @property
    def family(self) -> Family:
        return family_of(self.algorithm)

    def is_eval_round(self, r: int) -> bool:
        """Evaluate every run.eval_every rounds, and always after the last one."""
        return r % self.run.eval_every == 0 or r == self.federation.rounds

    @property
    def exchanges(self) -> bool:
        """Whether adapters travel between the server and the clients in this run (not in its
        `run.compare` siblings): what `federation.compress` needs to have any effect."""
        return self.variant_exchanges(self.algorithm if self.is_cotuning else self.strategy.name)

    def variant_exchanges(self, name: str) -> bool:
        """Whether the strategy (personalized) or algorithm (FedCoLLM family) `name` exchanges adapters."""
        return name in EXCHANGING_ALGORITHMS if self.is_cotuning else strategy_spec(name).exchanges

    @property
    def uploads_logits(self) -> bool:
        """Whether this run's clients send their top-k logits on the public set (prediction trust): what
        `privacy.evidence_clip` protects."""
        return self.variant_uploads_logits(self.strategy.name)

    def variant_uploads_logits(self, name: str) -> bool:
        """Whether the strategy `name` sends each client's top-k logits (never a FedCoLLM algorithm)."""
        return not self.is_cotuning and "prediction_distance" in strategy_spec(name).evidence

    @property
    def is_cotuning(self) -> bool:
        """The FedCoLLM family (SPEC A) rather than personalized fine-tuning (SPEC B)."""
        return self.family == "fedcollm"

    def family_dump(self) -> dict[str, Any]:
        """The resolved config as plain data, holding only the sections this family reads."""
        data = self.model_dump(mode="json")
        other: Family = "personalized" if self.family == "fedcollm" else "fedcollm"
        for key in FAMILY_FEDERATION_FIELDS[other]:
            del data["federation"][key]
        return {k: v for k, v in data.items() if k in FAMILY_SECTIONS[self.family]}

    @model_validator(mode="after")
    def _only_sections_the_family_reads(self) -> ExperimentConfig:
        """A section (or federation setting) the other family reads would be silently ignored: refuse it."""
        family = self.family
        unread = [k for k in self.model_fields_set if k not in FAMILY_SECTIONS[family]]
        other: Family = "personalized" if family == "fedcollm" else "fedcollm"
        fed_only = FAMILY_FEDERATION_FIELDS[other]
        unread += [f"federation.{k}" for k in self.federation.model_fields_set if k in fed_only]
        if unread:
            raise ValueError(
                f"algorithm '{self.algorithm}' ({family} family) does not read {', '.join(sorted(unread))}: "
                f"remove {'it' if len(unread) == 1 else 'them'} (the {other} family reads "
                f"{'it' if len(unread) == 1 else 'them'})"
            )
        return self

    @model_validator(mode="after")
    def _sections_for_algorithm(self) -> ExperimentConfig:
        if self.is_cotuning and self.task is None:
            raise ValueError(f"algorithm '{self.algorithm}' needs a 'task' section (a multiple-choice task)")
        if self.task is not None and self.task.kind == "generation" and self.distill.kd_target == "choices":
            raise ValueError(
                "distill.kd_target 'choices' distils over a multiple-choice task's choices; a generation "
                "task has none: use distill.kd_target 'vocab'"
            )
        names: tuple[str, ...] = FEDCOLLM_ALGORITHMS if self.is_cotuning else STRATEGIES
        wrong = [c for c in self.run.compare if c not in names]
        if wrong:
            kind = "algorithms" if self.is_cotuning else "strategies"
            raise ValueError(f"run.compare {wrong}: expected {kind} from {list(names)}")
        needs_llm = [a for a in [self.algorithm, *self.run.compare] if a in LLM_ALGORITHMS]
        if needs_llm and self.llm is None:
            raise ValueError(f"algorithm '{needs_llm[0]}' needs an 'llm' section (the server's model)")
        n = self.federation.clients
        sim = self.simulation
        wrong_clients = [c for c in [*sim.attack.clients, *(f.client for f in sim.faults)] if c >= n]
        if wrong_clients:
            raise ValueError(f"simulation: client {wrong_clients[0]} does not exist (clients are 0..{n - 1})")
        if self.privacy.enabled and self.robustness.aggregator != "mean":
            raise ValueError(
                "privacy.clip_norm (differential privacy) needs robustness.aggregator 'mean': the noise is "
                "calibrated to the sensitivity of a (weighted) mean"
            )
        if (self.privacy.enabled or self.privacy.protects_evidence) and self.privacy.delta >= 1.0 / n:
            raise ValueError(
                f"privacy.delta {self.privacy.delta:g} >= 1/federation.clients (1/{n}): a mechanism that "
                "publishes one whole client's update with probability delta would meet that guarantee; "
                f"choose privacy.delta well below 1/{n} (e.g. 1e-5)"
            )
        s = self.strategy
        if not self.is_cotuning and s.selection == "topk" and s.topk > n:
            raise ValueError(f"strategy.topk {s.topk} > federation.clients {n}: it would select every client")
        m = self.federation.min_clients
        if (
            m is not None
            and self.federation.clients_per_round is not None
            and m > self.federation.sampled_per_round
        ):
            raise ValueError(
                f"federation.min_clients {m} > the {self.federation.sampled_per_round} clients drawn per "
                "round (federation.clients_per_round): no round could go on"
            )
        if self.federation.min_clients is not None and self.federation.min_clients > n:
            raise ValueError(f"federation.min_clients {self.federation.min_clients} > federation.clients {n}")
        self._check_parallel_clients()
        self._check_compress()
        self._check_evidence_protection()
        self._check_owned_data()
        self._check_ranks()
        return self

    def _check_ranks(self) -> None:
        """Per-client ranks: one per client, in the personalized family, with a strategy that can mix them."""
        ranks = self.lora.ranks
        if self.llm is not None and self.llm.lora.ranks is not None:
            raise ValueError("llm.lora.ranks: the server's LLM has one LoRA; client ranks go in lora.ranks")
        if ranks is None:
            return
        if self.is_cotuning:
            raise ValueError(
                "lora.ranks (per-client ranks) is for the personalized family: FedCoLLM's clients all train "
                "the one SLM adapter the server averages and distils"
            )
        if len(ranks) != self.federation.clients:
            raise ValueError(
                f"lora.ranks lists {len(ranks)} rank(s) for federation.clients {self.federation.clients}: "
                "give one per client"
            )
        if not self.lora.mixed_ranks:
            return
        wrong = [s for s in [self.strategy.name, *self.run.compare] if s not in MIXED_RANK_STRATEGIES]
        if wrong:
            raise ValueError(
                f"strategy '{wrong[0]}' mixes adapters element by element, which needs one rank for every "
                f"client, but lora.ranks gives several: use one of {', '.join(MIXED_RANK_STRATEGIES)}"
            )

    def _check_owned_data(self) -> None:
        """Per-owner data: one path per client, and a public set where prediction trust needs one."""
        owned = self.task.clients if self.is_cotuning and self.task is not None else self.data.clients
        if owned is None:
            return
        if self.is_cotuning:
            if len(owned) != self.federation.clients:
                raise ValueError(
                    f"task.clients lists {len(owned)} file(s) for federation.clients "
                    f"{self.federation.clients}: give one per client"
                )
            return
        if len(owned) != self.federation.clients:
            raise ValueError(
                f"data.clients lists {len(owned)} path(s) for federation.clients {self.federation.clients}: "
                "give one per client"
            )
        compared = [strategy_spec(s) for s in [self.strategy.name, *self.run.compare]]
        if any("prediction_distance" in s.evidence for s in compared) and self.data.public is None:
            raise ValueError(
                "prediction trust compares the clients on a public reference set: with data.clients, give "
                "it as data.public (the same files for every client)"
            )

    def _check_compress(self) -> None:
        """Compression needs an exchange to compress, and one the server decodes itself (not SecAgg+'s)."""
        if self.federation.compress.off:
            return
        if self.federation.secure_aggregation:
            raise ValueError(
                "federation.compress with federation.secure_aggregation: SecAgg+ sends its own masked, "
                "quantized vectors, not the codec's; use one of the two"
            )
        first: str = self.algorithm if self.is_cotuning else self.strategy.name
        variants: list[str] = [first, *self.run.compare]
        if not any(self.variant_exchanges(v) for v in variants):
            raise ValueError(
                f"federation.compress: {', '.join(variants)} exchange(s) no adapter, so there is nothing to "
                "compress; remove federation.compress"
            )

    def _check_evidence_protection(self) -> None:
        """privacy.evidence_clip protects the top-k logits prediction trust uploads: a run must send some."""
        if not self.privacy.protects_evidence:
            return
        if self.is_cotuning:
            raise ValueError(
                f"privacy.evidence_clip protects the top-k logits prediction trust uploads; algorithm "
                f"'{self.algorithm}' (FedCoLLM family) uploads none: remove privacy.evidence_clip"
            )
        variants = [self.strategy.name, *self.run.compare]
        if not any(self.variant_uploads_logits(v) for v in variants):
            raise ValueError(
                f"privacy.evidence_clip protects the top-k logits prediction trust uploads; strategy "
                f"{', '.join(variants)} upload(s) none: use strategy.name prediction or remove "
                "privacy.evidence_clip and privacy.evidence_noise_multiplier"
            )

    def _check_parallel_clients(self) -> None:
        """Clients trained together share one eval-mode forward/backward: nothing may tell them apart."""
        if self.federation.parallel_clients == 1:
            return
        if self.lora.dropout > 0:
            raise ValueError(
                f"federation.parallel_clients {self.federation.parallel_clients} runs clients in one "
                f"eval-mode batch, where lora.dropout {self.lora.dropout:g} would be off: set lora.dropout: "
                "0, or federation.parallel_clients: 1"
            )
        if self.simulation.faults or self.federation.client_timeout is not None:
            raise ValueError(
                "federation.parallel_clients > 1 trains clients in one shared step, so one client's fault "
                "or time cannot be told from the others': use simulation.faults / federation.client_timeout "
                "with federation.parallel_clients: 1"
            )
