"""Many LoRA adapters on one frozen base model, using peft's multi-adapter support.

Each client's adapter is its own LoRA weights, held back to back in one flat parameter (two when a
learner freezes some of them) and run by binding views of it into one of peft's adapters of the same
PeftModel: activating a client is a pointer switch (no weight is copied), and each client's optimizer owns
only its own parameter. State dicts in peft's format are the exchange unit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from cotune.algorithms.ranks import lora_pairs, rank_of, resize_rank
from cotune.config.schema import LoraSettings
from cotune.errors import OrdinaryError
from cotune.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from cotune.seeds import torch_generator
from cotune.state import AdapterState, copied


class LoraTargetError(ValueError, OrdinaryError):
    """The configured LoRA target modules do not exist in the model."""


def linear_module_names(model: nn.Module) -> list[str]:
    return sorted(
        {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    )


def lora_config(settings: LoraSettings, rank: int | None = None) -> LoraConfig:
    """peft's config for a rank-`rank` adapter (default lora.r). alpha grows with the rank so that the scale
    alpha / r is lora.alpha / lora.r at every rank: one B A means one weight update on every client."""
    r = settings.r if rank is None else rank
    return LoraConfig(
        r=r,
        lora_alpha=settings.alpha * r / settings.r,  # type: ignore[arg-type]  # peft annotates int
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )


def embedding_module_names(model: nn.Module) -> set[str]:
    """Names of the input and output embeddings (lm_head): peft adapts them as embeddings, saving the
    base weights with the adapter, which a client's upload must never carry."""
    ends = [getattr(model, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if any(mod is e for e in ends)}


def check_targets(model: nn.Module, settings: LoraSettings) -> None:
    """Refuse target modules cotune cannot adapt, before any adapter is built."""
    embeddings = embedding_module_names(model)
    available = [n for n in linear_module_names(model) if n not in embeddings]
    tied = [t for t in settings.target_modules if t in embeddings]
    if tied:
        raise LoraTargetError(
            f"lora.target_modules {tied}: the model's embeddings / output layer cannot be LoRA targets "
            f"(their adapter would carry the base weights); choose among: {', '.join(available)}"
        )
    missing = [t for t in settings.target_modules if t not in available]
    if missing:
        raise LoraTargetError(
            f"lora.target_modules {missing} are not linear layers of this model; "
            f"it has: {', '.join(available)}"
        )


def wide_initialisation(
    like: Mapping[str, torch.Tensor], rank: int, generator: torch.Generator | None = None
) -> AdapterState:
    """peft's LoRA initialisation at `rank` for the modules of `like`: A Kaiming-uniform (a = sqrt 5),
    B zero. Drawn from a generator of its own (default: seeded like torch's default one), not from the
    default one, so it does not depend on how many adapters a pool made before."""
    generator = generator or torch_generator("global", torch.initial_seed())
    out: AdapterState = {}
    for a_key, b_key in lora_pairs(like).values():
        a, b = like[a_key], like[b_key]
        wide = torch.empty(rank, a.shape[1], dtype=torch.float32)
        nn.init.kaiming_uniform_(wide, a=math.sqrt(5), generator=generator)
        out[a_key] = wide.to(dtype=a.dtype, device=a.device)
        out[b_key] = torch.zeros(b.shape[0], rank, dtype=b.dtype, device=b.device)
    return out


def lane_name(index: int, rank: int) -> str:
    return f"lane{index}_r{rank}"


PIECES = "cotune_pieces"  # attribute of a flat parameter: the sizes of the weights it holds, in order


def piece_sizes(param: torch.Tensor) -> tuple[int, ...] | None:
    """The sizes of the LoRA weights a flat parameter holds back to back (None for any other tensor), so
    that gradient clipping can take its norm weight by weight, as over peft's own parameters."""
    return getattr(param, PIECES, None)


def flat_parameter(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    """`tensors` copied back to back into one parameter (no gradient until a learner switches it on)."""
    flat = nn.Parameter(torch.cat([t.detach().reshape(-1) for t in tensors]), requires_grad=False)
    setattr(flat, PIECES, tuple(t.numel() for t in tensors))
    return flat


class FlatWeights:
    """One client's LoRA weights, back to back in flat parameters, as FSDP keeps a module's: one for all of
    them, or (after `regroup`) one for those a learner trains and one for those it freezes (FFA-LoRA's A).
    A client then costs its bytes and a handful of tensor objects (three AdamW tensors per trained
    parameter), not ~240 parameters and ~720 AdamW tensors of ~0.6 KiB each (~0.55 MiB per SmolLM2
    client). Its weights are views of the flat parameters, in the key order of a saved adapter."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.shapes = {key: value.shape for key, value in state.items()}
        self.groups: list[tuple[nn.Parameter, list[str]]] = []
        self.regroup([list(state)], state)

    def regroup(self, groups: Sequence[Sequence[str]], values: Mapping[str, torch.Tensor]) -> None:
        """New flat parameters, one per non-empty group of keys, holding `values`."""
        self.groups = [(flat_parameter([values[key] for key in keys]), list(keys)) for keys in groups if keys]

    def parameters(self) -> list[nn.Parameter]:
        return [flat for flat, _ in self.groups]

    def views(self, detach: bool = False) -> dict[str, torch.Tensor]:
        """Each weight as a view of its flat parameter, by state key in saved order; without `detach` the
        views are in the autograd graph of a flat parameter that takes gradients (one split node each, so a
        backward hands each flat parameter one gradient)."""
        out: dict[str, torch.Tensor] = {}
        for flat, keys in self.groups:
            source = flat.detach() if detach else flat
            for key, piece in zip(keys, source.split(list(getattr(flat, PIECES))), strict=True):
                out[key] = piece.view(self.shapes[key])
        return {key: out[key] for key in self.shapes}


class AdapterPool:
    """N named adapters (clients) sharing one base model; all start from the same initialisation.

    A client's adapter is its own LoRA weights (`FlatWeights`: flat parameters whose views are keyed as
    in a saved peft adapter), not a peft adapter of its own: peft's adapters ("lanes", one per rank and
    per client that must run at the same time) are bound to a client by pointing their A and B modules at
    views of its weights. So a simulated client costs its weights and a few tensor objects, not ~240
    `nn.Linear` modules with their hook dictionaries (~0.55 MiB per SmolLM2 client) nor ~960 parameter and
    AdamW tensors (~0.55 MiB more), and switching clients never copies a weight. A lane holds detached
    views, except during a forward that builds a graph, when the lanes of clients that take gradients
    hold views in it (`graph_views`, `detach_views`).

    With `ranks` (one per name) the adapters differ in rank; each starts from the first r ranks of one
    initialisation at `initial_rank` (default: the largest), drawn from the seed of torch's default
    generator, so every transport and every pool of any subset of names agrees on it. `initial` is that
    full-rank initialisation (without `ranks`: peft's initialisation of the first lane).
    """

    def __init__(
        self,
        base_model: nn.Module,
        settings: LoraSettings,
        names: Sequence[str],
        ranks: Sequence[int] | None = None,
        initial_rank: int | None = None,
    ) -> None:
        if not names:
            raise ValueError("an adapter pool needs at least one adapter name")
        if ranks is not None and len(ranks) != len(names):
            raise ValueError(f"{len(ranks)} ranks for {len(names)} adapters")
        check_targets(base_model, settings)
        self.names = list(names)
        self.settings = settings
        self.ranks = dict(zip(self.names, [settings.r] * len(names) if ranks is None else ranks, strict=True))
        first_rank = self.ranks[self.names[0]]
        self.model: PeftModel = get_peft_model(
            base_model, lora_config(settings, first_rank), adapter_name=lane_name(0, first_rank)
        )
        self.stateless: dict[tuple[type, float | None], nn.Module] = {}
        self.share_stateless(lane_name(0, first_rank))
        self.lanes: dict[str, list[tuple[str, nn.Linear]]] = {}  # lane -> (state key, its A or B module)
        self.bound: dict[str, str] = {}  # lane -> the client whose weights it runs
        self.graphed: set[str] = set()  # lanes whose views are in an autograd graph (during a forward)
        self.weights: dict[str, FlatWeights] = {}  # client -> its weights
        self.active: str | None = None
        first_lane = self.lane(0, first_rank)
        initial = {key: module.weight.detach() for key, module in self.lanes[first_lane]}
        if ranks is None:
            self.initial = copied(initial)
        else:
            self.initial = wide_initialisation(initial, initial_rank or max(ranks))
        for name in self.names:
            self.add_weights(name, resize_rank(self.initial, self.ranks[name]))
        self.activate(self.names[0])
        self.original: dict[str, torch.Tensor] = {}  # base weights before `set_base_update`, by module
        network = self.model.get_base_model()
        self.hooks = [
            network.register_forward_pre_hook(self.graph_views),
            network.register_forward_hook(self.detach_views),
        ]

    # ---- lanes: the peft adapters that run clients' weights -----------------------------------------
    def lane(self, index: int, rank: int) -> str:
        """peft adapter `index` of `rank` (made on first use, without touching the run's randomness)."""
        name = lane_name(index, rank)
        if name not in self.lanes:
            if name not in self.model.peft_config:
                with torch.random.fork_rng():
                    self.model.add_adapter(name, lora_config(self.settings, rank))
                self.share_stateless(name)
                if self.active is not None:
                    self.model.set_adapter(self.lane_of(self.active))
            self.lanes[name] = self.lane_modules(name)
        return name

    def lane_modules(self, lane: str) -> list[tuple[str, nn.Linear]]:
        """(state key, module) of every LoRA weight of `lane`, in the order of a saved adapter."""
        marker = f".{lane}."
        table: list[tuple[str, nn.Linear]] = []
        for param_name, _ in self.model.named_parameters():
            if marker in param_name and "lora_" in param_name:
                path, attribute = param_name.rsplit(".", 1)
                module = self.model.get_submodule(path)
                if attribute != "weight" or not isinstance(module, nn.Linear):
                    raise RuntimeError(f"cotune binds only LoRA Linear weights, not {param_name}")
                table.append((param_name.replace(marker, "."), module))
        saved = list(get_peft_model_state_dict(self.model, adapter_name=lane))
        if [key for key, _ in table] != saved:
            raise RuntimeError("this peft version names adapter weights differently from what cotune expects")
        return table

    def lane_of(self, name: str) -> str:
        return lane_name(0, self.ranks[name])

    def bind(self, lane: str, name: str, graph: bool = False) -> None:
        """Point `lane`'s A and B modules at views of client `name`'s weights (no weight is copied):
        detached ones, or (`graph`, made anew each time) views in the autograd graph of its parameters."""
        if self.bound.get(lane) == name and not graph and lane not in self.graphed:
            return
        views = self.weights[name].views(detach=not graph)
        for key, module in self.lanes[lane]:
            if isinstance(module.weight, nn.Parameter):  # peft's own, until the lane's first binding
                del module.weight
            module.weight = views[key]
        self.bound[lane] = name
        (self.graphed.add if graph else self.graphed.discard)(lane)

    def graph_views(self, *_: object) -> None:
        """Before a forward that builds a graph: the lanes of clients that take gradients get views in it,
        made now (one split per flat parameter, so a backward hands each flat parameter one gradient)."""
        if torch.is_grad_enabled():
            for lane, name in self.bound.items():
                if any(param.requires_grad for param in self.parameters(name)):
                    self.bind(lane, name, graph=True)

    def detach_views(self, *_: object) -> None:
        """After that forward: detached views again (the graph keeps what it saved). Outside a forward no
        lane holds a view that an optimizer step could change in place under an autograd graph."""
        for lane in list(self.graphed):
            self.bind(lane, self.bound[lane])

    def add_weights(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Client `name`'s weights: a copy of `state`, back to back in one flat parameter."""
        device = next(iter(self.initial.values())).device
        self.weights[name] = FlatWeights({k: v.detach().to(device) for k, v in state.items()})

    def split_parameters(
        self, name: str, frozen: Sequence[str] = ()
    ) -> tuple[nn.Parameter, list[nn.Parameter]]:
        """Client `name`'s parameter a learner trains and those it freezes (weights whose key has a part
        of `frozen`, e.g. "lora_A" for FFA-LoRA), regrouping its weights when they are not split so yet
        (before any optimizer holds them): AdamW keeps no moments for frozen weights."""
        weights = self.weights[name]
        keys = list(weights.shapes)
        cold = [key for key in keys if any(part in key for part in frozen)]
        groups = [[key for key in keys if key not in cold], cold]
        if not groups[0]:
            raise ValueError(f"freezing {list(frozen)} leaves client {name} nothing to train")
        if [group for group in groups if group] != [group_keys for _, group_keys in weights.groups]:
            trainable = any(p.requires_grad for p in weights.parameters())
            weights.regroup(groups, self.state(name))
            for param in weights.parameters():
                param.requires_grad_(trainable)
            for lane in [lane for lane, client in self.bound.items() if client == name]:
                del self.bound[lane]  # its views are of the old parameters
                self.bind(lane, name)
        trained, *rest = weights.parameters()
        return trained, rest

    @contextmanager
    def lanes_for(self, names: Sequence[str], trainable: bool = False) -> Iterator[list[str]]:
        """Clients `names` each in a lane of its own, to run in one mixed-adapter batch (peft routes
        each row by lane name, the names yielded); with `trainable` all of them take gradients (peft
        otherwise trains only the active one). Afterwards the active client is back in its lane."""
        if len(set(names)) != len(names):
            raise ValueError("a client can run in only one lane of a mixed batch")
        lanes = [self.lane(index, self.ranks[name]) for index, name in enumerate(names)]  # before any
        for lane, name in zip(lanes, names, strict=True):  # binding: a new lane resets requires_grad
            self.bind(lane, name)
            if trainable:
                for param in self.parameters(name):
                    param.requires_grad_(True)
        try:
            yield lanes
        finally:
            if trainable:
                for name in names:
                    if name != self.active:
                        for param in self.parameters(name):
                            param.requires_grad_(False)
            if self.active is not None:
                self.bind(self.lane_of(self.active), self.active)

    # ---- clients -------------------------------------------------------------------------------------
    def activate(self, name: str) -> None:
        """Make client `name` the adapter the model runs and trains (its weights take gradients)."""
        if name == self.active:
            return
        lane = self.lane(0, self.ranks[name])
        if self.active is not None:
            for param in self.parameters(self.active):
                param.requires_grad_(False)
        self.bind(lane, name)
        if self.active is None or self.lane_of(self.active) != lane:
            self.model.set_adapter(lane)
        for param in self.parameters(name):
            param.requires_grad_(True)
        self.active = name

    def scratch(self, rank: int) -> str:
        """A spare adapter of `rank` (made once, outside `names`), to evaluate another client's adapter of
        that rank on this pool without touching any client's slot."""
        name = f"scratch_r{rank}"
        if name not in self.weights:
            self.ranks[name] = rank
            self.add_weights(name, resize_rank(self.initial, rank))
        return name

    def set_base_update(self, update: Mapping[str, torch.Tensor] | None) -> None:
        """Make the shared base weights W0 + scale * B A of `update` (None: W0 again), from the original
        weights each time, so every transport that merges the same update gets the same bits.

        For strategies that merge their aggregate into the base (FLoRA); `unload` gives W0 back.
        """
        for module, weight in self.original.items():
            self.base_weight(module).copy_(weight)
        if update is None:
            return
        scale = self.settings.alpha / self.settings.r  # one scale at every rank (lora_config)
        with torch.no_grad():
            for module, (a_key, b_key) in lora_pairs(update).items():
                weight = self.base_weight(module)
                self.original.setdefault(module, weight.detach().clone())
                a = update[a_key].to(weight.device, weight.dtype)
                b = update[b_key].to(weight.device, weight.dtype)
                delta = (b @ a) * scale
                layer = self.model.get_submodule(module)
                weight.add_(delta.T if getattr(layer, "fan_in_fan_out", False) else delta)

    def base_weight(self, module: str) -> torch.Tensor:
        """The frozen weight under the LoRA layer `module` (a key prefix of a saved adapter)."""
        layer = self.model.get_submodule(module)
        base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
        weight = base.weight
        assert isinstance(weight, torch.Tensor)
        return weight.data

    def share_stateless(self, name: str) -> None:
        """One LoRA dropout module for every layer and adapter instead of peft's one per layer per
        adapter: it holds no state (the masks come from the random stream, drawn in the same order), and
        the ~120 module objects per adapter were ~0.27 MiB of every simulated client."""
        for layer in self.model.modules():
            if isinstance(layer, LoraLayer) and name in layer.lora_dropout:
                module = layer.lora_dropout[name]
                layer.lora_dropout[name] = self.stateless.setdefault(
                    (type(module), getattr(module, "p", None)), module
                )

    def parameters(self, name: str) -> list[nn.Parameter]:
        """Client `name`'s flat parameters (one, or two after `split_parameters` froze some weights)."""
        return self.weights[name].parameters()

    def state(self, name: str) -> AdapterState:
        """A detached copy of one adapter's weights, keyed as in a saved peft adapter."""
        return copied(self.view(name))

    def view(self, name: str) -> AdapterState:
        """One adapter's weights themselves (detached, not copied): they change when the slot does."""
        return self.weights[name].views(detach=True)

    def load_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Copy weights in place (cast to the slot's dtype), so optimizers keep pointing at the same
        parameters; keys without `lora_` are ignored, as peft's loader does."""
        weights = self.view(name)
        unexpected = [k for k in state if "lora_" in k and k not in weights]
        if unexpected:
            raise KeyError(f"adapter state has keys this model does not: {unexpected[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                if key in weights:
                    if weights[key].shape != value.shape:
                        raise ValueError(
                            f"adapter weight {key} has shape {tuple(value.shape)}, this slot "
                            f"{tuple(weights[key].shape)}"
                        )
                    weights[key].copy_(value)

    def save(self, name: str, directory: Path, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write adapter `name` (or `state`, with `name`'s config) in PEFT format.

        The result loads with PeftModel.from_pretrained; `state` lets a round loop save the
        adapters it holds without loading them into a slot first.
        """
        directory.mkdir(parents=True, exist_ok=True)
        weights = self.state(name) if state is None else state
        tensors = {k: v.contiguous().cpu() for k, v in weights.items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = self.model.peft_config[lane_name(0, self.ranks[self.names[0]])].to_dict()
        rank = rank_of(weights)  # `state` may be another client's adapter, of another rank
        config.update(r=rank, lora_alpha=self.settings.alpha * rank / self.settings.r)
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))

    def adapter_bytes(self, name: str | None = None) -> int:
        """Size of adapter `name` (default: the first), what one client's upload weighs."""
        return sum(p.numel() * p.element_size() for p in self.parameters(name or self.names[0]))

    def base_bytes(self) -> int:
        """Size of the full model without any adapter: what an adapter's traffic is compared to."""
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if "lora_" not in n)

    def unload(self) -> nn.Module:
        """Remove every adapter and give the untouched base model back (for the next run), with any
        merged update (`set_base_update`) taken out again."""
        self.set_base_update(None)
        for hook in self.hooks:
            hook.remove()
        return self.model.unload()
