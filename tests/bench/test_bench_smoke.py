"""A smoke run of every benchmark (``--smoke``: tiny sizes, no targets) in ``make test``,
so that none can rot: each must run to its end, emit its SCORE keys and leave no process
of its own running. Each runs through the scoreboard runner, in its own process group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench.runner_support import RUN_PY, load_runner

run = load_runner()
ROOT = RUN_PY.parents[2]


def cases() -> list[Any]:
    # Every benchmark of the scoreboard: one missing from the tree fails its case, never
    # silently drops out of the smoke run.
    return [pytest.param(bench, id=bench.name, marks=[pytest.mark.slow])
            for bench in run.BENCHMARKS]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("bench", cases())
def test_benchmark_smoke_run(bench: Any, tmp_path: Path) -> None:
    assert bench.path.exists(), f"{bench.script} is on the scoreboard but not in tests/bench"
    report = tmp_path / "results.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(RUN_PY), "--smoke", "--only", bench.name, "--json", str(report)],
        capture_output=True, text=True, timeout=bench.smoke_budget + 60, env=env, cwd=ROOT,
    )
    [result] = json.loads(report.read_text())
    output = done.stdout[-6000:] + done.stderr[-2000:]
    assert result["returncode"] == 0, output
    assert not result["timed_out"], output
    assert result["left"] == [], f"left running: {result['left']}\n{output}"
    assert run.group_members(result["pgid"]) == []
    assert result["scores"], f"no SCORE line\n{output}"
    assert result["missing_keys"] == [], output
    assert {s["verdict"] for s in result["scores"]} == {"SMOKE"}, output
    assert result["measured"] and done.returncode == 0, output
