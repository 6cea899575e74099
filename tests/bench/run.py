"""The scoreboard: every benchmark of ``tests/bench/``, then one table (``make bench``).

Runs each benchmark of :data:`BENCHMARKS` (a fixed order; a script that does not exist
yet is a row "not measured") as a subprocess in its own process group, with a time
budget, its output streamed with its name in front; collects its ``SCORE`` lines
(:mod:`presenced.testing.scoreboard`) and prints them as one table, with the machine and
the total time. A benchmark that crashes, runs out of time, emits no ``SCORE`` line or
leaves a process of its group running is a row "not measured" with its exit status (what
it left is stopped: SIGTERM, then SIGKILL).

Exits 0 when every benchmark measured (MISS included), 1 when one could not.

Usage: .venv/bin/python tests/bench/run.py [--smoke] [--only NAME]... [--markdown FILE]
       [--json FILE] [--list]
``--smoke`` passes ``--smoke`` to each (tiny sizes, verdict SMOKE: proves they run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run as a script: the checkout's presenced, not another
    sys.path.insert(0, str(ROOT))

from presenced.testing.scoreboard import PREFIX, Score, parse, table  # noqa: E402

GRACE_S = 20.0
"""Seconds a benchmark has to stop what it started after its SIGTERM."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    """A file of tests/bench/."""
    budget: float
    """Seconds for a full run, then SIGTERM."""
    keys: tuple[str, ...]
    """The SCORE keys it must emit, or key prefixes ending with ``.``."""
    args: tuple[str, ...] = ()
    """Arguments of the full run (its sizes for ``make bench``)."""
    smoke_budget: float = 60.0

    @property
    def path(self) -> Path:
        return HERE / self.script


#: In the scoreboard's order; the budgets add up to make bench's 15 minutes at most.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("engine", "engine.py", 150, ("engine.",)),
    Benchmark("startup", "startup.py", 220, ("startup.",)),
    Benchmark("latency", "latency.py", 100, ("latency.",)),
    Benchmark("broker", "broker.py", 60, ("broker.",)),
    Benchmark("storm", "daemon.py", 60, ("storm.ops_per_event", "storm.converge_ratio")),
    Benchmark("idle", "idle.py", 160, ("idle.cpu_percent",)),
    Benchmark("emulator", "emulator.py", 110, ("emulator.",)),
    Benchmark("emulator-idle", "emulator_idle.py", 30, ("emulator.idle_cpu_percent",)),
)


@dataclass
class Result:
    name: str
    scores: list[Score] = field(default_factory=list)
    returncode: int | None = None
    """None when it never ran (no such script)."""
    seconds: float = 0.0
    timed_out: bool = False
    left: list[str] = field(default_factory=list)
    """Processes of its group still running once it had exited (then stopped)."""
    pgid: int | None = None
    missing_keys: list[str] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return (self.returncode == 0 and bool(self.scores) and not self.timed_out
                and not self.left and not self.missing_keys)

    def problem(self) -> str:
        if self.returncode is None:
            return "no such benchmark yet"
        if self.timed_out:
            return f"out of its time budget after {self.seconds:.0f} s"
        if self.returncode != 0:
            return f"exited with status {self.returncode}"
        if self.left:
            return f"left {len(self.left)} process(es) running"
        if not self.scores:
            return "exited 0 without a SCORE line"
        if self.missing_keys:
            return "no SCORE line for " + ", ".join(self.missing_keys)
        return ""


def not_measured(result: Result, bench: Benchmark) -> Score:
    """The row of a benchmark that did not measure."""
    return Score(key=f"{bench.name}.not_measured", measure=f"{bench.name} ({bench.script})",
                 target="-", measured=f"not measured: {result.problem()}", reference="-",
                 ratio="-", verdict="NOT MEASURED")


def missing(keys: tuple[str, ...], scores: list[Score]) -> list[str]:
    """The expected keys (or prefixes, ending with ``.``) no score carries."""
    have = [s.key for s in scores]
    return [k for k in keys
            if not any(h.startswith(k) if k.endswith(".") else h == k for h in have)]


def group_members(pgid: int) -> list[str]:
    """The processes of process group ``pgid`` still running: "pid command" each."""
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        found.append(f"{entry.name} {cmd.strip()[:120]}")
    return found


def stop_group(pgid: int, grace: float) -> None:
    """Stop a benchmark and what it started: SIGTERM to the benchmark (its leader, whose
    pid is ``pgid``) so that it stops its processes in order, up to ``grace`` seconds;
    then SIGTERM to whatever of its group is left, and SIGKILL 5 seconds later."""

    def wait(pids: Callable[[], list[str]], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while pids() and time.monotonic() < deadline:
            time.sleep(0.1)

    with suppress(ProcessLookupError, PermissionError):
        os.kill(pgid, signal.SIGTERM)
    wait(lambda: [p for p in group_members(pgid) if p.split(" ", 1)[0] == str(pgid)], grace)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    wait(lambda: group_members(pgid), 5)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _default_sigint() -> None:
    """In the benchmark's process: SIGINT as usual even when this runner was started with
    it ignored (a background job), so the emulators it starts stop on their SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_benchmark(bench: Benchmark, *, smoke: bool, out: TextIO | None = None,
                  command: list[str] | None = None) -> Result:
    """Run one benchmark (``command``, for tests, instead of its script) with its output
    streamed to ``out`` (stdout) behind its name; its scores and how it ended."""
    out = out or sys.stdout
    result = Result(bench.name)
    if command is None:
        if not bench.path.exists():
            return result
        command = [sys.executable, str(bench.path),
                   *(("--smoke",) if smoke else bench.args)]
    limit = bench.smoke_budget if smoke else bench.budget
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace",
                            cwd=ROOT, env=env, start_new_session=True,
                            preexec_fn=_default_sigint)
    result.pgid = proc.pid
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None and out is not None
        for line in proc.stdout:
            lines.append(line)
            out.write(f"  {bench.name:>13} | {line}")
            out.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(limit)
    except subprocess.TimeoutExpired:
        result.timed_out = True
        stop_group(proc.pid, GRACE_S)
    except BaseException:  # Ctrl-C or SIGTERM of the runner: the benchmark stops too
        stop_group(proc.pid, GRACE_S)
        raise
    finally:
        proc.wait()
        result.seconds = time.monotonic() - started
    result.returncode = proc.returncode
    result.left = group_members(proc.pid)
    if result.left:  # they may hold its output open too
        stop_group(proc.pid, 5)
    reader.join(5)
    try:
        result.scores = parse(lines)
    except (ValueError, TypeError) as exc:
        out.write(f"  {bench.name:>13} | unreadable SCORE line: {exc}\n")
    result.missing_keys = missing(bench.keys, result.scores) if result.scores else []
    return result


