"""Settings: the one place that reads environment variables, and their validation.

This module owns every setting of the daemon: its name, default, meaning
(``SETTINGS_TABLE``, from which the README's table is generated) and the rule it must
satisfy. ``load_settings`` reads them from the process environment, then a ``.env`` file,
then the ``NAME_FILE`` variants of the secrets, checks them all, and either returns a
frozen ``Settings`` or raises one ``SettingsError`` that lists every problem, each as a
sentence naming the variable, the value given (secrets masked) and the fix.

It must never connect to anything (a mongodb+srv:// URL is checked without a DNS
lookup), never modify ``os.environ``, never log, and never put a secret in a message or
a repr. Every other module gets its settings from a ``Settings`` object, never from the
environment.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal, NamedTuple, TypeVar, get_args
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values
from pymongo.errors import ConfigurationError
from pymongo.uri_parser import parse_uri

from presenced.log import MASK, mask_url, redact

__all__ = [
    "PROCESS_INSTANCE_ID",
    "SETTINGS_TABLE",
    "EffectiveFeed",
    "Feed",
    "LogLevel",
    "SettingDoc",
    "Settings",
    "SettingsError",
    "Source",
    "load_settings",
    "settings_table_markdown",
    "settings_table_text",
]

Feed = Literal["auto", "oplog", "changestream"]
EffectiveFeed = Literal["oplog", "changestream"]
LogLevel = Literal["debug", "info", "warning", "error"]
Serializer = Literal["EJSON", "JSON"]
Source = Literal["env", ".env", "file", "default"]
"""Where a setting's value came from: the process environment, the .env file, a
``NAME_FILE`` file, or the built-in default."""

EX_CONFIG: Final = 78
UNSET: Final = "<unset>"

DEFAULT_PORT: Final = 3005
DEFAULT_FEED: Final[Feed] = "auto"
DEFAULT_LOG_LEVEL: Final[LogLevel] = "info"
DEFAULT_CACHE_TTL: Final = 300
DEFAULT_INSTANCE_TIMEOUT: Final = 60
DEFAULT_SYNC_INTERVAL_MS: Final = 5000
DEFAULT_MAX_CONCURRENT_SYNC: Final = 10
DEFAULT_USERS_COLLECTION: Final = "users"
DEFAULT_SESSIONS_COLLECTION: Final = "usersSessions"
DEFAULT_INSTANCES_COLLECTION: Final = "instances"
DEFAULT_SERIALIZER: Final[Serializer] = "EJSON"
DEFAULT_HEARTBEAT_INTERVAL: Final = 10
DEFAULT_HEARTBEAT_TIMEOUT: Final = 30
TRANSPORTER_EXAMPLE: Final = "nats://127.0.0.1:4222"

PROCESS_INSTANCE_ID: Final = uuid.uuid4().hex
"""INSTANCE_ID when none is set: generated once per process, the same for every load."""

MONGO_URL_EXAMPLE: Final = "mongodb://127.0.0.1:27017/rocketchat?replicaSet=rs0"
OPLOG_URL_EXAMPLE: Final = "mongodb://127.0.0.1:27017/local?replicaSet=rs0&authSource=admin"

SECRET_FILE_SUFFIX: Final = "_FILE"

_FEEDS: Final[tuple[Feed, ...]] = get_args(Feed)
_LOG_LEVELS: Final[Mapping[str, LogLevel]] = {
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
}
_NAMESPACE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INSTANCE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_WHOLE_NUMBER: Final = re.compile(r"[+-]?[0-9]+")
_SRV_ONLY_OPTIONS: Final = frozenset({"srvservicename", "srvmaxhosts", "srvallowedhostssuffix"})

_Choice = TypeVar("_Choice", bound=str)


class SettingDoc(NamedTuple):
    """One row of the settings table: the variable, its default as shown, what it does."""

    name: str
    default: str
    meaning: str


SETTINGS_TABLE: Final[tuple[SettingDoc, ...]] = (
    SettingDoc("PORT", str(DEFAULT_PORT), "TCP port of the HTTP API (1-65535)."),
    SettingDoc(
        "HEALTH_CHECK_PORT",
        "PORT",
        "TCP port of /health and /ready; the API port unless set (1-65535).",
    ),
    SettingDoc(
        "MONGO_URL",
        "(required for `run`)",
        "Rocket.Chat's MongoDB, as a mongodb:// or mongodb+srv:// URL whose path names the"
        f" database, e.g. `{MONGO_URL_EXAMPLE}`. Secret: may be given as MONGO_URL_FILE.",
    ),
    SettingDoc(
        "MONGO_OPLOG_URL",
        "(unset)",
        "The replica set's `local` database, for the oplog feed, e.g."
        f" `{OPLOG_URL_EXAMPLE}`. Secret: may be given as MONGO_OPLOG_URL_FILE.",
    ),
    SettingDoc(
        "FEED",
        DEFAULT_FEED,
        "Where changes are read from: `oplog`, `changestream`, or `auto` (oplog when"
        " MONGO_OPLOG_URL is set, else change streams).",
    ),
    SettingDoc(
        "ROCKETCHAT_URL",
        "(unset)",
        "Rocket.Chat's http(s) address, for the version check and the REST API.",
    ),
    SettingDoc("ROCKETCHAT_USERNAME", "(unset)", "User the daemon logs in to Rocket.Chat as."),
    SettingDoc(
        "ROCKETCHAT_PASSWORD",
        "(unset)",
        "That user's password. Secret: may be given as ROCKETCHAT_PASSWORD_FILE.",
    ),
    SettingDoc(
        "TRANSPORTER",
        "(unset)",
        "Rocket.Chat's service broker (Moleculer over NATS), e.g."
        f" `{TRANSPORTER_EXAMPLE}`: presenced joins it as the `presence` service and"
        " broadcasts `presence.status`. Unset: no broker. Secret: may be given as"
        " TRANSPORTER_FILE.",
    ),
    SettingDoc(
        "MS_NAMESPACE",
        "(empty)",
        "The broker's namespace, as Rocket.Chat's (letters, digits, `_`, `-`).",
    ),
    SettingDoc(
        "SERIALIZER",
        DEFAULT_SERIALIZER,
        "The broker's packet format, as Rocket.Chat's: `EJSON` or `JSON`.",
    ),
    SettingDoc(
        "HEARTBEAT_INTERVAL",
        str(DEFAULT_HEARTBEAT_INTERVAL),
        "Seconds between the broker heartbeats presenced sends (1-3600).",
    ),
    SettingDoc(
        "HEARTBEAT_TIMEOUT",
        str(DEFAULT_HEARTBEAT_TIMEOUT),
        "Seconds without a heartbeat after which a broker node is lost and its"
        " connections removed (more than HEARTBEAT_INTERVAL).",
    ),
    SettingDoc(
        "LOG_LEVEL",
        DEFAULT_LOG_LEVEL,
        "Least severe level logged: debug, info, warn (= warning) or error.",
    ),
    SettingDoc(
        "INSTANCE_ID",
        "(generated)",
        "This daemon's name in the cluster; a random id per process unless set"
        " (letters, digits, `.`, `_`, `:`, `-`; up to 128).",
    ),
    SettingDoc(
        "CACHE_TTL",
        str(DEFAULT_CACHE_TTL),
        "Seconds after its `_updatedAt` that a connection stops counting; cached user"
        " documents are re-read after this long (>= 1).",
    ),
    SettingDoc(
        "INSTANCE_TIMEOUT",
        str(DEFAULT_INSTANCE_TIMEOUT),
        "Seconds after its `instances._updatedAt` that a Rocket.Chat instance is dead (>= 1).",
    ),
    SettingDoc(
        "SYNC_INTERVAL",
        str(DEFAULT_SYNC_INTERVAL_MS),
        "Milliseconds between runs of the housekeeping loop (100-3600000).",
    ),
    SettingDoc(
        "MAX_CONCURRENT_SYNC",
        str(DEFAULT_MAX_CONCURRENT_SYNC),
        "Write batches in flight at once; also reconcile batches loaded at once (1-1000).",
    ),
    SettingDoc("USERS_COLLECTION", DEFAULT_USERS_COLLECTION, "Collection of user documents."),
    SettingDoc(
        "SESSIONS_COLLECTION",
        DEFAULT_SESSIONS_COLLECTION,
        "Collection of the users' connections.",
    ),
    SettingDoc(
        "INSTANCES_COLLECTION",
        DEFAULT_INSTANCES_COLLECTION,
        "Collection in which Rocket.Chat instances register.",
    ),
)


def settings_table_markdown() -> str:
    """The README's settings table, as Markdown, from ``SETTINGS_TABLE``."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for doc in SETTINGS_TABLE:
        meaning = doc.meaning.replace("|", r"\|")
        lines.append(f"| `{doc.name}` | {doc.default} | {meaning} |")
    return "\n".join(lines) + "\n"


