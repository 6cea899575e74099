"""``presenced verify`` against hand-built databases whose differences are known.

Each database is written document by document as Rocket.Chat stores them, with an
instant fixed by the test (``now_ms`` is injected), so which user differs, what is derived
and why is known in advance; the grace period is driven through the injected ``sleep``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo.database import Database

from presenced.cli import _ProgressLine
from presenced.presence import Collections, Presence, Status, from_ms
from presenced.verify import Report, verify

from .test_cli_check import with_database

Doc = dict[str, Any]
NOW_MS = 1_780_000_000_000
TTL_MS = 300_000
INSTANCE_TIMEOUT_MS = 60_000


def at(ms_before_now: int) -> datetime:
    """A naive UTC datetime ``ms_before_now`` before the test's instant, as pymongo gives."""
    return from_ms(NOW_MS - ms_before_now).replace(tzinfo=None)


def connection(cid: str, instance: str | None, status: str = "online",
               age_ms: int = 1_000) -> Doc:
    conn: Doc = {"id": cid, "status": status, "_createdAt": at(age_ms + 5_000),
                 "_updatedAt": at(age_ms)}
    if instance is not None:
        conn["instanceId"] = instance
    return conn


def user(uid: Any, status: Any = "offline", status_connection: Any = None, **more: Any) -> Doc:
    doc: Doc = {"_id": uid, "username": f"user-{uid}", "status": status,
                "statusConnection": status if status_connection is None else status_connection}
    doc.update(more)
    return doc


def build(db: Database[Doc], users: list[Doc], sessions: dict[Any, list[Any]],
          instances: dict[str, int]) -> None:
    if users:
        db.users.insert_many(users)
    for uid, conns in sessions.items():
        db.usersSessions.insert_one({"_id": uid, "connections": conns})
    for iid, age_ms in instances.items():
        db.instances.insert_one({"_id": iid, "_updatedAt": at(age_ms),
                                 "extraInformation": {"host": "rc", "port": 3000}})


def run_verify(db: Database[Doc], *, grace_s: float = 0.0, fix: bool = False,
               unlisted_dead: bool = True, now_ms: int = NOW_MS,
               sleep: Callable[[float], None] | None = None, **kw: Any) -> Report:
    clock = [now_ms]

    def sleeping(seconds: float) -> None:
        clock[0] += int(seconds * 1000)
        if sleep is not None:
            sleep(seconds)

    return verify(db, Collections(db.name), ttl_ms=TTL_MS,
                  instance_timeout_ms=INSTANCE_TIMEOUT_MS, unlisted_dead=unlisted_dead,
                  grace_s=grace_s, fix=fix, now_ms=lambda: clock[0], sleep=sleeping, **kw)


def right_database(db: Database[Doc]) -> None:
    """Every user stored as the rules derive it."""
    build(db, [
        user("on", "online"),
        user("off", "offline"),
        user("never"),  # no sessions document at all
        user("busy", "busy", "online", statusDefault="busy"),
        user("gone", "offline", active=False),
        user("awaytoo", "away"),
        user("two", "online"),
    ], {
        "on": [connection("c1", "i1")],
        "off": [connection("c2", "i1", age_ms=TTL_MS + 1)],
        "busy": [connection("c3", "i1")],
        "gone": [connection("c4", "i1")],
        "awaytoo": [connection("c5", "i1", "away")],
        "two": [connection("c6", "i1", "away"), connection("c7", None, "online")],
    }, {"i1": 1_000})


def test_a_database_that_is_right_has_no_differences(db: Database[Doc]) -> None:
    right_database(db)
    report = run_verify(db)
    assert report.checked == 7
    assert report.differences == []
    assert report.ok


