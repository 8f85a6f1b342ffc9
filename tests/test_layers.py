"""Imports go downward only, and no two modules import each other (directly or around a loop).

Every ``.py`` under ``vdopt/``, ``passes/``, ``kernels/`` and ``models/`` is parsed with ``ast``
(nothing is imported), mapped to its installed name (``passes/x.py`` -> ``vdopt.passes.x``),
and every import it makes is collected, those inside functions (lazy imports) included.
Exempt: imports under ``if TYPE_CHECKING:`` (annotations only), and a package's PEP 562
``__getattr__`` re-exporting a public name from above (``vdopt.kernels.attention``): it
runs when a user reads the name, never when the package or its modules are imported.

The layers, bottom to top (a module may import its own layer and those below):

  base       vdopt._bare_import, vdopt.progress (no vdopt imports at all)
  kernels    vdopt.kernels: Triton kernels, launchers, references
  ops        vdopt.ops, vdopt.attention, vdopt.meta, vdopt.config, vdopt.mesh,
             vdopt.collectives, vdopt.ring_attention
  graph      vdopt.passes.graph_utils, vdopt.passes.dims, vdopt.capture, vdopt.guards, vdopt.compile
  analysis   vdopt.passes.analysis
  passes     the rest of vdopt.passes
  runtime    vdopt.runtime (the executable and its report; local_ranks, the local launcher)
  artifacts  vdopt.artifacts
  planning   vdopt.planning: the automatic parallel planner (uses runtime and passes)
  api        vdopt (the package itself), vdopt.api, vdopt.cli, vdopt.__main__, vdopt.pipelines, vdopt.vae

``vdopt.models`` sits beside them, above ops: it may import base, kernels and ops, and only
the api layer may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"vdopt": "vdopt", "passes": "vdopt.passes", "kernels": "vdopt.kernels", "models": "vdopt.models"}

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("vdopt._bare_import", "vdopt.progress")),
    ("kernels", ("vdopt.kernels",)),
    ("ops", ("vdopt.ops", "vdopt.attention", "vdopt.meta", "vdopt.config", "vdopt.mesh", "vdopt.collectives",
             "vdopt.ring_attention")),
    ("graph", ("vdopt.passes.graph_utils", "vdopt.passes.dims", "vdopt.capture", "vdopt.guards", "vdopt.compile")),
    ("analysis", ("vdopt.passes.analysis",)),
    ("passes", ("vdopt.passes",)),
    ("runtime", ("vdopt.runtime",)),
    ("artifacts", ("vdopt.artifacts",)),
    ("planning", ("vdopt.planning",)),
    ("api", ("vdopt.api", "vdopt.cli", "vdopt.__main__", "vdopt.pipelines", "vdopt.vae")),
)
TOP = "vdopt"
"""The package itself (``vdopt/__init__.py``): api layer, matched exactly (not as a prefix)."""
MODELS = "vdopt.models"
MODELS_MAY_IMPORT = {"base", "kernels", "ops"}
MODELS_IMPORTED_BY = {"api"}


def module_files() -> dict[str, Path]:
    """Installed module name -> file."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def layer_of(module: str) -> str:
    if module == TOP:
        return "api"
    if module == MODELS or module.startswith(MODELS + "."):
        return "models"
    best = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (name, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, known: set[str]) -> str | None:
    """The vdopt module ``name`` refers to (its longest known prefix), or None outside vdopt."""
    for folder, package in FOLDERS.items():
        if folder != "vdopt" and (name == folder or name.startswith(folder + ".")):
            name = package + name[len(folder):]  # a bare folder import (never expected)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import ``module`` makes, except the exempt ones."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, top_level)
            return
        if is_package and top_level and isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return  # PEP 562 lazy re-export of a public name
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, known)
                if target:
                    found.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                target = _resolve(f"{source}.{alias.name}", known)
                if target:
                    found.append((target, node.lineno))
        nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for child in ast.iter_child_nodes(node):
            visit(child, top_level and not nested)

    for child in tree.body:
        visit(child, True)
    return sorted({(t, line) for t, line in found if t != module})


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    files = module_files()
    known = set(files)
    return files, {m: imports_of(m, p, known) for m, p in files.items()}


def allowed(source: str, target: str) -> bool:
    src, dst = layer_of(source), layer_of(target)
    order = [name for name, _ in LAYERS]
    if src == "models":
        return dst in MODELS_MAY_IMPORT or dst == "models"
    if dst == "models":
        return src in MODELS_IMPORTED_BY
    return order.index(dst) <= order.index(src)


def cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                target = child[0]
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(edges.get(target, []))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _where(files: dict[str, Path], module: str, line: int) -> str:
    return f"{files[module].relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_imports_go_downward_only():
    files, edges = import_graph()
    upward = [
        f"{_where(files, source, line)}: {source} ({layer_of(source)}) imports {target} ({layer_of(target)})"
        for source, targets in edges.items()
        for target, line in targets
        if not allowed(source, target)
    ]
    assert not upward, "upward imports:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    files, edges = import_graph()
    report = []
    for component in cycles(edges):
        members = set(component)
        report.append(" <-> ".join(component))
        report.extend(
            f"    {_where(files, source, line)}: {source} imports {target}"
            for source in component for target, line in edges[source] if target in members
        )
    assert not report, "import cycles:\n  " + "\n  ".join(report)


def test_the_checker_sees_lazy_and_type_checking_imports():
    """The rules above are only as good as the import collection: check it on known cases."""
    files, edges = import_graph()
    targets = {m: {t for t, _ in found} for m, found in edges.items()}
    # a function-level import is collected
    assert "vdopt.ops" in targets["vdopt.passes.pipefusion.stage_split"]
    # TYPE_CHECKING-only imports are not (vdopt.runtime.report annotates with the runtime's Plan)
    assert "vdopt.runtime.plan" not in targets["vdopt.runtime.report"]
    # ``from vdopt import meta`` is an import of the module vdopt.meta, not of the package
    assert "vdopt.meta" in targets["vdopt.collectives"] and "vdopt" not in targets["vdopt.collectives"]
    # the lazy re-export is exempt, the package imports nothing above the kernels
    assert not {t for t in targets["vdopt.kernels"] if layer_of(t) != "kernels" and layer_of(t) != "base"}
    assert allowed("vdopt.api", "vdopt.models") and not allowed("vdopt.passes.order", "vdopt.models")
    assert not allowed("vdopt.models.zoo", "vdopt.passes.graph_utils")
