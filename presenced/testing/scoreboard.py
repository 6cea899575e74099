"""The benchmarks' common result line, and the scoreboard that ``make bench`` prints.

Each benchmark in ``tests/bench/`` measures one or more lines of issue 10's table and
reports each with :func:`emit`: one ``SCORE {json}`` line on stdout per measure, beside its
own human-readable output. The scoreboard runner (``tests/bench/run.py``) runs every
benchmark as a subprocess, collects those lines, and prints them as one table:
measure, target, measured, reference, ratio, verdict.

A verdict is one of
- ``PASS``: the target is met;
- ``MISS``: it is not, and nothing measured in the same run explains it;
- ``FLOOR``: it is not, but the reference measured beside it (the emulator's own floor,
  in the same run under the same load) is itself at or past the target, so the figure is
  the emulator's, not presenced's (issue 10's acceptance: "a MISS shown to be the
  emulator's floor");
- ``SMOKE``: a smoke run (tiny sizes, ``--smoke``): measured to prove the benchmark
  runs, not judged;
- ``NOT MEASURED``: the runner's row for a benchmark that crashed, ran out of time or
  emitted no ``SCORE`` line (never emitted by a benchmark itself).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Final, Literal

__all__ = ["PREFIX", "Score", "Verdict", "emit", "parse", "table", "verdict"]

PREFIX: Final = "SCORE "

Verdict = Literal["PASS", "MISS", "FLOOR", "SMOKE", "NOT MEASURED"]


@dataclass(frozen=True, slots=True)
class Score:
    """One measure, as the scoreboard shows it. Every field is display text except
    ``key`` (a stable identifier such as ``engine.events_per_s``) and ``verdict``."""

    key: str
    measure: str
    """What is measured, as the issue's table names it."""
    target: str
    """E.g. ``>= 50,000 events/s``."""
    measured: str
    """The figure, with its unit."""
    reference: str
    """What it is compared with, measured in the same run (``-`` when none)."""
    ratio: str
    """Measured over reference, e.g. ``0.31x`` (``-`` when no reference)."""
    verdict: Verdict
    note: str = ""
    """Anything a reader needs to judge the line (sizes, the floor, the command)."""


def verdict(met: bool, *, smoke: bool = False, floor_explains: bool = False) -> Verdict:
    """The verdict of a measure: SMOKE for a smoke run, else PASS when ``met``, FLOOR when
    the emulator's floor measured beside it explains the miss, else MISS."""
    if smoke:
        return "SMOKE"
    if met:
        return "PASS"
    return "FLOOR" if floor_explains else "MISS"


def emit(score: Score) -> None:
    """Print ``score`` as one ``SCORE {json}`` line on stdout, flushed."""
    print(PREFIX + json.dumps(asdict(score), ensure_ascii=False), flush=True)


def parse(lines: Iterable[str]) -> list[Score]:
    """The scores among a benchmark's output lines (other lines are ignored)."""
    scores: list[Score] = []
    for line in lines:
        if line.startswith(PREFIX):
            scores.append(Score(**json.loads(line[len(PREFIX) :])))
    return scores


_COLUMNS: Final = ("measure", "target", "measured", "reference", "ratio", "verdict")


def table(scores: Iterable[Score]) -> str:
    """The scores as a Markdown table (readable on a terminal, pasted into the docs)."""
    rows = [list(_COLUMNS)] + [[str(getattr(s, c)) for c in _COLUMNS] for s in scores]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows[1:]]
    return "\n".join(out)
