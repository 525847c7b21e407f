"""Many LoRA adapters on one frozen base model, using peft's multi-adapter support.

Each client is a named peft adapter inside the same PeftModel: activating a client is a
pointer switch (no base weight is copied), and each client's optimizer owns only its
adapter's parameters. State dicts in peft's format are the exchange unit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from cotune.algorithms.ranks import lora_pairs, rank_of, resize_rank
from cotune.config.schema import LoraSettings
from cotune.state import AdapterState, copied


class LoraTargetError(ValueError):
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


def check_targets(model: nn.Module, settings: LoraSettings) -> None:
    available = linear_module_names(model)
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
    generator = generator or torch.Generator().manual_seed(torch.initial_seed())
    out: AdapterState = {}
    for a_key, b_key in lora_pairs(like).values():
        a, b = like[a_key], like[b_key]
        wide = torch.empty(rank, a.shape[1], dtype=torch.float32)
        nn.init.kaiming_uniform_(wide, a=math.sqrt(5), generator=generator)
        out[a_key] = wide.to(dtype=a.dtype, device=a.device)
        out[b_key] = torch.zeros(b.shape[0], rank, dtype=b.dtype, device=b.device)
    return out


class AdapterPool:
    """N named adapters sharing one base model; all start from the same initialisation.

    With `ranks` (one per name) the adapters differ in rank; each starts from the first r ranks of one
    initialisation at `initial_rank` (default: the largest), drawn from the seed of torch's default
    generator, so every transport and every pool of any subset of names agrees on it. `initial` is that
    full-rank initialisation (without `ranks`: the first adapter's).
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
        first = self.names[0]
        self.model: PeftModel = get_peft_model(
            base_model, lora_config(settings, self.ranks[first]), adapter_name=first
        )
        self.stateless: dict[tuple[type, float | None], nn.Module] = {}
        self.share_stateless(first)
        for name in self.names[1:]:
            self.model.add_adapter(name, lora_config(settings, self.ranks[name]))
            self.share_stateless(name)
        if ranks is None:
            self.initial = self.state(first)
        else:
            self.initial = wide_initialisation(self.state(first), initial_rank or max(ranks))
        for name in self.names[1 if ranks is None else 0 :]:
            self.load_state(name, resize_rank(self.initial, self.ranks[name]))
        self.active: str | None = None
        self.activate(first)
        self.original: dict[str, torch.Tensor] = {}  # base weights before `set_base_update`, by module

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

    def scratch(self, rank: int) -> str:
        """A spare adapter of `rank` (made once, outside `names`), to evaluate another client's adapter of
        that rank on this pool without touching any client's slot."""
        name = f"scratch_r{rank}"
        if name not in self.ranks:
            with torch.random.fork_rng():  # its initialisation never shifts the run's randomness (CPU or GPU)
                self.model.add_adapter(name, lora_config(self.settings, rank))
            self.share_stateless(name)
            self.ranks[name] = rank
            if self.active is not None:
                self.model.set_adapter(self.active)
        return name

    def activate(self, name: str) -> None:
        if name != self.active:
            self.model.set_adapter(name)
            self.active = name

    def parameters(self, name: str) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters(name)]

    def named_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        marker = f".{name}."
        return [(n, p) for n, p in self.model.named_parameters() if marker in n and "lora_" in n]

    @contextmanager
    def all_trainable(self, names: Sequence[str]) -> Iterator[None]:
        """Adapters `names` all take gradients at once (peft otherwise trains only the active one), for
        mixed-adapter batches; afterwards only the active adapter does again."""
        for name in names:
            for param in self.parameters(name):
                param.requires_grad_(True)
        try:
            yield
        finally:
            for name in names:
                if name != self.active:
                    for param in self.parameters(name):
                        param.requires_grad_(False)

    def state(self, name: str) -> AdapterState:
        """A detached copy of one adapter's weights, keyed as in a saved peft adapter."""
        return copied(self.view(name))

    def view(self, name: str) -> AdapterState:
        """One adapter's weights themselves (detached, not copied): they change when the slot does."""
        return {k: v.detach() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}

    def load_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Copy weights in place, so optimizers keep pointing at the same parameters."""
        result = set_peft_model_state_dict(self.model, dict(state), adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise KeyError(f"adapter state has keys this model does not: {unexpected[:3]}")

    def save(self, name: str, directory: Path, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write adapter `name` (or `state`, with `name`'s config) in PEFT format.

        The result loads with PeftModel.from_pretrained; `state` lets a round loop save the
        adapters it holds without loading them into a slot first.
        """
        directory.mkdir(parents=True, exist_ok=True)
        weights = self.state(name) if state is None else state
        tensors = {k: v.contiguous().cpu() for k, v in weights.items()}
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = self.model.peft_config[name].to_dict()
        rank = rank_of(weights)  # `state` may be another client's adapter, of another rank
        config.update(r=rank, lora_alpha=self.settings.alpha * rank / self.settings.r)
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))

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
        return self.model.unload()
