"""The import structure: libraries down, runners up (issue 20).

Every ``import`` of every project module is parsed, including those inside functions, and
``importlib.import_module("<project module>")`` calls with a constant name. Layers, each importing only from its
own layer or the ones before it:

    base       sde_lib, utils, analytic, torch_io, safe_pickle, configs/...
    library    losses, samplers, likelihood, controllable_generation, evaluation/..., datasets, models/...
    composition  experiment
    runners    run_lib, convert
    entry      main

Modules not listed count as library modules. Scripts (tests/, benchmarks/, tools/, examples/) may import
anything and are not checked.
"""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("tests", "benchmarks", "tools", "examples", "docs")
LAYERS = {"base": 0, "library": 1, "composition": 2, "runners": 3, "entry": 4}
LAYER_OF = {"sde_lib": "base", "utils": "base", "analytic": "base", "torch_io": "base", "safe_pickle": "base",
            "configs": "base", "experiment": "composition", "run_lib": "runners", "convert": "runners",
            "main": "entry"}


def project_modules() -> dict:
    """Dotted module name -> path, for every project .py outside the script folders."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SCRIPT_DIRS or any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts)
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def layer(module: str) -> str:
    return LAYER_OF.get(module.split(".")[0], "library")


def _resolve(name: str, modules: dict) -> str:
    """The longest project module that ``name`` (a dotted import target) names or lies in."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return ""


def _package(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _targets(node, module: str, path: pathlib.Path, modules: dict) -> list:
    """Project modules imported by one AST node."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = _package(module, path).split(".") if _package(module, path) else []
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        names = [node.args[0].value]
    return [t for t in (_resolve(n, modules) for n in names) if t and t != module]


def imports(modules: dict) -> dict:
    """module -> list of (target, line, inside_function)."""
    out = {}
    for module, path in modules.items():
        found = []

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                found.extend((t, child.lineno, in_function) for t in _targets(child, module, path, modules))
                visit(child, inner)

        visit(ast.parse(path.read_text(), str(path)), False)
        out[module] = found
    return out


def find_cycle(graph: dict) -> list:
    """One cycle of ``graph`` (module -> set of modules) as a list of modules, or []."""
    state, stack = {}, []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = dfs(n)
                if cycle:
                    return cycle
        state[m] = 2
        stack.pop()
        return []

    for m in sorted(graph):
        if m not in state:
            cycle = dfs(m)
            if cycle:
                return cycle
    return []


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return modules, imports(modules)


def test_checker_sees_function_local_and_by_name_imports(tmp_path):
    """The parser itself: a function-local import, a relative import and import_module("x") are all found."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from . import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    import c\n")
    (tmp_path / "c.py").write_text("import importlib\nimportlib.import_module('pkg.a')\n")
    mods = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.a": tmp_path / "pkg" / "a.py",
            "pkg.b": tmp_path / "pkg" / "b.py", "c": tmp_path / "c.py"}
    found = imports(mods)
    assert found["pkg.a"] == [("pkg.b", 1, False)]
    assert found["pkg.b"] == [("c", 2, True)]
    assert found["c"] == [("pkg.a", 2, False)]
    assert find_cycle({m: {t for t, _, _ in v} for m, v in found.items()}) == ["c", "pkg.a", "pkg.b", "c"]


def test_no_import_cycles(graph):
    modules, found = graph
    cycle = find_cycle({m: {t for t, _, _ in v} for m, v in found.items()})
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downwards(graph):
    modules, found = graph
    bad = [f"{m} ({layer(m)}) imports {t} ({layer(t)}) at {modules[m].relative_to(ROOT)}:{line}"
           for m, v in found.items() for t, line, _ in v if LAYERS[layer(t)] > LAYERS[layer(m)]]
    assert not bad, "\n".join(bad)


def test_no_function_local_project_imports_in_libraries(graph):
    modules, found = graph
    bad = [f"{modules[m].relative_to(ROOT)}:{line} imports {t} inside a function"
           for m, v in found.items() if LAYERS[layer(m)] <= LAYERS["library"] for t, line, local in v if local]
    assert not bad, "\n".join(bad)


def test_the_device_mesh_is_built_in_one_place():
    """One ``Mesh(...)`` construction outside tests (``jax.make_mesh`` counts too)."""
    sites = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "tests" or any(p.startswith(".") for p in rel.parts):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bMesh\(|\bjax\.make_mesh\(", code):
                sites.append(f"{rel}:{i}")
    assert len(sites) == 1, f"Mesh built in {len(sites)} places: {sites}"
