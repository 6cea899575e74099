"""Rocket.Chat's ``presence`` service, served on the broker by presenced.

Owns the actions Rocket.Chat's callers (``ddp-streamer``, the Meteor methods) invoke as
``presence.<method>`` with positional argument arrays, and the events the service listens
to. Each action writes what Rocket.Chat's presence service writes (the ``usersSessions`` /
``users`` shapes of :class:`~presenced.store.ActionStore`), then hands the user to the
engine at once (``refresh``): the status write and the ``presence.status`` broadcast do
not wait for the feed, and the feed's later key for the same change finds nothing to do.

Return values are Rocket.Chat 7.x's: ``newConnection`` → ``{uid, connectionId}``,
``removeConnection`` → ``{uid, session}``, ``setStatus`` / ``setConnectionStatus`` →
bool, ``removeLostConnections`` → user ids, ``getConnectionCount`` → ``{current, max}``;
None (JavaScript's ``undefined``) where Rocket.Chat returns nothing. There is no
connection cap: ``max`` is :data:`NO_CAP`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from loguru import logger
from pymongo.errors import OperationFailure, PyMongoError, ServerSelectionTimeoutError

from presenced.blocking import StoreCalls
from presenced.broker.node import ActionError
from presenced.clock import Clock
from presenced.engine import Engine, Transition
from presenced.health import one_line
from presenced.notify import Notifier, status_payload
from presenced.presence import ABSENT, from_ms
from presenced.store import ActionStore

__all__ = ["EVENTS", "NO_CAP", "STATUS_TEXT_MAX", "PresenceService"]

NO_CAP: Final = 2**53 - 1
"""``getConnectionCount().max``: Rocket.Chat's service caps unlicensed use at 200
connections; presenced has no cap (JavaScript's ``Number.MAX_SAFE_INTEGER``)."""
STATUS_TEXT_MAX: Final = 120
STATUSES: Final = ("online", "away", "busy", "offline")
EVENTS: Final = ("$node.disconnected", "watch.instanceStatus")

Refresh = Callable[[Sequence[Any]], Awaitable[list[Transition]]]


class PresenceService:
    """The ``presence`` service's actions and event handlers."""

    name = "presence"

    def __init__(
        self,
        db: StoreCalls,
        store: ActionStore,
        engine: Engine,
        clock: Clock,
        notifier: Notifier,
        *,
        refresh: Refresh,
        live_nodes: Callable[[], list[str]] = list,
        secrets: Sequence[str] = (),
    ) -> None:
        self._db = db
        self._store = store
        self._engine = engine
        self._clock = clock
        self._notifier = notifier
        self._refresh = refresh
        self._live_nodes = live_nodes
        self._secrets = list(secrets)
        self._actions: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "newConnection": self.new_connection,
            "updateConnection": self.update_connection,
            "removeConnection": self.remove_connection,
            "removeLostConnections": self.remove_lost_connections,
            "setStatus": self.set_status,
            "setConnectionStatus": self.set_connection_status,
            "updateUserPresence": self.update_user_presence,
            "toggleBroadcast": self.toggle_broadcast,
            "getConnectionCount": self.get_connection_count,
            "getPeakConnections": self.get_peak_connections,
            "resetPeakConnections": self.reset_peak_connections,
        }

    @property
    def actions(self) -> Mapping[str, Callable[[Any], Awaitable[Any]]]:
        return self._actions

    @property
    def events(self) -> Sequence[str]:
        return EVENTS

    # -- actions ------------------------------------------------------------------------
    async def new_connection(self, params: Any) -> Any:
        uid, session, node_id = _args(params, 3)
        if not uid or not session:
            return None
        _strings(uid=uid, session=session)
        instance = node_id if isinstance(node_id, str) else None
        if instance is None:
            raise _invalid("nodeId must be a string")
        await self._write(self._store.add_connection, uid, session, instance, self._now())
        await self._refresh([uid])
        return {"uid": uid, "connectionId": session}

    async def update_connection(self, params: Any) -> Any:
        uid, connection_id = _args(params, 2)
        _strings(uid=uid, connectionId=connection_id)
        now = self._clock.now_ms()
        counted = self._engine.counts_connection(uid, connection_id, now)
        if not await self._write(self._store.touch_connection, uid, connection_id, from_ms(now)):
            return None
        if not counted:
            # The heartbeat may bring the connection back (or the user is not held): derive
            # now. Otherwise the answer cannot change; the feed brings the new date.
            await self._refresh([uid])
        return {"uid": uid, "connectionId": connection_id}

    async def remove_connection(self, params: Any) -> Any:
        uid, session, _node_id = _args(params, 3)
        if not uid or not session:
            return None
        _strings(uid=uid, session=session)
        await self._write(self._store.remove_connection, session)
        await self._refresh([uid])
        return {"uid": uid, "session": session}

    async def remove_lost_connections(self, params: Any) -> Any:
        (node_id,) = _args(params, 1)
        if node_id:
            _strings(nodeID=node_id)
            affected = await self._write(self._store.remove_instance_connections, node_id)
        else:
            live = self._live_nodes()
            if not live:
                return []
            affected = await self._write(self._store.remove_other_instances_connections, live)
        if affected:
            await self._refresh(affected)
        return affected

    async def set_status(self, params: Any) -> Any:
        uid, status_default, status_text = _args(params, 3)
        _strings(uid=uid, statusDefault=status_default)
        if status_default not in STATUSES:
            raise _invalid(f"statusDefault must be one of {', '.join(STATUSES)}")
        if status_text is not None and not isinstance(status_text, str):
            raise _invalid("statusText must be a string")
        text = None if status_text is None else status_text.strip()[:STATUS_TEXT_MAX]
        before = await self._user(uid)
        changed = await self._write(self._store.set_status_default, uid, status_default, text)
        transitions = await self._refresh([uid])
        after = await self._user(uid)
        if changed and before is not None and after is not None:
            status = after.get("status")
            if status == before.get("status") and isinstance(status, str):
                # The text (or the chosen status) changed and the stored status did not,
                # so no transition told anyone: Rocket.Chat still tells every client,
                # which shows the text.
                self._notifier.announce([
                    status_payload(
                        uid, after.get("username", ABSENT), status,
                        after.get("statusText", ABSENT), after.get("roles", ABSENT), status,
                    )
                ])
        return changed or bool(transitions)

    async def set_connection_status(self, params: Any) -> Any:
        uid, status, session = _args(params, 3)
        _strings(uid=uid, status=status, session=session)
        if status not in STATUSES:
            raise _invalid(f"status must be one of {', '.join(STATUSES)}")
        changed = await self._write(
            self._store.set_connection_status, uid, session, status, self._now()
        )
        await self._refresh([uid])
        return changed

    async def update_user_presence(self, params: Any) -> Any:
        (uid,) = _args(params, 1)
        _strings(uid=uid)
        await self._refresh([uid])
        return None

    async def toggle_broadcast(self, params: Any) -> Any:
        (enabled,) = _args(params, 1)
        self._notifier.enabled = bool(enabled)
        logger.info("presence.status broadcasts {}", "on" if enabled else "off")
        return None

    async def get_connection_count(self, params: Any) -> Any:
        return {"current": self._engine.stats().connections, "max": NO_CAP}

    async def get_peak_connections(self, params: Any) -> Any:
        (reset,) = _args(params, 1)
        peak = self._engine.stats().peak_connections
        if reset:
            self._engine.reset_peak()
        return peak

    async def reset_peak_connections(self, params: Any) -> Any:
        self._engine.reset_peak()
        return None

    # -- events -------------------------------------------------------------------------
    async def on_event(self, event: str, data: Any, sender: str) -> None:
        if event == "watch.instanceStatus":
            arg = data[0] if isinstance(data, list) and data else data
            if (
                isinstance(arg, Mapping) and arg.get("clientAction") == "removed"
                and isinstance(arg.get("id"), str)
            ):
                await self.remove_lost_connections([arg["id"]])
        elif event == "$node.disconnected":
            arg = data[0] if isinstance(data, list) and data else data
            node = arg.get("node") if isinstance(arg, Mapping) else None
            node_id = node.get("id") if isinstance(node, Mapping) else None
            if isinstance(node_id, str):
                await self.on_node_lost(node_id)

    async def on_node_lost(self, node_id: str) -> None:
        removed = await self.remove_lost_connections([node_id])
        if removed:
            logger.info("removed the connections of lost node {} ({} users)", node_id,
                        len(removed))

    # -- helpers ------------------------------------------------------------------------
    def _now(self) -> Any:
        return from_ms(self._clock.now_ms())

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self._db.write(fn, *args)
        except PyMongoError as exc:
            raise _mongo_error(exc, self._secrets) from None

    async def _user(self, uid: Any) -> dict[str, Any] | None:
        """The user's presence fields as stored now (None: no such user)."""
        try:
            users = await self._db.read(self._db.store.load_users, [uid])
        except PyMongoError as exc:
            raise _mongo_error(exc, self._secrets) from None
        return users.get(uid)


def _args(params: Any, count: int) -> list[Any]:
    """Rocket.Chat's positional arguments, padded with None (``undefined``)."""
    if params is None:
        params = []
    if not isinstance(params, list):
        raise _invalid("params must be the positional argument array")
    return (params + [None] * count)[:count]


def _strings(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, str):
            raise _invalid(f"{name} must be a string")


def _invalid(message: str) -> ActionError:
    return ActionError(
        f"Parameters validation error: {message}", name="ValidationError", code=422,
        type="VALIDATION_ERROR",
    )


def _mongo_error(exc: PyMongoError, secrets: Sequence[str]) -> ActionError:
    """A database failure as the Node.js driver's error would reach a caller (one line,
    secrets masked)."""
    text = one_line(exc, secrets)
    if isinstance(exc, ServerSelectionTimeoutError):
        return ActionError(text, name="MongoServerSelectionError", retryable=True)
    if isinstance(exc, OperationFailure):
        return ActionError(text, name="MongoServerError", code=exc.code or 500)
    return ActionError(text, name="MongoNetworkError", retryable=True)
