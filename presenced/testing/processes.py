"""presenced and its emulator as processes, for benchmarks and tools that measure them.

Owns: a free loopback port, starting ``python -m presenced.testing.mongo`` and reading the
URL it reports, polling ``/ready``, and stopping a process (signal, wait, then kill).

Must never: be imported by the daemon.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

__all__ = ["READY_TIMEOUT", "STOP_TIMEOUT", "Failed", "OutOfTime", "budget", "cpu_seconds",
           "daemon", "emulator", "free_port", "ready", "speaks_nats", "stop", "with_database"]

READY_TIMEOUT: Final = 60.0
"""Seconds for the emulator or presenced to come up."""
STOP_TIMEOUT: Final = 10.0
"""Seconds for a process to exit after its signal before it is killed."""


class Failed(Exception):
    """A process did not start, or did not do what the measurement needs."""


class OutOfTime(Failed):
    """A benchmark's --budget passed."""


@contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Raise :class:`OutOfTime` in the main thread once ``seconds`` have passed, and turn
    SIGTERM into ``SystemExit`` (so every ``finally`` runs and stops what was started);
    both undone on exit. For benchmarks run as scripts."""

    def out_of_time(signum: int, frame: object) -> None:
        raise OutOfTime(f"--budget of {seconds:g} s passed")

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGALRM, out_of_time), signal.signal(
        signal.SIGTERM, terminated
    )
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def speaks_nats(port: int) -> bool:
    """True when something on 127.0.0.1:``port`` speaks NATS (greets with ``INFO``)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(url: str, database: str) -> str:
    """``url`` with its path set to ``/database`` (its query kept)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))


def ready(port: int) -> bool:
    """True when presenced's ``/ready`` on ``port`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int:
    """Signal ``proc``, wait up to STOP_TIMEOUT, then kill it. Returns its exit status."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def emulator(
    *args: str, started: list[subprocess.Popen[Any]] | None = None
) -> Iterator[str]:
    """The emulator as a process (``args`` added to its command line); yields its URL and
    stops it on leaving. The process is appended to ``started`` for a caller's own cleanup."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "presenced.testing.mongo", "--port", "0", *args],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    if started is not None:
        started.append(proc)
    try:
        stdout = proc.stdout
        assert stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT)
        line = lines[0].strip() if lines else ""
        if not line.startswith("ready "):
            raise Failed(f"the emulator did not report ready (got {line!r})")
        threading.Thread(target=stdout.read, daemon=True).start()  # never block on a pipe
        yield line.split(" ", 1)[1]
    finally:
        stop(proc, signal.SIGINT)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name (field 2) may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def daemon(
    url: str, database: str, workdir: Path, *, env: Mapping[str, str] | None = None,
    started: list[subprocess.Popen[Any]] | None = None, ready_timeout: float = READY_TIMEOUT,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``presenced run`` on ``database`` of ``url`` as a process (this checkout: PYTHONPATH
    is passed on), its log in ``workdir/presenced.log``, ``env`` added to its environment;
    yields it and its health port once ``/ready`` answers, and stops it on leaving. The
    process is appended to ``started`` for a caller's own cleanup."""
    port = free_port()
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir),
               "MONGO_URL": with_database(url, database), "HEALTH_CHECK_PORT": str(port),
               "PORT": str(free_port()), "LOG_LEVEL": "warning", **(env or {})}
    if "PYTHONPATH" in os.environ:
        environ["PYTHONPATH"] = os.environ["PYTHONPATH"]
    log = workdir / "presenced.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "presenced", "run"], env=environ,
                                cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    if started is not None:
        started.append(proc)
    try:
        deadline = time.monotonic() + ready_timeout
        while not ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text("utf-8", "replace").splitlines()[-20:]
                raise Failed("presenced did not become ready:\n" + "\n".join(tail))
            time.sleep(0.05)
        yield proc, port
    finally:
        stop(proc)
