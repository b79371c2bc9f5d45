"""The package's shape: one-way imports, no private names across modules, a curated public API.

Parses every module of ``gifjax`` with ``ast`` (no import needed for the
graph), so a cycle or a cross-module private import fails here with the
modules named, before it bites at run time.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib

import numpy as np
import pytest

import gifjax

ROOT = pathlib.Path(gifjax.__file__).parent
END_TO_END = "gifjax.experiments"
ENTRY_POINTS = {"gifjax.demo"}  # `python -m gifjax.demo`, a shim into the experiments


def _module_name(path: pathlib.Path) -> str:
    parts = ("gifjax",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([target] if target else []))


def _imports(module: str):
    """(imported module, imported name or None, line) for every import inside ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gifjax"):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if not base.startswith("gifjax"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    yield sub, None, node.lineno           # a module
                else:
                    yield base, alias.name, node.lineno    # a name from a module


def _graph():
    return {m: {target for target, _, _ in _imports(m) if target in MODULES and target != m}
            for m in MODULES}


def _parent_packages(module: str):
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_imports_form_no_cycle():
    # Importing a submodule first runs its parent packages' __init__: those edges are
    # implicit, and a package's own __init__ importing its submodules is not a cycle.
    graph = {m: {t for t in ts if t not in _parent_packages(m)} for m, ts in _graph().items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_uses_another_modules_private_names():
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, name, line in _imports(module):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{module}:{line} imports {name} from {target}")
        # `alias._name` where `alias` is an imported gifjax module
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(module, path.name == "__init__.py", node.level, node.module)
                for a in node.names:
                    if f"{base}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_core_never_imports_the_end_to_end_pieces():
    bad = [f"{m} imports {t}" for m, ts in _graph().items()
           if not m.startswith(END_TO_END) and m not in ENTRY_POINTS
           for t in ts if t.startswith(END_TO_END)]
    assert not bad, "\n".join(bad)


PUBLIC = ["gifjax", "gifjax.estimators", "gifjax.operators", "gifjax.solvers", "gifjax.lowrank",
          "gifjax.masks", "gifjax.selection", "gifjax.spectrum", "gifjax.sweep", "gifjax.parallel",
          "gifjax.evaluation", "gifjax.curvature", "gifjax.group", "gifjax.preconditioners",
          "gifjax.stepping", "gifjax.diagnostics"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_modules_curate_their_names_and_document_them(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no module docstring"
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"
    undocumented = []
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.__all__ lists {attr!r}, which does not exist"
        obj = getattr(module, attr)
        if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj)) \
                and not inspect.getdoc(obj):
            undocumented.append(attr)
    assert not undocumented, f"{name}: no docstring for {undocumented}"


def test_every_module_is_reachable_and_public_ones_have_all():
    private = {m for m in MODULES if any(p.startswith("_") for p in m.split(".")[1:])}
    public = set(MODULES) - private - {END_TO_END} - {m for m in MODULES if m.startswith(END_TO_END + ".")}
    public -= ENTRY_POINTS
    assert public <= set(PUBLIC), f"public modules not checked by this file: {sorted(public - set(PUBLIC))}"


def test_influence_is_the_function_and_its_module_is_estimators():
    assert inspect.isfunction(gifjax.influence)
    assert gifjax.influence.__module__ == "gifjax.estimators"
    assert importlib.import_module("gifjax.estimators").influence is gifjax.influence


def _results():
    """Every public NamedTuple in the core: the result types (plus solver state)."""
    seen = {}
    for name in PUBLIC:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
                seen[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return sorted(seen.items())


def test_result_reprs_are_compact():
    """Shapes, dtypes and counts, never whole arrays: a result of a real model prints in a few lines."""
    big, flags = np.arange(200_000.0).reshape(400, 500), np.arange(64) % 4 != 0
    missing, long = [], []
    for qualname, cls in _results():
        if qualname == "gifjax.solvers.SolverState":   # holds the operator and solver, not arrays
            continue
        if not getattr(cls, "_compact_repr", False):
            missing.append(qualname)
            continue
        special = {"converged": flags, "failure": np.arange(64) % 8, "value": {"w": big, "b": big[0]},
                   "delta": {"w": big, "b": big[0]}}
        values = [special.get(f, big) for f in cls._fields]
        text = repr(cls(*values))
        if len(text) > 600 or "array(" in text.lower():
            long.append(f"{qualname}: {text[:200]}")
    assert not missing, f"result types without a compact repr: {missing}"
    assert not long, "\n".join(long)


def test_solution_repr_counts_converged_and_failures():
    from gifjax.solvers import FAILURES, Solution
    sol = Solution(value={"w": np.zeros((64, 1000), np.float32)}, num_steps=np.zeros(64, np.int32),
                   num_matvecs=np.zeros(64, np.int32), residual_norm=np.zeros(64, np.float32),
                   converged=np.arange(64) >= 4,
                   failure=np.where(np.arange(64) < 3, FAILURES.index("max_steps"),
                                    np.where(np.arange(64) == 3, FAILURES.index("indefinite"), 0)),
                   backward_error=np.zeros(64, np.float32))
    assert repr(sol) == ("Solution(value=<dict: 1 array, 64,000 f32>, num_steps=i32[64], num_matvecs=i32[64], "
                         "residual_norm=f32[64], converged=60/64, failure={max_steps: 3, indefinite: 1}, "
                         "backward_error=f32[64])")