def settings_table_text(width: int = 79) -> str:
    """The settings table for a terminal (``presenced run --help``), from ``SETTINGS_TABLE``.

    One entry per setting: its name and default on one line, its meaning below, wrapped
    to ``width`` columns (a URL is never split, so its line may be longer). Markdown code
    spans lose their backticks; a one-character span is quoted instead.
    """
    name_width = max(len(doc.name) for doc in SETTINGS_TABLE)
    lines = [f"  {'setting'.ljust(name_width)}  default"]
    for doc in SETTINGS_TABLE:
        lines.append(f"  {doc.name.ljust(name_width)}  {_plain_text(doc.default)}")
        lines += textwrap.wrap(
            _plain_text(doc.meaning),
            width=max(width, 20),
            initial_indent="      ",
            subsequent_indent="      ",
            break_long_words=False,
            break_on_hyphens=False,
        )
    return "\n".join(lines) + "\n"


def _plain_text(markdown: str) -> str:
    return re.sub(r"`([^`]*)`", lambda m: f"'{m[1]}'" if len(m[1]) == 1 else m[1], markdown)


class SettingsError(Exception):
    """The settings cannot be used; ``problems`` holds one sentence per problem."""

    exit_code: ClassVar[int] = EX_CONFIG
    """The process exit status for this error: EX_CONFIG (78), from sysexits.h."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        listed = "\n".join(f"  - {problem}" for problem in self.problems)
        return f"{len(self.problems)} settings need fixing:\n{listed}"


@dataclass(frozen=True, repr=False)
class Settings:
    """The daemon's validated settings. Build it with ``load_settings``.

    Every field has its default, so a test may build one directly (or with
    ``dataclasses.replace``) without validation.
    """

    port: int = DEFAULT_PORT
    health_check_port: int = DEFAULT_PORT
    mongo_url: str | None = None
    """None when unset: only ``run`` needs it (see ``require_mongo``)."""
    mongo_oplog_url: str | None = None
    feed: Feed = DEFAULT_FEED
    """As set; what is used is ``effective_feed``."""
    rocketchat_url: str | None = None
    """Without a trailing slash."""
    rocketchat_username: str | None = None
    rocketchat_password: str | None = None
    transporter: str | None = None
    """The broker's NATS URL, or None: no broker."""
    ms_namespace: str = ""
    serializer: Serializer = DEFAULT_SERIALIZER
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    """Seconds."""
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT
    """Seconds."""
    log_level: LogLevel = DEFAULT_LOG_LEVEL
    instance_id: str = PROCESS_INSTANCE_ID
    cache_ttl: int = DEFAULT_CACHE_TTL
    """Seconds."""
    instance_timeout: int = DEFAULT_INSTANCE_TIMEOUT
    """Seconds."""
    sync_interval_ms: int = DEFAULT_SYNC_INTERVAL_MS
    """Milliseconds (SYNC_INTERVAL); ``sync_interval_seconds`` for trio."""
    max_concurrent_sync: int = DEFAULT_MAX_CONCURRENT_SYNC
    users_collection: str = DEFAULT_USERS_COLLECTION
    sessions_collection: str = DEFAULT_SESSIONS_COLLECTION
    instances_collection: str = DEFAULT_INSTANCES_COLLECTION
    sources: Mapping[str, Source] = field(
        default_factory=lambda: MappingProxyType({}), compare=False
    )
    """Where each setting came from, by variable name; a name missing means default."""

    @property
    def effective_feed(self) -> EffectiveFeed:
        """The feed in use: FEED, with ``auto`` resolved (oplog iff MONGO_OPLOG_URL is set)."""
        if self.feed == "auto":
            return "oplog" if self.mongo_oplog_url else "changestream"
        return self.feed

    @property
    def sync_interval_seconds(self) -> float:
        return self.sync_interval_ms / 1000

    @property
    def mongo_database(self) -> str:
        """The database MONGO_URL names. Raises SettingsError when MONGO_URL is unset."""
        database = _parse_mongo_url(self.require_mongo())["database"]
        if not isinstance(database, str) or not database:
            raise SettingsError([_no_database_problem("MONGO_URL", self.require_mongo())])
        return database

    def require_mongo(self) -> str:
        """MONGO_URL, or a SettingsError saying it must be set."""
        if self.mongo_url is None:
            raise SettingsError([_mongo_url_missing_problem()])
        return self.mongo_url

    def for_command(self, command: str) -> Settings:
        """These settings, checked for what ``command`` needs (``run`` and ``verify`` need
        MONGO_URL)."""
        if command in ("run", "verify"):
            self.require_mongo()
        return self

    def source(self, name: str) -> Source:
        """Where the setting ``name`` (e.g. "PORT") came from."""
        return self.sources.get(name, "default")

    def secrets(self) -> list[str]:
        """The secret values, as given and percent-decoded, for ``log.configure_logging``."""
        found: list[str] = []
        for url in (self.mongo_url, self.mongo_oplog_url, self.rocketchat_url, self.transporter):
            password = _url_password(url) if url else None
            if password:
                found += [password, unquote(password)]
        if self.rocketchat_password:
            found.append(self.rocketchat_password)
        token = _nats_token(self.transporter) if self.transporter else None
        if token:
            found += [token, unquote(token)]
        return list(dict.fromkeys(found))

    def describe(self) -> list[tuple[str, str]]:
        """Every setting's name and effective value, in ``SETTINGS_TABLE`` order, secrets
        masked; ``source(name)`` says where each came from."""
        feed = f"{self.effective_feed} (auto)" if self.feed == "auto" else self.feed
        values: dict[str, str] = {
            "PORT": str(self.port),
            "HEALTH_CHECK_PORT": str(self.health_check_port),
            "MONGO_URL": _shown_url(self.mongo_url),
            "MONGO_OPLOG_URL": _shown_url(self.mongo_oplog_url),
            "FEED": feed,
            "ROCKETCHAT_URL": _shown_url(self.rocketchat_url),
            "ROCKETCHAT_USERNAME": self.rocketchat_username or UNSET,
            "ROCKETCHAT_PASSWORD": MASK if self.rocketchat_password else UNSET,
            "TRANSPORTER": _shown_url(self.transporter),
            "MS_NAMESPACE": self.ms_namespace or "(empty)",
            "SERIALIZER": self.serializer,
            "HEARTBEAT_INTERVAL": str(self.heartbeat_interval),
            "HEARTBEAT_TIMEOUT": str(self.heartbeat_timeout),
            "LOG_LEVEL": self.log_level,
            "INSTANCE_ID": self.instance_id,
            "CACHE_TTL": str(self.cache_ttl),
            "INSTANCE_TIMEOUT": str(self.instance_timeout),
            "SYNC_INTERVAL": str(self.sync_interval_ms),
            "MAX_CONCURRENT_SYNC": str(self.max_concurrent_sync),
            "USERS_COLLECTION": self.users_collection,
            "SESSIONS_COLLECTION": self.sessions_collection,
            "INSTANCES_COLLECTION": self.instances_collection,
        }
        return [(doc.name, values[doc.name]) for doc in SETTINGS_TABLE]

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.describe())
        return f"Settings({shown})"


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env",
) -> Settings:
    """Read and check every setting.

    ``environ`` (default: the process environment) wins over ``env_file`` (read without
    touching ``os.environ``; a missing file is fine, ``None`` skips it). An empty value
    counts as unset. MONGO_URL, MONGO_OPLOG_URL and ROCKETCHAT_PASSWORD may instead be
    given as NAME_FILE, the path of a file holding the value.

    Raises SettingsError listing every problem found, not just the first.
    """
    reader = _Reader(os.environ if environ is None else environ, env_file)

    port = reader.integer("PORT", DEFAULT_PORT, 1, 65535, "TCP port")
    health_check_port = reader.integer("HEALTH_CHECK_PORT", port, 1, 65535, "TCP port")

    mongo_url = reader.secret("MONGO_URL")
    if mongo_url is not None:
        mongo_url = mongo_url.strip()
        _check_mongo_url(reader, "MONGO_URL", mongo_url)
    oplog_url = reader.secret("MONGO_OPLOG_URL")
    if oplog_url is not None:
        oplog_url = oplog_url.strip()
        _check_oplog_url(reader, oplog_url)

    feed = reader.choice("FEED", _FEEDS, DEFAULT_FEED, "a feed")
    if feed == "oplog" and oplog_url is None and "MONGO_OPLOG_URL" not in reader.invalid:
        reader.problem(
            "FEED",
            'FEED="oplog" needs MONGO_OPLOG_URL, which is not set; set MONGO_OPLOG_URL to the'
            f" replica set's local database (e.g. {OPLOG_URL_EXAMPLE}), or set FEED to"
            " changestream or auto",
        )

    rocketchat_url = _read_rocketchat_url(reader)
    username = reader.value("ROCKETCHAT_USERNAME")
    username = username.strip() if username is not None else None
    password = reader.secret("ROCKETCHAT_PASSWORD")
    _check_rocketchat_login(reader, rocketchat_url, username, password)

    transporter = _read_transporter(reader)
    namespace = (reader.value("MS_NAMESPACE") or "").strip()
    if namespace and not _NAMESPACE.fullmatch(namespace):
        reader.problem(
            "MS_NAMESPACE",
            f"MS_NAMESPACE={_quoted(namespace)} is not a usable broker namespace; use up to 64"
            " letters, digits, '_' or '-' (the same value as Rocket.Chat's MS_NAMESPACE)",
        )
        namespace = ""
    serializer_text = reader.choice("SERIALIZER", ("ejson", "json"), "ejson", "a serializer")
    serializer: Serializer = "JSON" if serializer_text == "json" else "EJSON"
    heartbeat_interval = reader.integer(
        "HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL, 1, 3600, "seconds"
    )
    heartbeat_timeout = reader.integer(
        "HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT, 1, 86_400, "seconds"
    )
    if heartbeat_timeout <= heartbeat_interval and not reader.invalid.intersection(
        ("HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT")
    ):
        reader.problem(
            "HEARTBEAT_TIMEOUT",
            f"HEARTBEAT_TIMEOUT={heartbeat_timeout} is not more than"
            f" HEARTBEAT_INTERVAL={heartbeat_interval}: every node would be lost between two"
            " heartbeats; set it to about three intervals (default"
            f" {DEFAULT_HEARTBEAT_TIMEOUT} for {DEFAULT_HEARTBEAT_INTERVAL})",
        )

    level_text = reader.choice("LOG_LEVEL", tuple(_LOG_LEVELS), "info", "a log level")
    log_level = _LOG_LEVELS.get(level_text, DEFAULT_LOG_LEVEL)

    instance_id = reader.value("INSTANCE_ID")
    if instance_id is None:
        instance_id = PROCESS_INSTANCE_ID
    else:
        instance_id = instance_id.strip()
        if not _INSTANCE_ID.fullmatch(instance_id):
            reader.problem(
                "INSTANCE_ID",
                f"INSTANCE_ID={_quoted(instance_id)} is not a usable instance id; use up to 128"
                " letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
                " (e.g. the pod or host name), or unset it to get a random one",
            )

    cache_ttl = reader.integer("CACHE_TTL", DEFAULT_CACHE_TTL, 1, None, "seconds")
    instance_timeout = reader.integer(
        "INSTANCE_TIMEOUT", DEFAULT_INSTANCE_TIMEOUT, 1, None, "seconds"
    )
    sync_interval_ms = reader.integer(
        "SYNC_INTERVAL", DEFAULT_SYNC_INTERVAL_MS, 100, 3_600_000, "milliseconds"
    )
    max_concurrent_sync = reader.integer(
        "MAX_CONCURRENT_SYNC", DEFAULT_MAX_CONCURRENT_SYNC, 1, 1000, "write batches"
    )

    users = reader.collection("USERS_COLLECTION", DEFAULT_USERS_COLLECTION)
    sessions = reader.collection("SESSIONS_COLLECTION", DEFAULT_SESSIONS_COLLECTION)
    instances = reader.collection("INSTANCES_COLLECTION", DEFAULT_INSTANCES_COLLECTION)
    names = ("USERS_COLLECTION", "SESSIONS_COLLECTION", "INSTANCES_COLLECTION")
    if len({users, sessions, instances}) < 3 and not reader.invalid.intersection(names):
        reader.problem(
            "USERS_COLLECTION",
            f"USERS_COLLECTION={_quoted(users)}, SESSIONS_COLLECTION={_quoted(sessions)} and"
            f" INSTANCES_COLLECTION={_quoted(instances)} name the same collection twice; set"
            " each to a different collection",
        )

    if reader.problems:
        raise SettingsError(reader.problems)
    return Settings(
        port=port,
        health_check_port=health_check_port,
        mongo_url=mongo_url,
        mongo_oplog_url=oplog_url,
        feed=feed,
        rocketchat_url=rocketchat_url,
        rocketchat_username=username,
        rocketchat_password=password,
        transporter=transporter,
        ms_namespace=namespace,
        serializer=serializer,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        log_level=log_level,
        instance_id=instance_id,
        cache_ttl=cache_ttl,
        instance_timeout=instance_timeout,
        sync_interval_ms=sync_interval_ms,
        max_concurrent_sync=max_concurrent_sync,
        users_collection=users,
        sessions_collection=sessions,
        instances_collection=instances,
        sources=MappingProxyType(dict(reader.sources)),
    )


