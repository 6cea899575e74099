"""presenced.rocketchat without sockets: version comparison, and run()'s schedule and log.

The schedule runs under a MockClock that jumps whenever everything waits, with ``check``
replaced by a script of reports, so ten minutes pass in no time. The real HTTP exchanges are
tested in tests/integration/test_rocketchat_rest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing
from loguru import logger

from presenced.clock import Clock
from presenced.config import Settings
from presenced.rocketchat import (
    RECHECK_S,
    SUPPORTED,
    RestReport,
    RocketChat,
    parse_version,
    supported_text,
    version_supported,
)

# --- versions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("7.5.1", (7, 5, 1)),
        ("7.5", (7, 5, 0)),
        ("v6.13.0", (6, 13, 0)),
        (" 7.10.2 ", (7, 10, 2)),
        ("7.6.0-develop", (7, 6, 0)),
        ("8.0.0-rc.1", (8, 0, 0)),
        ("7.5.1+build.42", (7, 5, 1)),
        ("develop", None),
        ("7", None),
        ("7.x", None),
        ("", None),
        ("7.5.1.2", None),
    ],
)
def test_parse_version_reads_major_minor_and_patch(
    text: str, parsed: tuple[int, int, int] | None
) -> None:
    assert parse_version(text) == parsed


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("6.0.0", True),
        ("6.0", True),
        ("6.13.2", True),
        ("7.5", True),
        ("7.99.99", True),
        ("5.4.9", False),
        ("5.99", False),
        ("8.0", False),
        ("8.0.0-rc.1", False),
        ("10.0.0", False),
        ("develop", None),
    ],
)
def test_the_supported_range_is_6_x_and_7_x(version: str, supported: bool | None) -> None:
    assert SUPPORTED == (">=6.0", "<8.0")
    assert version_supported(version) is supported


def test_versions_compare_as_numbers_not_text() -> None:
    assert version_supported("7.10.0", (">=7.9",)) is True
    assert version_supported("7.9.0", (">7.10",)) is False


def test_every_bound_operator_is_understood() -> None:
    assert version_supported("7.5.1", ("==7.5.1", "<=7.5.1", ">7.5.0", "<7.6")) is True


def test_a_malformed_bound_is_a_bug() -> None:
    with pytest.raises(ValueError, match="not an operator and a version"):
        version_supported("7.5.1", ("~7.5",))


def test_the_range_reads_as_people_write_it() -> None:
    assert supported_text() == ">=6.0, <8.0"


def test_from_settings_builds_the_check_only_when_rocketchat_url_is_set() -> None:
    clock = Clock(epoch_ms=0)
    assert RocketChat.from_settings(Settings(), clock) is None
    settings = Settings(rocketchat_url="https://u:pw-123456@chat.example.com",
                        rocketchat_username="bot", rocketchat_password="s3cret-pw")
    rc = RocketChat.from_settings(settings, clock)
    assert rc is not None
    assert rc.credentials
    assert repr(rc) == "RocketChat(url='https://u:****@chat.example.com', username='bot')"
    assert rc.details() == {
        "url": "https://u:****@chat.example.com", "supported": ">=6.0, <8.0",
        "version": None, "version_ok": None, "logged_in": None, "admin": None,
        "problem": None, "checked_at": None,
    }


# --- run(): the schedule and the log -------------------------------------------------------

OK = RestReport(reachable=True, version="7.5", version_ok=True, logged_in=True, admin=True)
DOWN = RestReport(reachable=False, version=None, version_ok=None, logged_in=None, admin=None,
                  problems=["cannot connect to http://rc (GET /api/info): refused"])


class Scripted(RocketChat):
    """``check`` answers the next report of the script (a bug when it is an exception) and
    notes the trio time it was called at."""

    def __init__(self, script: list[RestReport | Exception]) -> None:
        super().__init__("http://rc", "bot", "pw-123456", clock=Clock(epoch_ms=0))
        self.script = script
        self.at: list[float] = []

    async def check(self) -> RestReport:
        self.at.append(trio.current_time())
        step = self.script[min(len(self.at), len(self.script)) - 1]
        if isinstance(step, Exception):
            raise step
        self._last = step
        return step


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: lines.append((m.record["level"].name, m.record["message"])),
        level="DEBUG", format="{message}",
    )
    yield lines
    logger.remove(sink)


def run_for(rc: Scripted, checks: int) -> None:
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rc.run)
            with trio.fail_after(RECHECK_S * (checks + 1)):
                while len(rc.at) < checks:
                    await trio.sleep(1)
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_run_checks_at_start_and_every_ten_minutes() -> None:
    rc = Scripted([OK])
    run_for(rc, 4)
    assert RECHECK_S == 600
    assert rc.at == [0, 600, 1200, 1800]


def test_a_failure_is_logged_once_and_the_recovery_once(
    logs: list[tuple[str, str]],
) -> None:
    rc = Scripted([OK, DOWN, DOWN, DOWN, OK, OK])
    run_for(rc, 6)
    assert [level for level, _ in logs] == ["INFO", "WARNING", "INFO"]
    assert logs[1][1] == (
        "Rocket.Chat REST check failed: cannot connect to http://rc (GET /api/info): refused;"
        " checking again every 600 s (presence is not affected)"
    )
    assert logs[2][1].startswith("Rocket.Chat REST API at http://rc works again after 1800 s:")


def test_a_different_failure_is_logged_again(logs: list[tuple[str, str]]) -> None:
    other = RestReport(reachable=True, version="7.5", version_ok=True, logged_in=False,
                       admin=None, problems=["http://rc refused the login of user 'bot'"])
    rc = Scripted([DOWN, DOWN, other, other])
    run_for(rc, 4)
    assert [level for level, _ in logs] == ["WARNING", "WARNING"]


def test_a_bug_in_a_check_is_logged_and_the_checks_go_on(
    logs: list[tuple[str, str]],
) -> None:
    rc = Scripted([RuntimeError("boom"), OK])
    run_for(rc, 3)
    assert rc.at == [0, 600, 1200]
    assert logs[0][0] == "ERROR"
    assert "failed unexpectedly (a bug in presenced)" in logs[0][1]
    assert [level for level, _ in logs[1:]] == ["INFO"]


def test_an_unsupported_version_is_warned_again_only_when_it_changes(
    logs: list[tuple[str, str]],
) -> None:
    def at(version: str, ok: bool) -> RestReport:
        return RestReport(reachable=True, version=version, version_ok=ok, logged_in=True,
                          admin=True)

    rc = Scripted([at("8.0", False), at("8.0", False), at("8.1", False), at("7.5", True),
                   at("8.1", False)])
    run_for(rc, 5)
    warnings = [text for level, text in logs if level == "WARNING"]
    assert [w.split(" at ")[0] for w in warnings] == [
        "Rocket.Chat 8.0", "Rocket.Chat 8.1", "Rocket.Chat 8.1",
    ]
