"""Dependencies point one way, dsvl2 (CLI and API, in dsvl2_cli/) → dsvl2.pipelines → dsvl2.model, checked by
walking every import (ast); and nothing imports the folders by their own names (they install only under `dsvl2`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# The import name of each folder, and what it must never import.
PACKAGES = {"model": "dsvl2.model", "pipelines": "dsvl2.pipelines", "dsvl2_cli": "dsvl2"}
TERMINAL = {"typer", "rich", "fitz", "pymupdf", "click"}
FORBIDDEN = {
    "model": {*TERMINAL, "dsvl2.pipelines", *(f"dsvl2.{m.stem}" for m in (ROOT / "dsvl2_cli").glob("*.py"))},
    "pipelines": {*TERMINAL, *(f"dsvl2.{m.stem}" for m in (ROOT / "dsvl2_cli").glob("*.py"))},
}
# Names that exist only as folders of the repository, never as installed packages.
FOLDER_NAMES = {"model", "pipelines", "dsvl2_cli"}
# The CLI may import these parts of the runtime when its modules load; the rest only inside functions.
CLI_EAGER_MODEL_IMPORTS = {"dsvl2.model.requests", "dsvl2.model.errors", "dsvl2.model.hub", "dsvl2.model.devices"}


def imports(path: Path, *, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in a file; with top_level_only, not those inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            counted = not (top_level_only and in_function)
            if isinstance(child, ast.Import) and counted:
                found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 and counted:
                found.append((child.lineno, child.module))
            visit(child, inside)

    visit(tree, False)
    return found


def _type_checking_lines(path: Path) -> set[int]:
    """Lines under `if TYPE_CHECKING:` (annotations only, never executed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_walker_sees_nested_and_from_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import a.b\nfrom c import d\ndef f():\n    import e\n    from g.h import i\n")
    assert [m for _, m in imports(probe)] == ["a.b", "c", "e", "g.h"]
    assert [m for _, m in imports(probe, top_level_only=True)] == ["a.b", "c"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_layers_or_terminal_libraries(package):
    assert files(package), f"no Python files found under {package}/"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files(package)
        for line, module in imports(path)
        if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert bad == [], "\n".join(bad)


def test_nothing_imports_a_folder_by_its_own_name():
    """`import model` would work only from the repository root (and picks up a user's own `model`)."""
    folders = [*FOLDER_NAMES, "tests", "bench", "samples"]
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for folder in folders
        for path in files(folder)
        for line, module in imports(path)
        if module.split(".")[0] in FOLDER_NAMES
    ]
    assert bad == [], "\n".join(bad)


def test_cli_loads_only_the_runtime_seam_at_import_time():
    bad = []
    for path in files("dsvl2_cli"):
        hidden = _type_checking_lines(path)
        for line, module in imports(path, top_level_only=True):
            if module.startswith("dsvl2.model") and module not in CLI_EAGER_MODEL_IMPORTS and line not in hidden:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} at import time")
    assert bad == [], "\n".join(bad)


def test_importing_the_cli_loads_neither_torch_nor_pymupdf():
    """`dsvl2 --help` must stay fast: the heavy libraries load when a model or a PDF is first needed."""
    code = "import sys, dsvl2, dsvl2.app; print(sorted(m for m in ('torch', 'pymupdf', 'fitz') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
