"""Shared fixtures: a synthetic labelled corpus on disk and tiny configs (no downloads)."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# rich wraps what it prints at $COLUMNS (80 when unset) and breaks a word longer than that: the temporary
# paths tests expect in error messages grow under pytest-xdist (.../popen-gw0/...), so print wide enough
# for any of them, whatever the terminal says.
os.environ["COLUMNS"] = "240"


def share_the_cores_among_workers() -> None:
    """Under pytest-xdist every worker (and the Flower, Ray and CLI processes it starts) would take a
    torch thread per core: n workers on n cores then run n*n spinning threads, and the suite measured
    far slower than with one core's share each. Set before torch is imported so child processes
    inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 0:
        share = max(1, (os.cpu_count() or 1) // workers)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, str(share))


share_the_cores_among_workers()
# the SuperNodes the Flower tests start pull their next message after 0.2 s instead of 3 s
# (tests/flower_fast_poll/sitecustomize.py says why); child processes inherit it
FAST_POLL = str(Path(__file__).resolve().parent / "flower_fast_poll")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (FAST_POLL, os.environ.get("PYTHONPATH")) if p)

WORDS = {
    "alpha": ["apple", "apricot", "avocado", "almond", "anchovy", "artichoke", "arugula"],
    "beta": ["banana", "blueberry", "broccoli", "basil", "barley", "beetroot", "brioche"],
    "gamma": ["grape", "guava", "garlic", "ginger", "gnocchi", "gouda", "granola"],
    "delta": ["date", "dill", "donut", "dumpling", "durian", "dal", "daikon"],
}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep `--dist loadgroup` grouping: pytest-xdist (3.8) tells the controller a test's xdist_group by
    appending "@group" to `item._nodeid`, which pytest 9 no longer reads (the id lives in `item._id`), so
    every test became its own group and each module-scoped run (a Flower federation, the SmolLM2 run)
    was built once per worker. Append the suffix where xdist's did not take."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            item._id = type(item._id).parse(item.nodeid + suffix)
    items[:] = slow_modules_first(items)


def slow_modules_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """The modules holding slow or integration tests first, each module kept whole (its module-scoped
    fixtures are built once): xdist hands tests out in this order, so the long ones start while the
    short ones can still fill the gaps at the end (longest first keeps the last worker from finishing
    alone minutes after the other)."""
    heavy = {
        getattr(i, "module", None)
        for i in items
        if i.get_closest_marker("slow") or i.get_closest_marker("integration")
    }
    return sorted(
        items, key=lambda i: getattr(i, "module", None) not in heavy
    )  # stable: the order inside a module stays


@pytest.fixture(autouse=True)
def node_state_in_tmp(tmp_path_factory, monkeypatch) -> Path:
    """SuperNodes keep their trainer states under XDG_STATE_HOME: a temporary one, never the home dir."""
    root = tmp_path_factory.mktemp("xdg-state")
    monkeypatch.setenv("XDG_STATE_HOME", str(root))
    monkeypatch.delenv("COTUNE_NODE_STATE", raising=False)
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Four labels, each a directory of small text files with its own vocabulary."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for label, words in WORDS.items():
        (root / label).mkdir()
        for i in range(12):
            text = " ".join(rng.choice(words) for _ in range(60))
            (root / label / f"{i:03d}.txt").write_text(text)
    return root


def tiny_tree(corpus_dir: Path, tmp_path: Path, **sections) -> dict:
    tree = {
        "model": {
            "name": "tiny",
            "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        },
        "lora": {"r": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "path": str(corpus_dir),
            "seq_len": 32,
            "max_train_windows": 16,
            "max_val_windows": 4,
            "public_windows": 4,
        },
        "train": {"lr": 1e-2, "batch_size": 4, "eval_batch_size": 4},
        "federation": {"clients": 4, "rounds": 2, "local_steps": 2, "warmup_steps": 2},
        "strategy": {"name": "fedavg"},
        "run": {"seed": 0, "out_dir": str(tmp_path / "runs"), "name": "t"},
        "device": "cpu",
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return tree


def load_bench_script(path: Path, name: str) -> ModuleType:
    """A bench/ script (not a package) imported as module `name`: its functions tested without running it.
    Each test file gives its own name, so the modules (and what a test patches on them) stay apart."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
