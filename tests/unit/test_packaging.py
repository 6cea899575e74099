"""The daemon never depends on the testing extra (the emulator and simulator)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "presenced"
TESTING_ONLY = ("presenced.testing", "mongomock_ng")


def _daemon_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_daemon_modules_exist_to_be_checked() -> None:
    assert PACKAGE / "presence.py" in _daemon_modules()


def test_no_daemon_module_imports_the_testing_extra() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            n for n in _imports(path) if n.startswith(TESTING_ONLY)
        )
        for path in _daemon_modules()
    }
    assert {k: v for k, v in offenders.items() if v} == {}
