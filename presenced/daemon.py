"""The daemon: one trio process that keeps users' presence true to their connections.

Owns: the flow between the parts and its timing. Start-up (connect, open the feed and
note its position, reconcile every user that may need it, then apply the feed from the
noted position), the feed loop (keys → bulk re-read → engine → conditional writes), the
timer loop (connections going stale with no database event), housekeeping every
SYNC_INTERVAL (instance liveness, reaper, retries, checkpoint), outage handling, and a
clean shutdown (stop, flush, checkpoint).

It never decides a status (presence.py and engine.py do), never calls pymongo directly
(store.py and the feed do, always in worker threads under a limiter), and never blocks
the event loop.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import trio
from loguru import logger
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from presenced import __version__
from presenced.config import Settings
from presenced.engine import Engine, PlannedWrite, Transition
from presenced.feed.changestream import ChangeStreamSource
from presenced.feed.keys import (
    InstancesChanged,
    Key,
    ResyncAll,
    SessionsChanged,
    UserChanged,
    WatchedCollections,
)
from presenced.feed.source import HistoryLost
from presenced.http import serve_http
from presenced.log import redact
from presenced.metrics import Metrics
from presenced.presence import (
    InstanceLiveness,
    from_ms,
    parse_connections,
    parse_instances,
    reapable,
)
from presenced.store import CollectionNames, ReapRequest, StatusWrite, Store

T = TypeVar("T")


class StartupProblem(Exception):
    """A deployment problem found at start that retrying cannot fix (exit status 78)."""

    exit_code = 78


class FeedSource(Protocol):
    """What the daemon needs of a feed: both ChangeStreamSource and OplogSource."""

    def open(self, position: Any) -> None: ...

    def position(self) -> Any: ...

    def poll(self, max_events: int = 1000) -> list[Key]: ...

    def close(self) -> None: ...

#: /ready fails when the feed has not answered for this long.
READY_MAX_LAG_S = 5.0
#: Users per bulk read / bulk write.
BATCH = 500
#: The feed's longest wait for an event (getMore maxAwaitTimeMS).
FEED_AWAIT_MS = 1000
#: Longest pause between retries while MongoDB is unreachable.
MAX_BACKOFF_S = 5.0
#: Time allowed to flush and checkpoint at shutdown.
SHUTDOWN_GRACE_S = 4.0


def now_ms() -> int:
    """Wall-clock milliseconds: Rocket.Chat's _updatedAt values are wall-clock too."""
    return int(time.time() * 1000)