class _Reader:
    """Looks variables up (environment, then .env) and collects the problems found."""

    def __init__(self, environ: Mapping[str, str], env_file: str | os.PathLike[str] | None) -> None:
        self.problems: list[str] = []
        self.invalid: set[str] = set()
        self.sources: dict[str, Source] = {}
        self._layers: list[tuple[Source, Mapping[str, str | None]]] = [("env", environ)]
        if env_file is not None:
            try:
                dotenv = dotenv_values(env_file, interpolate=False)
            except (OSError, UnicodeDecodeError) as exc:
                self.problems.append(
                    f"the settings file {_quoted(os.fspath(env_file))} cannot be read"
                    f" ({_reason(exc)}); make it a readable UTF-8 file or remove it"
                )
            else:
                self._layers.append((".env", dotenv))

    def problem(self, name: str, sentence: str) -> None:
        self.invalid.add(name)
        self.problems.append(sentence)

    def lookup(self, name: str) -> tuple[str, Source] | None:
        """The raw value and where it came from; an empty value counts as unset."""
        for source, layer in self._layers:
            value = layer.get(name)
            if value is not None and value.strip():
                return value, source
        return None

    def value(self, name: str) -> str | None:
        found = self.lookup(name)
        if found is None:
            return None
        self.sources[name] = found[1]
        return found[0]

    def secret(self, name: str) -> str | None:
        """NAME, or the content of the file NAME_FILE names (one trailing newline off)."""
        file_name = name + SECRET_FILE_SUFFIX
        direct = self.lookup(name)
        path_found = self.lookup(file_name)
        if path_found is None:
            return self.value(name)
        path = path_found[0].strip()
        if direct is not None:
            self.problem(
                name,
                f"{name} and {file_name} are both set ({name} in {_where(direct[1])},"
                f" {file_name} in {_where(path_found[1])}); set only one of them",
            )
            return None
        try:
            with open(path, encoding="utf-8") as file:
                content = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(
                name,
                f"{file_name}={_quoted(path)} cannot be read ({_reason(exc)}); point"
                f" {file_name} at a readable UTF-8 file holding {name}, or set {name} instead",
            )
            return None
        content = content.removesuffix("\n").removesuffix("\r")
        if not content.strip():
            self.problem(
                name,
                f"{file_name}={_quoted(path)} is an empty file; write {name} into it, or"
                f" unset {file_name}",
            )
            return None
        self.sources[name] = "file"
        return content

    def integer(self, name: str, default: int, low: int, high: int | None, unit: str) -> int:
        raw = self.value(name)
        if raw is None:
            return default
        wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        fix = f"set it to {wanted} (default {default})"
        if name == "HEALTH_CHECK_PORT":
            fix = f"set it to {wanted}, or unset it to use PORT"
        text = raw.strip()
        if not _WHOLE_NUMBER.fullmatch(text):
            what = "a whole number" if unit == "TCP port" else f"a whole number of {unit}"
            self.problem(name, f"{name}={_quoted(raw)} is not {what}; {fix}")
            return default
        number = int(text)
        if number < low or (high is not None and number > high):
            self.problem(name, f"{name}={_quoted(raw)} is out of range; {fix}")
            return default
        return number

    def choice(self, name: str, allowed: Sequence[_Choice], default: _Choice, what: str) -> _Choice:
        raw = self.value(name)
        if raw is None:
            return default
        text = raw.strip().lower()
        for option in allowed:
            if option == text:
                return option
        self.problem(
            name,
            f"{name}={_quoted(raw)} is not {what}; set it to one of"
            f" {', '.join(allowed)} (default {default})",
        )
        return default

    def collection(self, name: str, default: str) -> str:
        raw = self.value(name)
        if raw is None:
            return default
        text = raw.strip()
        reason = _collection_name_problem(text)
        if reason is not None:
            self.problem(
                name,
                f"{name}={_quoted(raw)} is not a valid MongoDB collection name ({reason}); set"
                f" it to the collection's name (default {default})",
            )
            return default
        return text


