"""``presenced demo``: the daemon on the embedded emulator with simulated traffic.

Owns: wiring the three together in one process (the emulator and the simulator in
threads, the daemon on trio in the main thread) and the live view printed to the
terminal. Never used by ``presenced run``.
"""

from __future__ import annotations

import datetime as dt
import socket
import sys
import threading
from collections import Counter
from typing import Any

import trio
from pymongo import MongoClient

from presenced.config import load_settings
from presenced.engine import Transition
from presenced.log import configure_logging
from presenced.testing.mongo import MongoEmulator
from presenced.testing.simulator import RocketChatSimulator

DATABASE = "rocketchat"
_COLOURS = {"online": "\033[32m", "away": "\033[33m", "busy": "\033[31m", "offline": "\033[90m"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _paint(status: str, tty: bool) -> str:
    return f"{_COLOURS[status]}{status:<7}\033[0m" if tty else f"{status:<7}"


def demo(users: int = 40, seed: int = 1) -> int:
    tty = sys.stdout.isatty()
    emulator = MongoEmulator(ttl_monitor_interval=5.0)
    url = emulator.start()
    mongo_url = url.replace("/?", f"/{DATABASE}?")
    port = _free_port()
    settings = load_settings(
        {
            "MONGO_URL": mongo_url,
            "CACHE_TTL": "90",
            "INSTANCE_TIMEOUT": "15",
            "SYNC_INTERVAL": "1000",
            "HEALTH_CHECK_PORT": str(port),
            "PORT": str(port),
            "LOG_LEVEL": "warning",
        },
        env_file=None,
    ).for_command("run")
    configure_logging(settings.log_level, settings.secrets())
    client: MongoClient[dict[str, Any]] = MongoClient(url)
    sim = RocketChatSimulator(
        client[DATABASE], users=users, instances=3, seed=seed, crash_after=25.0
    )
    sim.setup()
    stop = threading.Event()
    shown: Counter[str] = Counter()

    def on_transition(t: Transition) -> None:
        now = dt.datetime.now().strftime("%H:%M:%S")
        before = t.previous.status.value if t.previous else "offline"
        before_conn = t.previous.status_connection.value if t.previous else "offline"
        after, after_conn = t.current.status.value, t.current.status_connection.value
        shown[after] += 1
        # status is what users see; when only statusConnection moved (an invisible or busy
        # user), say so rather than print "offline → offline".
        detail = (f"  statusConnection {before_conn} → {after_conn}"
                  if before_conn != after_conn and (before == after or after_conn != after)
                  else "")
        print(f"{now}  {(t.username or str(t.user_id)):<14} {_paint(before, tty)} → "
              f"{_paint(after, tty)}{detail}  ({t.reason})", flush=True)

    from presenced.daemon import Daemon

    daemon = Daemon(settings, on_transition=on_transition)

    def on_tick(stats: Any) -> None:
        if stats.crashed_instances:
            print(f"--- Rocket.Chat instance {stats.crashed_instances[0][:8]} crashed: its "
                  f"connections stay in MongoDB; presenced takes those users offline once "
                  f"the instance is {settings.instance_timeout} s silent ---", flush=True)

    async def main() -> None:
        _banner(emulator.url, port, users)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report, daemon, sim)
            threading.Thread(
                target=sim.run, args=(stop,), kwargs={"speed": 1.0, "on_tick": on_tick},
                daemon=True,
            ).start()
            await daemon.run()  # until Ctrl-C
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        client.close()
        emulator.close()
    print(f"demo stopped: {daemon.counts['written']} statuses written, "
          f"{daemon.counts['reaped']} sessions reaped, {sim.stats.total} Rocket.Chat writes")
    return 0


def _banner(url: str, port: int, users: int) -> None:
    print(f"MongoDB emulator: {url}\npresenced: http://127.0.0.1:{port}/ready  /metrics\n"
          f"simulating {users} users on 3 Rocket.Chat instances; Ctrl-C stops\n", flush=True)


async def _report(daemon: Any, sim: RocketChatSimulator) -> None:
    while True:
        await trio.sleep(10)
        ok, body = daemon.health.readiness()
        print(f"    [ready={ok} users tracked={body['users_tracked']} written="
              f"{daemon.counts['written']} reaped={daemon.counts['reaped']} "
              f"rocket.chat writes={sim.stats.total}]", flush=True)
