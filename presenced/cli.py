"""Command line: ``presenced check`` (and, as they land, run, demo, simulate).

Owns: argument parsing, turning settings problems into exit status 78 with the message,
and each subcommand's top-level flow. It never reads environment variables itself
(config.py does) and never calls MongoDB except through what it is handed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from presenced import __version__
from presenced.config import Settings, SettingsError, load_settings
from presenced.log import redact

EX_OK = 0
EX_FAIL = 1


def _settings(command: str) -> Settings:
    return load_settings().for_command(command)


def check(timeout_ms: int = 5000) -> int:
    """Print the effective settings (secrets masked), then test the MongoDB connection."""
    try:
        settings = _settings("check")
    except SettingsError as exc:
        print(f"presenced {__version__}: the settings need fixing:\n{exc}", file=sys.stderr)
        return SettingsError.exit_code
    width = max(len(name) for name, _ in settings.describe())
    print(f"presenced {__version__}")
    for name, value in settings.describe():
        print(f"  {name.ljust(width)}  {value}")
    if settings.mongo_url is None:
        print("MongoDB: not checked (MONGO_URL is not set)")
        return EX_FAIL
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
        return EX_OK if replica_set else EX_FAIL
    except PyMongoError as exc:
        print(f"MongoDB: unreachable: {redact(str(exc), settings.secrets())}", file=sys.stderr)
        return EX_FAIL
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="presenced", description="Rocket.Chat presence daemon")
    parser.add_argument("--version", action="version", version=f"presenced {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="print the effective settings and test the MongoDB connection")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check()
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