def _check_mongo_url(reader: _Reader, name: str, url: str) -> None:
    parsed = _checked_mongo_url(reader, name, url)
    if parsed is not None and not parsed["database"]:
        reader.problem(name, _no_database_problem(name, url))


def _check_oplog_url(reader: _Reader, url: str) -> None:
    name = "MONGO_OPLOG_URL"
    parsed = _checked_mongo_url(reader, name, url)
    if parsed is None:
        return
    database = parsed["database"]
    if database != "local":
        named = f'names the database "{database}"' if database else "names no database"
        reader.problem(
            name,
            f"{name}={_quoted(mask_url(url))} {named}, but the oplog is in the database"
            f' "local"; make the URL\'s path /local, e.g. {OPLOG_URL_EXAMPLE}',
        )


def _checked_mongo_url(reader: _Reader, name: str, url: str) -> dict[str, Any] | None:
    example = OPLOG_URL_EXAMPLE if name == "MONGO_OPLOG_URL" else MONGO_URL_EXAMPLE
    shown = _quoted(_masked_broken_url(url))
    if not url.lower().startswith(("mongodb://", "mongodb+srv://")):
        reader.problem(
            name,
            f"{name}={shown} is not a MongoDB URL; set it to a mongodb:// or mongodb+srv://"
            f" URL such as {example}",
        )
        return None
    try:
        return _parse_mongo_url(url)
    except (ConfigurationError, ValueError) as exc:
        password = _url_password(url)
        secrets = [password, unquote(password)] if password else []
        reason = redact(str(exc), secrets).rstrip(".")
        reader.problem(
            name,
            f"{name}={shown} is not a valid MongoDB URL ({reason}); correct it, e.g."
            f" {example}, percent-encoding any of : / ? # @ in the user name and password",
        )
        return None


