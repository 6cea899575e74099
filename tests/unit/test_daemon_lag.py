"""The daemon says once when its feed falls behind and once when it catches up."""

from __future__ import annotations

from loguru import logger

from presenced.config import load_settings
from presenced.daemon import Daemon
from presenced.health import READY_MAX_LAG_S


def make_daemon() -> Daemon:
    settings = load_settings(
        {"MONGO_URL": "mongodb://127.0.0.1:1/rocketchat?replicaSet=rs0"}, env_file=None
    )
    return Daemon(settings.for_command("run"))


def test_falling_behind_is_logged_once_and_catching_up_once() -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    try:
        d = make_daemon()
        for lag in (0.0, READY_MAX_LAG_S + 1, READY_MAX_LAG_S + 3, 0.5, 0.2):
            d._log_lag(lag)
    finally:
        logger.remove(sink)
    behind = [line for line in lines if "behind" in line]
    caught_up = [line for line in lines if "caught up" in line]
    assert len(behind) == 1 and f"{READY_MAX_LAG_S + 1:.1f} s behind" in behind[0]
    assert len(caught_up) == 1
