"""Command line: ``presenced run``, ``check``, ``verify``, ``demo`` and ``simulate``.

Owns: argument parsing, turning settings problems into exit status 78 with the message,
a crash of the daemon into one redacted CRITICAL log line and exit status 70, and each
subcommand's top-level flow. It never reads environment variables itself (config.py
does) and never calls MongoDB except through what it is handed.
"""

from __future__ import annotations

import argparse
import errno
import shutil
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any, Final, TypeVar

from presenced import __version__
from presenced.config import Settings, SettingsError, load_settings, settings_table_text
from presenced.log import redact

EX_OK: Final = 0
EX_FAIL: Final = 1
EX_USAGE: Final = 2
"""A command line argparse cannot use (argparse's own status for usage errors)."""
EX_UNAVAILABLE: Final = 69
"""MongoDB could not be reached or read (sysexits.h EX_UNAVAILABLE): ``verify`` could not
tell, which is neither "all right" (0) nor "some differ" (1)."""
EX_SOFTWARE: Final = 70
"""An unexpected exception, i.e. a bug (sysexits.h EX_SOFTWARE)."""

TESTING_EXTRA_MODULES: Final = ("mongomock_ng",)
"""Top-level modules that only the ``presenced[testing]`` extra installs."""

_BIND_ERRORS: Final = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is less than 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not more than 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 0 or more")
    return value