def _parse_mongo_url(url: str) -> dict[str, Any]:
    """pymongo's parse of ``url``, without network access.

    parse_uri resolves a mongodb+srv:// URL's DNS records, so such a URL is checked as
    the equivalent mongodb:// URL (its one host, without the SRV-only options) instead.
    """
    scheme, separator, rest = url.partition("://")
    if scheme.lower() != "mongodb+srv":
        return parse_uri(url)
    before_query, _, query = rest.partition("?")
    host = before_query.partition("/")[0].rpartition("@")[2]
    if not host or "," in host or ":" in host:
        raise ConfigurationError("a mongodb+srv:// URL names exactly one host name, without a port")
    options = [
        option
        for option in re.split("[&;]", query)
        if option and option.partition("=")[0].lower() not in _SRV_ONLY_OPTIONS
    ]
    equivalent = "mongodb" + separator + before_query
    if options:
        equivalent += "?" + "&".join(options)
    return parse_uri(equivalent)


def _read_rocketchat_url(reader: _Reader) -> str | None:
    raw = reader.value("ROCKETCHAT_URL")
    if raw is None:
        return None
    url = raw.strip()
    try:
        parts = urlsplit(url)
        valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        valid = False
    if not valid:
        reader.problem(
            "ROCKETCHAT_URL",
            f"ROCKETCHAT_URL={_quoted(_masked_broken_url(url))} is not an http(s) URL; set it"
            " to the address Rocket.Chat is served at, e.g. https://chat.example.com",
        )
        return None
    return url.rstrip("/")


