"""Tests for presenced.log: URL and secret masking, and that no secret reaches the sink."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from loguru import logger

from presenced.log import (
    add_secrets,
    configure_logging,
    mask_url,
    normalize_level,
    redact,
    reset_logging,
)

PASSWORD = "hunter2-secret"
MONGO_URL = f"mongodb://rocket:{PASSWORD}@db1:27017,db2:27017/rocketchat?replicaSet=rs0"


@pytest.fixture
def sink() -> Iterator[io.StringIO]:
    """A fresh stream that configure_logging writes to; logging is reset afterwards."""
    stream = io.StringIO()
    yield stream
    reset_logging()


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "mongodb://u:pw@h:27017/rc?replicaSet=rs0",
            "mongodb://u:****@h:27017/rc?replicaSet=rs0",
        ),
        (
            "mongodb+srv://u:pw@cluster.example.net/rc",
            "mongodb+srv://u:****@cluster.example.net/rc",
        ),
        ("http://u:pw@chat.example.com/api", "http://u:****@chat.example.com/api"),
        ("https://u:pw@chat.example.com", "https://u:****@chat.example.com"),
        ("MONGODB://u:pw@h/rc", "MONGODB://u:****@h/rc"),
        ("mongodb://u:p%40ss@h/rc", "mongodb://u:****@h/rc"),
        ("mongodb://u:p@ss@h/rc", "mongodb://u:****@h/rc"),
        ("mongodb://:pw@h/rc", "mongodb://:****@h/rc"),
        ("nats://u:pw@nats:4222", "nats://u:****@nats:4222"),
        ("tls://u:pw@nats:4222", "tls://u:****@nats:4222"),
        ("nats://s3cr3t-token@nats:4222", "nats://****@nats:4222"),
    ],
    ids=[
        "mongodb",
        "srv",
        "http",
        "https",
        "upper-case-scheme",
        "percent-encoded",
        "unescaped-at",
        "no-user-name",
        "nats",
        "nats-tls",
        "nats-token",
    ],
)
def test_mask_url_replaces_only_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    [
        "mongodb://h:27017/rc?replicaSet=rs0",
        "mongodb://rocket@h:27017/rc",
        "https://chat.example.com:8443/api/info",
        "mongodb://h/rc?appName=a@b",
        "nats://nats:4222",
    ],
    ids=["no-user-info", "user-without-password", "port-not-password", "at-in-query",
         "nats-without-credentials"],
)
def test_mask_url_leaves_urls_without_password_unchanged(url: str) -> None:
    assert mask_url(url) == url


def test_mask_url_masks_every_url_inside_longer_text() -> None:
    text = f"cannot reach '{MONGO_URL}' nor https://bot:tok3n@chat.example.com/api: timeout"

    masked = mask_url(text)

    assert PASSWORD not in masked
    assert "tok3n" not in masked
    assert masked == (
        "cannot reach 'mongodb://rocket:****@db1:27017,db2:27017/rocketchat?replicaSet=rs0'"
        " nor https://bot:****@chat.example.com/api: timeout"
    )


def test_redact_masks_literal_secrets() -> None:
    assert redact("login as bot with s3cret-pw failed", ["s3cret-pw"]) == (
        "login as bot with **** failed"
    )


def test_redact_masks_url_passwords_without_being_told_them() -> None:
    assert PASSWORD not in redact(f"connecting to {MONGO_URL}", [])


def test_redact_skips_secrets_shorter_than_four_characters() -> None:
    assert redact("abc and abcd", ["abc", "", "xyzw"]) == "abc and abcd"


def test_redact_masks_a_longer_secret_whole_when_it_contains_a_shorter_one() -> None:
    assert redact("token=abcd1234", ["abcd", "abcd1234"]) == "token=****"


@pytest.mark.parametrize(
    ("given", "level"),
    [
        ("debug", "DEBUG"),
        ("INFO", "INFO"),
        ("warn", "WARNING"),
        ("Warning", "WARNING"),
        ("error", "ERROR"),
    ],
)
def test_normalize_level_accepts_log_level_values(given: str, level: str) -> None:
    assert normalize_level(given) == level


def test_normalize_level_rejects_an_unknown_level() -> None:
    with pytest.raises(ValueError, match="verbose"):
        normalize_level("verbose")


def test_password_in_a_message_never_reaches_the_sink(sink: io.StringIO) -> None:
    configure_logging("info", stream=sink)

    logger.info("connecting to {}", MONGO_URL)

    assert PASSWORD not in sink.getvalue()
    assert "mongodb://rocket:****@db1" in sink.getvalue()


def test_password_in_an_exception_logged_with_logger_exception_never_reaches_the_sink(
    sink: io.StringIO,
) -> None:
    configure_logging("info", stream=sink)

    try:
        raise ConnectionError(f"authentication failed for {MONGO_URL}")
    except ConnectionError:
        logger.exception("cannot open the feed")

    output = sink.getvalue()
    assert "ConnectionError: authentication failed for mongodb://rocket:****@db1" in output
    assert PASSWORD not in output


def test_password_in_the_cause_of_a_logged_exception_never_reaches_the_sink(
    sink: io.StringIO,
) -> None:
    configure_logging("info", stream=sink)

    try:
        try:
            raise ConnectionError(f"authentication failed for {MONGO_URL}")
        except ConnectionError as exc:
            raise RuntimeError("feed stopped") from exc
    except RuntimeError:
        logger.exception("cannot open the feed")

    output = sink.getvalue()
    assert "RuntimeError: feed stopped" in output
    assert PASSWORD not in output


def test_password_in_a_bound_value_never_reaches_the_sink(sink: io.StringIO) -> None:
    configure_logging("info", stream=sink)

    logger.bind(url=MONGO_URL).info("connected")

    assert PASSWORD not in sink.getvalue()


def test_literal_secret_never_reaches_the_sink(sink: io.StringIO) -> None:
    configure_logging("info", ["rc-password-1"], stream=sink)

    logger.warning("login with rc-password-1 refused")

    assert "rc-password-1" not in sink.getvalue()
    assert "login with **** refused" in sink.getvalue()


def test_secret_added_after_configuration_is_masked(sink: io.StringIO) -> None:
    configure_logging("info", stream=sink)
    add_secrets(["auth-token-9876"])

    logger.info("got auth-token-9876")

    assert "auth-token-9876" not in sink.getvalue()


def test_password_never_reaches_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure_logging("info")
        logger.error("lost {}", MONGO_URL)
    finally:
        reset_logging()

    err = capsys.readouterr().err
    assert "lost mongodb://rocket:****@db1" in err
    assert PASSWORD not in err


def test_password_in_a_standard_library_log_record_never_reaches_the_sink(
    sink: io.StringIO,
) -> None:
    configure_logging("info", stream=sink)

    logging.getLogger("pymongo.test").warning("server %s unreachable", MONGO_URL)

    output = sink.getvalue()
    assert "unreachable" in output
    assert "logger=pymongo.test" in output
    assert PASSWORD not in output


def test_line_has_time_level_message_and_bound_values(sink: io.StringIO) -> None:
    configure_logging("info", stream=sink)

    logger.bind(user="u1", reason="two words").info("status changed")

    line = sink.getvalue()
    assert line.endswith('INFO    status changed user=u1 reason="two words"\n')
    assert line[:24].endswith("Z")  # 2024-01-02T03:04:05.678Z, in UTC


def test_messages_below_the_level_are_dropped(sink: io.StringIO) -> None:
    configure_logging("warn", stream=sink)

    logger.info("quiet")
    logger.warning("loud")

    assert "quiet" not in sink.getvalue()
    assert "loud" in sink.getvalue()


def test_configuring_twice_replaces_the_sink(sink: io.StringIO) -> None:
    first = io.StringIO()
    configure_logging("info", stream=first)
    configure_logging("info", stream=sink)

    logger.info("once")

    assert first.getvalue() == ""
    assert sink.getvalue().count("once") == 1


def test_mask_url_masks_a_url_glued_to_preceding_text() -> None:
    assert mask_url("uri_mongodb://u:pw@h/rc") == "uri_mongodb://u:****@h/rc"
