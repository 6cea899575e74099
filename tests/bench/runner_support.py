"""The scoreboard runner (tests/bench/run.py) loaded by its path, for the tests beside it
(tests/bench is no package: its scripts run as files)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

RUN_PY = Path(__file__).resolve().parent / "run.py"


def load_runner() -> ModuleType:
    """tests/bench/run.py as a module (loaded once)."""
    name = "presenced_bench_run"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
