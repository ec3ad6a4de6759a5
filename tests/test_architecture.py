"""The package's shape (issue #17): one concept per module, small modules, no import cycles.

Every ``import`` / ``from ... import`` of a ``prime_ckpt`` module counts, function-local ones
included (a cycle hidden in a function is still a cycle), except under ``if TYPE_CHECKING:``.
Run ``python tests/test_architecture.py`` to print the graph's cycles and the module sizes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prime_ckpt"
MAX_LINES = 400  # issue #17: no module over ~400 lines


def module_name(path: Path) -> str:
    """``prime_ckpt/cli/render.py`` -> ``prime_ckpt.cli.render`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (run-time imports only)."""
    name = module_name(path)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("prime_ckpt"):
                        found.add(resolve(alias.name))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.startswith("prime_ckpt"):
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        found.add(sub if sub in modules else resolve(base))
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(None)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def module_sizes() -> dict[str, int]:
    return {module_name(p): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_cycle():
    graph = import_graph()
    assert "prime_ckpt.errors" in graph  # the walk found the package
    assert cycles(graph) == []


def test_every_module_is_small():
    big = {m: n for m, n in module_sizes().items() if n > MAX_LINES}
    assert big == {}


def test_every_error_is_a_prime_ckpt_error():
    """Issue #17: one error base. Every public exception class the package defines subclasses
    ``PrimeCkptError`` (an ``Exception``, so ``except Exception`` catches it)."""
    import importlib
    import inspect

    from prime_ckpt.errors import PrimeCkptError

    strays = []
    for module in sorted(import_graph()):
        mod = importlib.import_module(module)
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module
                    and not name.startswith("_") and not issubclass(obj, PrimeCkptError)):
                strays.append(f"{module}.{name}")
    assert issubclass(PrimeCkptError, Exception)
    assert strays == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


if __name__ == "__main__":
    g = import_graph()
    for comp in cycles(g):
        print("cycle:", " ".join(comp))
        for m in comp:
            print("   ", m, "->", " ".join(sorted(g[m] & set(comp))))
    for m, n in sorted(module_sizes().items(), key=lambda kv: -kv[1]):
        if n > MAX_LINES:
            print(f"{n:5d} {m}")
