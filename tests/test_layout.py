"""The package's floor plan holds: each layer imports only the layers below it, no import
circle, and every module is used by the package itself (not only by tests or benchmarks)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fmnist_jax"
# Bottom to top: a module may import from its own layer or one below, never above.
LAYERS = [
    ("fmnist_jax", "fmnist_jax.errors", "fmnist_jax.files", "fmnist_jax.streams"),
    ("fmnist_jax.data",),
    ("fmnist_jax.conv_forms", "fmnist_jax.layers", "fmnist_jax.models", "fmnist_jax.augment", "fmnist_jax.optim",
     "fmnist_jax.steps", "fmnist_jax.seeds", "fmnist_jax.metrics"),
    ("fmnist_jax.run",),
    ("fmnist_jax.evaluation",),
    ("fmnist_jax.baseline",),
    ("fmnist_jax.cli_flags", "fmnist_jax.cli_resume", "fmnist_jax.cli"),
]
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_layout.py"
    return best[0]


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(p, known) - {m} for m, p in known.items()}


def test_no_layer_imports_one_above_it():
    upward = [f"{m} imports {dep}" for m, deps in _graph().items() for dep in deps
              if _layer(dep) > _layer(m)]
    assert not upward


def test_no_import_circle():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(m, path):
        state[m] = "open"
        for dep in graph[m]:
            if dep == m.rsplit(".", 1)[0] or m == dep.rsplit(".", 1)[0]:
                continue  # a package and its own modules (__init__ re-exports)
            if state.get(dep) == "open":
                pytest.fail("import circle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_every_module_is_used_by_the_package():
    """A module that only tests or benchmarks import belongs in benchmarks/, not here."""
    graph = _graph()
    imported = set().union(*graph.values())
    entry_points = {"fmnist_jax", "fmnist_jax.cli"}
    unused = sorted(m for m in graph if m not in imported and m not in entry_points)
    assert not unused


def test_no_module_is_long():
    long = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert {m: n for m, n in long.items() if n > MAX_LINES} == {}
