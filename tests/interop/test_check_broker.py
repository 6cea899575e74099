"""`presenced check` with TRANSPORTER: NATS reached, the Moleculer nodes that answer, and a
presence service already on the broker (Rocket.Chat's presence-service still running)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from presenced.testing.processes import free_port, with_database
from tests.integration.daemon_harness import DaemonProcess, Db
from tests.interop.peers import NatsServer, NodePeer, nats_server

SECRET = "nats-Pa55word"


@pytest.fixture
def nats() -> Iterator[NatsServer]:
    with nats_server() as server:
        yield server


def run_check(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "presenced", "check"], env={**base, **env}, cwd=cwd,
        capture_output=True, text=True, timeout=60,
    )


def test_check_lists_the_broker_nodes(nats: NatsServer, mongo_url: str, db: Db,
                                      tmp_path: Path) -> None:
    with NodePeer(nats.url, "rc-ddp-1", offer=["echo"]):
        done = run_check({"MONGO_URL": with_database(mongo_url, db.name),
                          "TRANSPORTER": nats.url}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"broker: ok, NATS at {nats.url}; 1 Moleculer node(s) answered" in done.stdout
    assert "rc-ddp-1 (" in done.stdout and "echo" in done.stdout


@pytest.mark.slow
def test_check_fails_when_another_node_already_offers_presence(
    nats: NatsServer, mongo_url: str, db: Db, tmp_path: Path
) -> None:
    url = with_database(mongo_url, db.name)
    with DaemonProcess(tmp_path / "other", url, TRANSPORTER=nats.url,
                       INSTANCE_ID="old-presence") as other:
        (tmp_path / "other").mkdir(exist_ok=True)
        other.start()
        done = run_check({"MONGO_URL": url, "TRANSPORTER": nats.url,
                          "INSTANCE_ID": "new-presence"}, tmp_path)
    assert done.returncode == 1
    assert "node(s) old-presence already offer the presence service" in done.stderr


def test_check_with_the_broker_down_exits_1_and_masks_its_password(
    mongo_url: str, db: Db, tmp_path: Path
) -> None:
    url = f"nats://presenced:{SECRET}@127.0.0.1:{free_port()}"
    done = run_check({"MONGO_URL": with_database(mongo_url, db.name), "TRANSPORTER": url,
                      }, tmp_path)
    assert done.returncode == 1
    assert "broker: unreachable at nats://presenced:****@127.0.0.1" in done.stderr
    assert "TRANSPORTER" in done.stdout
    assert SECRET not in done.stdout + done.stderr
