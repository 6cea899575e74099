"""`presenced demo` shows presence changing within 10 s and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRANSITION = re.compile(r"\d\d:\d\d:\d\d\s+\S+\s+\S*(offline|online|away|busy)\S*\s+→")


@pytest.mark.emulator_only
def test_demo_prints_a_transition_within_10_seconds_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "presenced", "demo", "--users", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    found = None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    started = time.monotonic()
    try:
        while found is None and time.monotonic() - started < 10:
            if sel.select(timeout=0.2):
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if TRANSITION.search(line):
                    found = line
        assert found is not None, "no transition within 10 s:\n" + "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, "".join(lines) + rest
        assert "demo stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
