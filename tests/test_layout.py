"""The package's shape: imports flow one way, modules stay small, nobody imports
another module's private names, and the client imports without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

PACKAGE = Path(__file__).resolve().parents[1] / "streamgemma"
MAX_LINES = 520


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("streamgemma",) + parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[tuple[str, str]]:
    """(module imported, names imported from it) for every import in the file,
    in functions too; relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {(a.name, "") for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add((full, "") if full in known else (base, alias.name))
    return {(m, n) for m, n in out if m.startswith("streamgemma")}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: {m for m, _ in imports_of(name, path, known) if m in known and m != name}
            for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    assert find_cycle(graph()) is None


def test_subpackages_import_one_way():
    def unit(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2])

    edges: dict[str, set[str]] = {}
    for source, targets in graph().items():
        if source == "streamgemma":  # the lazy facade names everything
            continue
        edges.setdefault(unit(source), set()).update(unit(t) for t in targets if unit(t) != unit(source))
    assert find_cycle(edges) is None, edges


def test_no_module_is_much_over_500_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_private_name_is_imported_from_another_module():
    found = modules()
    known = set(found)
    private = sorted(f"{name} imports {m}.{n}" for name, path in found.items()
                     for m, n in imports_of(name, path, known) if n.startswith("_") and n != "__version__")
    assert private == []


@pytest.mark.parametrize("module", ["streamgemma", "streamgemma.client", "streamgemma.types"])
def test_the_client_side_imports_without_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr or f"importing {module} imported torch"


def test_no_object_reaches_into_another_objects_private_members():
    """`x._name` only on self or cls (a module's own helpers are called by bare name)."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{name}:{node.lineno} .{node.attr}")
    assert found == []
