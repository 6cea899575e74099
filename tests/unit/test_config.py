"""Tests for presenced.config: sources, defaults, validation messages, secrets masking.

Every test passes ``environ`` explicitly and ``env_file`` (None or a file under tmp_path),
so none depends on the real process environment or working directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from presenced.config import (
    PROCESS_INSTANCE_ID,
    SETTINGS_TABLE,
    Settings,
    SettingsError,
    load_settings,
    settings_table_markdown,
)

PASSWORD = "hunter2-secret"
MONGO_URL = f"mongodb://rocket:{PASSWORD}@db1:27017,db2:27017/rocketchat?replicaSet=rs0"
OPLOG_URL = f"mongodb://oplogger:{PASSWORD}@db1:27017/local?authSource=admin&replicaSet=rs0"
RC_PASSWORD = "rc-bot-password"


def load(environ: Mapping[str, str]) -> Settings:
    return load_settings(environ, env_file=None)


def problems_for(environ: Mapping[str, str], env_file: Path | None = None) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ, env_file=env_file)
    return caught.value.problems


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -----------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_set() -> None:
    settings = load({})

    assert (settings.port, settings.health_check_port) == (3005, 3005)
    assert settings.mongo_url is None
    assert settings.mongo_oplog_url is None
    assert settings.feed == "auto"
    assert settings.rocketchat_url is None
    assert settings.rocketchat_username is None
    assert settings.rocketchat_password is None
    assert settings.log_level == "info"
    assert settings.cache_ttl == 300
    assert settings.instance_timeout == 60
    assert settings.sync_interval_ms == 5000
    assert settings.max_concurrent_sync == 10
    assert settings.users_collection == "users"
    assert settings.sessions_collection == "usersSessions"
    assert settings.instances_collection == "instances"


def test_loaded_defaults_equal_the_dataclass_defaults() -> None:
    assert load({}) == Settings()


def test_health_check_port_defaults_to_port() -> None:
    assert load({"PORT": "4000"}).health_check_port == 4000


def test_instance_id_is_generated_once_per_process() -> None:
    first, second = load({}), load({})

    assert first.instance_id == second.instance_id == PROCESS_INSTANCE_ID
    assert len(PROCESS_INSTANCE_ID) == 32
    int(PROCESS_INSTANCE_ID, 16)


def test_sync_interval_is_also_given_in_seconds() -> None:
    assert load({"SYNC_INTERVAL": "2500"}).sync_interval_seconds == 2.5


def test_empty_value_counts_as_unset() -> None:
    settings = load({"PORT": "", "CACHE_TTL": "  ", "MONGO_URL": ""})

    assert (settings.port, settings.cache_ttl, settings.mongo_url) == (3005, 300, None)


# --- good values --------------------------------------------------------------------


GOOD_VALUES = [
    ("PORT", "8080", "port", 8080),
    ("HEALTH_CHECK_PORT", "9090", "health_check_port", 9090),
    ("CACHE_TTL", " 1 ", "cache_ttl", 1),
    ("INSTANCE_TIMEOUT", "120", "instance_timeout", 120),
    ("SYNC_INTERVAL", "100", "sync_interval_ms", 100),
    ("SYNC_INTERVAL", "3600000", "sync_interval_ms", 3_600_000),
    ("MAX_CONCURRENT_SYNC", "1000", "max_concurrent_sync", 1000),
    ("USERS_COLLECTION", "rocketchat_users", "users_collection", "rocketchat_users"),
    ("SESSIONS_COLLECTION", "sessions", "sessions_collection", "sessions"),
    ("INSTANCES_COLLECTION", "rc.instances", "instances_collection", "rc.instances"),
    ("INSTANCE_ID", "presenced-0", "instance_id", "presenced-0"),
    ("ROCKETCHAT_URL", "https://chat.example.com/", "rocketchat_url", "https://chat.example.com"),
    ("FEED", "ChangeStream", "feed", "changestream"),
]


@pytest.mark.parametrize(
    ("name", "value", "attribute", "expected"),
    GOOD_VALUES,
    ids=[f"{name}={value!r}" for name, value, _, _ in GOOD_VALUES],
)
def test_valid_value_is_read(name: str, value: str, attribute: str, expected: object) -> None:
    assert getattr(load({name: value}), attribute) == expected


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("debug", "debug"),
        ("INFO", "info"),
        ("warn", "warning"),
        ("Warning", "warning"),
        ("error", "error"),
    ],
)
def test_log_level_is_case_insensitive_and_warn_means_warning(value: str, level: str) -> None:
    assert load({"LOG_LEVEL": value}).log_level == level


def test_rocketchat_credentials_are_read() -> None:
    settings = load(
        {
            "ROCKETCHAT_URL": "http://rc:3000",
            "ROCKETCHAT_USERNAME": "presence-bot",
            "ROCKETCHAT_PASSWORD": RC_PASSWORD,
        }
    )

    assert (settings.rocketchat_username, settings.rocketchat_password) == (
        "presence-bot",
        RC_PASSWORD,
    )


# --- bad values ---------------------------------------------------------------------


BAD_VALUES = [
    ("PORT", "abc", "is not a whole number; set it to an integer from 1 to 65535 (default 3005)"),
    ("PORT", "0", "is out of range; set it to an integer from 1 to 65535"),
    ("PORT", "65536", "is out of range"),
    ("PORT", "80.5", "is not a whole number"),
    ("HEALTH_CHECK_PORT", "-1", "is out of range; set it to an integer from 1 to 65535, or unset"),
    (
        "CACHE_TTL",
        "abc",
        "is not a whole number of seconds; set it to an integer >= 1 (default 300)",
    ),
    ("CACHE_TTL", "0", "is out of range; set it to an integer >= 1 (default 300)"),
    ("CACHE_TTL", "1e3", "is not a whole number of seconds"),
    ("INSTANCE_TIMEOUT", "0", "is out of range; set it to an integer >= 1 (default 60)"),
    ("INSTANCE_TIMEOUT", "1m", "is not a whole number of seconds"),
    ("SYNC_INTERVAL", "99", "is out of range; set it to an integer from 100 to 3600000"),
    ("SYNC_INTERVAL", "3600001", "is out of range"),
    ("SYNC_INTERVAL", "5s", "is not a whole number of milliseconds"),
    ("MAX_CONCURRENT_SYNC", "0", "is out of range; set it to an integer from 1 to 1000"),
    ("MAX_CONCURRENT_SYNC", "1001", "is out of range"),
    ("MAX_CONCURRENT_SYNC", "ten", "is not a whole number"),
    ("FEED", "tail", "is not a feed; set it to one of auto, oplog, changestream"),
    ("LOG_LEVEL", "verbose", "is not a log level; set it to one of debug, info, warn"),
    ("INSTANCE_ID", "two words", "is not a usable instance id"),
    ("INSTANCE_ID", "-leading-dash", "is not a usable instance id"),
    ("INSTANCE_ID", "x" * 129, "is not a usable instance id"),
    ("ROCKETCHAT_URL", "chat.example.com", "is not an http(s) URL"),
    ("ROCKETCHAT_URL", "ftp://chat.example.com", "is not an http(s) URL"),
    ("ROCKETCHAT_URL", "https://chat.example.com:99999", "is not an http(s) URL"),
    ("USERS_COLLECTION", "users$", "is not a valid MongoDB collection name (it contains '$')"),
    ("SESSIONS_COLLECTION", "system.sessions", "names starting with 'system.' are reserved"),
    ("INSTANCES_COLLECTION", "inst\x00ances", "it contains a NUL character"),
    ("USERS_COLLECTION", "rc..users", "it has an empty part between dots"),
    ("MONGO_URL", "postgres://h/rocketchat", "is not a MongoDB URL"),
    ("MONGO_URL", "mongodb://h:27017/?replicaSet=rs0", "does not name a database"),
    ("MONGO_URL", "mongodb://h/rocketchat?noSuchOption=1", "is not a valid MongoDB URL"),
    ("MONGO_URL", "mongodb://h:99999/rocketchat", "is not a valid MongoDB URL"),
    ("MONGO_URL", "mongodb+srv://c.example.net:27017/rc", "exactly one host name, without a port"),
    ("MONGO_OPLOG_URL", "mongodb://h/rocketchat", 'names the database "rocketchat"'),
    (
        "MONGO_OPLOG_URL",
        "mongodb://h/",
        'names no database, but the oplog is in the database "local"',
    ),
]


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    BAD_VALUES,
    ids=[f"{name}={value[:30]!r}" for name, value, _ in BAD_VALUES],
)
def test_bad_value_is_one_problem_naming_variable_value_and_fix(
    name: str, value: str, complaint: str
) -> None:
    [problem] = problems_for({name: value})

    assert problem.startswith(f"{name}=")
    assert complaint in problem
    assert "; " in problem  # what is wrong; the fix


def test_every_problem_is_reported_together() -> None:
    problems = problems_for(
        {"PORT": "abc", "CACHE_TTL": "0", "FEED": "tail", "MONGO_URL": "mongodb://h/"}
    )

    assert [p.split("=")[0] for p in problems] == ["PORT", "MONGO_URL", "FEED", "CACHE_TTL"]


def test_settings_error_lists_every_problem_in_its_message() -> None:
    error = SettingsError(["PORT is wrong; fix it", "FEED is wrong; fix it"])

    assert str(error) == (
        "2 settings need fixing:\n  - PORT is wrong; fix it\n  - FEED is wrong; fix it"
    )


def test_settings_error_with_one_problem_is_that_sentence() -> None:
    assert str(SettingsError(["PORT is wrong; fix it"])) == "PORT is wrong; fix it"


def test_settings_error_exit_code_is_ex_config() -> None:
    assert SettingsError(["x"]).exit_code == 78


def test_collections_must_differ() -> None:
    [problem] = problems_for({"SESSIONS_COLLECTION": "users"})

    assert "name the same collection twice" in problem


def test_rocketchat_username_without_password_is_an_error() -> None:
    [problem] = problems_for({"ROCKETCHAT_URL": "http://rc", "ROCKETCHAT_USERNAME": "bot"})

    assert problem.startswith("ROCKETCHAT_USERNAME is set but ROCKETCHAT_PASSWORD is not")


def test_rocketchat_password_without_username_is_an_error() -> None:
    [problem] = problems_for({"ROCKETCHAT_URL": "http://rc", "ROCKETCHAT_PASSWORD": RC_PASSWORD})

    assert problem.startswith("ROCKETCHAT_PASSWORD is set but ROCKETCHAT_USERNAME is not")
    assert RC_PASSWORD not in problem


def test_rocketchat_credentials_without_url_are_an_error() -> None:
    [problem] = problems_for({"ROCKETCHAT_USERNAME": "bot", "ROCKETCHAT_PASSWORD": RC_PASSWORD})

    assert "ROCKETCHAT_URL is not" in problem


# --- sources: environment, .env ------------------------------------------------------


def test_env_file_values_are_used(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", "PORT=4000\nFEED=changestream\n")

    settings = load_settings({}, env_file=env_file)

    assert (settings.port, settings.feed) == (4000, "changestream")


def test_environment_wins_over_env_file(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", "PORT=4000\nCACHE_TTL=30\n")

    settings = load_settings({"PORT": "5000"}, env_file=env_file)

    assert (settings.port, settings.cache_ttl) == (5000, 30)


def test_missing_env_file_is_fine(tmp_path: Path) -> None:
    assert load_settings({}, env_file=tmp_path / "absent.env").port == 3005


def test_env_file_does_not_change_the_process_environment(tmp_path: Path) -> None:
    before = dict(os.environ)
    env_file = write(tmp_path / ".env", "PRESENCED_TEST_ONLY_VARIABLE=1\nPORT=4000\n")

    load_settings({}, env_file=env_file)

    assert dict(os.environ) == before


def test_env_file_values_are_taken_literally(tmp_path: Path) -> None:
    url = "mongodb://rocket:pa$HOME$x@h/rocketchat"
    env_file = write(tmp_path / ".env", f"MONGO_URL='{url}'\n")

    assert load_settings({}, env_file=env_file).mongo_url == url


def test_bad_value_in_env_file_is_reported(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", "CACHE_TTL=soon\n")

    [problem] = problems_for({}, env_file=env_file)

    assert problem.startswith('CACHE_TTL="soon" is not a whole number of seconds')


def test_source_says_where_each_value_came_from(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", "CACHE_TTL=30\n")
    secret = write(tmp_path / "mongo_url", MONGO_URL + "\n")

    settings = load_settings({"PORT": "5000", "MONGO_URL_FILE": str(secret)}, env_file=env_file)

    assert [settings.source(n) for n in ("PORT", "CACHE_TTL", "MONGO_URL", "FEED")] == [
        "env",
        ".env",
        "file",
        "default",
    ]


# --- NAME_FILE secrets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "attribute", "value"),
    [
        ("MONGO_URL", "mongo_url", MONGO_URL),
        ("MONGO_OPLOG_URL", "mongo_oplog_url", OPLOG_URL),
        ("ROCKETCHAT_PASSWORD", "rocketchat_password", RC_PASSWORD),
    ],
    ids=["MONGO_URL_FILE", "MONGO_OPLOG_URL_FILE", "ROCKETCHAT_PASSWORD_FILE"],
)
def test_secret_is_read_from_its_file_without_the_trailing_newline(
    tmp_path: Path, name: str, attribute: str, value: str
) -> None:
    secret = write(tmp_path / "secret", value + "\n")
    environ = {f"{name}_FILE": str(secret)}
    if name == "ROCKETCHAT_PASSWORD":
        environ |= {"ROCKETCHAT_URL": "http://rc", "ROCKETCHAT_USERNAME": "bot"}

    assert getattr(load(environ), attribute) == value


def test_secret_file_loses_only_its_trailing_newline(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", " pass word \n")
    environ = {
        "ROCKETCHAT_PASSWORD_FILE": str(secret),
        "ROCKETCHAT_URL": "http://rc",
        "ROCKETCHAT_USERNAME": "bot",
    }

    assert load(environ).rocketchat_password == " pass word "


def test_secret_file_path_may_come_from_env_file(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", MONGO_URL)
    env_file = write(tmp_path / ".env", f"MONGO_URL_FILE={secret}\n")

    assert load_settings({}, env_file=env_file).mongo_url == MONGO_URL


def test_missing_secret_file_is_an_error_naming_variable_and_path(tmp_path: Path) -> None:
    path = tmp_path / "no-such-file"

    [problem] = problems_for({"MONGO_URL_FILE": str(path)})

    assert problem.startswith(f'MONGO_URL_FILE="{path}" cannot be read (No such file')


def test_empty_secret_file_is_an_error(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", "\n")

    [problem] = problems_for({"MONGO_URL_FILE": str(secret)})

    assert problem == (
        f'MONGO_URL_FILE="{secret}" is an empty file; write MONGO_URL into it,'
        " or unset MONGO_URL_FILE"
    )


def test_secret_and_its_file_both_set_is_an_error(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", MONGO_URL)

    [problem] = problems_for({"MONGO_URL": MONGO_URL, "MONGO_URL_FILE": str(secret)})

    assert problem.startswith("MONGO_URL and MONGO_URL_FILE are both set")
    assert "set only one of them" in problem
    assert PASSWORD not in problem


# --- MONGO_URL -----------------------------------------------------------------------


def test_mongo_url_is_not_needed_to_load() -> None:
    assert load({}).mongo_url is None


def test_run_needs_mongo_url() -> None:
    with pytest.raises(SettingsError) as caught:
        load({}).for_command("run")

    [problem] = caught.value.problems
    assert problem.startswith("MONGO_URL is not set; set MONGO_URL (or MONGO_URL_FILE)")


def test_commands_other_than_run_do_not_need_mongo_url() -> None:
    settings = load({})

    assert settings.for_command("check") is settings


def test_mongo_database_is_the_database_in_the_url_path() -> None:
    assert load({"MONGO_URL": MONGO_URL}).mongo_database == "rocketchat"


def test_mongo_database_without_mongo_url_raises_settings_error() -> None:
    with pytest.raises(SettingsError, match="MONGO_URL is not set"):
        _ = load({}).mongo_database


def test_srv_url_is_checked_without_a_dns_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    from pymongo.synchronous import srv_resolver

    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_settings looked up DNS")

    monkeypatch.setattr(srv_resolver._SrvResolver, "__init__", no_dns)
    url = f"mongodb+srv://rocket:{PASSWORD}@cluster0.example.net/rocketchat?srvMaxHosts=2"

    assert load({"MONGO_URL": url}).mongo_database == "rocketchat"


def test_unparsable_mongo_url_error_does_not_show_the_password() -> None:
    url = f"mongodb://rocket:{PASSWORD}/x@db1/rocketchat"

    [problem] = problems_for({"MONGO_URL": url})

    assert problem.startswith('MONGO_URL="mongodb://rocket:****@db1/rocketchat" is not a valid')
    assert PASSWORD not in problem


def test_mongo_url_without_database_error_masks_the_password() -> None:
    [problem] = problems_for({"MONGO_URL": f"mongodb://rocket:{PASSWORD}@db1:27017/"})

    assert problem.startswith('MONGO_URL="mongodb://rocket:****@db1:27017/" does not name')
    assert PASSWORD not in problem


# --- MONGO_OPLOG_URL and FEED ----------------------------------------------------------


def test_oplog_url_naming_local_is_accepted() -> None:
    assert load({"MONGO_OPLOG_URL": OPLOG_URL}).mongo_oplog_url == OPLOG_URL


def test_oplog_url_not_naming_local_says_the_database_must_be_local() -> None:
    url = f"mongodb://oplogger:{PASSWORD}@db1/rocketchat"

    [problem] = problems_for({"MONGO_OPLOG_URL": url})

    assert 'the oplog is in the database "local"' in problem
    assert "make the URL's path /local" in problem
    assert PASSWORD not in problem


def test_auto_feed_is_changestream_without_oplog_url() -> None:
    assert load({}).effective_feed == "changestream"


def test_auto_feed_is_oplog_with_oplog_url() -> None:
    assert load({"MONGO_OPLOG_URL": OPLOG_URL}).effective_feed == "oplog"


def test_changestream_feed_is_kept_even_with_oplog_url() -> None:
    settings = load({"FEED": "changestream", "MONGO_OPLOG_URL": OPLOG_URL})

    assert settings.effective_feed == "changestream"


def test_oplog_feed_with_oplog_url_is_oplog() -> None:
    assert load({"FEED": "oplog", "MONGO_OPLOG_URL": OPLOG_URL}).effective_feed == "oplog"


def test_oplog_feed_without_oplog_url_is_an_error() -> None:
    [problem] = problems_for({"FEED": "oplog"})

    assert problem.startswith('FEED="oplog" needs MONGO_OPLOG_URL, which is not set')


def test_oplog_feed_with_bad_oplog_url_reports_only_the_url() -> None:
    [problem] = problems_for({"FEED": "oplog", "MONGO_OPLOG_URL": "mongodb://h/rocketchat"})

    assert problem.startswith("MONGO_OPLOG_URL=")


# --- describe, repr, secrets, table ------------------------------------------------------


def full_settings() -> Settings:
    return load(
        {
            "MONGO_URL": MONGO_URL,
            "MONGO_OPLOG_URL": OPLOG_URL,
            "ROCKETCHAT_URL": "https://chat.example.com",
            "ROCKETCHAT_USERNAME": "bot",
            "ROCKETCHAT_PASSWORD": RC_PASSWORD,
        }
    )


def test_describe_never_shows_a_secret() -> None:
    output = "\n".join(f"{name}={value}" for name, value in full_settings().describe())

    assert PASSWORD not in output
    assert RC_PASSWORD not in output


def test_describe_masks_only_the_password_of_mongo_urls() -> None:
    described = dict(full_settings().describe())

    assert described["MONGO_URL"] == (
        "mongodb://rocket:****@db1:27017,db2:27017/rocketchat?replicaSet=rs0"
    )
    assert described["ROCKETCHAT_PASSWORD"] == "****"


def test_describe_shows_unset_settings_as_unset() -> None:
    described = dict(load({}).describe())

    assert described["MONGO_URL"] == described["ROCKETCHAT_PASSWORD"] == "<unset>"


def test_describe_shows_the_feed_auto_chose() -> None:
    assert dict(full_settings().describe())["FEED"] == "oplog (auto)"


def test_describe_lists_every_setting_of_the_table_in_order() -> None:
    assert [name for name, _ in load({}).describe()] == [doc.name for doc in SETTINGS_TABLE]


def test_repr_never_shows_a_secret() -> None:
    shown = repr(full_settings())

    assert PASSWORD not in shown
    assert RC_PASSWORD not in shown


def test_secrets_lists_the_url_passwords_and_the_rocketchat_password() -> None:
    assert set(full_settings().secrets()) == {PASSWORD, RC_PASSWORD}


def test_settings_table_markdown_has_a_row_per_setting() -> None:
    table = settings_table_markdown()

    assert table.count("\n") == len(SETTINGS_TABLE) + 2
    assert all(f"| `{doc.name}` | {doc.default} |" in table for doc in SETTINGS_TABLE)


def test_env_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"PORT=\xff\n")

    [problem] = problems_for({}, env_file=env_file)

    assert problem == (
        f'the settings file "{env_file}" cannot be read (not UTF-8 text);'
        " make it a readable UTF-8 file or remove it"
    )


# -- the service broker -------------------------------------------------------------------


def test_broker_settings_default_to_rocketchats() -> None:
    s = load({})
    assert s.transporter is None
    assert (s.ms_namespace, s.serializer) == ("", "EJSON")
    assert (s.heartbeat_interval, s.heartbeat_timeout) == (10, 30)


def test_broker_settings_are_read() -> None:
    s = load({"TRANSPORTER": "nats://nats:4222", "MS_NAMESPACE": "rc7", "SERIALIZER": "json",
              "HEARTBEAT_INTERVAL": "5", "HEARTBEAT_TIMEOUT": "15"})
    assert (s.transporter, s.ms_namespace, s.serializer) == ("nats://nats:4222", "rc7", "JSON")
    assert (s.heartbeat_interval, s.heartbeat_timeout) == (5, 15)


def test_a_transporter_token_or_password_is_a_secret_and_masked() -> None:
    for url, secret in (("nats://presenced:pa55-nats@nats:4222", "pa55-nats"),
                        ("nats://t0ken-nats@nats:4222", "t0ken-nats")):
        s = load({"TRANSPORTER": url})
        assert secret in s.secrets()
        assert secret not in repr(s)
        assert dict(s.describe())["TRANSPORTER"].endswith("****@nats:4222")


def test_transporter_may_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "transporter"
    path.write_text("nats://u:p4ss@nats:4222\n")
    assert load({"TRANSPORTER_FILE": str(path)}).transporter == "nats://u:p4ss@nats:4222"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"TRANSPORTER": "redis://r:6379"}, "TRANSPORTER=\"redis://r:6379\" is not a NATS URL"),
        ({"TRANSPORTER": "nats://"}, "is not a NATS URL"),
        ({"MS_NAMESPACE": "a.b"}, "MS_NAMESPACE=\"a.b\" is not a usable broker namespace"),
        ({"SERIALIZER": "msgpack"}, "SERIALIZER=\"msgpack\" is not a serializer"),
        ({"HEARTBEAT_INTERVAL": "0"}, "HEARTBEAT_INTERVAL=\"0\" is out of range"),
        ({"HEARTBEAT_INTERVAL": "10", "HEARTBEAT_TIMEOUT": "10"},
         "HEARTBEAT_TIMEOUT=10 is not more than HEARTBEAT_INTERVAL=10"),
    ],
)
def test_bad_broker_settings_are_named(env: dict[str, str], fragment: str) -> None:
    [problem] = problems_for(env)
    assert fragment in problem


def test_a_bad_transporter_never_shows_its_password() -> None:
    [problem] = problems_for({"TRANSPORTER": "redis://u:s3cret-redis@r:6379"})
    assert "s3cret-redis" not in problem
