"""Simulated Rocket.Chat traffic: the presence writes Rocket.Chat makes to MongoDB.

Owns: writing ``usersSessions`` and ``instances`` exactly the way Rocket.Chat does (the
update shapes in ``docs/design/rocketchat-presence.md``, verbatim), creating the ``users``
and ``instances`` documents and Rocket.Chat's indexes in :meth:`RocketChatSimulator.setup`,
and an in-memory model of what it has written, so tests can compare the model with MongoDB.

Must never: write ``status`` or ``statusConnection`` on ``users`` (deriving them is the
daemon's job; ``setup()`` only sets them once, when it creates a user), read presence state
back to decide what to do (a real Rocket.Chat does not wait for presenced), or run inside
the daemon: this is test support, used by ``presenced demo``, ``presenced simulate``, the
integration tests and the benchmarks.

Every write goes through blocking pymongo. Timestamps come from the injected clock;
scheduling (who connects, when a heartbeat is due) runs on simulated seconds, the sum of
the ``dt_seconds`` given to :meth:`RocketChatSimulator.tick`, and on a seeded RNG, so a run
is reproducible given the seed, the sequence of calls and the clock.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from random import Random
from typing import Any, Literal, get_args

from pymongo import ASCENDING, UpdateOne
from pymongo.database import Database

ConnectionStatus = Literal["online", "away", "busy"]
StatusDefault = Literal["online", "away", "busy", "offline"]
InstanceState = Literal["live", "crashed", "shut_down"]
WriteKind = Literal[
    "connect",
    "disconnect",
    "set_status",
    "heartbeat",
    "repeat_login",
    "instance_heartbeat",
    "instance_cleanup",
    "instance_delete",
]

CONNECTION_STATUSES: tuple[str, ...] = get_args(ConnectionStatus)

# Meteor's Random.id(): 17 characters from the "unmistakable" alphabet. Rocket.Chat uses it
# for user ids and DDP connection ids.
_ID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz"
_ID_LENGTH = 17

# Rocket.Chat's own intervals (see the spec): a client heartbeats each connection every
# 30-60 s; an instance bumps its document every 10 s; the TTL index drops it after 60 s.
HEARTBEAT_INTERVAL_SECONDS = (30.0, 60.0)
INSTANCE_HEARTBEAT_SECONDS = 10.0
INSTANCE_TTL_SECONDS = 60

_STATUS_TEXTS = (
    "In a meeting",
    "Working remotely",
    "On vacation",
    "Commuting",
    "Focus time, ping if urgent",
    "Out sick",
)


def utc_now_ms() -> datetime:
    """The current UTC time, truncated to milliseconds (what BSON dates can hold)."""
    return _to_ms(datetime.now(UTC))


def _to_ms(moment: datetime) -> datetime:
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)


def _random_id(rng: Random) -> str:
    return "".join(rng.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))


def _chance(rng: Random, dt_seconds: float, mean_seconds: float) -> bool:
    """True with the probability that an event with this mean interval happens within dt."""
    if mean_seconds <= 0:
        return True
    return rng.random() < 1.0 - math.exp(-dt_seconds / mean_seconds)


@dataclass(frozen=True, slots=True)
class TrafficProfile:
    """Mean intervals, in simulated seconds, of the random events :meth:`tick` draws."""

    offline_before_login: float = 120.0
    """How long an offline user stays offline before connecting."""
    extra_device: float = 300.0
    """How long a connected user waits before opening another device (up to max_devices)."""
    max_devices: int = 3
    online_before_away: float = 300.0
    away_before_back: float = 120.0
    connection_lifetime: float = 900.0
    """How long a connection lives before its client disconnects."""
    repeat_login: float = 3600.0
    """How often a login is repeated on one connection (a duplicate entry)."""
    reconnect_delay: tuple[float, float] = (1.0, 15.0)
    """After its instance crashes or shuts down, a client reconnects within this range."""


@dataclass(frozen=True, slots=True)
class SimulatedUser:
    """A user :meth:`RocketChatSimulator.setup` creates."""

    id: str
    username: str
    status_default: StatusDefault | None
    status_text: str | None

    def to_document(self, now: datetime) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "_id": self.id,
            "username": self.username,
            "name": self.username.replace("user", "User "),
            "type": "user",
            "roles": ["user"],
            "active": True,
            "status": "offline",
            "statusConnection": "offline",
            "createdAt": now,
            "_updatedAt": now,
        }
        if self.status_default is not None:
            doc["statusDefault"] = self.status_default
        if self.status_text is not None:
            doc["statusText"] = self.status_text
        return doc


@dataclass(frozen=True, slots=True)
class Connection:
    """One entry of a ``usersSessions.connections`` array, as the simulator wrote it."""

    id: str
    instance_id: str
    status: str
    created_at: datetime
    updated_at: datetime

    def to_document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "instanceId": self.instance_id,
            "status": self.status,
            "_createdAt": self.created_at,
            "_updatedAt": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Instance:
    """A simulated Rocket.Chat server instance and what its document holds."""

    id: str
    name: str
    pid: int
    host: str
    port: int
    created_at: datetime
    updated_at: datetime
    state: InstanceState = "live"

    @property
    def has_document(self) -> bool:
        """A clean shutdown deletes the document; a crash leaves it for the TTL index."""
        return self.state != "shut_down"

    def to_document(self) -> dict[str, Any]:
        return {
            "_id": self.id,
            "name": self.name,
            "pid": self.pid,
            "_createdAt": self.created_at,
            "_updatedAt": self.updated_at,
            "extraInformation": {"host": self.host, "port": self.port, "conns": 0},
        }


@dataclass(frozen=True, slots=True)
class WriteCounts:
    """Writes to MongoDB, by kind (one Rocket.Chat write each)."""

    connect: int = 0
    disconnect: int = 0
    set_status: int = 0
    heartbeat: int = 0
    repeat_login: int = 0
    instance_heartbeat: int = 0
    instance_cleanup: int = 0
    instance_delete: int = 0

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def __add__(self, other: WriteCounts) -> WriteCounts:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return WriteCounts(*(a + b for a, b in pairs))

    def __sub__(self, other: WriteCounts) -> WriteCounts:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return WriteCounts(*(a - b for a, b in pairs))


@dataclass(frozen=True, slots=True)
class TickStats:
    """What one :meth:`RocketChatSimulator.tick` did, and the state it left."""

    tick: int
    elapsed: float
    """Simulated seconds since the simulator was created, after this tick."""
    writes: WriteCounts
    """Writes made by this tick."""
    crashed_instances: tuple[str, ...]
    live_connections: int
    connected_users: int
    live_instances: int


@dataclass(frozen=True, slots=True)
class StormResult:
    """What :meth:`RocketChatSimulator.reconnect_storm` did and how long the writes took."""

    users: int
    writes: WriteCounts
    seconds: float


@dataclass(frozen=True, slots=True)
class _LiveConnection:
    """A connection whose client the simulator still drives (heartbeats, status changes)."""

    id: str
    user_id: str
    instance_id: str
    status: str
    next_heartbeat: float


class RocketChatSimulator:
    """Writes Rocket.Chat's presence traffic to MongoDB and remembers what it wrote.

    Call :meth:`setup` first. The explicit actions (:meth:`connect`, :meth:`disconnect`,
    :meth:`set_status`, :meth:`heartbeat`, :meth:`repeat_login`, :meth:`instance_heartbeat`,
    :meth:`shutdown_instance`, :meth:`crash_instance`) each make Rocket.Chat's write for
    that event; :meth:`tick` draws random traffic made of them; :meth:`run` ticks in real
    time.
    """

    def __init__(
        self,
        db: Database[dict[str, Any]],
        *,
        users: int = 50,
        instances: int = 3,
        seed: int = 0,
        users_collection: str = "users",
        sessions_collection: str = "usersSessions",
        instances_collection: str = "instances",
        clock: Callable[[], datetime] = utc_now_ms,
        traffic: TrafficProfile | None = None,
        crash_after: float | None = None,
    ) -> None:
        if users < 0:
            raise ValueError(f"users must be 0 or more, got {users}")
        if instances < 1:
            raise ValueError(
                f"instances must be 1 or more (clients need a server), got {instances}"
            )
        self._db = db
        self._users_coll = db[users_collection]
        self._sessions_coll = db[sessions_collection]
        self._instances_coll = db[instances_collection]
        self._clock = clock
        self._rng = Random(seed)
        self.traffic = traffic if traffic is not None else TrafficProfile()
        self.crash_after = crash_after
        self._crashed_by_knob = False
        self._set_up = False
        self._elapsed = 0.0
        self._ticks = 0
        self._writes: Counter[str] = Counter()

        now = self._now()
        self._users: dict[str, SimulatedUser] = {}
        for number in range(1, users + 1):
            user = self._new_user(number)
            self._users[user.id] = user
        self._instances: dict[str, Instance] = {}
        self._instance_next_heartbeat: dict[str, float] = {}
        for index in range(instances):
            instance = Instance(
                id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
                name="rocket.chat",
                pid=self._rng.randint(100, 65_000),
                host=f"10.0.0.{11 + index}",
                port=3000,
                created_at=now,
                updated_at=now,
            )
            self._instances[instance.id] = instance
            self._instance_next_heartbeat[instance.id] = INSTANCE_HEARTBEAT_SECONDS

        # What usersSessions holds, as far as the simulator wrote it: user id -> entries in
        # array order. A user is a key once their document exists (it is never deleted).
        self._sessions: dict[str, list[Connection]] = {}
        # Users holding entries with a connection id (usually one), for disconnect.
        self._holders: dict[str, list[str]] = {}
        # Connections whose clients are alive, in creation order; dangling ones are not here.
        self._live: dict[str, _LiveConnection] = {}
        # The same, per user: user id -> live connection ids (a user is a key while connected).
        self._user_live: dict[str, dict[str, None]] = {}
        # Per connected user, how many devices they mean to have open this session.
        self._devices_wanted: dict[str, int] = {}
        # Clients whose instance went away: (due at, user id), reconnected by tick().
        self._pending_reconnects: list[tuple[float, str]] = []

    # ------------------------------------------------------------------ the model

    @property
    def users(self) -> tuple[SimulatedUser, ...]:
        return tuple(self._users.values())

    @property
    def user_ids(self) -> tuple[str, ...]:
        return tuple(self._users)

    @property
    def instances(self) -> tuple[Instance, ...]:
        return tuple(self._instances.values())

    def live_instance_ids(self) -> tuple[str, ...]:
        return tuple(i.id for i in self._instances.values() if i.state == "live")

    def live_connection_ids(self, user_id: str | None = None) -> tuple[str, ...]:
        """Connections whose clients are alive (not left dangling by a crash)."""
        if user_id is None:
            return tuple(self._live)
        return tuple(self._user_live.get(user_id, ()))

    def connected_user_ids(self) -> tuple[str, ...]:
        """Users with at least one live connection, in first-connection order."""
        return tuple(self._user_live)

    def sessions(self) -> dict[str, tuple[Connection, ...]]:
        """What the simulator believes ``usersSessions`` holds: user id -> connections."""
        return {uid: tuple(entries) for uid, entries in self._sessions.items()}

    def session_documents(self) -> dict[str, dict[str, Any]]:
        """The ``usersSessions`` documents the simulator believes exist, by ``_id``."""
        return {
            uid: {"_id": uid, "connections": [c.to_document() for c in entries]}
            for uid, entries in self._sessions.items()
        }

    def instance_documents(self) -> dict[str, dict[str, Any]]:
        """The ``instances`` documents the simulator believes exist (before any TTL expiry)."""
        return {i.id: i.to_document() for i in self._instances.values() if i.has_document}

    @property
    def stats(self) -> WriteCounts:
        """Every write since the simulator was created (setup() not counted)."""
        return WriteCounts(**self._writes)

    @property
    def elapsed(self) -> float:
        """Simulated seconds ticked so far."""
        return self._elapsed

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Creates the users, the live instances' documents and Rocket.Chat's indexes.

        Idempotent: existing documents are left as they are (an upsert with
        ``$setOnInsert``), so calling it again never resets a status the daemon wrote.
        """
        now = self._now()
        if self._users:
            self._users_coll.bulk_write(
                [
                    UpdateOne(
                        {"_id": user.id},
                        {"$setOnInsert": _without_id(user.to_document(now))},
                        upsert=True,
                    )
                    for user in self._users.values()
                ],
                ordered=False,
            )
        for instance in self._instances.values():
            if instance.state == "live":
                self._instances_coll.update_one(
                    {"_id": instance.id},
                    {"$setOnInsert": _without_id(instance.to_document())},
                    upsert=True,
                )
        # Rocket.Chat's InstanceStatus model: a silent instance expires after 60 s.
        self._instances_coll.create_index(
            [("_updatedAt", ASCENDING)], expireAfterSeconds=INSTANCE_TTL_SECONDS
        )
        # Rocket.Chat's UsersSessions model indexes.
        self._sessions_coll.create_index([("connections.id", ASCENDING)], sparse=True)
        self._sessions_coll.create_index([("connections.instanceId", ASCENDING)], sparse=True)
        self._set_up = True

    # ------------------------------------------------------------------ explicit actions

    def connect(self, user_id: str, instance_id: str | None = None, status: str = "online") -> str:
        """A new DDP connection logs in: pushes an entry (upsert). Returns its id.

        ``instance_id=None`` picks a live instance. An id the simulator does not know is
        accepted (a foreign instance); one it crashed or shut down is refused.
        """
        _check_status(status)
        if instance_id is None:
            live = self.live_instance_ids()
            if not live:
                raise ValueError(
                    "no live instance to connect to: every instance crashed or shut down"
                )
            instance_id = self._rng.choice(live)
        elif instance_id in self._instances and self._instances[instance_id].state != "live":
            raise ValueError(
                f"instance {instance_id} is {self._instances[instance_id].state}; "
                "connect to one of live_instance_ids()"
            )
        connection_id = _random_id(self._rng)
        self._push_connection(user_id, connection_id, instance_id, status, "connect")
        self._live[connection_id] = _LiveConnection(
            id=connection_id,
            user_id=user_id,
            instance_id=instance_id,
            status=status,
            next_heartbeat=self._elapsed + self._rng.uniform(*HEARTBEAT_INTERVAL_SECONDS),
        )
        self._user_live.setdefault(user_id, {})[connection_id] = None
        return connection_id

    def repeat_login(self, user_id: str, connection_id: str) -> None:
        """A login repeated on one connection: pushes the same connection id again."""
        instance_id = self._instance_of(user_id, connection_id)
        self._push_connection(user_id, connection_id, instance_id, "online", "repeat_login")

    def disconnect(self, connection_id: str) -> int:
        """A connection closes: pulls every entry with that id. Returns documents modified."""
        result = self._sessions_coll.update_many(
            {"connections.id": connection_id},
            {"$pull": {"connections": {"id": connection_id}}},
        )
        self._writes["disconnect"] += 1
        for uid in self._holders.pop(connection_id, ()):
            self._sessions[uid] = [c for c in self._sessions[uid] if c.id != connection_id]
        gone = self._forget_live(connection_id)
        if gone is not None and gone.user_id not in self._user_live:
            self._devices_wanted.pop(gone.user_id, None)
        return result.modified_count

    def set_status(self, user_id: str, connection_id: str, status: str) -> bool:
        """Away / back online on one connection (every entry with that id, via arrayFilters).

        Returns whether MongoDB modified the document.
        """
        _check_status(status)
        now = self._now()
        result = self._sessions_coll.update_one(
            {"_id": user_id},
            {"$set": {"connections.$[c].status": status, "connections.$[c]._updatedAt": now}},
            array_filters=[{"c.id": connection_id}],
        )
        self._writes["set_status"] += 1
        entries = self._sessions.get(user_id)
        if entries is not None:
            self._sessions[user_id] = [
                dataclasses.replace(c, status=status, updated_at=now)
                if c.id == connection_id
                else c
                for c in entries
            ]
        live = self._live.get(connection_id)
        if live is not None and live.user_id == user_id:
            self._live[connection_id] = dataclasses.replace(live, status=status)
        return result.modified_count == 1

    def heartbeat(self, user_id: str, connection_id: str) -> bool:
        """A client heartbeat: refreshes ``_updatedAt`` of the first entry with that id.

        Returns whether MongoDB modified the document.
        """
        now = self._now()
        result = self._sessions_coll.update_one(
            {"_id": user_id, "connections.id": connection_id},
            {"$set": {"connections.$._updatedAt": now}},
        )
        self._writes["heartbeat"] += 1
        entries = self._sessions.get(user_id)
        if entries is not None:
            # The positional operator updates only the first matching element.
            for index, c in enumerate(entries):
                if c.id == connection_id:
                    entries[index] = dataclasses.replace(c, updated_at=now)
                    break
        return result.modified_count == 1

    def instance_heartbeat(self, instance_id: str) -> bool:
        """An instance's 10-second ping: bumps its document's ``_updatedAt``.

        Rocket.Chat uses ``$currentDate``; the simulator sets the clock's time instead so a
        run is reproducible. Returns whether MongoDB modified the document.
        """
        now = self._now()
        result = self._instances_coll.update_one(
            {"_id": instance_id}, {"$set": {"_updatedAt": now}}
        )
        self._writes["instance_heartbeat"] += 1
        instance = self._instances.get(instance_id)
        if instance is not None and instance.has_document:
            self._instances[instance_id] = dataclasses.replace(instance, updated_at=now)
        return result.modified_count == 1

    def shutdown_instance(self, instance_id: str) -> int:
        """A clean shutdown: pulls the instance's connections from every user, then deletes
        its document. Its clients reconnect elsewhere on later ticks.

        Returns the number of ``usersSessions`` documents that lost connections.
        """
        result = self._sessions_coll.update_many(
            {}, {"$pull": {"connections": {"instanceId": instance_id}}}
        )
        self._writes["instance_cleanup"] += 1
        for uid, entries in self._sessions.items():
            pulled = [c for c in entries if c.instance_id == instance_id]
            if not pulled:
                continue
            self._sessions[uid] = [c for c in entries if c.instance_id != instance_id]
            for c in pulled:
                holders = self._holders.get(c.id, [])
                if uid in holders:
                    holders.remove(uid)
                if not holders:
                    self._holders.pop(c.id, None)
        self._instances_coll.delete_one({"_id": instance_id})
        self._writes["instance_delete"] += 1
        self._retire_instance(instance_id, "shut_down")
        return result.modified_count

    def crash_instance(self, instance_id: str) -> tuple[str, ...]:
        """The instance dies without a word: writes nothing.

        It stops heartbeating, and so do its connections; they dangle in ``usersSessions``
        and its document stays until the TTL index removes it. Its clients reconnect to a
        live instance on later ticks. Returns the ids of the connections left dangling.
        """
        if instance_id not in self._instances:
            raise ValueError(f"unknown instance {instance_id}; use one of live_instance_ids()")
        return self._retire_instance(instance_id, "crashed")

    def reconnect_storm(self, n_users: int) -> StormResult:
        """A proxy restart: n users drop every connection, then all reconnect at once.

        Connected users are picked first (in seeded random order), then offline ones. Each
        reconnects as many devices as it had (at least one), on live instances.
        """
        connected = list(self.connected_user_ids())
        self._rng.shuffle(connected)
        offline = [uid for uid in self._users if uid not in self._user_live]
        self._rng.shuffle(offline)
        chosen = (connected + offline)[: max(0, n_users)]
        before = self.stats
        started = time.perf_counter()
        devices: dict[str, int] = {}
        for uid in chosen:
            ids = self.live_connection_ids(uid)
            devices[uid] = max(1, len(ids))
            for connection_id in ids:
                self.disconnect(connection_id)
        for uid in chosen:
            for _ in range(devices[uid]):
                self.connect(uid)
            self._devices_wanted[uid] = devices[uid]
        seconds = time.perf_counter() - started
        return StormResult(users=len(chosen), writes=self.stats - before, seconds=seconds)

    # ------------------------------------------------------------------ random traffic

    def tick(self, dt_seconds: float = 1.0) -> TickStats:
        """One simulated step of ``dt_seconds`` of random Rocket.Chat traffic."""
        if not self._set_up:
            raise RuntimeError("call setup() before tick(): the users and instances must exist")
        if dt_seconds <= 0:
            raise ValueError(f"dt_seconds must be positive, got {dt_seconds}")
        before = self.stats
        self._elapsed += dt_seconds
        self._ticks += 1
        traffic = self.traffic
        rng = self._rng

        crashed: tuple[str, ...] = ()
        if (
            self.crash_after is not None
            and not self._crashed_by_knob
            and self._elapsed >= self.crash_after
            and self.live_instance_ids()
        ):
            victim = rng.choice(self.live_instance_ids())
            self.crash_instance(victim)
            self._crashed_by_knob = True
            crashed = (victim,)

        for instance_id in self.live_instance_ids():
            if self._instance_next_heartbeat[instance_id] <= self._elapsed:
                self.instance_heartbeat(instance_id)
                self._instance_next_heartbeat[instance_id] = (
                    self._elapsed + INSTANCE_HEARTBEAT_SECONDS
                )

        self._reconnect_due_clients()

        for live in list(self._live.values()):
            if _chance(rng, dt_seconds, traffic.connection_lifetime):
                self.disconnect(live.id)
                continue
            if live.status == "online" and _chance(rng, dt_seconds, traffic.online_before_away):
                self.set_status(live.user_id, live.id, "away")
            elif live.status == "away" and _chance(rng, dt_seconds, traffic.away_before_back):
                self.set_status(live.user_id, live.id, "online")
            if live.next_heartbeat <= self._elapsed:
                self.heartbeat(live.user_id, live.id)
                self._live[live.id] = dataclasses.replace(
                    self._live[live.id],
                    next_heartbeat=self._elapsed + rng.uniform(*HEARTBEAT_INTERVAL_SECONDS),
                )
            if _chance(rng, dt_seconds, traffic.repeat_login):
                self.repeat_login(live.user_id, live.id)

        if self.live_instance_ids():
            waiting = {uid for _, uid in self._pending_reconnects}
            for uid in self._users:
                if uid in waiting:
                    continue
                open_devices = len(self._user_live.get(uid, ()))
                if open_devices == 0:
                    if _chance(rng, dt_seconds, traffic.offline_before_login):
                        self._devices_wanted[uid] = rng.randint(1, traffic.max_devices)
                        self.connect(uid)
                elif open_devices < self._devices_wanted.get(uid, 1) and _chance(
                    rng, dt_seconds, traffic.extra_device
                ):
                    self.connect(uid)

        return TickStats(
            tick=self._ticks,
            elapsed=self._elapsed,
            writes=self.stats - before,
            crashed_instances=crashed,
            live_connections=len(self._live),
            connected_users=len(self.connected_user_ids()),
            live_instances=len(self.live_instance_ids()),
        )

    def run(
        self,
        stop: threading.Event,
        speed: float = 1.0,
        on_tick: Callable[[TickStats], None] | None = None,
        *,
        tick_seconds: float = 1.0,
    ) -> None:
        """Ticks in real time (``speed`` simulated seconds per wall second) until ``stop``.

        Waits on ``stop`` between ticks. When a tick takes longer than its slot, the next
        one starts at once and the schedule restarts from there (no burst to catch up).
        """
        if speed <= 0:
            raise ValueError(f"speed must be positive (1.0 is real time), got {speed}")
        period = tick_seconds / speed
        deadline = time.monotonic()
        while not stop.is_set():
            stats = self.tick(tick_seconds)
            if on_tick is not None:
                on_tick(stats)
            deadline += period
            delay = deadline - time.monotonic()
            if delay < 0:
                deadline, delay = time.monotonic(), 0.0
            if stop.wait(delay):
                return

    # ------------------------------------------------------------------ internals

    def _now(self) -> datetime:
        return _to_ms(self._clock())

    def _new_user(self, number: int) -> SimulatedUser:
        rng = self._rng
        user_id = _random_id(rng)
        roll = rng.random()
        status_default: StatusDefault | None
        if roll < 0.60:
            status_default = None
        elif roll < 0.70:
            status_default = "online"
        elif roll < 0.85:
            status_default = "busy"
        elif roll < 0.95:
            status_default = "away"
        else:
            status_default = "offline"
        status_text = rng.choice(_STATUS_TEXTS) if rng.random() < 0.25 else None
        return SimulatedUser(user_id, f"user{number}", status_default, status_text)

    def _push_connection(
        self,
        user_id: str,
        connection_id: str,
        instance_id: str,
        status: str,
        kind: WriteKind,
    ) -> None:
        now = self._now()
        entry = Connection(connection_id, instance_id, status, now, now)
        self._sessions_coll.update_one(
            {"_id": user_id}, {"$push": {"connections": entry.to_document()}}, upsert=True
        )
        self._writes[kind] += 1
        self._sessions.setdefault(user_id, []).append(entry)
        holders = self._holders.setdefault(connection_id, [])
        if user_id not in holders:
            holders.append(user_id)

    def _forget_live(self, connection_id: str) -> _LiveConnection | None:
        """Stops driving a connection's client; returns what it was, if it was live."""
        live = self._live.pop(connection_id, None)
        if live is None:
            return None
        mine = self._user_live[live.user_id]
        del mine[connection_id]
        if not mine:
            del self._user_live[live.user_id]
        return live

    def _instance_of(self, user_id: str, connection_id: str) -> str:
        live = self._live.get(connection_id)
        if live is not None:
            return live.instance_id
        for c in self._sessions.get(user_id, ()):
            if c.id == connection_id:
                return c.instance_id
        raise ValueError(
            f"connection {connection_id} of user {user_id} is not one the simulator made"
        )

    def _retire_instance(self, instance_id: str, state: InstanceState) -> tuple[str, ...]:
        instance = self._instances.get(instance_id)
        if instance is not None:
            self._instances[instance_id] = dataclasses.replace(instance, state=state)
        orphans = [c for c in self._live.values() if c.instance_id == instance_id]
        for c in orphans:
            self._forget_live(c.id)
        low, high = self.traffic.reconnect_delay
        for uid in dict.fromkeys(c.user_id for c in orphans):
            self._pending_reconnects.append((self._elapsed + self._rng.uniform(low, high), uid))
        self._pending_reconnects.sort()
        return tuple(c.id for c in orphans)

    def _reconnect_due_clients(self) -> None:
        due = [p for p in self._pending_reconnects if p[0] <= self._elapsed]
        if not due or not self.live_instance_ids():
            return
        self._pending_reconnects = [p for p in self._pending_reconnects if p[0] > self._elapsed]
        for _, uid in due:
            self.connect(uid)


def _check_status(status: str) -> None:
    if status not in CONNECTION_STATUSES:
        raise ValueError(
            f"connection status must be one of {', '.join(CONNECTION_STATUSES)}, got {status!r}"
        )


def _without_id(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "_id"}
