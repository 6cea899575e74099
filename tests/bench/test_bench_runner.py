"""The scoreboard runner: SCORE lines parsed and tabled, a benchmark that crashes, runs out
of time, emits nothing or leaves a process running is a row "not measured" and fails the
run, and nothing it started survives it."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from presenced.testing.scoreboard import Score, emit, parse, table, verdict
from tests.bench.runner_support import load_runner

run = load_runner()

SCORE_LINE = textwrap.dedent("""
    from presenced.testing.scoreboard import Score, emit
    emit(Score(key="fake.{name}", measure="fake {name}", target="< 1", measured="{figure}",
               reference="-", ratio="-", verdict="{verdict}"))
""")


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def bench(path: Path | str, budget: float = 30.0, keys: tuple[str, ...] = ("fake.",)) -> Any:
    return run.Benchmark(Path(path).stem, str(path), budget, keys, smoke_budget=budget)


def scoring(name: str, figure: str = "0.5", verdict: str = "PASS") -> str:
    return SCORE_LINE.format(name=name, figure=figure, verdict=verdict)


def test_parse_reads_the_score_lines_among_others(capsys: pytest.CaptureFixture[str]) -> None:
    score = Score("k.a", "a thing", "< 1", "0.5", "-", "-", verdict(True))
    print("progress")
    emit(score)
    lines = capsys.readouterr().out.splitlines()
    assert parse(lines) == [score]
    assert "| a thing | < 1    | 0.5      | -         | -     | PASS    |" in table([score])


def test_every_benchmark_measured_is_exit_0_misses_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(run, "BENCHMARKS", (
        bench(script(tmp_path, "one", scoring("one"))),
        bench(script(tmp_path, "two", "print('working')\n" + scoring("two", "7", "MISS"))),
    ))
    assert run.main(["--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "one | working" not in out and "two | working" in out  # streamed, named
    assert "| fake one " in out and "| MISS " in out
    assert "Total:" in out and "CPU:" in out
    results = json.loads((tmp_path / "out.json").read_text())
    assert [r["measured"] for r in results] == [True, True]


def test_a_crash_no_score_or_a_missing_script_is_not_measured_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(run, "BENCHMARKS", (
        bench(script(tmp_path, "fine", scoring("fine"))),
        bench(script(tmp_path, "crash", "raise SystemExit(3)\n")),
        bench(script(tmp_path, "silent", "print('no score')\n")),
        bench(script(tmp_path, "partial", scoring("partial")), keys=("fake.partial", "x.y")),
        bench(tmp_path / "absent.py"),
    ))
    markdown = tmp_path / "board.md"
    assert run.main(["--markdown", str(markdown)]) == 1
    out = capsys.readouterr().out
    assert "not measured: exited with status 3" in out
    assert "not measured: exited 0 without a SCORE line" in out
    assert "not measured: no SCORE line for x.y" in out
    assert "not measured: no such benchmark yet" in out
    assert out.count("NOT MEASURED |") == 4
    text = markdown.read_text()
    assert text.startswith("## Scoreboard") and "| fake fine " in text and "CPU:" in text


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_benchmark_out_of_time_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    path = script(tmp_path, "slow", f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(60)
    """)
    result = run.run_benchmark(bench(path, budget=2.0), smoke=True, out=sys.stderr)
    assert result.timed_out and not result.measured
    assert "out of its time budget" in result.problem()
    assert not alive(int(pidfile.read_text()))
    assert run.group_members(result.pgid) == []


def test_a_benchmark_leaving_a_process_running_is_not_measured(tmp_path: Path) -> None:
    path = script(tmp_path, "leaky", textwrap.dedent("""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    """) + scoring("leaky"))
    result = run.run_benchmark(bench(path), smoke=True, out=sys.stderr)
    assert result.returncode == 0 and result.scores
    assert len(result.left) == 1 and "time.sleep(60)" in result.left[0]
    assert result.problem() == "left 1 process(es) running"
    assert run.group_members(result.pgid) == []  # and the runner stopped it


def test_the_full_scoreboard_fits_in_15_minutes() -> None:
    """Each budget is a cap (SIGTERM past it), so their sum bounds make bench."""
    assert sum(b.budget for b in run.BENCHMARKS) <= 15 * 60
    assert [b.name for b in run.BENCHMARKS][:7] == [
        "engine", "startup", "latency", "broker", "storm", "idle", "emulator"]
