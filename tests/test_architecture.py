"""The package's structure: layers that import only downwards, no cycles (the import-linter
contracts in .importlinter), and no imports of the package's own modules hidden inside functions."""

import ast
import pathlib
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    command = shutil.which("lint-imports")
    assert command is not None, "lint-imports is missing: pip install -r requirements.txt"
    done = subprocess.run([command, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _own_imports_inside_blocks(source: str, name: str) -> list[str]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                own = (isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or "").startswith("utils"))) \
                    or (isinstance(inner, ast.Import) and any(alias.name.split(".")[0] == "utils" for alias in inner.names))
                if own:
                    found.append(f"{name}:{inner.lineno}: {ast.unparse(inner)}")
    return found


def test_no_own_module_is_imported_inside_a_function():
    found = [line for path in sorted((ROOT / "utils").rglob("*.py"))
             for line in _own_imports_inside_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert found == []


def test_the_inner_import_check_finds_one():
    source = "import os\n\ndef f():\n    from .config import load_config\n    import numpy\n    import utils.data\n"
    assert _own_imports_inside_blocks(source, "x.py") == ["x.py:4: from .config import load_config", "x.py:6: import utils.data"]