def test_each_known_difference_is_found_with_its_derivation_and_why(
    db: Database[Doc],
) -> None:
    build(db, [
        user("dead", "online"),           # its one connection is on a dead instance
        user("unlisted", "online"),       # on an instance `instances` does not list
        user("stale", "away"),            # last heartbeat older than CACHE_TTL
        user("edge", "online"),           # exactly CACHE_TTL old: still counts (right)
        user("missed", "offline"),        # a fresh connection the status never showed
        user("deact", "online", active=False),
        user("busydef", "online", statusDefault="busy"),
        user("junk", 42, "online"),       # a status that is not a string
        user(7, "online"),                # a non-string id
        user("bad", "online"),            # its only connection cannot be read
        user("ok", "online"),
    ], {
        "dead": [connection("c7", "i2")],
        "unlisted": [connection("c8", "i9")],
        "stale": [connection("c9", "i1", "away", age_ms=TTL_MS + 1)],
        "edge": [connection("c10", "i1", age_ms=TTL_MS)],
        "missed": [connection("c11", "i1")],
        "deact": [connection("c12", "i1")],
        "busydef": [connection("c13", "i1")],
        "bad": [{"id": "c14", "status": "online", "_updatedAt": "yesterday"}],
        "ok": [connection("c15", "i1")],
    }, {"i1": 1_000, "i2": INSTANCE_TIMEOUT_MS + 1})

    report = run_verify(db)

    found = {d.user_id: d for d in report.differences}
    offline = Presence(Status.OFFLINE, Status.OFFLINE)
    assert {uid: d.derived for uid, d in found.items()} == {
        "dead": offline,
        "unlisted": offline,
        "stale": offline,
        "missed": Presence(Status.ONLINE, Status.ONLINE),
        "deact": offline,
        "busydef": Presence(Status.BUSY, Status.ONLINE),
        "junk": offline,
        7: offline,
        "bad": offline,
    }
    assert report.checked == 11
    assert found["dead"].stored == ("online", "online")
    assert found["dead"].username == "user-dead"
    assert "connection c7 (online) on dead instance i2" in found["dead"].why
    assert "last seen 60.001 s ago, more than INSTANCE_TIMEOUT 60 s" in found["dead"].why
    assert "i9 (not in instances)" in found["unlisted"].why
    assert "c9 (away) is stale: last updated 300.001 s ago" in found["stale"].why
    assert "c11 (online) on live instance i1 counts" in found["missed"].why
    assert "deactivated" in found["deact"].why
    assert "statusDefault is busy" in found["busydef"].why
    assert found["junk"].stored == (42, "online")
    assert "no usersSessions document" in found[7].why
    assert "unreadable connection entries" in found["bad"].why
    assert report.unreadable == {"connection_bad_updated_at": 1, "user_bad_status": 1}


def test_with_the_service_broker_an_unlisted_instance_is_not_dead(db: Database[Doc]) -> None:
    build(db, [user("u", "online")], {"u": [connection("c1", "ddp-streamer-7")]},
          {"i1": 1_000})
    assert run_verify(db, unlisted_dead=True).differences[0].derived.status == Status.OFFLINE
    assert run_verify(db, unlisted_dead=False).ok


def test_a_user_fixed_within_the_grace_period_is_not_counted(db: Database[Doc]) -> None:
    build(db, [user("late", "online"), user("stuck", "online")],
          {"late": [connection("c1", "i1", age_ms=TTL_MS + 1)],
           "stuck": [connection("c2", "i1", age_ms=TTL_MS + 1)]},
          {"i1": 1_000})
    slept: list[float] = []

    def daemon_catches_up(seconds: float) -> None:
        slept.append(seconds)
        db.users.update_one({"_id": "late"},
                            {"$set": {"status": "offline", "statusConnection": "offline"}})

    report = run_verify(db, grace_s=2.0, sleep=daemon_catches_up)
    assert slept == [2.0]
    assert [d.user_id for d in report.differences] == ["stuck"]
    assert report.recent == 1

    # Without a grace period both count: the daemon had no time.
    db.users.update_one({"_id": "late"}, {"$set": {"status": "online",
                                                   "statusConnection": "online"}})
    assert {d.user_id for d in run_verify(db, grace_s=0).differences} == {"late", "stuck"}


def test_a_user_whose_answer_changes_by_itself_within_the_grace_is_not_counted(
    db: Database[Doc],
) -> None:
    """Differs at the first instant, then its connection goes stale before the second:
    the stored offline is right by then, with no write from anyone."""
    build(db, [user("u", "offline")], {"u": [connection("c1", "i1", age_ms=TTL_MS - 500)]},
          {"i1": 1_000})
    assert run_verify(db, grace_s=0).differences[0].derived.status == Status.ONLINE
    report = run_verify(db, grace_s=1.0)
    assert report.ok
    assert report.recent == 0


def test_fix_writes_the_derived_values_conditionally_and_then_verify_is_clean(
    db: Database[Doc],
) -> None:
    build(db, [user("dead", "online"), user("missed", "offline"),
               user("ok", "online", statusText="lunch")],
          {"dead": [connection("c1", "i2")], "missed": [connection("c2", "i1")],
           "ok": [connection("c3", "i1")]},
          {"i1": 1_000, "i2": INSTANCE_TIMEOUT_MS + 1})
    before_ok = db.users.find_one({"_id": "ok"})

    report = run_verify(db, fix=True)

    assert len(report.differences) == 2
    assert (report.fixed, report.conflicts) == (2, 0)
    assert db.users.find_one({"_id": "dead"}, {"_id": 0, "status": 1,
                                               "statusConnection": 1}) == {
        "status": "offline", "statusConnection": "offline"}
    assert db.users.find_one({"_id": "missed"})["status"] == "online"  # type: ignore[index]
    assert db.users.find_one({"_id": "ok"}) == before_ok
    assert run_verify(db).ok