def _read_transporter(reader: _Reader) -> str | None:
    raw = reader.secret("TRANSPORTER")
    if raw is None:
        return None
    url = raw.strip()
    try:
        parts = urlsplit(url)
        valid = parts.scheme.lower() in ("nats", "tls") and bool(parts.hostname)
        _ = parts.port
    except ValueError:
        valid = False
    if not valid:
        reader.problem(
            "TRANSPORTER",
            f"TRANSPORTER={_quoted(_masked_broken_url(url))} is not a NATS URL; presenced"
            f" speaks Moleculer over NATS: set it to Rocket.Chat's, e.g. {TRANSPORTER_EXAMPLE}"
            " (nats:// or tls://), or unset it to run without the broker",
        )
        return None
    return url


def _check_rocketchat_login(
    reader: _Reader, url: str | None, username: str | None, password: str | None
) -> None:
    if "ROCKETCHAT_PASSWORD" in reader.invalid:
        return
    if username is not None and password is None:
        reader.problem(
            "ROCKETCHAT_PASSWORD",
            "ROCKETCHAT_USERNAME is set but ROCKETCHAT_PASSWORD is not; set"
            " ROCKETCHAT_PASSWORD (or ROCKETCHAT_PASSWORD_FILE) too, or unset"
            " ROCKETCHAT_USERNAME",
        )
    elif password is not None and username is None:
        reader.problem(
            "ROCKETCHAT_USERNAME",
            "ROCKETCHAT_PASSWORD is set but ROCKETCHAT_USERNAME is not; set"
            " ROCKETCHAT_USERNAME too, or unset ROCKETCHAT_PASSWORD",
        )
    elif username is not None and url is None and "ROCKETCHAT_URL" not in reader.invalid:
        reader.problem(
            "ROCKETCHAT_URL",
            "ROCKETCHAT_USERNAME and ROCKETCHAT_PASSWORD are set but ROCKETCHAT_URL is not;"
            " set ROCKETCHAT_URL to Rocket.Chat's address, or unset the credentials",
        )


