"""Telling others of a stored change: the broker's ``presence.status`` event.

Owns the payload Rocket.Chat's presence service broadcasts on every change of a user's
stored status, ``[{user: {_id, username, status, statusText, roles}, previousStatus}]``
(the EVENT's ``data`` is that one-element args array), built from a landed
:class:`~presenced.engine.Transition`, and the fan-out to whoever listens. A field the
user document does not have is left out, as JavaScript's ``undefined`` is when Rocket.Chat
serializes it.

Only transitions reach here: the writer announces a change once, and only when this
process's conditional write changed the document, so another presenced (or Rocket.Chat)
that wrote the same value does not announce it twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from presenced.engine import Transition
from presenced.presence import ABSENT

__all__ = ["PRESENCE_STATUS", "Notifier", "status_payload"]

PRESENCE_STATUS: Final = "presence.status"


def status_payload(
    user_id: Any, username: object, status: str, status_text: object, roles: object,
    previous_status: object,
) -> dict[str, Any]:
    """One ``presence.status`` argument: ``{user: {...}, previousStatus}``."""
    user: dict[str, Any] = {"_id": user_id}
    for key, value in (
        ("username", username), ("status", status), ("statusText", status_text),
        ("roles", roles),
    ):
        if value is not ABSENT and value is not None:
            user[key] = value
    payload: dict[str, Any] = {"user": user}
    if previous_status is not ABSENT:
        payload["previousStatus"] = previous_status
    return payload


def transition_payload(t: Transition) -> dict[str, Any]:
    return status_payload(
        t.user_id, t.username if t.username is not None else ABSENT, t.current.status.value,
        t.status_text, t.roles, t.previous_status,
    )


class Notifier:
    """Fans each transition out to the sinks (the broker node's ``broadcast``)."""

    def __init__(self) -> None:
        self.sinks: list[Callable[[str, list[Any]], object]] = []
        self.enabled = True
        """``presence.toggleBroadcast``: off stops announcing, state is kept."""

    def transition(self, t: Transition) -> None:
        self.announce([transition_payload(t)])

    def announce(self, data: list[Any]) -> None:
        if not self.enabled:
            return
        for sink in self.sinks:
            sink(PRESENCE_STATUS, data)
