"""What the daemon tells an operator about itself: readiness, MongoDB outages, refused input.

Owns:
- :class:`Health`: the state behind ``/health``, ``/ready`` and ``/metrics`` (connected,
  reconciled, when the feed last answered, the feed's lag), computed when asked, so a
  scrape and a probe always see the same answer; and the logging of MongoDB failures: an
  outage is logged when it starts, at most once a minute while it lasts (with its true
  length) and when it ends; an authentication or authorization failure (codes 18 and 13),
  which no retry fixes, at ERROR on every attempt with the fix. Log lines and ``/ready``
  carry one line, never pymongo's topology description, and never a secret.
- :class:`RefusalLog`: malformed documents, counted in
  ``presenced_malformed_documents_total`` once per document and distinct content (a
  document read again unchanged is not counted again), and logged with the collection and
  ``_id`` (never the content) at most every 10 minutes while the document stays bad.

Must never: do I/O (it is handed what it reports), or decide anything about presence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cachetools import LRUCache
from loguru import logger
from pymongo.errors import OperationFailure

from presenced import __version__
from presenced.clock import Clock
from presenced.log import redact
from presenced.metrics import Metrics

__all__ = [
    "OUTAGE_LOG_EVERY_S",
    "READY_MAX_LAG_S",
    "REFUSAL_LOG_EVERY_S",
    "Gauges",
    "Health",
    "RefusalLog",
    "one_line",
]

READY_MAX_LAG_S: Final = 5.0
"""/ready fails when the feed has not answered (or is behind) for this long."""
OUTAGE_LOG_EVERY_S: Final = 60.0
"""While MongoDB stays unavailable, "still unavailable" is logged at most this often."""
REFUSAL_LOG_EVERY_S: Final = 600.0
"""A document that stays malformed is logged again at most this often."""
MAX_LINE: Final = 300

AUTHENTICATION_FAILED: Final = 18
UNAUTHORIZED: Final = 13

# Where pymongo's messages stop being one line about the failure.
_CUT_MARKERS: Final = (", Timeout:", ", full error:", ", Topology Description:", "\n")


def one_line(exc: BaseException, secrets: Sequence[str]) -> str:
    """``exc`` as one short line: its type and the first part of its message, without
    pymongo's topology description or raw server reply, secrets masked."""
    text = str(exc)
    for marker in _CUT_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    line = redact(f"{type(exc).__name__}: {text.strip()}", secrets)
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…"


def auth_failure(exc: BaseException) -> int | None:
    """18 (authentication) or 13 (authorization) when ``exc`` is such a failure, else None."""
    if isinstance(exc, OperationFailure) and exc.code in (AUTHENTICATION_FAILED, UNAUTHORIZED):
        return int(exc.code)
    return None


@dataclass(frozen=True)
class Gauges:
    """What ``/ready`` and ``/metrics`` report from the other parts."""

    users_tracked: int
    pending_writes: int


