"""The official MongoDB Node.js driver against the emulator: ``tests/emulator/node``.

Rocket.Chat talks to MongoDB with the Node.js driver (6.16 in 7.x), so its behaviour is the
one that counts (issue 9). This runs the ``node:test`` suite there (``*.test.mjs``, one file
per concern, every test with 6.16.0 and, under npm aliases, 6.22 and 7.x; see
``lib.mjs``) once, against an emulator process of its own started with the driver's
default settings in mind (``python -m presenced.testing.mongo``), or against
``PRESENCED_TEST_MONGO_URL`` when it is set.

Outcome: fails when a Node test fails, with the names, the errors and the tail of the
``spec`` output. A test the emulator does not pass yet is marked ``todo`` in its file (the
reason says what is wrong today): it runs and reports, but does not fail the run. What
remains to do, what passes despite its todo marker (remove the marker), and the timings the
tests printed are written to stdout, shown by ``pytest -rA`` (or ``-s``).

Skips when ``node`` is not installed or ``tests/emulator/node/node_modules`` is missing
(``make install`` runs ``npm ci`` there). Against a real server the test that starts
emulators of its own (a resume token from another server life) skips itself: it is only
given ``PRESENCED_PYTHON`` with the emulator.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Final

import pytest

from presenced.testing.processes import emulator

NODE_DIR: Final = Path(__file__).resolve().parent / "node"
REPORTER: Final = NODE_DIR / "reporter.mjs"
RUN_TIMEOUT: Final = 300.0
"""Seconds for the whole Node suite (it takes ~30 s)."""
TEST_TIMEOUT_MS: Final = 120_000
"""Milliseconds for any one Node test."""
TAIL_LINES: Final = 150
"""Lines of the spec output shown on a failure."""


def _why_not() -> str | None:
    """Why the Node suite cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node not installed: the Node.js driver suite needs Node.js 20 and npm"
    if not (NODE_DIR / "node_modules" / "mongodb").is_dir():
        return ("tests/emulator/node/node_modules is missing: `make install` runs `npm ci` "
                "there (needs npm and the npm registry)")
    return None


@contextmanager
def _server() -> Iterator[tuple[str, bool]]:
    """The URL to test and whether it is the emulator."""
    real = os.environ.get("PRESENCED_TEST_MONGO_URL", "").strip()
    if real:
        yield real, False
        return
    with emulator() as url:
        yield url, True


def _run_node(url: str, is_emulator: bool, results: Path) -> tuple[int, str]:
    """Runs the suite; returns node's exit status and its spec output."""
    env = {**os.environ, "MONGO_URL": url}
    env.pop("PRESENCED_PYTHON", None)
    if is_emulator:
        # The emulator-only test starts emulators of its own with this interpreter; the
        # environment (PYTHONPATH included) is passed on, so they run this checkout's code.
        env["PRESENCED_PYTHON"] = sys.executable
    files = sorted(p.name for p in NODE_DIR.glob("*.test.mjs"))
    command = [
        "node", "--test",
        # One file at a time: the speed smoke measures, and nothing else should load the
        # server meanwhile. The drivers' suites inside a file may run side by side.
        "--test-concurrency=1",
        f"--test-timeout={TEST_TIMEOUT_MS}",
        "--test-reporter=spec", "--test-reporter-destination=stdout",
        f"--test-reporter={REPORTER.as_uri()}", f"--test-reporter-destination={results}",
        *files,
    ]
    proc = subprocess.Popen(
        command, cwd=NODE_DIR, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # The test runner has a process per file: end the whole group it leads.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the Node suite did not finish within {RUN_TIMEOUT:g} s:\n"
                    + _tail(output), pytrace=False)
    return proc.returncode, output


def _tail(output: str) -> str:
    lines = output.rstrip().splitlines()
    return "\n".join(lines[-TAIL_LINES:])


def _name(result: dict[str, Any]) -> str:
    return f"{Path(result['file']).name}: " + " > ".join(result["path"])


def _observed(result: dict[str, Any]) -> str:
    """One line of what a failed test saw: its assertion's message, or the actual value when
    the message is the generic one."""
    lines = (result.get("error") or "").strip().splitlines()
    first = lines[0] if lines else ""
    actual = result.get("actual")
    if actual and actual != "undefined" and (not first or first.startswith("Expected")):
        return f"actual: {actual}"
    return first


def _summary(results: list[dict[str, Any]]) -> str:
    """What passed, what remains to do (by todo reason), what to unmark, and timings."""
    counts: dict[str, int] = defaultdict(int)
    for r in results:
        counts[r["outcome"]] += 1
    lines = ["Node.js driver suite: " + ", ".join(
        f"{counts[k]} {k}" for k in ("pass", "fail", "todo", "todo-pass", "skip") if counts[k])]
    todos: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r["outcome"] == "todo":
            todos[r.get("todo") or "(no reason)"].append(r)
    if todos:
        lines.append("")
        lines.append(f"Todo ({counts['todo']}), by reason:")
        for reason in sorted(todos):
            lines.append(f"- {reason}")
            lines.extend(f"    {_name(r)}  [{_observed(r)}]" for r in todos[reason])
    unmark = [r for r in results if r["outcome"] == "todo-pass"]
    if unmark:
        lines.append("")
        lines.append("Passing despite their todo (remove the todo marker):")
        lines.extend(f"- {_name(r)}  (todo: {r.get('todo')})" for r in unmark)
    skipped = [r for r in results if r["outcome"] == "skip"]
    if skipped:
        lines.append("")
        lines.append("Skipped:")
        lines.extend(f"- {_name(r)}: {r.get('skip')}" for r in skipped)
    timed = [r for r in results if r.get("diagnostics")]
    if timed:
        lines.append("")
        lines.append("Diagnostics:")
        for r in timed:
            lines.extend(f"- {_name(r)}: {d}" for d in r["diagnostics"])
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_node_driver_suite() -> None:
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    with tempfile.TemporaryDirectory(prefix="presenced-node-") as tmp:
        results_file = Path(tmp) / "results.jsonl"
        with _server() as (url, is_emulator):
            status, output = _run_node(url, is_emulator, results_file)
        text = results_file.read_text() if results_file.exists() else ""
    results = [json.loads(line) for line in text.splitlines() if line.strip()]
    summary = _summary(results)
    print(summary)
    failed = [r for r in results if r["outcome"] == "fail"]
    if status != 0 or failed or not results:
        details = "\n\n".join(
            f"{_name(r)}\n{r.get('error') or ''}\nactual: {r.get('actual')}".rstrip()
            for r in failed)
        pytest.fail(
            f"node --test exited with {status}; {len(failed)} test(s) failed"
            + (f":\n\n{details}" if details else "")
            + f"\n\n{summary}\n\n--- node output (tail) ---\n{_tail(output)}",
            pytrace=False,
        )
