"""What every chaos case ends on: ``presenced verify`` finds no user stored wrong.

Not a test module. :func:`wait_converged` polls :func:`presenced.verify.verify` (the
daemon's own rules) until it reports no difference, and fails with the differences, in
words, when the deadline passes first.
"""

from __future__ import annotations

import time
from typing import Any

from pymongo.database import Database

from presenced.presence import Collections
from presenced.verify import Report, render_text, verify

# tests/integration/daemon_harness.py's DEFAULT_SETTINGS (CACHE_TTL 60, INSTANCE_TIMEOUT 3600).
TTL_S = 60
INSTANCE_TIMEOUT_S = 3600


def converged(
    db: Database[dict[str, Any]], *, ttl_s: int = TTL_S,
    instance_timeout_s: int = INSTANCE_TIMEOUT_S, unlisted_dead: bool = True,
    grace_s: float = 0.5,
) -> Report:
    """One ``verify`` of ``db`` with the daemon's settings."""
    return verify(db, Collections(db.name), ttl_ms=ttl_s * 1000,
                  instance_timeout_ms=instance_timeout_s * 1000,
                  unlisted_dead=unlisted_dead, grace_s=grace_s)


def wait_converged(
    db: Database[dict[str, Any]], timeout: float = 20.0, **settings: Any
) -> Report:
    """Poll :func:`converged` until no user differs; the last report. Raises
    AssertionError listing the differences if some remain after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        report = converged(db, **settings)
        if report.ok:
            return report
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not converged after {timeout} s:\n{render_text(report, report.differences[:20])}"
            )
        time.sleep(0.1)
