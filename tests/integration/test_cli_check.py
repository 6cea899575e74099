"""`presenced check`: prints the effective settings with secrets masked, tests MongoDB and
Rocket.Chat's REST API (the broker's check is in tests/interop/test_check_broker.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from .rocketchat_double import RocketChatDouble

SECRET = "s3cr3t-Pa55word"


def with_database(url: str, database: str, userinfo: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if userinfo:
        netloc = f"{userinfo}@{netloc}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, ""))


def run_check(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "presenced", "check"], env={**base, **env}, cwd=cwd,
        capture_output=True, text=True, timeout=60,
    )


def test_check_reports_a_reachable_replica_set_and_exits_0(mongo_url: str, tmp_path: Path) -> None:
    done = run_check({"MONGO_URL": with_database(mongo_url, "rocketchat")}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "MongoDB: ok" in done.stdout
    assert "replica set" in done.stdout


def test_check_masks_the_rocketchat_password(mongo_url: str, tmp_path: Path) -> None:
    env = {
        "MONGO_URL": with_database(mongo_url, "rocketchat"),
        "ROCKETCHAT_URL": "http://127.0.0.1:3000",
        "ROCKETCHAT_USERNAME": "presence-bot",
        "ROCKETCHAT_PASSWORD": SECRET,
    }
    done = run_check(env, tmp_path)
    assert "ROCKETCHAT_PASSWORD" in done.stdout
    assert SECRET not in done.stdout + done.stderr


@pytest.mark.emulator_only
def test_check_masks_a_password_inside_the_mongo_url_even_when_login_fails(
    mongo_url: str, tmp_path: Path
) -> None:
    url = with_database(mongo_url, "rocketchat", userinfo=f"rc:{SECRET}")
    done = run_check({"MONGO_URL": url}, tmp_path)
    assert done.returncode == 1
    assert SECRET not in done.stdout + done.stderr
    assert "MONGO_URL" in done.stdout


def test_check_with_a_bad_setting_exits_78_naming_it(tmp_path: Path) -> None:
    done = run_check({"MONGO_URL": "mongodb://127.0.0.1:1/rocketchat", "CACHE_TTL": "soon"},
                     tmp_path)
    assert done.returncode == 78
    assert "CACHE_TTL" in done.stderr


def test_check_with_an_unreachable_server_exits_1(tmp_path: Path) -> None:
    done = run_check({"MONGO_URL": "mongodb://127.0.0.1:1/rocketchat?connectTimeoutMS=200"
                      "&serverSelectionTimeoutMS=500"}, tmp_path)
    assert done.returncode == 1
    assert "unreachable" in done.stderr


def test_check_output_in_one_pipe_shows_the_settings_before_the_mongodb_error(
    tmp_path: Path,
) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "MONGO_URL": "mongodb://127.0.0.1:1/rocketchat?connectTimeoutMS=200"
                        "&serverSelectionTimeoutMS=500"}
    done = subprocess.run(
        [sys.executable, "-m", "presenced", "check"], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert 0 <= done.stdout.find("MONGO_URL") < done.stdout.find("MongoDB: unreachable")


def test_simulate_writes_rocketchat_sessions_for_the_requested_users(
    client: object, mongo_url: str, tmp_path: Path
) -> None:
    from pymongo import MongoClient

    database = f"sim_{tmp_path.name[-8:]}".replace("-", "_")
    url = with_database(mongo_url, database)
    done = subprocess.run(
        [sys.executable, "-m", "presenced", "simulate", "--mongo-url", url, "--users", "20",
         "--speed", "60", "--duration", "3", "--report-every", "1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "stopped after" in done.stdout
    check: MongoClient[dict[str, object]] = MongoClient(mongo_url)
    try:
        db = check[database]
        assert db.users.count_documents({}) == 20
        assert db.usersSessions.count_documents({"connections.0": {"$exists": True}}) > 0
    finally:
        check.drop_database(database)
        check.close()


def test_simulate_refuses_a_url_without_a_database(mongo_url: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "presenced", "simulate", "--mongo-url", mongo_url],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert done.returncode == 78
    assert "must name the database" in done.stderr


# -- Rocket.Chat's REST API (ROCKETCHAT_URL) ---------------------------------------------------


def test_check_reports_rocketchats_version_and_login(
    mongo_url: str, tmp_path: Path, rocketchat: RocketChatDouble
) -> None:
    env = {"MONGO_URL": with_database(mongo_url, "rocketchat"),
           "ROCKETCHAT_URL": rocketchat.url, "ROCKETCHAT_USERNAME": "presence-bot",
           "ROCKETCHAT_PASSWORD": rocketchat.password}
    done = run_check(env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"Rocket.Chat: ok at {rocketchat.url}, version 7.5, logged in" in done.stdout
    assert rocketchat.logins == 1 and rocketchat.me_calls == 1
    assert rocketchat.password not in done.stdout + done.stderr


def test_check_says_what_is_wrong_with_rocketchat_and_exits_1(
    mongo_url: str, tmp_path: Path, rocketchat: RocketChatDouble
) -> None:
    rocketchat.roles = ["user"]
    rocketchat.version = "8.1.0"
    env = {"MONGO_URL": with_database(mongo_url, "rocketchat"),
           "ROCKETCHAT_URL": rocketchat.url, "ROCKETCHAT_USERNAME": "presence-bot",
           "ROCKETCHAT_PASSWORD": "wrong-" + rocketchat.password}
    done = run_check(env, tmp_path)
    assert done.returncode == 1
    assert "refused the login of user 'presence-bot'" in done.stderr
    assert "wrong-" not in done.stdout + done.stderr
    rocketchat.raw.clear()
    env["ROCKETCHAT_PASSWORD"] = rocketchat.password
    done = run_check(env, tmp_path)
    assert done.returncode == 0
    assert "version 8.1 (outside the versions presenced supports" in done.stdout
    assert "logged in (the user lacks the admin role)" in done.stdout