def machine() -> list[str]:
    model = "unknown CPU"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0))
    return [f"CPU: {model}, {cores} core(s) usable ({os.cpu_count()} online)",
            f"Python {platform.python_version()} on {platform.platform()}",
            f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"]


def rows(results: list[Result]) -> list[Score]:
    by_name = {b.name: b for b in BENCHMARKS}
    out: list[Score] = []
    for r in results:
        out += r.scores
        if not r.measured:
            bench = by_name.get(r.name) or Benchmark(r.name, f"{r.name}.py", 0, ())
            out.append(not_measured(r, bench))
    return out


def report(results: list[Result], seconds: float, smoke: bool) -> str:
    scores = rows(results)
    lines = [table(scores), ""]
    notes: list[str] = []
    seen: set[str] = set()
    for s in scores:
        if s.note and s.note not in seen:  # each note once
            seen.add(s.note)
            notes.append(f"- {s.measure}: {s.note}")
    if notes:
        lines += ["Notes:", *notes, ""]
    lines += [f"- {m}" for m in machine()]
    lines.append(f"- Total: {seconds / 60:.1f} min{' (smoke run)' if smoke else ''}; "
                 + ", ".join(f"{r.name} {r.seconds:.0f} s" for r in results))
    return "\n".join(lines)


@contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit, so the running benchmark's group is stopped too."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None,
         runner: Callable[..., Result] = run_benchmark) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, no targets")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run this benchmark only (repeatable): "
                    + ", ".join(b.name for b in BENCHMARKS))
    ap.add_argument("--markdown", type=Path, help="also write the scoreboard to this file")
    ap.add_argument("--json", type=Path, help="write every result to this file")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:14} {b.script:18} {b.budget:5.0f} s"
                  f"{'' if b.path.exists() else '  (not there yet)'}")
        return 0
    unknown = set(args.only) - {b.name for b in BENCHMARKS}
    if unknown:
        ap.error(f"no benchmark named {', '.join(sorted(unknown))}")
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    results: list[Result] = []
    started = time.monotonic()
    try:
        with terminated_as_exit():
            for bench in chosen:
                print(f"== {bench.name} ({bench.script})", flush=True)
                result = runner(bench, smoke=args.smoke)
                results.append(result)
                status = "measured" if result.measured else "NOT MEASURED: " + result.problem()
                print(f"== {bench.name}: {status} in {result.seconds:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("== interrupted: the running benchmark and what it started are stopped",
              flush=True)
        return 130
    text = report(results, time.monotonic() - started, args.smoke)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(f"## Scoreboard{' (smoke run)' if args.smoke else ''}\n\n"
                                 + text + "\n")
    if args.json:
        args.json.write_text(json.dumps(
            [{**asdict(r), "scores": [asdict(s) for s in r.scores], "measured": r.measured}
             for r in results], indent=1))
    return 0 if all(r.measured for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BENCHMARKS", "PREFIX", "Benchmark", "Result", "main", "run_benchmark"]
