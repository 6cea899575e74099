"""Housekeeping: what the daemon does every SYNC_INTERVAL, whatever the feed says.

Owns: refreshing the view of the ``instances`` collection (parsed once per refresh; users
of an instance that died or came back are re-derived), the reaper (the guarded ``$pull`` of
connections that no longer count, for users held in memory and, through an indexed sweep,
for the rest; both use the one plan of ``presence.reap_plan``), re-reading the users a
failure left behind, reporting refused feed events, re-anchoring the clock after a
wall-clock step, and saving the checkpoint: the feed position whose writes have all landed.

Must never: decide a status (the engine does), or call the store but through
:class:`~presenced.blocking.StoreCalls`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from loguru import logger
from pymongo.errors import PyMongoError

from presenced.blocking import StoreCalls
from presenced.clock import Clock
from presenced.engine import Engine, Reason
from presenced.health import Health, RefusalLog
from presenced.metrics import Metrics
from presenced.presence import Collections, from_ms, parse_connections, parse_instances, reap_plan
from presenced.store import ReapRequest
from presenced.writer import Writer

__all__ = ["SWEEP_LIMIT", "Housekeeping"]

SWEEP_LIMIT: Final = 5000
"""``usersSessions`` documents the reaper's sweep reads per pass at most."""


class Housekeeping:
    """Instances, reaper, retries and checkpoint, every ``period_s`` seconds."""

    def __init__(
        self,
        db: StoreCalls,
        engine: Engine,
        writer: Writer,
        clock: Clock,
        health: Health,
        metrics: Metrics,
        refusals: RefusalLog,
        *,
        period_s: float,
        collections: Collections,
        checkpoint_name: str,
        safe_position: Callable[[], Any],
        feed_malformed: Callable[[], int],
        on_timers_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._engine = engine
        self._writer = writer
        self._clock = clock
        self._health = health
        self._metrics = metrics
        self._refusals = refusals
        self._period_s = period_s
        self._instances_collection = collections.instances
        self._checkpoint_name = checkpoint_name
        self._safe_position = safe_position
        self._feed_malformed = feed_malformed
        self._on_timers_changed = on_timers_changed
        self._saved_position: Any = None
        self.reaped = 0

    async def run(self) -> None:
        """Every ``period_s``: one pass, forever (until cancelled)."""
        while True:
            await self._clock.sleep(self._period_s)
            await self.run_once()

    async def run_once(self) -> None:
        step = self._clock.reanchor()
        if step:
            logger.warning("the wall clock stepped by {} ms; following it", step)
            self._on_timers_changed()
        self._refusals.feed_events(self._feed_malformed())
        await self.refresh_instances()
        await self.reap()
        await self._writer.retry()
        await self.checkpoint()

    # -- instances ----------------------------------------------------------------------
    async def refresh_instances(self) -> None:
        """Re-read ``instances``; re-derive the users whose instance changed liveness."""
        try:
            docs = await self._db.read(self._db.store.load_instances)
        except PyMongoError as exc:
            self._health.failed("instances", exc)
            return
        self._health.succeeded()
        updated_ms: dict[str, int | None] = {}
        for doc in docs:  # one document at a time, so a refusal names its document
            parsed, reasons = parse_instances([doc])
            updated_ms.update(parsed)
            if reasons:
                doc_id = doc.get("_id") if isinstance(doc, dict) else None
                self._refusals.document(self._instances_collection, doc_id, reasons, repr(doc))
        affected = self._engine.set_instances(updated_ms, self._clock.now_ms())
        if affected:
            await self._writer.evaluate(affected, Reason.INSTANCE)
        self._on_timers_changed()

    # -- reaper -------------------------------------------------------------------------
    async def reap(self) -> None:
        """Pull connections that no longer count, guarded so a fresh heartbeat wins."""
        now = self._clock.now_ms()
        ttl_ms = self._engine.ttl_ms
        requests: dict[Any, ReapRequest] = {
            cand.user_id: ReapRequest(cand.user_id, list(cand.connection_ids), cand.cutoff)
            for cand in self._engine.reapable(now)
        }
        try:
            stale_docs = await self._db.read(
                self._db.store.stale_sessions, from_ms(now - ttl_ms), SWEEP_LIMIT
            )
        except PyMongoError as exc:
            self._health.failed("reaper", exc)
            return
        liveness = self._engine.liveness
        for doc in stale_docs:
            uid = doc.get("_id")
            if uid in requests or uid in self._engine:
                continue  # held in memory: the engine's plan above is the current one
            connections, _ = parse_connections(doc.get("connections"))
            plan = reap_plan(connections, now, ttl_ms, liveness)
            if plan is not None:
                requests[uid] = ReapRequest(
                    uid, list(plan.connection_ids), from_ms(plan.cutoff_ms)
                )
        if not requests:
            return
        try:
            modified = await self._db.write(self._db.store.reap, list(requests.values()))
        except PyMongoError as exc:
            self._health.failed("reaper", exc)
            return
        self.reaped += modified
        self._metrics.reaped.inc(modified)
        if modified:
            logger.info("reaper: removed dead connections from {} users", modified)

    # -- checkpoint ---------------------------------------------------------------------
    async def checkpoint(self) -> None:
        """Save the feed position whose writes have all landed, if it moved."""
        position = self._safe_position()
        if position is None or position == self._saved_position:
            return
        try:
            # Abandoned when cancelled (the shutdown grace): a save that did not land is
            # only an older position to resume from, and every start reconciles anyway.
            await self._db.write(
                self._db.store.save_checkpoint, self._checkpoint_name, position, abandon=True
            )
        except PyMongoError as exc:
            self._health.failed("checkpoint", exc)
            return
        self._saved_position = position
