"""Logging: the one place that sets log sinks, and the secret redaction every line goes through.

This module owns the loguru set-up (one sink, on stderr by default), the one-line format
(UTC time, level, message, ``key=value`` pairs from ``logger.bind``), the routing of
standard-library ``logging`` records (pymongo, hypercorn, ...) into that sink, and the
masking of secrets: passwords inside MongoDB and HTTP URLs, and literal secret values.

It must never read the environment (``config.py`` does), never log a secret unmasked, and
never add a sink anywhere else: every other module only calls ``loguru.logger``.

Redaction happens twice: a loguru patcher masks the message and the bound values of every
record, and the sink masks the whole formatted line, traceback included (an exception
message, or one of its ``__cause__`` chain, can carry a connection string).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

__all__ = [
    "MASK",
    "add_secrets",
    "configure_logging",
    "mask_url",
    "normalize_level",
    "redact",
    "reset_logging",
]

MASK: Final = "****"
"""What a password or secret is replaced with."""

MIN_SECRET_LENGTH: Final = 4
"""Literal secrets shorter than this are not masked: masking "ab" would garble every line."""

# scheme://user:password@host — the password is what sits between the first ":" after the
# user name and the last "@" before the host (as pymongo reads it), so a password with an
# unescaped "@" is masked whole. It cannot cross "/", "?", "#" or whitespace, which keeps a
# "@" in a query string or in the text after the URL from widening the match.
_URL_PASSWORD: Final = re.compile(
    r"(?P<prefix>(?:mongodb(?:\+srv)?|https?|nats|tls)://[^\s:/?#]*:)(?P<password>[^\s/?#]+)(?=@)",
    re.IGNORECASE,
)

_NATS_TOKEN: Final = re.compile(
    r"(?P<prefix>(?:nats|tls)://)(?P<token>[^\s:/?#@*]+)@", re.IGNORECASE
)
"""A NATS URL's token (``nats://<token>@host``): user info with no password part."""

_LEVELS: Final = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
}

_FORMAT_HEAD: Final = (
    "<green>{time:YYYY-MM-DDTHH:mm:ss.SSS[Z]!UTC}</green> <level>{level: <7}</level> {message}"
)

_secrets: tuple[str, ...] = ()
_handler_id: int | None = None


def mask_url(url: str) -> str:
    """Replace the password of every mongodb://, mongodb+srv://, http://, https://, nats://
    and tls:// URL in ``url`` (a URL or any text containing URLs), and the token of a
    ``nats://<token>@host`` URL, with ``****``; everything else is kept."""
    masked = _URL_PASSWORD.sub(lambda m: m.group("prefix") + MASK, url)
    return _NATS_TOKEN.sub(lambda m: m.group("prefix") + MASK + "@", masked)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Mask URL passwords in ``text`` and every occurrence of each literal secret.

    Secrets shorter than four characters are skipped; longer secrets are masked first, so
    a secret that contains another is masked whole.
    """
    masked = mask_url(text)
    for secret in sorted(
        {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True
    ):
        masked = masked.replace(secret, MASK)
    return masked


def normalize_level(level: str) -> str:
    """The loguru level name for a LOG_LEVEL value (``warn`` → ``WARNING``).

    Raises ValueError for anything but debug, info, warn, warning or error (any case).
    """
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error") from None


def add_secrets(secrets: Iterable[str]) -> None:
    """Mask these values too from now on (e.g. a token obtained at run time)."""
    global _secrets
    _secrets = tuple(dict.fromkeys((*_secrets, *secrets)))


def configure_logging(
    level: str, secrets: Iterable[str] = (), *, stream: TextIO | None = None
) -> None:
    """Send log lines at ``level`` and above to ``stream`` (stderr), with ``secrets`` masked.

    Calling it again replaces the sink and the secrets, it does not add a second sink.
    Standard-library ``logging`` records are routed into the same sink.
    """
    global _secrets, _handler_id
    loguru_level = normalize_level(level)
    _secrets = tuple(dict.fromkeys(secrets))
    target = sys.stderr if stream is None else stream

    if _handler_id is None:
        # loguru's default stderr handler (id 0) would print every line a second time,
        # unredacted.
        with contextlib.suppress(ValueError):
            logger.remove(0)
    else:
        logger.remove(_handler_id)
    logger.configure(patcher=_redact_record)
    _handler_id = logger.add(
        _RedactingSink(target),
        level=loguru_level,
        format=_format,
        colorize=_is_tty(target),
        # diagnose would print the values of local variables in tracebacks.
        backtrace=False,
        diagnose=False,
    )
    _route_stdlib_logging(loguru_level)


def reset_logging() -> None:
    """Undo ``configure_logging``: remove its sink, its secrets and the stdlib routing.

    For tests; loguru's own default stderr sink is not brought back.
    """
    global _secrets, _handler_id
    if _handler_id is not None:
        with contextlib.suppress(ValueError):
            logger.remove(_handler_id)
        _handler_id = None
    _secrets = ()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibToLoguru)]:
        root.removeHandler(handler)


class _RedactingSink:
    """Writes each formatted line, traceback included, with secrets masked."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, message: Message) -> None:
        self._stream.write(redact(str(message), _secrets))
        self._stream.flush()


def _redact_record(record: Record) -> None:
    record["message"] = redact(record["message"], _secrets)
    extra = record["extra"]
    for key, value in extra.items():
        text = str(value)
        masked = redact(text, _secrets)
        if masked != text:
            extra[key] = masked


def _format(record: Record) -> str:
    # Values go in through a field, not into the template: the template is parsed for
    # colour markup and braces, a value must not be.
    pairs = " ".join(
        f"{key}={_format_value(value)}"
        for key, value in record["extra"].items()
        if not key.startswith("_")
    )
    record["extra"]["_pairs"] = f" {pairs}" if pairs else ""
    return _FORMAT_HEAD + "{extra[_pairs]}\n{exception}"


def _format_value(value: object) -> str:
    text = str(value)
    if text == "" or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _StdlibToLoguru(logging.Handler):
    """Forwards standard-library log records (pymongo, hypercorn, ...) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).bind(logger=record.name).log(
            level, record.getMessage()
        )


def _route_stdlib_logging(loguru_level: str) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StdlibToLoguru) for h in root.handlers):
        root.addHandler(_StdlibToLoguru())
    # Libraries are chatty at DEBUG (pymongo logs every command): INFO at most from them.
    root.setLevel(max(logging.getLevelNamesMapping()[loguru_level], logging.INFO))
    # httpx (the REST check) and nats-py log every request or reconnect attempt at INFO;
    # presenced says once what changed instead.
    for chatty in ("httpx", "httpcore", "nats"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
