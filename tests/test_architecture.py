"""Facts about the package's shape that anyone can check: imports run one way, modules stay
short, and measured evidence lives in docs/results.md, not in the code.

The layer order is DESIGN.md's stage order, with the records and utilities below the stages and
the API and CLI above them: a module may import only its own unit (a subpackage or module) and
the units before it. Imports under `if TYPE_CHECKING:` count for the layer rule (a type from a
later stage is a dependency too) but not for cycles (they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mpq_search"

LAYERS: tuple[str, ...] = (
    # records and utilities
    "errors", "_version", "_fieldtypes", "files", "runtime", "phases", "_urls", "choices",
    "bitmap", "budget", "config", "data", "images", "zoo",
    # stages, in DESIGN.md's order
    "layers", "trajectory", "sampling", "models", "fid", "training", "quant", "cost",
    "importance", "allocation", "evaluate", "deployment", "export_formats", "search", "report",
    "dashboard", "planning",
    # the API and its callers
    "api", "api_commands", "cli", "__main__",
)
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mpq_search"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Project imports of one module: (target module, line, runs at import time?, typing only?)."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module, self.is_package, self.known = module, is_package, known
        self.found: list[tuple[str, int, bool, bool]] = []
        self._depth = 0
        self._typing = 0

    def visit_If(self, node: ast.If) -> None:
        typing = _is_type_checking(node)
        self._typing += typing
        for child in node.body:
            self.visit(child)
        self._typing -= typing
        for child in node.orelse:
            self.visit(child)

    def _scoped(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _scoped

    def _add(self, target: str, line: int) -> None:
        if target in self.known and target != self.module:
            self.found.append((target, line, self._depth == 0, self._typing > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.split(".")
            if not self.is_package:
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.known else base, node.lineno)


def _imports() -> dict[str, list[tuple[str, int, bool, bool]]]:
    modules = _modules()
    known = set(modules)
    out = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        out[name] = visitor.found
    return out


def test_no_import_cycle() -> None:
    """No circle among the imports that run (the package's own `__init__` is the lazy public
    facade and imports nothing at run time)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, found in _imports().items():
        for target, _, _, typing in found:
            if not typing and "mpq_search" not in (module, target):
                graph[module].add(target)
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_imports_run_one_way() -> None:
    """A unit imports only itself and the units before it in LAYERS; nothing imports the
    package root (the facade) from inside."""
    upward = []
    for module, found in _imports().items():
        unit = _unit(module)
        if unit == "mpq_search":
            continue
        assert unit in LAYERS, f"{module}: add its unit to LAYERS"
        for target, line, _, _ in found:
            other = _unit(target)
            if other == "mpq_search" or (other != unit
                                          and LAYERS.index(other) > LAYERS.index(unit)):
                upward.append(f"{module}:{line} imports {target}")
    assert upward == []


def test_function_local_imports_say_why() -> None:
    """A project import inside a function is there to keep start-up fast: the CLI's commands
    import the API when they run; anywhere else the import line says why (`# lazy: ...`)."""
    unexplained = []
    for module, found in _imports().items():
        if _unit(module) in ("cli", "mpq_search"):
            continue
        lines = _modules()[module].read_text(encoding="utf-8").splitlines()
        for _, line, top_level, typing in found:
            if not top_level and not typing and "# lazy:" not in lines[line - 1]:
                unexplained.append(f"{module}:{line}: {lines[line - 1].strip()}")
    assert unexplained == []


def test_no_module_over_500_lines() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_no_measured_evidence_cited_in_the_package() -> None:
    """Measured numbers live on the results page; the code says what and why."""
    cites = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in PACKAGE.rglob("*")
             if p.suffix in (".py", ".md", ".toml")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if "RESULTS" in line]
    assert cites == []


@pytest.mark.parametrize("command", [["--help"], ["models"], ["run", "--help"]])
def test_light_commands_do_not_import_torch(command: list[str]) -> None:
    """`--help` and `models` start without torch (the heavy part of start-up time); the
    commands that compute import it when they run."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom mpq_search.cli import app\n"
            f"result = CliRunner().invoke(app, {command!r})\n"
            "assert result.exit_code == 0, result.output\n"
            "print(sorted(m for m in ('torch', 'optuna', 'diffusers', 'numpy') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
