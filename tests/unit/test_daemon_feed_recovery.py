"""When the feed fails and its position has meanwhile fallen out of MongoDB's history,
the daemon reopens from now AND reconciles everything (nothing is silently skipped)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from pymongo.errors import AutoReconnect

from presenced.config import load_settings
from presenced.daemon import Daemon
from presenced.feed.keys import Key
from presenced.feed.source import HistoryLost


class EndOfTest(Exception):
    """Raised by the fake source's third poll to end the feed loop."""


class FailingThenLostSource:
    """poll() fails once; reopening at the old position finds the history lost."""

    def __init__(self) -> None:
        self.opened: list[Any] = []
        self.polls = 0

    def open(self, position: Any) -> None:
        self.opened.append(position)
        if position == "old-token":
            raise HistoryLost("gone")

    def position(self) -> Any:
        return "new-token" if self.opened and self.opened[-1] is None else "old-token"

    def poll(self, max_events: int = 1000) -> list[Key]:
        self.polls += 1
        if self.polls == 1:
            raise AutoReconnect("connection reset")
        raise EndOfTest

    def close(self) -> None:
        pass


def test_a_lost_position_found_while_recovering_the_feed_triggers_a_reconciliation() -> None:
    settings = load_settings(
        {"MONGO_URL": "mongodb://127.0.0.1:1/rocketchat?replicaSet=rs0"}, env_file=None
    ).for_command("run")
    daemon = Daemon(settings)
    source = FailingThenLostSource()
    daemon._source = source
    daemon._safe_position = "old-token"
    reconciled: list[str] = []

    async def fake_reconcile(cause: str) -> None:
        reconciled.append(cause)

    daemon._reconcile = fake_reconcile  # type: ignore[method-assign]

    async def main() -> None:
        with trio.fail_after(30):
            await daemon._feed_loop()

    with pytest.raises(EndOfTest):  # the loop ran until the source said so (one 1 s backoff)
        trio.run(main)
    assert source.opened == ["old-token", None]
    assert reconciled == ["history_lost"]
