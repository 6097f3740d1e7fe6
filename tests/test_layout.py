"""The package's shape (docs/architecture.md): no import cycle, not even one for typing only, and no hub
that most modules import besides the settings and the errors."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "casimg"
FOUNDATIONS = {"casimg.config", "casimg.errors", "casimg"}  # meant to be imported everywhere


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every casimg module `path` imports, wherever the import stands (TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("casimg"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("casimg"):
            found.add(node.module)
            # `from casimg import handlers` imports the module casimg.handlers
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists())
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_imports_itself_through_others():
    edges = graph()
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*trail, name, target])
            if target not in state:
                visit(target, [*trail, name])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


def test_no_hub_but_the_settings_and_the_errors():
    edges = graph()
    modules = [name for name in edges if name != "casimg"]
    for target in modules:
        if target in FOUNDATIONS:
            continue
        importers = sorted(name for name in modules if target in edges[name])
        assert len(importers) <= len(modules) // 2, f"{target} is imported by {len(importers)}: {importers}"
