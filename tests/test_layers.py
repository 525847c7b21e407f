"""The layering of docs/architecture.md, enforced: every import inside cotune goes to its own layer or
one below (imports inside functions too), and no module reaches for another module's private names.

Read with `ast` only (nothing is imported), so it is fast and a violation fails CI at once. A new
module must be given its layer here, next to its neighbours in docs/architecture.md.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# docs/architecture.md, "Layers": the longest matching prefix decides a module's layer.
LAYERS: dict[str, int] = {
    "cotune": 0,
    "cotune.config": 0,
    "cotune.assets": 0,
    "cotune.reporting": 0,
    "cotune.state": 0,
    "cotune.records": 0,
    "cotune.errors": 0,
    "cotune.layout": 0,
    "cotune.seeds": 0,
    "cotune.process": 0,
    "cotune.models": 1,
    "cotune.data": 1,
    "cotune.evaluation": 1,
    "cotune.algorithms": 1,
    "cotune.training": 2,
    "cotune.runtime": 3,
    "cotune.runtime.rundir": 3,
    "cotune.runtime.checkpoint": 3,
    "cotune.runtime.lock": 3,
    "cotune.runtime.guard": 3,
    "cotune.runtime.quorum": 3,
    "cotune.runtime.simulated": 3,
    "cotune.runtime.membership": 3,
    "cotune.runtime.rounds": 3,
    "cotune.runtime.traffic": 3,
    "cotune.runtime.claims": 3,
    "cotune.runtime.pipeline": 3,
    "cotune.runtime.port": 3,
    "cotune.runtime.client": 3,
    "cotune.runtime.personalized": 4,
    "cotune.runtime.fedcollm": 4,
    "cotune.runtime.setup": 5,
    "cotune.runtime.compose": 5,
    "cotune.runtime.inprocess": 6,
    "cotune.runtime.flower": 6,
    "cotune.runtime.experiment": 7,
    "cotune.runtime.backends": 7,
    "cotune.runtime.embedded": 7,
    "cotune.runtime.results": 7,
    "cotune.runtime.audit": 7,
    "cotune.runtime.flower.server_app": 7,
    "cotune.runtime.flower.deploy": 7,
    "cotune.runtime.flower.app": 7,
    "cotune.runtime.flower.outcome": 7,
    "cotune.runtime.flower.probe": 7,
    "cotune.runtime.flower.federation": 7,
    "cotune.runtime.flower.simulation": 7,
    "cotune.cli": 8,
}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def modules(src: Path) -> dict[str, Module]:
    found = {}
    for path in sorted((src / "cotune").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        found[name] = Module(name, path, is_package)
    return found


def layer_of(name: str) -> int:
    prefix = name
    while prefix not in LAYERS:
        prefix = prefix.rpartition(".")[0]
    return LAYERS[prefix]


def imported(module: Module, known: dict[str, Module]) -> list[tuple[int, str, str]]:
    """(line, target module, imported name) for every import of a cotune module, at any depth."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(module.path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, "") for a in node.names if a.name.startswith("cotune")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("cotune"):
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.append((node.lineno, full if full in known else base, alias.name))
    return found


def upward_imports(src: Path) -> list[str]:
    known = modules(src)
    upward = []
    for module in known.values():
        for line, target, _ in imported(module, known):
            if layer_of(target) > layer_of(module.name):
                upward.append(
                    f"{module.path.relative_to(src)}:{line}: {module.name} (layer {layer_of(module.name)}) "
                    f"imports {target} (layer {layer_of(target)})"
                )
    return upward


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_crossings(src: Path) -> list[str]:
    """Private names imported from, or read as attributes of, another cotune module."""
    known = modules(src)
    crossing = []
    for module in known.values():
        where = module.path.relative_to(src)
        module_aliases = {}
        for line, target, name in imported(module, known):
            if name and is_private(name) and target != module.name:
                crossing.append(f"{where}:{line}: imports {name} from {target}")
            elif name and target in known and target.endswith(f".{name}"):
                module_aliases[name] = target
        tree = ast.parse(module.path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                module_aliases.update(
                    {a.asname or a.name: a.name for a in node.names if a.name.startswith("cotune")}
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases
                and is_private(node.attr)
            ):
                crossing.append(f"{where}:{node.lineno}: uses {module_aliases[node.value.id]}.{node.attr}")
    return crossing


def test_imports_go_only_downward():
    found = upward_imports(SRC)
    assert not found, "imports that go up a layer (docs/architecture.md):\n" + "\n".join(found)


def test_no_private_names_across_modules():
    found = private_crossings(SRC)
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_checks_catch_a_violation(tmp_path):
    """Both checks find a planted upward import of a private name, inside a function."""
    package = tmp_path / "cotune"
    for sub in ("models", "cli"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "cli" / "main.py").write_text("def _hidden():\n    pass\n")
    (package / "models" / "bad.py").write_text(
        "def f():\n    from cotune.cli.main import _hidden\n    return _hidden\n"
    )
    assert [line.split(": ")[0] for line in upward_imports(tmp_path)] == ["cotune/models/bad.py:2"]
    assert private_crossings(tmp_path) == ["cotune/models/bad.py:2: imports _hidden from cotune.cli.main"]
