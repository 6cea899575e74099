"""The daemon: one trio process that keeps users' presence true to their connections.

Owns the run loop that wires the parts, top-down in :meth:`Daemon.run`:

1. connect (the :class:`Backend` factory: the store and the feed; tests hand in doubles);
2. start-up: check the servers are replica-set members, ensure the index, open the feed at
   the checkpoint (or now) and note its position, reconcile every user that may need it;
3. then, concurrently until stopped:
   - the feed, read ahead and batched naturally: a reader polls and gathers the keys
     (one per user) while the applier works; the applier, whenever it is free, takes
     everything gathered in one load (keys → bulk re-read → engine → conditional writes).
     An idle applier takes a single key at once; under load, loads grow with the load
     (after a big load the next poll comes no sooner than GATHER_S after the last one);
     the gathered set is bounded (the reader stops polling at the bound);
   - the timers: users whose answer changes by itself (a connection going stale, an
     instance timing out) are re-derived at that millisecond, with no database event;
   - housekeeping every SYNC_INTERVAL (:mod:`presenced.housekeeping`);
4. shutdown: cancel, then save the checkpoint within the grace period.

The parts: :class:`~presenced.health.Health` (readiness, outages),
:class:`~presenced.writer.Writer` (load → write → confirm, the retry set),
:class:`~presenced.reconcile.Reconciler`, :class:`~presenced.housekeeping.Housekeeping`.
Every timer reads the one :class:`~presenced.clock.Clock`.

It never decides a status (presence.py and engine.py do), never calls pymongo directly
(store.py and the feeds do, in worker threads), and never blocks the event loop.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import trio
from loguru import logger
from pymongo.errors import PyMongoError

from presenced import __version__
from presenced.blocking import (
    MAX_BACKOFF_S,
    Feed,
    RunSync,
    StoreCalls,
    ThreadedFeed,
    in_worker_thread,
)
from presenced.broker.node import BrokerConfig, BrokerNode, LinkFactory, nats_link
from presenced.broker.service import PresenceService
from presenced.clock import Clock
from presenced.config import Settings
from presenced.engine import Engine, Reason, Transition
from presenced.feed.keys import InstancesChanged, Key, ResyncAll, SessionsChanged, UserChanged
from presenced.feed.source import HistoryLost
from presenced.health import READY_MAX_LAG_S, Gauges, Health, RefusalLog
from presenced.housekeeping import Housekeeping
from presenced.http import serve_http
from presenced.log import mask_url
from presenced.metrics import Metrics
from presenced.notify import Notifier
from presenced.presence import Collections
from presenced.reconcile import Reconciler
from presenced.rocketchat import RocketChat
from presenced.store import PresenceStore
from presenced.writer import BATCH, Coalescer, Writer

__all__ = [
    "SHUTDOWN_GRACE_S", "Backend", "Daemon", "Pending", "StartupProblem", "mongo_backend"
]

#: Time allowed to save the checkpoint at shutdown.
SHUTDOWN_GRACE_S: Final = 4.0
#: The feed's longest wait on the server for an event (getMore maxAwaitTimeMS).
FEED_AWAIT_MS: Final = 1000
HISTORY_LOST: Final = "history_lost"
#: Distinct users the feed reader gathers for a busy applier before it stops polling
#: (backpressure: the feed waits on the server, memory stays bounded).
PENDING_USERS: Final = 4 * BATCH
#: A poll that brought fewer keys than this has caught up with the server: the reader
#: polls again once the applier took them (one getMore per load under load, each bringing
#: what came meanwhile). A bigger poll leaves more waiting: the reader reads on.
READ_ON_KEYS: Final = 200
#: Under load (the load just applied held GATHER_USERS users or more), the reader polls
#: no sooner than GATHER_S after its previous poll began: what comes meanwhile waits on
#: the server and goes in one load (fewer commands per event). A load that took that
#: long already waits no more; after a smaller load the reader polls at once.
GATHER_USERS: Final = 24
GATHER_S: Final = 0.025
BROKER_RESTART_S: Final = 5.0
BROKER_CONNECT_WAIT_S: Final = 3.0
BROKER_DISCOVER_S: Final = 0.5
"""Wait before the broker node is started again after it failed."""


class StartupProblem(Exception):
    """A deployment problem found at start that retrying cannot fix (exit status 78)."""

    exit_code = 78


@dataclass
class Backend:
    """What the daemon talks to: made by a factory when it starts, closed when it stops.

    ``servers`` are the ``hello`` calls of each server the daemon connects to, by the
    setting that names it (each must be a replica-set member).
    """

    store: PresenceStore
    feed: Feed
    servers: Sequence[tuple[str, Callable[[], Mapping[str, Any]]]] = ()
    close: Callable[[], None] = field(default=lambda: None)


BackendFactory = Callable[[Settings, Collections], Backend]


def collections_of(settings: Settings) -> Collections:
    return Collections(
        settings.mongo_database, users=settings.users_collection,
        sessions=settings.sessions_collection, instances=settings.instances_collection,
    )


def mongo_backend(settings: Settings, collections: Collections) -> Backend:
    """The real one: pymongo clients on MONGO_URL (and MONGO_OPLOG_URL for the oplog feed)."""
    from pymongo import MongoClient

    from presenced.feed.changestream import ChangeStreamSource
    from presenced.feed.oplog import OplogSource
    from presenced.store import Store

    options: dict[str, Any] = {
        "appname": "presenced", "serverSelectionTimeoutMS": 5000, "connectTimeoutMS": 5000,
        "socketTimeoutMS": 30_000,
    }
    client: MongoClient[dict[str, Any]] = MongoClient(settings.require_mongo(), **options)
    clients = [client]
    servers: list[tuple[str, Callable[[], Mapping[str, Any]]]] = [
        ("MONGO_URL", partial(client.admin.command, "hello"))
    ]
    source: ChangeStreamSource | OplogSource
    if settings.effective_feed == "oplog":
        oplog_client: MongoClient[dict[str, Any]] = MongoClient(settings.mongo_oplog_url, **options)
        clients.append(oplog_client)
        servers.append(("MONGO_OPLOG_URL", partial(oplog_client.admin.command, "hello")))
        source = OplogSource(oplog_client, collections, max_await_ms=FEED_AWAIT_MS)
    else:
        source = ChangeStreamSource(client, collections, max_await_ms=FEED_AWAIT_MS)

    def close() -> None:
        for c in clients:
            c.close()

    return Backend(Store(client, collections), ThreadedFeed(source), servers, close)


class Daemon:
    """presenced: ``await Daemon(settings).run()`` until SIGINT/SIGTERM or ``stop()``.

    ``backend`` makes the store and feed (default: MongoDB through pymongo); ``clock`` is
    the one clock (default: the wall clock on trio's); ``run_sync`` runs blocking store
    calls (default: worker threads; tests with an in-memory store pass
    :func:`presenced.blocking.inline`); ``serve`` starts the HTTP endpoints;
    ``broker_link`` connects to the broker's NATS when ``TRANSPORTER`` is set (default:
    nats-py; tests pass a double).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        backend: BackendFactory = mongo_backend,
        clock: Clock | None = None,
        run_sync: RunSync = in_worker_thread,
        on_transition: Callable[[Transition], None] | None = None,
        serve: bool = True,
        broker_link: LinkFactory = nats_link,
    ) -> None:
        self.settings = settings
        self.clock = clock if clock is not None else Clock()
        self.collections = collections_of(settings)
        self.feed_kind = settings.effective_feed
        self.feed_name = f"{self.feed_kind}:{settings.mongo_database}"
        self.metrics = Metrics()
        self.engine = Engine(
            ttl_ms=settings.cache_ttl * 1000,
            instance_timeout_ms=settings.instance_timeout * 1000,
            # With the broker, connections name ddp-streamer nodes, which `instances` does
            # not list: there a lost node is found by the broker (removeLostConnections).
            unlisted_instances_dead=settings.transporter is None,
        )
        self.notifier = Notifier()
        self.broker: BrokerNode | None = None
        self.health = Health(
            self.clock, self.metrics, instance_id=settings.instance_id,
            feed_kind=self.feed_kind, secrets=settings.secrets(), gauges=self._gauges,
        )
        self.refusals = RefusalLog(self.clock, self.metrics)
        self._backend_factory = backend
        self._run_sync = run_sync
        self._on_transition = on_transition
        self._serve = serve
        self._broker_link = broker_link
        self._wake = trio.Event()
        self._safe_position: Any = None
        self.pending_users = PENDING_USERS
        self.read_on_keys = READ_ON_KEYS
        self.gather_users = GATHER_USERS
        self.gather_s = GATHER_S
        self._behind = False
        self._work_scope = trio.CancelScope()
        self.writer: Writer | None = None
        self._actions: Coalescer | None = None
        self.housekeeping: Housekeeping | None = None
        self.reconciler: Reconciler | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Statuses written, conflicts met, transitions announced and connections reaped
        since start."""
        counts = dict(self.writer.counts) if self.writer is not None else {
            "written": 0, "conflicts": 0, "transitions": 0
        }
        counts["reaped"] = self.housekeeping.reaped if self.housekeeping is not None else 0
        return counts

    def _gauges(self) -> Gauges:
        return Gauges(
            users_tracked=self.engine.stats().users_tracked,
            pending_writes=self.writer.pending_writes if self.writer is not None else 0,
        )

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self, *, handle_signals: bool = True) -> None:
        """Run until SIGINT/SIGTERM (or ``stop()``), then save the checkpoint."""
        s = self.settings
        logger.info("presenced {} starting as instance {}", __version__, s.instance_id)
        logger.info("settings: {}", ", ".join(f"{k}={v}" for k, v in s.describe()))
        async with trio.open_nursery() as outer:
            if self._serve:
                await outer.start(partial(serve_http, self.health, s.health_check_port))
                logger.info("health checks on port {}", s.health_check_port)
            if handle_signals:
                outer.start_soon(self._watch_signals)
            rest = RocketChat.from_settings(s, self.clock)
            if rest is not None:
                # Never blocks presence: a background check, shown in /ready.
                self.health.details["rocketchat"] = rest.details
                outer.start_soon(rest.run)
            backend: Backend | None = None
            try:
                # A stop() that came before this point cancels the scope as it is entered.
                with self._work_scope:
                    backend = await self._run_sync(
                        partial(self._backend_factory, s, self.collections),
                        limiter=trio.CapacityLimiter(1), abandon=False,
                    )
                    db = StoreCalls(
                        backend.store, self._run_sync, s.max_concurrent_sync,
                        health=self.health, clock=self.clock,
                    )
                    await self._work(db, backend)
            finally:
                self.health.quiet = True
                with trio.CancelScope(shield=True):
                    if self.housekeeping is not None:
                        with trio.move_on_after(SHUTDOWN_GRACE_S):
                            await self.housekeeping.checkpoint()
                    if backend is not None:
                        await self._run_sync(
                            backend.close, limiter=trio.CapacityLimiter(1), abandon=True
                        )
                outer.cancel_scope.cancel()
        logger.info("presenced stopped")

    def stop(self) -> None:
        """Stop (from the trio thread): at once, or as soon as the work starts."""
        self.health.quiet = True
        self._work_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info("{} received: stopping", signal.Signals(signum).name)
                self.stop()
                return

    def _assemble(self, db: StoreCalls, feed: Feed) -> tuple[Writer, Reconciler, Housekeeping]:
        s = self.settings
        writer = Writer(
            db, self.engine, self.clock, self.health, self.metrics, self.refusals,
            collections=self.collections,
            on_transition=self._transition, on_timers_changed=self._wake_timers,
        )
        reconciler = Reconciler(db, writer, self.clock, self.metrics)
        housekeeping = Housekeeping(
            db, self.engine, writer, self.clock, self.health, self.metrics, self.refusals,
            period_s=s.sync_interval_seconds, collections=self.collections,
            checkpoint_name=self.feed_name, safe_position=lambda: self._safe_position,
            feed_malformed=lambda: feed.malformed, on_timers_changed=self._wake_timers,
        )
        return writer, reconciler, housekeeping

    def _transition(self, t: Transition) -> None:
        self.notifier.transition(t)
        if self._on_transition is not None:
            self._on_transition(t)

    async def refresh(self, user_ids: Sequence[Any]) -> list[Transition]:
        """Re-derive ``user_ids`` now, ahead of the feed (a broker action wrote their
        documents); the transitions written. Concurrent actions share bulk loads."""
        assert self._actions is not None
        return await self._actions.load(user_ids)

    def _broker(self, db: StoreCalls) -> BrokerNode | None:
        s = self.settings
        if s.transporter is None:
            return None
        config = BrokerConfig(
            url=s.transporter, node_id=s.instance_id, namespace=s.ms_namespace,
            serializer=s.serializer, heartbeat_interval_s=s.heartbeat_interval,
            heartbeat_timeout_s=s.heartbeat_timeout, shown_url=mask_url(s.transporter),
        )
        node: BrokerNode | None = None

        def live_nodes() -> list[str]:
            return [s.instance_id, *(node.registry.available_ids() if node else [])]

        service = PresenceService(
            db, db.store, self.engine, self.clock, self.notifier, refresh=self.refresh,
            live_nodes=live_nodes, secrets=s.secrets(),
        )
        node = BrokerNode(
            config, service, self.clock, self.metrics, link_factory=self._broker_link
        )
        self.notifier.sinks.append(node.broadcast)
        self.health.details["broker"] = node.details
        return node

    async def _work(self, db: StoreCalls, backend: Backend) -> None:
        feed = backend.feed
        self.writer, self.reconciler, self.housekeeping = self._assemble(db, feed)
        self.broker = self._broker(db)
        async with trio.open_nursery() as nursery:
            if self.broker is not None:
                self._actions = Coalescer(self.writer, Reason.ACTION)
                nursery.start_soon(self._actions.run)
                nursery.start_soon(self._run_broker, self.broker)
                await self._meet_the_broker(self.broker)
            await self._presence(db, backend)

    async def _meet_the_broker(self, node: BrokerNode) -> None:
        """Give the broker a moment before the start-up reconciliation, so that the
        transitions it writes reach the nodes listening to presence.status: up to
        BROKER_CONNECT_WAIT_S to connect, then BROKER_DISCOVER_S for the nodes' INFO
        answers. A broker that does not answer delays nothing more."""
        with trio.move_on_after(BROKER_CONNECT_WAIT_S):
            await node.joined.wait()
        if node.connected:
            await self.clock.sleep(BROKER_DISCOVER_S)

    async def _run_broker(self, node: BrokerNode) -> None:
        """The broker node, restarted after a failure: a bug in it never stops presence."""
        while True:
            try:
                await node.run()
                return
            except Exception:
                logger.opt(exception=True).error(
                    "the service broker node failed (a bug in presenced); presence goes on;"
                    " rejoining the broker in {:.0f} s", BROKER_RESTART_S,
                )
                await self.clock.sleep(BROKER_RESTART_S)

    async def _presence(self, db: StoreCalls, backend: Backend) -> None:
        feed = backend.feed
        assert self.housekeeping is not None and self.reconciler is not None
        self.health.source_lag = feed.lag_seconds
        logger.info("feed: {}", self.feed_kind)
        for setting, hello in backend.servers:
            await self._require_replica_set(db, setting, hello)
        await db.read_until_answered("connect", db.store.ping)
        await db.read_until_answered("indexes", db.store.ensure_indexes)
        checkpoint = await db.read_until_answered(
            "checkpoint", db.store.load_checkpoint, self.feed_name
        )
        # Every start reconciles (timers live in memory), so a lost position needs no more.
        await self._open_feed(db, feed, checkpoint["position"] if checkpoint else None)
        self._safe_position = feed.position()
        self.health.feed_answered()
        await self.housekeeping.refresh_instances()
        await self.reconciler.reconcile("startup")
        self.health.reconciled = True
        pending = Pending(self.pending_users)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_feed, db, feed, pending)
            nursery.start_soon(self._apply_feed, pending)
            nursery.start_soon(self._timers)
            nursery.start_soon(self.housekeeping.run)

    async def _require_replica_set(
        self, db: StoreCalls, setting: str, hello: Callable[[], Mapping[str, Any]]
    ) -> None:
        answer = await db.read_until_answered("connect", hello)
        if not answer.get("setName"):
            raise StartupProblem(
                f"{setting} points at a MongoDB server that is not a replica-set member (its"
                " hello has no setName). presenced needs a replica set: change streams and"
                " the oplog exist only there. Point it at the replica set (add"
                " ?replicaSet=NAME) or convert the server to a one-node replica set."
            )

    async def _open_feed(self, db: StoreCalls, feed: Feed, position: Any) -> bool:
        """Open the feed at ``position`` (or now). If the position fell out of MongoDB's
        history, open from now and return True: the caller must reconcile everything."""
        try:
            await db.until_answered("feed", partial(feed.open, position))
            if position is not None:
                logger.info("feed resumed from the checkpoint")
            lost = False
        except HistoryLost:
            lost = True
            logger.warning(
                "the feed's resume point is no longer in MongoDB's history (oplog too small"
                " for the time presenced was down or behind); continuing from now after a"
                " full reconciliation"
            )
            await db.until_answered("feed", partial(feed.open, None))
        return lost

    # -- the feed: read ahead, applied in natural batches ------------------------------------
    async def _read_feed(self, db: StoreCalls, feed: Feed, pending: Pending) -> None:
        """Poll the feed and gather its keys, with the position that covers them, for the
        applier. A poll that caught up with the server (fewer than ``read_on_keys`` keys)
        waits until the applier has applied them: the next getMore, made as the applier
        comes free, brings everything that came meanwhile (one getMore per load, and each
        load takes what came during the last); an idle applier has taken them at once. A
        bigger poll leaves more waiting on the server: the reader reads on while the
        applier works. At ``pending_users`` users gathered it stops polling until the
        applier takes them. Under load (the load just applied held ``gather_users`` users
        or more) the next poll is made no sooner than ``gather_s`` after the last one
        began, so that it brings more; after a smaller load, at once."""
        backoff = 0.1
        while True:
            while pending.full:
                await pending.wait_taken()
            polled = self.clock.monotonic()
            try:
                keys = await feed.poll()
            except HistoryLost:
                await self._open_feed(db, feed, None)
                keys = [ResyncAll(HISTORY_LOST)]
            except PyMongoError as exc:
                self.health.failed("feed", exc)
                await self.clock.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                if not await self._open_feed(db, feed, feed.position()):
                    continue  # the keys gathered so far stay; the feed resumes after them
                keys = [ResyncAll(HISTORY_LOST)]
            else:
                backoff = 0.1
                self.health.succeeded()
                self.health.feed_answered()
                self._log_lag(feed.lag_seconds(self.clock.now_ms() / 1000))
            pending.add(keys, feed.position())
            if keys and len(keys) < self.read_on_keys:
                await pending.wait_applied()
                if pending.last_users >= self.gather_users:
                    wait = polled + self.gather_s - self.clock.monotonic()
                    if wait > 0:
                        await self.clock.sleep(wait)

    async def _apply_feed(self, pending: Pending) -> None:
        """Whenever free, take everything gathered in one ``_apply``."""
        while True:
            await pending.wait_fresh()
            keys, position = pending.take()
            if keys:
                await self._apply(keys)
            # Every write caused by the keys taken has landed (or its users wait in the
            # retry set), so the position that covers them is safe to checkpoint.
            self._safe_position = position
            pending.applied()

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
        assert self.writer is not None and self.housekeeping is not None
        assert self.reconciler is not None
        user_ids: list[Any] = []
        sessions: set[Any] = set()
        whole: set[Any] = set()
        instances = False
        resync: str | None = None
        for key in keys:
            if (
                isinstance(key, UserChanged) and key.written is not None
                and self.engine.holds(key.user_id, key.written)
            ):
                # Our own status write coming back: nothing new to read.
                self.metrics.feed_keys.labels("user_own_write").inc()
                continue
            if isinstance(key, SessionsChanged | UserChanged):
                user_ids.append(key.user_id)
                (sessions if isinstance(key, SessionsChanged) else whole).add(key.user_id)
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
            if resync != HISTORY_LOST:
                logger.warning("feed reported {}: full reconciliation", resync)
            await self.housekeeping.refresh_instances()
            await self.reconciler.reconcile(HISTORY_LOST if resync == HISTORY_LOST else "resync")
            return
        if instances:
            await self.housekeeping.refresh_instances()
        # A user whose only key is a sessions change: the engine's ``users`` fields are
        # current (any other change to that document comes as a key of its own), so only
        # its sessions are read, if the engine holds it.
        await self.writer.load(user_ids, Reason.CONNECTIONS, sessions_only=sessions - whole)

    # -- timers -------------------------------------------------------------------------
    def _wake_timers(self) -> None:
        self._wake.set()

    async def _timers(self) -> None:
        """Users whose answer changes by itself, re-derived at the millisecond it does."""
        assert self.writer is not None
        while True:
            self._wake = trio.Event()
            deadline = self.engine.next_deadline()
            if deadline is None:
                await self._wake.wait()
                continue
            if deadline > self.clock.now_ms():
                with trio.move_on_at(self.clock.trio_time(deadline)):
                    await self._wake.wait()
                continue
            await self.writer.evaluate(self.engine.due(self.clock.now_ms()), Reason.STALE)



class Pending:
    """Feed keys read and not yet applied, with the feed position that covers them all.

    One key per user, or two: a ``users`` change (``UserChanged`` without ``written``,
    a whole re-read) stays and covers any other key of its user; a sessions change stays
    too, and covers a later sessions change; an own-write echo (``UserChanged`` with
    ``written``) gives way to a later ``UserChanged`` (the later one describes the
    document as it is now), and is kept beside a sessions change of its user (the latest
    echo: if it is not our write, the ``users`` document must be read as well). One key
    per instance, the first ``ResyncAll``. ``take()`` hands on all of it and the position
    of the last ``add``: every key taken is covered by it, no key left out.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._users: dict[Any, Key] = {}
        # The latest echo of a user whose key in ``_users`` is a sessions change.
        self._echoes: dict[Any, UserChanged] = {}
        self._instances: dict[Any, Key] = {}
        self._resync: ResyncAll | None = None
        self._position: Any = None
        self._added = trio.Event()
        self._taken = trio.Event()
        self._adds = self._took = self._done = 0
        self.last_users = 0
        """The users (keys of users) of the last ``take``."""
        self._applied = trio.Event()

    @property
    def keys(self) -> int:
        return len(self._users) + len(self._instances) + (self._resync is not None)

    @property
    def full(self) -> bool:
        return len(self._users) >= self.limit

    def add(self, keys: Sequence[Key], position: Any) -> None:
        users, echoes = self._users, self._echoes
        for key in keys:
            if isinstance(key, SessionsChanged | UserChanged):
                uid = key.user_id
                held = users.get(uid)
                if held is None:
                    users[uid] = key
                elif isinstance(held, UserChanged) and held.written is None:
                    pass  # the whole re-read covers it
                elif isinstance(key, UserChanged) and key.written is None:
                    users[uid] = key
                    echoes.pop(uid, None)
                elif isinstance(held, SessionsChanged):
                    if isinstance(key, UserChanged):
                        echoes[uid] = key
                elif isinstance(key, SessionsChanged):
                    if isinstance(held, UserChanged):
                        echoes[uid] = held  # an echo, kept beside the sessions change
                    users[uid] = key
                else:
                    users[uid] = key  # a later echo
            elif isinstance(key, InstancesChanged):
                self._instances.setdefault(key.instance_id, key)
            elif self._resync is None:
                self._resync = key
        self._position = position
        self._adds += 1
        self._added.set()

    def take(self) -> tuple[list[Key], Any]:
        keys: list[Key] = [*self._instances.values()]
        echoes = self._echoes
        for uid, key in self._users.items():
            echo = echoes.get(uid)
            if echo is not None:
                keys.append(echo)
            keys.append(key)
        if self._resync is not None:
            keys.insert(0, self._resync)
        self.last_users = len(self._users)
        self._users, self._echoes, self._instances, self._resync = {}, {}, {}, None
        self._took = self._adds
        self._added = trio.Event()
        taken, self._taken = self._taken, trio.Event()
        taken.set()
        return keys, self._position

    async def wait_fresh(self) -> None:
        """Until something was added (keys, or a position) since the last ``take``."""
        while self._adds == self._took:  # every add so far was taken
            await self._added.wait()

    def applied(self) -> None:
        """The applier is done with what it took last."""
        self._done = self._took
        applied, self._applied = self._applied, trio.Event()
        applied.set()

    async def wait_taken(self) -> None:
        """Until the next ``take``."""
        await self._taken.wait()

    async def wait_applied(self) -> None:
        """Until everything added so far has been taken and applied."""
        while self._done < self._adds:
            await self._applied.wait()
