"""The runtime's structure: no import cycles, and no import of the package's own ``__init__`` names."""

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "src"
RUNTIME = "fedckpt.runtime"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The fedckpt modules ``path`` imports, at the top or in a function: ``from pkg import name``
    runs ``pkg/__init__`` and, where ``name`` is a module, that module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedckpt"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names} & modules
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fedckpt")}
    parents = {name.rsplit(".", depth)[0] for name in found for depth in range(1, name.count(".") + 1)}
    return (found | parents) & modules


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in (SOURCE / "fedckpt").rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def cycles_within(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """Strongly connected components of more than one module among the modules under ``prefix``."""
    nodes = {name for name in graph if name.startswith(prefix)}
    edges = {name: graph[name] & nodes for name in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return found


def test_the_runtime_has_no_import_cycles():
    assert cycles_within(import_graph(), RUNTIME) == []


def test_the_checker_finds_a_cycle():
    graph = {"fedckpt.runtime.a": {"fedckpt.runtime.b"}, "fedckpt.runtime.b": {"fedckpt.runtime.a"}}
    assert cycles_within(graph, RUNTIME) == [["fedckpt.runtime.a", "fedckpt.runtime.b"]]


def test_the_runtime_never_takes_names_from_the_package_init():
    """``from fedckpt import __version__`` would tie the runtime to the package's ``__init__`` (which
    imports the runtime); its modules (``from fedckpt import _compat``) are fine."""
    modules = {name.rsplit(".", 1)[-1] for name in import_graph() if name.count(".") == 1}
    offenders = []
    for path in (SOURCE / "fedckpt" / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fedckpt":
                offenders += [f"{path.relative_to(SOURCE)}:{node.lineno}: {a.name}" for a in node.names
                              if a.name not in modules]  # fmt: skip
    assert offenders == []
