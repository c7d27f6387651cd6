"""The package's layers point down (docs/architecture.md): every import, including those inside functions, goes from
a layer to one below it, and no two modules import each other in a circle."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bioclip_jax"
# Lowest first. Modules of one layer may import each other (without cycles); the package __init__ is the public face.
LAYERS = [
    {"errors"},
    {"paths", "hardware"},
    {"runtime", "tokenizer", "models"},
    {"mesh"},
    {"data"},
    {"shards"},
    {"convert"},
    {"inference"},
    {"evaluate"},
    {"train"},
    {"configs"},
    {"demo"},
    {"cli"},
    {"__main__"},
]
RANK = {node: i for i, layer in enumerate(LAYERS) for node in layer}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, is_package: bool, modules) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import module` imports the module; `from module import name` the module itself
            submodules = {f"{target}.{a.name}" for a in node.names} & modules
            out.update(submodules or {target})
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        targets = _imports(path, module, path.name == "__init__.py", files.keys())
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def node(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(root: Path) -> list[str]:
    graph = import_graph(root)
    problems = []
    for module, targets in graph.items():
        src = node(module)
        if not src:  # bioclip_jax/__init__.py re-exports the public API from every layer
            continue
        if src not in RANK:
            problems.append(f"{module}: not in any layer; add {src!r} to LAYERS and docs/architecture.md")
            continue
        for target in targets:
            dst = node(target)
            if dst and RANK.get(dst, len(LAYERS)) > RANK[src]:
                problems.append(f"{module} imports {target}: {dst!r} is a higher layer than {src!r}")
            elif dst and dst != src and RANK[dst] == RANK[src]:
                problems.append(f"{module} imports {target}: {src!r} and {dst!r} share a layer")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_layers_point_down_without_cycles():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize("planted, expected", [
    ("def f():\n    from bioclip_jax.evaluate import benchmark\n", "'evaluate' is a higher layer than 'convert'"),
    ("from bioclip_jax.train.trainer import train\n", "'train' is a higher layer than 'convert'"),
    ("def f():\n    from bioclip_jax.cli import common\n", "'cli' is a higher layer than 'convert'"),  # a package
])
def test_a_planted_upward_import_fails(tmp_path, planted, expected):
    copy = tmp_path / "bioclip_jax"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "convert" / "files.py"
    target.write_text(target.read_text() + "\n" + planted)
    assert any(expected in p for p in violations(copy))


def test_a_planted_cycle_fails(tmp_path):
    copy = tmp_path / "bioclip_jax"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "models" / "config.py"  # models.clip imports models.config; close the circle
    target.write_text(target.read_text() + "\ndef f():\n    from bioclip_jax.models import clip\n")
    assert any("import cycle" in p and "bioclip_jax.models.clip" in p for p in violations(copy))


# `models` turns dicts into configs and params into outputs; reading files belongs to `convert` (docs/architecture.md).
FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes"}
FILE_MODULES = {"etils", "etils.epath", "pathlib", "bioclip_jax.paths"}


def file_access(root: Path, layer: str = "models") -> list[str]:
    found = []
    for path in sorted((root / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
                if name in FILE_CALLS or (owner == "json" and name in ("load", "dump")):
                    found.append(f"{where}: {owner + '.' if owner else ''}{name}()")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                names += [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
                found += [f"{where}: imports {n}" for n in names if n in FILE_MODULES]
            elif isinstance(node, ast.Attribute) and node.attr == "epath":
                found.append(f"{where}: epath")
    return found


def test_models_read_no_files():
    assert file_access(PACKAGE) == []


@pytest.mark.parametrize("planted", ["def f(p):\n    return open(p).read()\n",
                                     "def f(p):\n    import json\n    return json.load(p)\n",
                                     "from etils import epath\n", "def f(p):\n    return p.read_text()\n"])
def test_a_planted_file_read_in_models_fails(tmp_path, planted):
    copy = tmp_path / "bioclip_jax"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "models" / "config.py"
    target.write_text(target.read_text() + "\n" + planted)
    assert any("models/config.py" in p for p in file_access(copy))
