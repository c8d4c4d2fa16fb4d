"""The package's layout is its architecture (docs/design.md, "Where things go"):

* the library (``sparsejax`` outside ``sparsejax.harness``) never imports the harness,
  deferred imports inside functions included;
* the import graph of the package (library and harness) has no cycle, deferred imports
  included; an import of a package's ``__init__`` counts as an import of the modules it
  re-exports;
* ``import sparsejax`` imports neither the NNX or linen integration nor the harness, nor
  ``flax.nnx``.
"""

import ast
import subprocess
import sys
from pathlib import Path

import sparsejax

ROOT = Path(sparsejax.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every sparsejax module ``name`` imports, at the top or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name and target != "sparsejax":
                found.add(target)
    return found


def _is_harness(name: str) -> bool:
    return name == "sparsejax.harness" or name.startswith("sparsejax.harness.")


def test_the_library_never_imports_the_harness():
    offenders = {name: sorted(filter(_is_harness, _imports(name)))
                 for name in MODULES if not _is_harness(name)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_graph_has_no_cycle():
    library = [name for name in MODULES if name != "sparsejax"]
    # A package's __init__ only re-exports: importing it imports its modules, and a module
    # of the package reaching its own __init__ is not a cycle of concepts.
    edges = {}
    for name in library:
        targets = set()
        for target in _imports(name):
            if MODULES[target].name == "__init__.py" and name.startswith(target + "."):
                continue
            targets.add(target)
        edges[name] = targets
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in sorted(library):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_import_sparsejax_imports_no_integration_or_harness():
    code = ("import sys, sparsejax; print(sorted(m for m in sys.modules if m.startswith("
            "('sparsejax.harness', 'sparsejax.integrations.nnx', 'sparsejax.integrations.linen',"
            " 'sparsejax.nnx', 'sparsejax.linen', 'flax.nnx'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert sparsejax.nnx.sparsify is sparsejax.integrations.nnx.sparsify  # on first use