def test_progress_is_reported_per_batch_up_to_the_total(db: Database[Doc]) -> None:
    build(db, [user(f"u{i:03}") for i in range(25)], {}, {})
    calls: list[tuple[int, int]] = []
    report = run_verify(db, batch=10, progress=lambda done, total: calls.append((done, total)))
    assert report.checked == 25
    assert calls == [(10, 25), (20, 25), (25, 25)]


def test_the_progress_line_draws_a_bar_and_clears_it() -> None:
    out = io.StringIO()
    line = _ProgressLine(out)
    line.update(50, 100)
    line.update(51, 100)  # within 0.1 s of the last: not drawn
    line.update(100, 100)  # the end is always drawn
    line.clear()
    text = out.getvalue()
    assert text.count("\rverifying") == 2
    assert "50/100 users (50%)" in text
    assert "[" + "#" * 30 + "] 100/100 users (100%)" in text
    assert text.endswith("\r\x1b[2K")


# ------------------------------------------------------------------ the command


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-m", "presenced", "verify", *args],
                          env={**base, **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_the_command_lists_differences_as_text_and_json_and_exits_1(
    db: Database[Doc], mongo_url: str, tmp_path: Path,
) -> None:
    now = datetime.utcnow()
    db.users.insert_many([user("stuck", "online"), user("fine", "offline")])
    db.usersSessions.insert_one({"_id": "stuck", "connections": [{
        "id": "c7", "instanceId": "i2", "status": "online", "_createdAt": now,
        "_updatedAt": now}]})
    db.instances.insert_one({"_id": "i2", "_updatedAt": now - timedelta(hours=1)})
    env = {"MONGO_URL": with_database(mongo_url, db.name)}

    done = run_cli(["--grace", "0"], env, tmp_path)
    assert done.returncode == 1, done.stderr
    assert "stuck (user-stuck): stored online/online, derived offline/offline" in done.stdout
    assert "connection c7 (online) on dead instance i2" in done.stdout
    assert "2 users checked" in done.stdout and "1 differ" in done.stdout

    done = run_cli(["--grace", "0", "--json"], env, tmp_path)
    assert done.returncode == 1
    answer = json.loads(done.stdout)
    assert answer["checked"] == 2 and answer["differing"] == 1
    assert answer["differences"][0]["id"] == "stuck"
    assert answer["differences"][0]["derived"] == {"status": "offline",
                                                   "statusConnection": "offline"}

    done = run_cli(["--grace", "0", "--fix"], env, tmp_path)
    assert done.returncode == 1  # it differed when read; the fix is reported
    assert "fixed 1" in done.stdout
    done = run_cli(["--grace", "0"], env, tmp_path)
    assert done.returncode == 0, done.stdout
    assert "0 differ" in done.stdout


def test_mongo_url_overrides_the_setting(db: Database[Doc], mongo_url: str,
                                         tmp_path: Path) -> None:
    db.users.insert_one(user("u", "offline"))
    env = {"MONGO_URL": with_database("mongodb://127.0.0.1:1/?directConnection=true", "x")}
    done = run_cli(["--mongo-url", with_database(mongo_url, db.name), "--json"], env,
                   tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checked"] == 1


def test_bad_settings_exit_78_naming_the_setting(tmp_path: Path) -> None:
    done = run_cli([], {"MONGO_URL": "mongodb://127.0.0.1/rocketchat", "CACHE_TTL": "soon"},
                   tmp_path)
    assert done.returncode == 78
    assert "CACHE_TTL" in done.stderr
    done = run_cli([], {}, tmp_path)
    assert done.returncode == 78
    assert "MONGO_URL" in done.stderr


def test_unreachable_mongodb_exits_69_without_the_password(tmp_path: Path) -> None:
    from presenced.testing.processes import free_port

    url = (f"mongodb://rc:Canary-Pw-77@127.0.0.1:{free_port()}/rocketchat"
           "?directConnection=true&serverSelectionTimeoutMS=300")
    done = run_cli(["--grace", "0"], {"MONGO_URL": url}, tmp_path)
    assert done.returncode == 69
    assert "cannot read MongoDB" in done.stderr
    assert "Canary-Pw-77" not in done.stdout + done.stderr
