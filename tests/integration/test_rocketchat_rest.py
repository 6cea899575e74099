"""The Rocket.Chat REST check against a real local HTTP server that answers as Rocket.Chat does.

``RocketChatDouble`` is a ``ThreadingHTTPServer`` on 127.0.0.1 answering ``/api/info``,
``/api/v1/login`` and ``/api/v1/me`` with the shapes Rocket.Chat documents (``/api/info``
without credentials gives only major.minor, as Rocket.Chat's ``getServerInfo`` does), with
switches per test: the version, the password, the roles, a token that has expired, raw
answers for garbage, and answers that never come. ``run()`` is driven under a MockClock
that never moves by itself: the test jumps it by RECHECK_S once a check has finished and the
loop sleeps, so real sockets and the 10-minute schedule meet without waiting.

Every log line is captured raw (no redaction configured, ``add_secrets`` disabled), so a
password or token that reached a line would be seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from loguru import logger

import presenced.rocketchat
from presenced.clock import Clock
from presenced.log import reset_logging
from presenced.rocketchat import RECHECK_S, RestReport, RocketChat
from presenced.testing.processes import free_port

from .rocketchat_double import PASSWORD, USER_ID, USERNAME, Raw, RocketChatDouble, _json


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """Every log line, raw: level and the whole text (message, bound values, traceback)."""
    reset_logging()
    # The module also hands the token to log.py for masking; turned off here so that a
    # token in a line would show.
    monkeypatch.setattr(presenced.rocketchat, "add_secrets", lambda values: None)
    lines: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: lines.append((m.record["level"].name, str(m))),
        level="DEBUG", format="{message} {extra} {exception}",
    )
    yield lines
    logger.remove(sink)
    reset_logging()


def client(url: str, *, username: str | None = USERNAME, password: str | None = PASSWORD,
           timeout_s: float = 10.0) -> RocketChat:
    return RocketChat(url, username, password, clock=Clock(), timeout_s=timeout_s)


def check(rc: RocketChat) -> RestReport:
    return trio.run(rc.check)


def run_checks(rc: RocketChat, count: int) -> list[RestReport]:
    """``rc.run()`` through ``count`` checks, RECHECK_S apart on a MockClock."""
    reports: list[RestReport] = []
    clock = trio.testing.MockClock()

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rc.run)
            while True:
                # run() has checked and sleeps once the report is there and all wait.
                while rc.last is None or (reports and rc.last is reports[-1]):
                    await trio.sleep(0)  # sockets make progress in other threads
                    await trio.testing.wait_all_tasks_blocked(cushion=0.001)
                reports.append(rc.last)
                if len(reports) == count:
                    break
                clock.jump(RECHECK_S)
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=clock)
    return reports


def secret_free(rc: RocketChat, double: RocketChatDouble, logs: list[tuple[str, str]]) -> None:
    """Neither the password nor any token issued shows in logs, problems, details or repr."""
    shown = [text for _, text in logs]
    shown.append(json.dumps(rc.details()))
    shown.append(repr(rc))
    if rc.last is not None:
        shown += [*rc.last.problems, repr(rc.last)]
    everything = "\n".join(shown)
    for secret in [PASSWORD, *double.tokens]:
        assert secret not in everything


def lines(logs: list[tuple[str, str]], level: str, containing: str = "") -> list[str]:
    return [text for lv, text in logs if lv == level and containing in text]


# --- the documented answers -------------------------------------------------------------------


def test_a_supported_version_and_an_admin_login_give_a_report_without_problems(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rc = client(rocketchat.url)
    [report] = run_checks(rc, 1)
    assert report == RestReport(
        reachable=True, version="7.5", version_ok=True, logged_in=True, admin=True,
        problems=[], checked_at_ms=report.checked_at_ms,
    )
    assert rocketchat.paths == ["GET /api/info", "POST /api/v1/login", "GET /api/v1/me"]
    assert lines(logs, "WARNING") == []
    [info] = lines(logs, "INFO")
    assert "version 7.5 (supported)" in info
    assert f"logged in as '{USERNAME}' (with the admin role)" in info
    secret_free(rc, rocketchat, logs)


def test_details_give_the_last_check_for_ready(rocketchat: RocketChatDouble) -> None:
    rc = client(rocketchat.url)
    assert rc.details()["checked_at"] is None
    check(rc)
    details = rc.details()
    assert details == {
        "url": rocketchat.url, "supported": ">=6.0, <8.0", "version": "7.5",
        "version_ok": True, "logged_in": True, "admin": True, "problem": None,
        "checked_at": details["checked_at"],
    }
    assert details["checked_at"].endswith("Z")


def test_the_token_is_kept_between_checks(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rc = client(rocketchat.url)
    reports = run_checks(rc, 3)
    assert all(r.logged_in for r in reports)
    assert rocketchat.logins == 1
    assert rocketchat.me_calls == 3
    assert len(lines(logs, "INFO")) == 1


def test_without_credentials_only_the_version_is_checked(
    rocketchat: RocketChatDouble,
) -> None:
    report = check(client(rocketchat.url, username=None, password=None))
    assert (report.version_ok, report.logged_in, report.admin, report.problems) == (
        True, None, None, [],
    )
    assert rocketchat.paths == ["GET /api/info"]


# --- versions ------------------------------------------------------------------------------


def test_a_version_outside_the_range_is_warned_once_over_three_checks(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rocketchat.version = "8.1.0"
    reports = run_checks(client(rocketchat.url), 3)
    assert [r.version_ok for r in reports] == [False, False, False]
    assert all(r.problems == [] for r in reports)
    [warning] = lines(logs, "WARNING")
    assert "Rocket.Chat 8.1" in warning
    assert "outside the versions presenced supports (>=6.0, <8.0)" in warning


def test_a_version_below_the_range_is_warned(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rocketchat.version = "5.4.9"
    [report] = run_checks(client(rocketchat.url), 1)
    assert report.version_ok is False
    assert len(lines(logs, "WARNING", "outside the versions")) == 1


def test_an_unreadable_version_is_warned_once(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rocketchat.raw["/api/info"] = _json(200, {"version": "develop", "success": True})
    reports = run_checks(client(rocketchat.url), 2)
    assert [(r.version, r.version_ok) for r in reports] == [("develop", None)] * 2
    [warning] = lines(logs, "WARNING")
    assert "reports version 'develop', which presenced cannot read" in warning


# --- login ---------------------------------------------------------------------------------


def test_a_wrong_password_is_a_problem_and_the_password_never_shows(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rocketchat.password = "the-real-one"
    rc = client(rocketchat.url)
    reports = run_checks(rc, 2)
    assert [(r.reachable, r.logged_in, r.admin) for r in reports] == [(True, False, None)] * 2
    [problem] = reports[0].problems
    assert f"refused the login of user '{USERNAME}' (HTTP 401: Unauthorized)" in problem
    assert "ROCKETCHAT_PASSWORD" in problem
    [warning] = lines(logs, "WARNING")  # the same failure twice: logged once
    assert problem in warning
    assert rc.details()["problem"] == problem
    secret_free(rc, rocketchat, logs)


def test_an_expired_token_is_replaced_by_one_new_login(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rocketchat.expire_first_token = True
    rc = client(rocketchat.url)
    [report] = run_checks(rc, 1)
    assert (report.logged_in, report.admin, report.problems) == (True, True, [])
    assert rocketchat.logins == 2
    assert rocketchat.me_calls == 2
    assert lines(logs, "WARNING") == []
    secret_free(rc, rocketchat, logs)


def test_a_token_refused_right_after_login_is_a_problem_not_a_loop(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rocketchat.raw["/api/v1/me"] = _json(
        401, {"status": "error", "message": "You must be logged in to do this."}
    )
    rc = client(rocketchat.url)
    report = check(rc)
    assert rocketchat.logins == 2
    assert report.logged_in is False
    assert "answered HTTP 401 twice" in report.problems[0]
    secret_free(rc, rocketchat, logs)


def test_an_account_without_the_admin_role_gets_one_warning_and_no_problem(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rocketchat.roles = ["user", "bot"]
    reports = run_checks(client(rocketchat.url), 3)
    assert [(r.logged_in, r.admin, r.problems) for r in reports] == [(True, False, [])] * 3
    [warning] = lines(logs, "WARNING")
    assert f"user '{USERNAME}'" in warning
    assert "does not have the admin role" in warning
    assert "admin-only REST endpoints" in warning
    assert "presence is not affected" in warning


def test_a_two_factor_account_is_named_as_the_problem(rocketchat: RocketChatDouble) -> None:
    rocketchat.raw["/api/v1/login"] = _json(
        401, {"status": "error", "error": "totp-required", "message": "TOTP Required"}
    )
    [problem] = check(client(rocketchat.url)).problems
    assert "two-factor" in problem
    assert "ROCKETCHAT_USERNAME" in problem


def test_an_error_answer_that_echoes_the_password_never_shows_it(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rocketchat.raw["/api/v1/login"] = _json(
        500, {"success": False, "error": f"crash while checking password {PASSWORD}",
              "stack": f"Error: {PASSWORD}\n    at login"},
    )
    rc = client(rocketchat.url)
    [report] = run_checks(rc, 1)
    [problem] = report.problems
    assert "answered POST /api/v1/login with HTTP 500 Internal Server Error" in problem
    assert "crash while checking password ****" in problem
    assert len(lines(logs, "WARNING")) == 1
    secret_free(rc, rocketchat, logs)


def test_an_html_error_page_that_echoes_the_password_never_shows_it(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    page = f"<html><body>500: bad password {PASSWORD}</body></html>".encode()
    rocketchat.raw["/api/v1/login"] = (500, "text/html", page, {})
    rc = client(rocketchat.url)
    [report] = run_checks(rc, 1)
    assert "HTTP 500" in report.problems[0]
    secret_free(rc, rocketchat, logs)


# --- garbage --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "expected"),
    [
        ("/api/info", (200, "text/html", b"<!DOCTYPE html><html>login</html>", {}),
         "answered GET /api/info with an HTML page (HTTP 200, text/html)"),
        ("/api/info", (200, "text/plain", b"OK", {}),
         "answered GET /api/info with a body that is not JSON"),
        ("/api/info", (200, "application/json", b"[1, 2]", {}),
         "answered GET /api/info with JSON that is not an object"),
        ("/api/info", _json(200, {"success": True}), "answered GET /api/info without a version"),
        ("/api/info", _json(200, {"version": 7.5}), "answered GET /api/info without a version"),
        ("/api/info", (503, "text/html", b"<h1>Service Unavailable</h1>", {}),
         "answered GET /api/info with HTTP 503 Service Unavailable"),
        ("/api/info", _json(404, {"success": False}),
         "answered GET /api/info with HTTP 404: it does not look like Rocket.Chat"),
        ("/api/v1/login", _json(200, {"status": "success", "data": {"token": "x"}}),
         "without data.authToken and data.userId"),
        ("/api/v1/login", (200, "application/json", b"{not json", {}),
         "answered POST /api/v1/login with a body that is not JSON"),
        ("/api/info", (200, "application/json", b"[" * 100_000, {}),
         "answered GET /api/info with a body that is not JSON"),
        ("/api/v1/me", _json(200, {"_id": USER_ID, "roles": "admin"}),
         "answered GET /api/v1/me without a list of roles"),
        ("/api/v1/me", (502, "text/html", b"<html>Bad Gateway</html>", {}),
         "answered GET /api/v1/me with HTTP 502 Bad Gateway"),
    ],
)
def test_a_garbage_answer_is_a_clear_problem_never_a_crash(
    rocketchat: RocketChatDouble, path: str, raw: Raw, expected: str
) -> None:
    rocketchat.raw[path] = raw
    report = check(client(rocketchat.url))
    assert report.reachable
    assert len(report.problems) == 1
    assert expected in report.problems[0]
    assert rocketchat.url in report.problems[0]


def test_an_answer_larger_than_a_megabyte_is_refused(rocketchat: RocketChatDouble) -> None:
    rocketchat.raw["/api/info"] = (200, "application/json", b" " * (2 << 20), {})
    [problem] = check(client(rocketchat.url)).problems
    assert "with more than 1048576 bytes" in problem


# --- the network ----------------------------------------------------------------------------


def test_a_server_that_is_down_is_unreachable_and_login_is_not_tried(
    logs: list[tuple[str, str]],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    rc = client(url)
    [report] = run_checks(rc, 1)
    assert (report.reachable, report.version, report.logged_in) == (False, None, None)
    [problem] = report.problems
    assert problem.startswith(f"cannot connect to {url} (GET /api/info)")
    assert "check ROCKETCHAT_URL and that Rocket.Chat is running" in problem
    [warning] = lines(logs, "WARNING")
    assert "presence is not affected" in warning


def test_a_server_that_never_answers_times_out(rocketchat: RocketChatDouble) -> None:
    rocketchat.hang.add("/api/info")
    report = check(client(rocketchat.url, timeout_s=0.5))
    assert not report.reachable
    assert report.problems == [
        f"{rocketchat.url} did not answer GET /api/info within 0.5 s; check ROCKETCHAT_URL"
        " and that Rocket.Chat is running"
    ]


def test_recovery_is_logged_once_after_the_failure(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    rocketchat.raw["/api/info"] = (503, "text/plain", b"starting", {})
    rc = client(rocketchat.url)
    clock = trio.testing.MockClock()
    seen: list[RestReport] = []

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rc.run)
            for step in range(4):
                while rc.last is None or (seen and rc.last is seen[-1]):
                    await trio.sleep(0)
                    await trio.testing.wait_all_tasks_blocked(cushion=0.001)
                seen.append(rc.last)
                if step == 1:
                    del rocketchat.raw["/api/info"]
                clock.jump(RECHECK_S)
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=clock)
    assert [r.ok for r in seen] == [False, False, True, True]
    assert len(lines(logs, "WARNING")) == 1
    [recovered] = lines(logs, "INFO")
    assert f"works again after {RECHECK_S * 2:.0f} s" in recovered


# --- redirects and URLs -------------------------------------------------------------------


def test_a_redirect_on_the_same_host_is_followed(rocketchat: RocketChatDouble) -> None:
    rocketchat.raw["/api/v1/login"] = (
        307, "text/plain", b"", {"Location": "/chat/api/v1/login"},
    )
    report = check(client(rocketchat.url))
    assert report.ok, report.problems
    assert "POST /chat/api/v1/login" in rocketchat.paths


def test_a_redirect_to_another_host_is_not_followed_with_the_password(
    rocketchat: RocketChatDouble, logs: list[tuple[str, str]]
) -> None:
    elsewhere = f"http://localhost:{free_port()}/api/v1/login"
    rocketchat.raw["/api/v1/login"] = (307, "text/plain", b"", {"Location": elsewhere})
    rc = client(rocketchat.url)
    [problem] = check(rc).problems
    assert f"redirected POST /api/v1/login to {elsewhere}" in problem
    assert "does not follow with credentials" in problem
    secret_free(rc, rocketchat, logs)


def test_endless_redirects_stop(rocketchat: RocketChatDouble) -> None:
    rocketchat.raw["/api/info"] = (302, "text/plain", b"", {"Location": "/api/info"})
    [problem] = check(client(rocketchat.url)).problems
    assert "redirected GET /api/info more than 3 times" in problem
    assert rocketchat.paths.count("GET /api/info") == 4


def test_a_url_password_is_masked_in_problems_details_and_logs(
    logs: list[tuple[str, str]],
) -> None:
    port = free_port()
    rc = client(f"http://proxy-user:proxy-secret-99@127.0.0.1:{port}")
    [report] = run_checks(rc, 1)
    shown = [*report.problems, json.dumps(rc.details()), repr(rc), *(t for _, t in logs)]
    assert all("proxy-secret-99" not in text for text in shown)
    assert rc.details()["url"] == f"http://proxy-user:****@127.0.0.1:{port}"


def test_reprs_hold_no_secret(rocketchat: RocketChatDouble) -> None:
    rc = client(rocketchat.url)
    check(rc)
    assert PASSWORD not in repr(rc)
    assert PASSWORD not in repr(rc.last)
    session = repr(rc._session)
    assert USER_ID in session
    assert all(token not in session for token in rocketchat.tokens)