class Health:
    """Readiness, the MongoDB outage log, and the metrics rendered at scrape time."""

    def __init__(
        self,
        clock: Clock,
        metrics: Metrics,
        *,
        instance_id: str,
        feed_kind: str,
        secrets: Sequence[str],
        gauges: Callable[[], Gauges],
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._instance_id = instance_id
        self._feed_kind = feed_kind
        self._secrets = list(secrets)
        self._gauges = gauges
        self.connected = False
        """MongoDB answered at least once."""
        self.reconciled = False
        """The start-up reconciliation finished."""
        self.source_lag: Callable[[float], float] = lambda now_s: 0.0
        """The feed's own measure of its lag at wall time ``now_s`` (the oplog's)."""
        self.quiet = False
        """Set while stopping: operations cancelled by the shutdown are not an outage."""
        self.details: dict[str, Callable[[], Any]] = {}
        """More sections of the ``/ready`` body, by name (the broker, Rocket.Chat's REST
        API): shown, never deciding readiness (presence in MongoDB is right without them)."""
        self._last_feed_ok: float | None = None
        self._outage_since: float | None = None
        self._outage_logged: float = 0.0
        self._reason: str | None = None
        metrics.ready.set_function(lambda: 1.0 if self.readiness()[0] else 0.0)
        metrics.feed_lag.set_function(lambda: math.nan if (lag := self.lag()) is None else lag)
        metrics.users_tracked.set_function(lambda: self._gauges().users_tracked)
        metrics.pending_writes.set_function(lambda: self._gauges().pending_writes)

    # -- MongoDB answers ----------------------------------------------------------------
    def failed(self, component: str, exc: BaseException) -> None:
        """A MongoDB operation of ``component`` failed with ``exc``; the caller retries."""
        self._metrics.feed_errors.labels(component).inc()
        if self.quiet:
            return
        line = one_line(exc, self._secrets)
        now = self._clock.monotonic()
        code = auth_failure(exc)
        if code is not None:
            self._auth_failed(component, code, line)
            if self._outage_since is None:
                self._outage_since = now
            return
        if self._outage_since is None:
            self._outage_since = self._outage_logged = now
            logger.warning("MongoDB unavailable ({}): {}; retrying", component, line)
        elif now - self._outage_logged >= OUTAGE_LOG_EVERY_S:
            self._outage_logged = now
            logger.warning(
                "MongoDB still unavailable after {:.0f} s ({}): {}; retrying",
                now - self._outage_since, component, line,
            )
        self._reason = f"MongoDB unavailable: {line}"

    def _auth_failed(self, component: str, code: int, line: str) -> None:
        if code == AUTHENTICATION_FAILED:
            self._reason = f"authentication failed: {line}"
            logger.error(
                "MongoDB refused presenced's credentials ({}): {}. Fix the user name and"
                " password in MONGO_URL (or MONGO_OPLOG_URL for the oplog feed), or the"
                " authSource they are defined in; retrying",
                component, line,
            )
        else:
            self._reason = f"authorization failed: {line}"
            logger.error(
                "MongoDB refused an operation for lack of privileges ({}): {}. Grant the"
                " MongoDB user the privileges docs/operations.md lists (find and update on"
                " users, usersSessions and presenced_checkpoints, find on instances, and"
                " changeStream on the database or find on local.oplog.rs for the feed);"
                " retrying",
                component, line,
            )

    def succeeded(self) -> None:
        """A MongoDB operation succeeded: an outage, if any, is over."""
        self.connected = True
        if self._outage_since is not None and not self.quiet:
            logger.info(
                "MongoDB available again after {:.1f} s",
                self._clock.monotonic() - self._outage_since,
            )
        self._outage_since = None
        self._reason = None

    def feed_answered(self) -> None:
        """The feed answered a poll (with or without events)."""
        self._last_feed_ok = self._clock.monotonic()

    # -- reports ------------------------------------------------------------------------
    def lag(self) -> float | None:
        """Seconds the feed is behind: since it last answered, or its own lag; None before
        it ever answered."""
        if self._last_feed_ok is None:
            return None
        since = self._clock.monotonic() - self._last_feed_ok
        return max(0.0, since, self.source_lag(self._clock.now_ms() / 1000))

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "instance": self._instance_id, "version": __version__}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        lag = self.lag()
        reason = None
        if self._reason:
            reason = self._reason
        elif not self.connected:
            reason = "connecting to MongoDB (no answer yet)"
        elif not self.reconciled:
            reason = "start-up reconciliation has not finished"
        elif lag is None or lag > READY_MAX_LAG_S:
            reason = f"the feed is behind (no answer for {lag or 0:.1f} s)"
        gauges = self._gauges()
        body: dict[str, Any] = {
            "ready": reason is None,
            "instance": self._instance_id,
            "version": __version__,
            "feed": self._feed_kind,
            "lag_seconds": None if lag is None else round(lag, 3),
            "users_tracked": gauges.users_tracked,
            "pending_writes": gauges.pending_writes,
        }
        for name, detail in self.details.items():
            body[name] = detail()
        if reason:
            body["reason"] = reason
        return reason is None, body

    def metrics_text(self) -> bytes:
        """Every gauge is computed now, from the same state ``/ready`` reads."""
        return self._metrics.render()


@dataclass
class _Seen:
    fingerprint: tuple[tuple[str, ...], str]
    logged_at: float


class RefusalLog:
    """Malformed documents: counted once per distinct content, logged at most every 10 min.

    Remembers the last ``max_documents`` bad documents (least recently reported forgotten
    first); a forgotten one that is read again counts again.
    """

    def __init__(self, clock: Clock, metrics: Metrics, max_documents: int = 10_000) -> None:
        self._clock = clock
        self._metrics = metrics
        self._seen: LRUCache[tuple[str, str], _Seen] = LRUCache(max_documents)
        self._feed_reported = 0
        self._feed_logged: float | None = None

    def document(
        self, collection: str, doc_id: Any, reasons: Sequence[str], content: str
    ) -> None:
        """``collection``'s document ``doc_id`` was read with these problems; ``content`` is
        a text of the offending values (compared, never logged)."""
        key = (collection, repr(doc_id))
        fingerprint = (tuple(sorted(set(reasons))), content)
        now = self._clock.monotonic()
        seen = self._seen.get(key)
        if seen is not None and seen.fingerprint == fingerprint:
            if now - seen.logged_at >= REFUSAL_LOG_EVERY_S:
                seen.logged_at = now
                self._log(collection, doc_id, fingerprint[0], "still malformed")
            return
        for reason in fingerprint[0]:
            self._metrics.malformed.labels(reason).inc()
        self._seen[key] = _Seen(fingerprint, now)
        self._log(collection, doc_id, fingerprint[0], "malformed")

    @staticmethod
    def _log(collection: str, doc_id: Any, reasons: Sequence[str], what: str) -> None:
        logger.warning(
            "{} document {} _id={!r} ({}): the rest of it is still used; counted in"
            " presenced_malformed_documents_total",
            collection, what, doc_id, ", ".join(reasons),
        )

    def feed_events(self, total: int) -> None:
        """The feed has refused ``total`` events since it was made: count the new ones
        (each event is its own occurrence), log at most every 10 minutes."""
        new = total - self._feed_reported
        if new <= 0:
            return
        self._feed_reported = total
        self._metrics.malformed.labels("feed_event_malformed").inc(new)
        now = self._clock.monotonic()
        if self._feed_logged is None or now - self._feed_logged >= REFUSAL_LOG_EVERY_S:
            self._feed_logged = now
            logger.warning(
                "the feed refused {} malformed event(s) (no key taken from them); counted in"
                " presenced_malformed_documents_total", new,
            )