def _collection_name_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if "$" in name:
        return "it contains '$'"
    if "\x00" in name:
        return "it contains a NUL character"
    if name.startswith("system."):
        return "names starting with 'system.' are reserved"
    if name.startswith(".") or name.endswith(".") or ".." in name:
        return "it has an empty part between dots"
    return None


def _no_database_problem(name: str, url: str) -> str:
    return (
        f"{name}={_quoted(mask_url(url))} does not name a database; add Rocket.Chat's"
        f" database as the URL's path, e.g. {MONGO_URL_EXAMPLE}"
    )


def _mongo_url_missing_problem() -> str:
    return (
        "MONGO_URL is not set; set MONGO_URL (or MONGO_URL_FILE) to Rocket.Chat's MongoDB,"
        f" e.g. {MONGO_URL_EXAMPLE}"
    )


def _url_password(url: str) -> str | None:
    """The password in ``url``'s user info, as written (percent-encoded), if any."""
    _, separator, rest = url.partition("://")
    if not separator:
        return None
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return None
    return userinfo.partition(":")[2] or None


def _nats_token(url: str) -> str | None:
    """The token of a ``nats://<token>@host`` URL (user info without a password)."""
    _, separator, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = authority.rpartition("@")
    return userinfo if separator and at and userinfo and ":" not in userinfo else None


def _masked_broken_url(url: str) -> str:
    """``url`` for a message when it may not parse: everything between the user name and
    the last '@' is masked, so a password with an unescaped '/' or ':' is hidden too."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return mask_url(url)
    return f"{scheme}{separator}{userinfo.partition(':')[0]}:{MASK}@{host}"


def _shown_url(url: str | None) -> str:
    return UNSET if url is None else mask_url(url)


def _quoted(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _where(source: Source) -> str:
    return "the environment" if source == "env" else "the .env file"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(exc)
