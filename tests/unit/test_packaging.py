"""The daemon never depends on the testing extra (the emulator and simulator).

Only the CLI's simulate/demo commands may load ``presenced.testing``, and only inside
those commands: importing any daemon module must not load it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "presenced"
TESTING_ONLY = ("presenced.testing", "mongomock_ng")


def _daemon_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "testing" in rel.parts or rel.name == "__main__":
            continue
        names.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return names


def _module_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_daemon_modules_exist_to_be_checked() -> None:
    assert {"presenced.presence", "presenced.cli"} <= set(_daemon_modules())


def test_no_daemon_module_imports_the_testing_extra_at_module_level() -> None:
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if "testing" in path.relative_to(PACKAGE).parts:
            continue
        bad = sorted(n for n in _module_level_imports(path) if n.startswith(TESTING_ONLY))
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = bad
    assert offenders == {}


def test_importing_every_daemon_module_loads_nothing_from_the_testing_extra() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {_daemon_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TESTING_ONLY!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"
