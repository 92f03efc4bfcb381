"""The house's layer order, checked on every module's imports (parsed, never executed).

Layers, lowest first: the root-level modules (``errors``, ``files``, ``filelock``, ``heap``,
``requests``, …) < ``solvers`` < ``model`` < ``locate`` < ``editors`` < ``session`` < ``eval`` <
``bench``, ``serve``. A module may import its own package and any lower layer; ``bench`` and
``serve`` share a layer and do not import each other. ``eval`` sits below ``bench`` and ``serve``
because both score models with it, and it must not reach back up to them.

Every import counts, also one inside a function: a lazy import still makes the lower layer
depend on the higher one. CLI modules (``*/cli.py``, ``*_cli.py``, ``rlsedit/cli.py``, and the
``python -m rlsedit`` entry ``__main__.py``) and the package's public face ``rlsedit/__init__.py``
(which re-exports editors, sessions and models) may import any layer. ``from rlsedit import
__version__`` is allowed everywhere: the package root is imported before any of its modules.

Modules also form no import cycles (package ``__init__`` files aside: their names are re-exports),
so that, e.g., ``bench/plots.py`` gets its data passed in rather than importing the benchmark.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rlsedit

ROOT = Path(rlsedit.__file__).resolve().parent
BOTTOM = "(root modules)"
RANK = {BOTTOM: 0, "solvers": 1, "model": 2, "locate": 3, "editors": 4, "session": 5, "eval": 6, "bench": 7,
        "serve": 7}
ANY_LAYER = "(cli)"
# (importing module, imported module) pairs that break the order but cannot be fixed safely yet;
# each with the reason. Empty: there are none.
ALLOWED: dict[tuple[str, str], str] = {}
# import cycles between modules that cannot be broken safely yet, with the reason. Empty: none.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str, *, file: str = "") -> str:
    """The layer of ``rlsedit.…`` module ``module``; ``file`` (the module's path relative to the
    package, when known) marks CLI modules, which may import any layer."""
    name = file.rsplit("/", 1)[-1]
    if file in ("cli.py", "__main__.py", "__init__.py") or name == "cli.py" or name.endswith("_cli.py"):
        return ANY_LAYER
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__version__":
        return BOTTOM  # the package root itself
    if parts[1] in RANK:
        return parts[1]
    return BOTTOM  # a root-level module (errors, files, filelock, heap, requests, …)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(rlsedit.… module, line)`` for every import statement in ``source``, relative ones resolved."""
    package = module if is_package else module.rsplit(".", 1)[0]
    tree = ast.parse(source)
    # imports under `if TYPE_CHECKING:` never run: annotations only, no layer or cycle
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from . import x`: x may be a module, so each name counts; `from .m import x`: module m
            targets = [prefix] if node.module else [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        out += [(t, node.lineno) for t in targets if t == "rlsedit" or t.startswith("rlsedit.")]
    return out


def violations(path: Path, source: str, root: Path = ROOT) -> list[str]:
    module = module_name(path, root)
    relative = path.relative_to(root).as_posix()
    layer = layer_of(module, file=relative)
    if layer == ANY_LAYER:
        return []
    found = []
    for target, line in imported_modules(source, module, path.name == "__init__.py"):
        target_layer = layer_of(target)
        same_package = target_layer == layer
        if same_package or RANK[target_layer] < RANK[layer] or (module, target) in ALLOWED:
            continue
        found.append(f"{relative}:{line}: {module} ({layer}) imports {target} ({target_layer})")
    return found


def test_every_import_points_down_the_layers():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} modules under {ROOT}"
    packages = {p.relative_to(ROOT).parts[0] for p in files if len(p.relative_to(ROOT).parts) > 1}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}; add them to RANK"
    found = [v for path in files for v in violations(path, path.read_text(encoding="utf-8"))]
    assert not found, "imports against the layer order:\n" + "\n".join(found)


def test_the_allow_list_names_only_imports_that_exist():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    for (module, target), reason in ALLOWED.items():
        assert reason, f"{module} -> {target} needs a reason"
        path = files[module]
        targets = [t for t, _ in imported_modules(path.read_text(encoding="utf-8"), module,
                                                  path.name == "__init__.py")]
        assert target in targets, f"{module} no longer imports {target}; drop it from ALLOWED"


def test_the_check_catches_upward_lazy_and_sibling_imports():
    fake = ROOT / "locate" / "example.py"
    lazy_up = "def f():\n    from ..session.store import is_state_dir\n"
    assert violations(fake, lazy_up) == [
        "locate/example.py:2: rlsedit.locate.example (locate) imports rlsedit.session.store (session)"]
    assert violations(ROOT / "eval" / "example.py", "from ..bench.methods import run_method_bench\n")
    assert violations(ROOT / "bench" / "example.py", "import rlsedit.serve.app\n")  # siblings
    assert violations(ROOT / "errors2.py", "from .editors import RLSEdit\n")  # a root module is the bottom
    assert violations(ROOT / "solvers" / "example.py", "from .. import model\n")
    # downward, same package, the version, and CLI modules pass
    assert not violations(ROOT / "bench" / "example.py", "from ..eval.runner import run_eval\nfrom . import sweep\n")
    assert not violations(ROOT / "locate" / "example.py", "from .. import __version__\nfrom ..errors import X\n")
    assert not violations(ROOT / "session" / "cli.py", "from ..eval.generation import GenerationConfig\n")
    assert not violations(ROOT / "locate" / "stats_cli.py", "from ..session.session import Session\n")


def import_cycles(sources: dict[str, tuple[str, bool]]) -> list[frozenset[str]]:
    """Strongly connected groups of more than one module in the import graph of ``sources``
    (module -> (source, is package)); imports of a package's ``__init__`` are left out."""
    packages = {m for m, (_, is_package) in sources.items() if is_package}

    def resolve(target: str) -> str:  # `from .m import name` -> module m
        while target and target not in sources:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        return target

    graph = {m: {resolve(t) for t, _ in imported_modules(src, m, False)} - packages - {m, ""}
             for m, (src, is_package) in sources.items() if not is_package}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while not group or v not in group:
                group.add(stack.pop())
            if len(group) > 1:
                cycles.append(frozenset(group))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles_between_modules():
    sources = {module_name(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py") for p in ROOT.rglob("*.py")}
    cycles = import_cycles(sources)
    unexpected = [sorted(c) for c in cycles if c not in ALLOWED_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in cycles]
    assert not stale, f"no longer cycles, drop them from ALLOWED_CYCLES: {stale}"


def test_the_cycle_check_finds_a_lazy_cycle():
    sources = {"rlsedit.bench": ("", True),
               "rlsedit.bench.a": ("from .b import plot\n", False),
               "rlsedit.bench.b": ("def plot():\n    from .a import name\n", False),
               "rlsedit.bench.c": ("from . import a\nfrom .a import x\n", False)}
    assert import_cycles(sources) == [frozenset({"rlsedit.bench.a", "rlsedit.bench.b"})]


def test_imports_for_type_checkers_only_are_not_counted():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .base import Editor\n"
              "from .record import EditRecord\n")
    found = [name for name, _ in imported_modules(source, "rlsedit.editors.pretrained", False)]
    assert found == ["rlsedit.editors.record"]