@dataclass
class _Outage:
    """Logs a MongoDB outage once when it starts and once when it ends."""

    since: float | None = None
    reason: str | None = None

    #: Set while stopping: operations cancelled by the shutdown are not an outage.
    quiet: bool = False

    def failed(self, component: str, exc: BaseException, secrets: Sequence[str]) -> None:
        if self.quiet:
            return
        text = redact(f"{type(exc).__name__}: {exc}", secrets)
        if self.since is None:
            self.since = time.monotonic()
            logger.warning("MongoDB unavailable ({}): {}; retrying", component, text)
        else:
            logger.debug("MongoDB still unavailable ({}): {}", component, text)
        self.reason = f"MongoDB unavailable: {text}"

    def succeeded(self) -> None:
        if self.since is not None:
            logger.info("MongoDB available again after {:.1f} s", time.monotonic() - self.since)
        self.since = None
        self.reason = None


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        on_transition: Callable[[Transition], None] | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.on_transition = on_transition
        self.metrics = Metrics()
        self.engine = Engine(
            ttl_ms=settings.cache_ttl * 1000,
            instance_timeout_ms=settings.instance_timeout * 1000,
        )
        self.feed_kind = settings.effective_feed
        self.feed_name = f"{self.feed_kind}:{settings.mongo_database}"
        self._secrets = settings.secrets()
        self._db_limiter = trio.CapacityLimiter(settings.max_concurrent_sync + 2)
        self._write_limiter = trio.CapacityLimiter(settings.max_concurrent_sync)
        self._feed_limiter = trio.CapacityLimiter(1)
        self._load_lock = trio.Lock()
        self._wake = trio.Event()
        self._outage = _Outage()
        self._liveness = InstanceLiveness({}, settings.instance_timeout * 1000)
        self._dirty: set[Any] = set()
        self._safe_position: Any = None
        self._saved_position: Any = None
        self._reconciled = False
        self._connected = False
        self._behind = False
        self._malformed_reported: dict[str, int] = {}
        self._last_feed_ok: float | None = None
        self._pending_writes = 0
        self._work_scope: trio.CancelScope | None = None
        self.counts = {"written": 0, "conflicts": 0, "reaped": 0, "transitions": 0}
        self._store: Store | None = None
        self._source: FeedSource | None = None
        self._source_lag: Callable[[], float] = lambda: 0.0

    # -- health -------------------------------------------------------------------------
    def _lag(self) -> float | None:
        """Seconds the feed is behind: since it last answered, or the oplog's own lag."""
        if self._last_feed_ok is None:
            return None
        return max(0.0, trio.current_time() - self._last_feed_ok, self._source_lag())

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "instance": self.settings.instance_id, "version": __version__}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        lag = self._lag()
        reason = None
        if self._outage.reason:
            reason = self._outage.reason
        elif not self._connected:
            reason = "connecting to MongoDB (no answer yet)"
        elif not self._reconciled:
            reason = "start-up reconciliation has not finished"
        elif lag is None or lag > READY_MAX_LAG_S:
            reason = f"the feed is behind (no answer for {lag or 0:.1f} s)"
        body: dict[str, Any] = {
            "ready": reason is None,
            "instance": self.settings.instance_id,
            "version": __version__,
            "feed": self.feed_kind,
            "lag_seconds": None if lag is None else round(lag, 3),
            "users_tracked": self.engine.stats().users_tracked,
            "pending_writes": self._pending_writes,
        }
        if reason:
            body["reason"] = reason
        self.metrics.ready.set(1 if reason is None else 0)
        return reason is None, body

    def metrics_text(self) -> bytes:
        self.metrics.users_tracked.set(self.engine.stats().users_tracked)
        self.metrics.pending_writes.set(self._pending_writes)
        self.metrics.feed_lag.set(self._lag() or 0.0)
        return self.metrics.render()

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self, *, handle_signals: bool = True) -> None:
        """Run until SIGINT/SIGTERM (or ``stop()``), then flush and checkpoint."""
        s = self.settings
        logger.info("presenced {} starting as instance {}", __version__, s.instance_id)
        logger.info("settings: {}", ", ".join(f"{k}={v}" for k, v in s.describe()))
        async with trio.open_nursery() as outer:
            await outer.start(partial(serve_http, self, s.health_check_port))
            logger.info("health checks on port {}", s.health_check_port)
            if handle_signals:
                outer.start_soon(self._watch_signals)
            client: MongoClient[dict[str, Any]] = MongoClient(
                s.require_mongo(),
                appname="presenced",
                serverSelectionTimeoutMS=5000,
                connectTimeoutMS=5000,
                socketTimeoutMS=30_000,
            )
            oplog_client: MongoClient[dict[str, Any]] | None = None
            if self.feed_kind == "oplog":
                oplog_client = MongoClient(
                    s.mongo_oplog_url, appname="presenced", serverSelectionTimeoutMS=5000,
                    connectTimeoutMS=5000, socketTimeoutMS=30_000,
                )
            try:
                with trio.CancelScope() as self._work_scope:
                    await self._work(client, oplog_client)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_GRACE_S):
                    await self._checkpoint()
                await trio.to_thread.run_sync(client.close)
                if oplog_client is not None:
                    await trio.to_thread.run_sync(oplog_client.close)
                outer.cancel_scope.cancel()
        logger.info("presenced stopped")

    def stop(self) -> None:
        self._outage.quiet = True
        if self._work_scope is not None:
            self._work_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info("{} received: stopping", signal.Signals(signum).name)
                self.stop()
                return

    async def _db(
        self, fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None,
        abandon: bool = True,
    ) -> T:
        """Run a blocking MongoDB call in a worker thread.

        Reads are abandoned when cancelled (at shutdown their answer no longer matters, and
        waiting for a 5 s server selection would break the 5 s shutdown promise); writes pass
        ``abandon=False`` so a write in flight finishes and is accounted for.
        """
        return await trio.to_thread.run_sync(
            partial(fn, *args), limiter=limiter or self._db_limiter, abandon_on_cancel=abandon
        )

    async def _retrying(self, component: str, fn: Callable[..., T], *args: Any) -> T:
        """Call until MongoDB answers, backing off; logs an outage once."""
        backoff = 0.1
        while True:
            try:
                result = await self._db(fn, *args)
                self._outage.succeeded()
                return result
            except PyMongoError as exc:
                self.metrics.feed_errors.labels(component).inc()
                self._outage.failed(component, exc, self._secrets)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _work(
        self, client: MongoClient[dict[str, Any]], oplog_client: MongoClient[dict[str, Any]] | None
    ) -> None:
        s = self.settings
        names = CollectionNames(
            users=s.users_collection, sessions=s.sessions_collection,
            instances=s.instances_collection,
        )
        store = self._store = Store(client, s.mongo_database, names)
        watched = WatchedCollections(
            s.mongo_database, users=s.users_collection, sessions=s.sessions_collection,
            instances=s.instances_collection,
        )
        await self._require_replica_set(client, "MONGO_URL")
        if oplog_client is not None:
            from presenced.feed.oplog import OplogSource

            await self._require_replica_set(oplog_client, "MONGO_OPLOG_URL")
            oplog = OplogSource(oplog_client, watched, max_await_ms=FEED_AWAIT_MS)
            self._source = oplog
            self._source_lag = oplog.lag_seconds
        else:
            self._source = ChangeStreamSource(client, watched, max_await_ms=FEED_AWAIT_MS)
        logger.info("feed: {}", self.feed_kind)
        await self._retrying("connect", store.ping)
        self._connected = True
        await self._retrying("indexes", store.ensure_indexes)
        checkpoint = await self._retrying("checkpoint", store.load_checkpoint, self.feed_name)
        # Every start reconciles (timers live in memory), so a lost position needs no more.
        await self._open_feed(checkpoint["position"] if checkpoint else None)
        self._last_feed_ok = trio.current_time()
        await self._reconcile("startup")
        self._reconciled = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed_loop)
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._housekeeping_loop)

    async def _require_replica_set(self, client: MongoClient[dict[str, Any]], setting: str) -> None:
        hello = await self._retrying("connect", client.admin.command, "hello")
        if not hello.get("setName"):
            raise StartupProblem(
                f"{setting} points at a MongoDB server that is not a replica-set member (its"
                " hello has no setName). presenced needs a replica set: change streams and"
                " the oplog exist only there. Point it at the replica set (add"
                " ?replicaSet=NAME) or convert the server to a one-node replica set."
            )

    async def _open_feed(self, token: Any) -> bool:
        """Open the feed at ``token`` (or now). If the token fell out of MongoDB's history,
        open from now and return True: the caller must reconcile everything."""
        assert self._source is not None
        try:
            await self._retrying("feed", self._source.open, token)
            if token is not None:
                logger.info("feed resumed from the checkpoint")
            lost = False
        except HistoryLost:
            lost = True
            self.metrics.reconciliations.labels("history_lost").inc()
            logger.warning(
                "the feed's resume point is no longer in MongoDB's history (oplog too small"
                " for the time presenced was down); continuing from now after a full"
                " reconciliation"
            )
            await self._retrying("feed", self._source.open, None)
        self._safe_position = self._source.position()
        return lost

    # -- reconciliation and loading -----------------------------------------------------
    async def _reconcile(self, cause: str) -> None:
        assert self._store is not None
        started = time.monotonic()
        written_before = self.counts["written"]
        self.metrics.reconciliations.labels(cause).inc()
        await self._refresh_instances()
        batches: Iterator[list[Any]] = self._store.iter_reconcile_ids(BATCH)
        users = 0
        while True:
            try:
                batch = await self._db(next, batches, None)
            except PyMongoError as exc:
                self.metrics.feed_errors.labels("reconcile").inc()
                self._outage.failed("reconcile", exc, self._secrets)
                await trio.sleep(1)
                batches = self._store.iter_reconcile_ids(BATCH)  # start over: idempotent
                continue
            if batch is None:
                break
            users += len(batch)
            await self._load_users(batch, "reconcile")
        logger.info(
            "reconciliation ({}) done: {} users checked, {} statuses written in {:.2f} s",
            cause, users, self.counts["written"] - written_before, time.monotonic() - started,
        )

    async def _load_users(self, user_ids: Iterable[Any], reason: str) -> None:
        """Re-read users and their sessions in bulk, derive, write what changed."""
        assert self._store is not None
        ids = list(dict.fromkeys(user_ids))
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            async with self._load_lock:
                try:
                    users = await self._db(self._store.load_users, chunk)
                    sessions = await self._db(self._store.load_sessions, chunk)
                except PyMongoError as exc:
                    self.metrics.feed_errors.labels("load").inc()
                    self._outage.failed("load", exc, self._secrets)
                    self._dirty.update(chunk)
                    continue
                now = self.clock()
                writes = [
                    w for uid in chunk
                    if (w := self.engine.load(uid, users.get(uid), sessions.get(uid), now, reason))
                ]
            self._wake_timers()
            await self._write(writes)

    async def _write(self, writes: Sequence[PlannedWrite]) -> None:
        if not writes:
            return
        async with trio.open_nursery() as nursery:
            for start in range(0, len(writes), BATCH):
                nursery.start_soon(self._write_batch, writes[start : start + BATCH])

    async def _write_batch(self, writes: Sequence[PlannedWrite]) -> None:
        assert self._store is not None
        request = [
            StatusWrite(
                w.user_id, w.presence.status.value, w.presence.status_connection.value,
                w.expected_status, w.expected_status_connection,
            )
            for w in writes
        ]
        self._pending_writes += len(writes)
        try:
            outcome = await self._db(
                self._store.write_statuses, request, limiter=self._write_limiter, abandon=False
            )
        except PyMongoError as exc:
            # Landed or not, we cannot tell: re-read these users once MongoDB answers.
            self.metrics.writes.labels("failed").inc(len(writes))
            self.metrics.feed_errors.labels("write").inc()
            self._outage.failed("write", exc, self._secrets)
            for w in writes:
                self.engine.forget(w.user_id)
                self._dirty.add(w.user_id)
            return
        finally:
            self._pending_writes -= len(writes)
        by_id = {w.user_id: w for w in writes}
        now = self.clock()
        for uid in outcome.written:
            self.counts["written"] += 1
            self.metrics.writes.labels("written").inc()
            transition = self.engine.confirm(by_id[uid], now)
            if transition is not None:
                self._transition(transition)
        if outcome.conflicts:
            self.counts["conflicts"] += len(outcome.conflicts)
            self.metrics.writes.labels("conflict").inc(len(outcome.conflicts))
            for uid in outcome.conflicts:
                self.engine.conflict(uid)
            logger.debug("{} writes met a concurrent change; re-reading", len(outcome.conflicts))
            self._dirty.update(outcome.conflicts)
        self._wake_timers()

    def _transition(self, t: Transition) -> None:
        self.counts["transitions"] += 1
        self.metrics.transitions.labels(t.reason, t.current.status.value).inc()
        before = "?" if t.previous is None else f"{t.previous.status.value}"
        logger.debug(
            "{} ({}): {} → {} ({})", t.username or "?", t.user_id, before,
            t.current.status.value, t.reason,
        )
        if self.on_transition is not None:
            self.on_transition(t)

    # -- loops --------------------------------------------------------------------------
    async def _feed_loop(self) -> None:
        assert self._source is not None
        source = self._source
        while True:
            try:
                keys = await self._db(source.poll, 1000, limiter=self._feed_limiter)
                position = source.position()
            except HistoryLost:
                await self._open_feed(None)
                await self._reconcile("history_lost")
                continue
            except PyMongoError as exc:
                self.metrics.feed_errors.labels("feed").inc()
                self._outage.failed("feed", exc, self._secrets)
                await trio.sleep(1)
                if await self._open_feed(self._safe_position):
                    await self._reconcile("history_lost")
                continue
            self._outage.succeeded()
            self._last_feed_ok = trio.current_time()
            self._log_lag(self._source_lag())
            if keys:
                await self._apply(keys)
            # Every write caused by the keys before this position has landed (or its users
            # are queued for a re-read), so the position is safe to checkpoint.
            self._safe_position = position

    def _log_lag(self, lag: float) -> None:
        """Say once when the feed falls behind (entries pending older than the /ready
        limit), and once when it has caught up."""
        if lag > READY_MAX_LAG_S and not self._behind:
            self._behind = True
            logger.warning("feed is {:.1f} s behind MongoDB's writes", lag)
        elif lag <= 1.0 and self._behind:
            self._behind = False
            logger.info("feed caught up")

    async def _apply(self, keys: Sequence[Key]) -> None:
        user_ids: list[Any] = []
        instances = False
        resync: str | None = None
        for key in keys:
            if isinstance(key, SessionsChanged | UserChanged):
                user_ids.append(key.user_id)
                self.metrics.feed_keys.labels(
                    "sessions" if isinstance(key, SessionsChanged) else "user"
                ).inc()
            elif isinstance(key, InstancesChanged):
                instances = True
                self.metrics.feed_keys.labels("instance").inc()
            elif isinstance(key, ResyncAll):
                resync = key.reason
                self.metrics.feed_keys.labels("resync").inc()
        if resync is not None:
            logger.warning("feed reported {}: full reconciliation", resync)
            await self._reconcile("resync")
            return
        if instances:
            await self._refresh_instances()
        await self._load_users(user_ids, "connections")

    def _wake_timers(self) -> None:
        self._wake.set()

    async def _timer_loop(self) -> None:
        """Users whose answer changes by itself (a connection or instance going stale)."""
        while True:
            self._wake = trio.Event()
            deadline = self.engine.next_deadline()
            if deadline is None:
                await self._wake.wait()
                continue
            delay = (deadline - self.clock()) / 1000
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wake.wait()
                continue
            await self._evaluate(self.engine.due(self.clock()), "stale")

    async def _evaluate(self, user_ids: Iterable[Any], reason: str) -> None:
        now = self.clock()
        writes: list[PlannedWrite] = []
        reread: list[Any] = []
        for uid in user_ids:
            if uid not in self.engine:
                reread.append(uid)
                continue
            write = self.engine.evaluate(uid, now, reason)
            if write is not None:
                writes.append(write)
        await self._write(writes)
        if reread:
            await self._load_users(reread, reason)

    def _report_malformed(self) -> None:
        """Count refused documents in the metric, and say once per kind what was refused."""
        seen = dict(self.engine.stats().malformed)
        source_malformed = getattr(self._source, "malformed", 0)
        if isinstance(source_malformed, int) and source_malformed:
            seen["feed_event_malformed"] = source_malformed
        for reason, total in seen.items():
            new = total - self._malformed_reported.get(reason, 0)
            if new <= 0:
                continue
            self.metrics.malformed.labels(reason).inc(new)
            if reason not in self._malformed_reported:
                logger.warning(
                    "refused malformed input ({}): the rest of the document is still used;"
                    " counted in presenced_malformed_documents_total", reason,
                )
            self._malformed_reported[reason] = total

    async def _housekeeping_loop(self) -> None:
        period = self.settings.sync_interval_ms / 1000
        while True:
            await trio.sleep(period)
            self._report_malformed()
            await self._refresh_instances()
            await self._reap()
            if self._dirty:
                dirty, self._dirty = list(self._dirty), set()
                await self._load_users(dirty, "retry")
            await self._checkpoint()

    async def _refresh_instances(self) -> None:
        assert self._store is not None
        try:
            docs = await self._db(self._store.load_instances)
        except PyMongoError as exc:
            self.metrics.feed_errors.labels("instances").inc()
            self._outage.failed("instances", exc, self._secrets)
            return
        updated, problems = parse_instances(docs)
        for reason in problems:
            self.metrics.malformed.labels(reason).inc()
        self._liveness = InstanceLiveness(updated, self.settings.instance_timeout * 1000)
        affected = self.engine.set_instances(docs, self.clock())
        if affected:
            await self._evaluate(affected, "instance")
        self._wake_timers()

    async def _reap(self) -> None:
        """Pull connections that no longer count, guarded so a fresh heartbeat wins."""
        assert self._store is not None
        now = self.clock()
        ttl_ms = self.settings.cache_ttl * 1000
        requests: dict[Any, ReapRequest] = {}
        for cand in self.engine.reapable(now):
            requests[cand.user_id] = ReapRequest(cand.user_id, list(cand.connection_ids),
                                                 cand.cutoff)
        try:
            cutoff_dt = from_ms(now - ttl_ms)
            stale_docs = await self._db(_collect, self._store.iter_stale_sessions(cutoff_dt))
        except PyMongoError as exc:
            self.metrics.feed_errors.labels("reaper").inc()
            self._outage.failed("reaper", exc, self._secrets)
            return
        for doc in stale_docs:
            uid = doc.get("_id")
            if uid in requests:
                continue
            connections, problems = parse_connections(doc.get("connections"))
            for reason in problems:
                self.metrics.malformed.labels(reason).inc()
            gone = reapable(connections, now, ttl_ms, self._liveness)
            if gone:
                newest = max(c.updated_ms for c in gone)
                requests[uid] = ReapRequest(
                    uid, list(dict.fromkeys(c.id for c in gone)), from_ms(newest)
                )
        if not requests:
            return
        try:
            modified = await self._db(self._store.reap, list(requests.values()), abandon=False)
        except PyMongoError as exc:
            self.metrics.feed_errors.labels("reaper").inc()
            self._outage.failed("reaper", exc, self._secrets)
            return
        self.counts["reaped"] += modified
        self.metrics.reaped.inc(modified)
        if modified:
            logger.info("reaper: removed dead connections from {} users", modified)

    async def _checkpoint(self) -> None:
        position = self._safe_position
        if self._store is None or position is None or position == self._saved_position:
            return
        try:
            await self._db(self._store.save_checkpoint, self.feed_name, position, abandon=False)
            self._saved_position = position
        except PyMongoError as exc:
            self.metrics.feed_errors.labels("checkpoint").inc()
            self._outage.failed("checkpoint", exc, self._secrets)


def _collect(batches: Iterator[list[Any]]) -> list[Any]:
    out: list[Any] = []
    for batch in batches:
        out.extend(batch)
    return out
