"""The profile of presenced's hottest path: the engine deciding connection events.

Runs the engine benchmark's event phase (``tests/bench/engine.py``: 100,000 users loaded,
then a stream of connection events fed to ``Engine.load`` as the writer feeds it, timers
firing) under py-spy (the ``dev`` extra), keeps the samples taken inside the timed event
loop (not the seeding, not the benchmark's own document building), and prints the
functions with the most self time and the most total time, as shares of those samples.
``docs/performance.md`` records its output.

Usage: .venv/bin/python tests/bench/profile_engine.py [--users 100000] [--events 300000]
       [--rate 250] [--raw FILE]
Not a benchmark of the scoreboard (it judges nothing); not collected by pytest.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The benchmark's timed event loop, and the frames of its own document building.
LOOP = re.compile(r"engine_rate \(engine\.py:\d+\)")
BENCH_OWN = ("World.",)


def inner(users: int, events: int) -> None:
    sys.path.insert(0, str(HERE))
    engine = importlib.import_module("engine")  # tests/bench/engine.py, a script's sibling
    rate = engine.engine_rate(users, events, 4000)
    print(f"engine: {rate:,.0f} events/s under the profiler")


def summarise(raw: Path, top: int = 12) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        if not any(LOOP.fullmatch(f) for f in frames):
            continue
        if any(f.startswith(BENCH_OWN) for f in frames):
            continue
        count = int(count_text)
        samples += count
        names = [re.sub(r":\d+\)$", ")", f) for f in frames]
        own[names[-1]] += count
        for name in set(names):
            total[name] += count
    if not samples:
        return "no samples in the event loop"
    out = [f"{samples} samples in the timed event loop", "self time:"]
    out += [f"  {100 * c / samples:5.1f}%  {f}" for f, c in own.most_common(top)]
    out.append("total time (with callees):")
    out += [
        f"  {100 * c / samples:5.1f}%  {f}"
        for f, c in total.most_common(top + 2)
        if not f.startswith(("engine_rate ", "<module> ", "inner ", "main "))
    ]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.users, args.events)
        return 0
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
        "py-spy"
    )
    if py_spy is None:
        print("py-spy is not installed (make install brings the dev extra)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw or Path(tmp) / "engine.raw"
        subprocess.run(
            [py_spy, "record", "--format", "raw", "--rate", str(args.rate), "-o", str(raw),
             "--", sys.executable, __file__, "--inner",
             "--users", str(args.users), "--events", str(args.events)],
            check=True,
        )
        print(summarise(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