def _err(message: str) -> None:
    """Write ``message`` to stderr after what is already written to stdout, so that a
    terminal or a combined pipe shows the two in the order they were written."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def _settings(command: str) -> Settings:
    return load_settings().for_command(command)


def check(timeout_ms: int = 5000) -> int:
    """Print the effective settings (secrets masked), then test the connections: MongoDB,
    the service broker (TRANSPORTER) and Rocket.Chat's REST API (ROCKETCHAT_URL) when set.
    Exit 0 when every one checked works."""
    try:
        settings = _settings("check")
    except SettingsError as exc:
        _err(f"presenced {__version__}: the settings need fixing:\n{exc}")
        return SettingsError.exit_code
    width = max(len(name) for name, _ in settings.describe())
    print(f"presenced {__version__}")
    for name, value in settings.describe():
        print(f"  {name.ljust(width)}  {value}")
    ok = _check_mongo(settings, timeout_ms)
    if settings.transporter is not None:
        ok = _check_broker(settings, timeout_ms) and ok
    if settings.rocketchat_url is not None:
        ok = _check_rocketchat(settings) and ok
    return EX_OK if ok else EX_FAIL


def _check_mongo(settings: Settings, timeout_ms: int) -> bool:
    if settings.mongo_url is None:
        print("MongoDB: not checked (MONGO_URL is not set)")
        return False
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    client: MongoClient[dict[str, object]] = MongoClient(
        settings.mongo_url, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms
    )
    try:
        hello = client.admin.command("hello")
        version = client.server_info().get("version", "?")
        replica_set = hello.get("setName")
        print(
            f"MongoDB: ok, version {version}, "
            + (f"replica set {replica_set}" if replica_set else "NOT a replica-set member")
        )
        return bool(replica_set)
    except PyMongoError as exc:
        _err(f"MongoDB: unreachable: {redact(str(exc), settings.secrets())}")
        return False
    finally:
        client.close()


def _check_broker(settings: Settings, timeout_ms: int) -> bool:
    """Reach the broker's NATS, list the Moleculer nodes that answer a DISCOVER, and say
    whether another node already offers the ``presence`` service."""
    import trio

    from presenced.broker.node import BrokerConfig
    from presenced.broker.probe import probe
    from presenced.log import mask_url

    assert settings.transporter is not None
    shown = mask_url(settings.transporter)
    config = BrokerConfig(
        url=settings.transporter, node_id=settings.instance_id,
        namespace=settings.ms_namespace, serializer=settings.serializer, shown_url=shown,
    )
    report = trio.run(lambda: probe(config, timeout_s=timeout_ms / 1000))
    if not report.reachable:
        _err(redact(f"broker: unreachable at {shown}: {report.error}", settings.secrets()))
        return False
    nodes = ", ".join(
        f"{node} ({', '.join(services) or 'no services'})"
        for node, services in sorted(report.nodes.items())
    )
    print(f"broker: ok, NATS at {shown}; {len(report.nodes)} Moleculer node(s) answered"
          + (f": {nodes}" if nodes else ""))
    others = report.presence_nodes(settings.instance_id)
    if others:
        _err(f"broker: node(s) {', '.join(others)} already offer the presence service: stop"
             " Rocket.Chat's presence-service (presenced replaces it), or give this presenced"
             " an INSTANCE_ID of its own; two presence services would both answer")
        return False
    return True


def _check_rocketchat(settings: Settings) -> bool:
    import trio

    from presenced.clock import Clock
    from presenced.rocketchat import RocketChat

    rest = RocketChat.from_settings(settings, Clock())
    assert rest is not None
    report = trio.run(rest.check)
    details = rest.details()
    if report.problems:
        _err("Rocket.Chat: " + "; ".join(report.problems))
        return False
    supported = details.get("supported")
    shown_version = f"version {report.version}"
    if report.version_ok is False:
        shown_version += f" (outside the versions presenced supports: {supported})"
    elif report.version_ok is None:
        shown_version += f" (unreadable; presenced supports {supported})"
    parts = [shown_version]
    if report.logged_in:
        parts.append("logged in" + ("" if report.admin else " (the user lacks the admin role)"))
    print(f"Rocket.Chat: ok at {details['url']}, " + ", ".join(parts))
    return True


def verify(args: argparse.Namespace) -> int:
    """Derive every user with the daemon's rules and list those whose stored status differs.
    Exit 0 when none differ, 1 when some do, 69 when MongoDB cannot be read, 78 on bad
    settings."""
    import json
    import os

    environ = dict(os.environ)
    if args.mongo_url is not None:
        environ.pop("MONGO_URL_FILE", None)
        environ["MONGO_URL"] = args.mongo_url
    try:
        settings = load_settings(environ).for_command("verify")
    except SettingsError as exc:
        _err(f"presenced verify: the settings need fixing:\n{exc}")
        return SettingsError.exit_code
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    from presenced.daemon import collections_of
    from presenced.verify import render_text
    from presenced.verify import verify as run_verify

    progress = _ProgressLine(sys.stderr) if sys.stderr.isatty() else None
    url = settings.require_mongo()
    # Timeouts the URL sets win over these defaults (pymongo's keywords would override them).
    defaults: dict[str, Any] = {"serverSelectionTimeoutMS": 10_000, "connectTimeoutMS": 10_000,
                "socketTimeoutMS": 120_000}
    query = url.partition("?")[2].lower()
    options = {k: v for k, v in defaults.items() if f"{k.lower()}=" not in query}
    client: MongoClient[dict[str, Any]] = MongoClient(url, appname="presenced-verify", **options)
    collections = collections_of(settings)
    try:
        report = run_verify(
            client[collections.database], collections,
            ttl_ms=settings.cache_ttl * 1000,
            instance_timeout_ms=settings.instance_timeout * 1000,
            unlisted_dead=settings.transporter is None,
            grace_s=args.grace, fix=args.fix,
            progress=progress.update if progress is not None else None,
        )
    except PyMongoError as exc:
        if progress is not None:
            progress.clear()
        _err(redact(f"presenced verify: cannot read MongoDB: {exc}", settings.secrets()))
        return EX_UNAVAILABLE
    finally:
        client.close()
    if progress is not None:
        progress.clear()
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(render_text(report))
    return EX_OK if report.ok else EX_FAIL


class _ProgressLine:
    """A one-line progress bar on a terminal, redrawn at most 10 times a second."""

    WIDTH: Final = 30

    def __init__(self, stream: object) -> None:
        import time

        self._stream = stream
        self._time = time.monotonic
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        now = self._time()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        share = done / total if total else 1.0
        filled = int(share * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._write(f"\rverifying [{bar}] {done:,}/{total:,} users ({share:.0%})")
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self._write("\r\x1b[2K")
            self._drawn = False

    def _write(self, text: str) -> None:
        stream = self._stream
        stream.write(text)  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]


def run() -> int:
    """The daemon, until SIGINT/SIGTERM."""
    try:
        settings = _settings("run")
    except SettingsError as exc:
        _err(f"presenced {__version__}: cannot start, the settings need fixing:\n{exc}")
        return SettingsError.exit_code
    import trio

    from presenced.daemon import Daemon
    from presenced.log import configure_logging

    configure_logging(settings.log_level, settings.secrets())
    try:
        trio.run(Daemon(settings).run)
    except BaseException as exc:  # turned into a message and an exit status
        return _exit_status(exc, settings)
    return EX_OK


def _exit_status(exc: BaseException, settings: Settings) -> int:
    """The exit status for what stopped the daemon, after saying what it was on stderr."""
    from presenced.daemon import StartupProblem

    secrets = settings.secrets()
    problem = _find(exc, StartupProblem)
    if problem is not None:
        _err(redact(f"presenced: cannot start: {problem}", secrets))
        return StartupProblem.exit_code
    bind_error = next(
        (e for e in _leaves(exc) if isinstance(e, OSError) and e.errno in _BIND_ERRORS), None
    )
    if bind_error is not None:
        fix = "a port above 1023" if bind_error.errno == errno.EACCES else "a free port"
        _err(f"presenced: cannot serve HTTP on port {settings.health_check_port}: "
             f"{bind_error.strerror}; set HEALTH_CHECK_PORT to {fix}")
        return EX_FAIL
    if all(isinstance(e, KeyboardInterrupt) for e in _leaves(exc)):
        return EX_OK
    from loguru import logger

    # Through log.py's sink, which masks secrets in the traceback too; never to Python's
    # excepthook, which would print the exception (and any URL in it) as it is.
    logger.opt(exception=exc).critical(
        "presenced stopped on an unexpected error; this is a bug, please report it with"
        " this traceback"
    )
    return EX_SOFTWARE


E = TypeVar("E", bound=BaseException)


def _find(exc: BaseException, kind: type[E]) -> E | None:
    return next((e for e in _leaves(exc) if isinstance(e, kind)), None)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, or every exception inside it when it is an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def demo(users: int, seed: int) -> int:
    """The daemon on the embedded emulator, if the ``testing`` extra is installed."""
    try:
        from presenced.testing.demo import demo as run_demo  # loads the testing extra
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in TESTING_EXTRA_MODULES:
            raise
        _err("presenced demo needs the MongoDB emulator from the testing extra; install it"
             " with: pip install 'presenced[testing]'")
        return EX_FAIL
    return run_demo(users=users, seed=seed)


def simulate(args: argparse.Namespace) -> int:
    """Write simulated Rocket.Chat presence traffic to any MongoDB until Ctrl-C."""
    import signal
    import threading
    import time

    from pymongo import MongoClient, uri_parser
    from pymongo.errors import PyMongoError

    # The simulator is test support: loaded only by this command, never by the daemon.
    from presenced.testing.simulator import RocketChatSimulator, TickStats

    try:
        database = uri_parser.parse_uri(args.mongo_url).get("database")
    except Exception as exc:
        _err(f"--mongo-url is not a MongoDB URL: {redact(str(exc), [])}")
        return SettingsError.exit_code
    if not database:
        _err("--mongo-url must name the database, e.g. mongodb://127.0.0.1:27017/rocketchat"
             "?replicaSet=rs0")
        return SettingsError.exit_code
    client: MongoClient[dict[str, object]] = MongoClient(
        args.mongo_url, serverSelectionTimeoutMS=10_000
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.duration is not None:
        threading.Timer(args.duration, stop.set).start()
    last_report = [time.monotonic()]

    def report(stats: TickStats) -> None:
        if time.monotonic() - last_report[0] >= args.report_every:
            last_report[0] = time.monotonic()
            print(f"t={stats.elapsed:7.0f}s users online={stats.connected_users:6d} "
                  f"connections={stats.live_connections:6d} instances={stats.live_instances} "
                  f"writes={sim.stats.total}", flush=True)

    try:
        sim = RocketChatSimulator(
            client[database], users=args.users, instances=args.instances, seed=args.seed,
            crash_after=args.crash_after,
        )
        sim.setup()
        print(f"simulating {args.users} users on {args.instances} Rocket.Chat instances "
              f"into {database} (Ctrl-C stops)", flush=True)
        sim.run(stop, speed=args.speed, on_tick=report)
    except PyMongoError as exc:
        _err(f"MongoDB: {redact(str(exc), [])}")
        return EX_FAIL
    finally:
        stop.set()
        client.close()
    print(f"stopped after {sim.stats.total} writes", flush=True)
    return EX_OK


def _help_width() -> int:
    """The width argparse wraps help to (the terminal's, less 2), for the settings list."""
    return max(shutil.get_terminal_size().columns - 2, 40)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="presenced", description="Rocket.Chat presence daemon",
        epilog="presenced COMMAND --help describes a command; presenced run --help also lists"
               " the settings.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"presenced {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    sub.add_parser(
        "check", help="print the effective settings and test the MongoDB connection",
        description="Print the effective settings (secrets masked) and test the MongoDB"
                    " connection. Exits 0 when MongoDB answers as a replica-set member, 1"
                    " when it does not or cannot be reached, 78 when a setting is bad.",
    )
    verify_parser = sub.add_parser(
        "verify", help="list the users whose stored status is not what presenced derives",
        description="Read users, usersSessions and instances (the settings of presenced run),"
                    " derive every user at one instant with the daemon's rules, and list each"
                    " user whose stored status/statusConnection differs, with why. A user that"
                    " differs is read again after --grace seconds and counts only if its"
                    " documents did not change meanwhile and it still differs. Read-only"
                    " unless --fix. Exits 0 when none differ, 1 when some do, 69 when MongoDB"
                    " cannot be read, 78 when a setting is bad.",
    )
    verify_parser.add_argument("--mongo-url", default=None,
                               help="MongoDB URL naming the database (default: MONGO_URL)")
    verify_parser.add_argument("--grace", type=_non_negative_float, default=2.0,
                               help="seconds a differing user is given to settle before it"
                                    " counts (default: %(default)s)")
    verify_parser.add_argument("--json", action="store_true",
                               help="print the report as JSON")
    verify_parser.add_argument("--fix", action="store_true",
                               help="write the derived values where they differ, with the"
                                    " daemon's conditional writes")
    width = _help_width()
    sub.add_parser(
        "run", help="run the daemon (settings from the environment and .env)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Run the daemon until SIGINT or SIGTERM. Exits 0 when stopped, 78 when a setting"
            " is bad or MongoDB is not usable, 1 when the HTTP port cannot be served, 70 on"
            " a bug.", width),
        epilog=textwrap.fill(
            "Settings are read from the environment, then from a .env file in the working"
            " directory (the environment wins); a secret may instead be given as NAME_FILE,"
            " the path of a file holding it.", width)
        + "\n\n" + settings_table_text(width),
    )
    demo_parser = sub.add_parser(
        "demo", help="the daemon on the embedded MongoDB emulator with simulated Rocket.Chat"
                     " traffic",
        description="The daemon on the embedded MongoDB emulator with simulated Rocket.Chat"
                    " traffic, printing each user's transitions; Ctrl-C stops it. Needs the"
                    " testing extra: pip install 'presenced[testing]'.",
    )
    demo_parser.add_argument("--users", type=_positive_int, default=40,
                             help="simulated Rocket.Chat users (default: %(default)s)")
    demo_parser.add_argument("--seed", type=int, default=1,
                             help="random seed of the simulated traffic (default: %(default)s)")
    sim = sub.add_parser(
        "simulate", help="write simulated Rocket.Chat presence traffic",
        description="Write simulated Rocket.Chat presence traffic into any MongoDB (use a"
                    " test database) until Ctrl-C.",
    )
    sim.add_argument("--mongo-url", required=True,
                     help="MongoDB URL naming the database (required)")
    sim.add_argument("--users", type=_positive_int, default=50,
                     help="simulated Rocket.Chat users (default: %(default)s)")
    sim.add_argument("--instances", type=_positive_int, default=3,
                     help="simulated Rocket.Chat instances (default: %(default)s)")
    sim.add_argument("--seed", type=int, default=0,
                     help="random seed of the simulated traffic (default: %(default)s)")
    sim.add_argument("--speed", type=_positive_float, default=1.0,
                     help="simulated seconds per second (default: %(default)s)")
    sim.add_argument("--crash-after", type=float, default=None,
                     help="crash one Rocket.Chat instance after this many simulated seconds"
                          " (default: no crash)")
    sim.add_argument("--duration", type=_positive_float, default=None,
                     help="stop after this many seconds (default: run until Ctrl-C)")
    sim.add_argument("--report-every", type=_positive_float, default=5.0,
                     help="seconds between progress lines (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # Nothing was asked for: the help, on stdout, but not success (a script that lost
        # its subcommand must not look as if it ran one); 2 as argparse's usage errors.
        parser.print_help()
        return EX_USAGE
    if args.command == "check":
        return check()
    if args.command == "run":
        return run()
    if args.command == "verify":
        return verify(args)
    if args.command == "demo":
        return demo(users=args.users, seed=args.seed)
    if args.command == "simulate":
        return simulate(args)
    parser.error(f"unknown command {args.command}")
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
