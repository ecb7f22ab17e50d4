"""docs/architecture.md stays true: every module is in its map, small, and imports only lower levels."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 300


def levels() -> dict[str, int]:
    """Module → level, from the table in docs/architecture.md (``cli/main.py`` as ``cli.main``)."""
    rows = re.findall(r"^\| (\d+) \| `([\w/.]+)` \|", (ROOT / "docs" / "architecture.md").read_text(), re.M)
    return {name.removesuffix(".py").replace("/", "."): int(level) for level, name in rows}


def imports(path: Path) -> set[str]:
    """The gradindex modules a file imports at run time (type-checking-only imports excluded)."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if module.startswith("cli."):
            found.add(module)
        elif node.level == 1 or module.startswith("gradindex"):
            module = module.removeprefix("gradindex").lstrip(".")
            found |= {a.name for a in node.names} if not module else {module.split(".")[0]}
    return found - {"__version__"}


def test_every_module_is_mapped_small_and_imports_only_lower_levels():
    table = levels()
    files = {p.stem: p for p in (ROOT / "gradindex").glob("*.py") if p.stem != "__init__"} | {f"cli.{p.stem}": p for p in (ROOT / "cli").glob("*.py") if p.stem != "__init__"}
    assert sorted(table) == sorted(files), "docs/architecture.md and the modules disagree"
    for name, path in files.items():
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"{name} is over {MAX_LINES} lines"
        for target in imports(path):
            if target in table:
                assert table[target] < table[name], f"{name} (level {table[name]}) imports {target} (level {table[target]})"
