"""Tests for presenced.cli, in-process: help and version, option checks, the demo without
the testing extra, and how what stops ``presenced run`` becomes a message and an exit
status (a crash: one redacted CRITICAL log line and 70).

The daemon is replaced by a stand-in whose ``run`` raises what each test needs; the
settings come from a cleaned environment and an empty working directory.
"""

from __future__ import annotations

import errno
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import presenced.daemon
from presenced import __version__, cli
from presenced.config import SETTINGS_TABLE, Settings, settings_table_text
from presenced.log import MASK, reset_logging

PASSWORD = "hunter2-secret"
MONGO_URL = f"mongodb://rocket:{PASSWORD}@127.0.0.1:1/rocketchat?replicaSet=rs0"


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Only MONGO_URL set, no .env file; logging reset afterwards."""
    for doc in SETTINGS_TABLE:
        monkeypatch.delenv(doc.name, raising=False)
        monkeypatch.delenv(f"{doc.name}_FILE", raising=False)
    monkeypatch.setenv("MONGO_URL", MONGO_URL)
    monkeypatch.chdir(tmp_path)
    yield
    reset_logging()


def daemon_raising(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException, *, in_task: bool = False
) -> None:
    """Make ``cli.run``'s daemon raise ``exc`` from ``run`` (or from a task it started)."""

    class Crashing:
        def __init__(self, settings: Settings) -> None:
            self.settings = settings

        async def run(self) -> None:
            if not in_task:
                raise exc

            async def task() -> None:
                raise exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(task)

    monkeypatch.setattr(presenced.daemon, "Daemon", Crashing)


def exit_code(argv: list[str]) -> object:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    return stopped.value.code


# --- help and version ------------------------------------------------------------------


def test_bare_presenced_prints_the_help_on_stdout_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main([]) == 2

    out, err = capsys.readouterr()
    assert out.startswith("usage: presenced")
    assert all(command in out for command in ("check", "run", "demo", "simulate"))
    assert err == ""


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_flag_prints_the_version_and_exits_0(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code([flag]) == 0

    assert capsys.readouterr().out == f"presenced {__version__}\n"


def test_run_help_lists_every_setting_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert exit_code(["run", "--help"]) == 0

    out = capsys.readouterr().out
    for doc in SETTINGS_TABLE:
        default = doc.default.replace("`", "")
        assert re.search(rf"^  {doc.name} +{re.escape(default)}$", out, re.MULTILINE), doc.name


def test_run_help_gives_each_setting_its_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["run", "--help"]) == 0

    words = " ".join(capsys.readouterr().out.split())
    for doc in SETTINGS_TABLE:
        assert " ".join(doc.meaning.replace("`", "").split()[:4]) in words, doc.name


def test_settings_text_fits_the_width_it_is_given() -> None:
    lines = settings_table_text(79).splitlines()

    assert max(len(line) for line in lines) <= 79


def test_settings_text_never_splits_a_url() -> None:
    text = settings_table_text(40)

    assert "mongodb://127.0.0.1:27017/local?replicaSet=rs0&authSource=admin" in text


@pytest.mark.parametrize("command", ["demo", "simulate"])
def test_every_option_of_the_command_shows_its_default_in_the_help(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # no help text wrapped
    required = ["--mongo-url", "mongodb://h/db"] if command == "simulate" else []
    defaults = vars(cli.build_parser().parse_args([command, *required]))

    assert exit_code([command, "--help"]) == 0

    # Each option's entry: "  --name METAVAR  help", the help maybe on the next line.
    entries = re.findall(r"^  (--[\w-]+) \S+\s+(.*)$", capsys.readouterr().out, re.MULTILINE)
    assert len(entries) == len(defaults) - 1  # every option but the command's name
    for option, text in entries:
        default = defaults[option[2:].replace("-", "_")]
        if option in required:
            assert "(required)" in text, option
        elif default is None:
            assert "(default: " in text, option
        else:
            assert f"(default: {default})" in text, option


def test_a_non_positive_speed_is_refused_naming_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert exit_code(["simulate", "--mongo-url", "mongodb://h/db", "--speed", "0"]) == 2

    assert "argument --speed: '0' is not more than 0" in capsys.readouterr().err


def test_a_user_count_that_is_not_a_number_is_refused_naming_the_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert exit_code(["demo", "--users", "ten"]) == 2

    assert "argument --users: 'ten' is not a whole number" in capsys.readouterr().err


# --- demo without the testing extra ------------------------------------------------------


@pytest.fixture
def isolated_modules() -> Iterator[None]:
    """Put ``sys.modules`` back exactly as it was: modules a test imports afresh (after
    removing the loaded ones) must not outlive it, or later tests get two copies of a
    module (the emulator's global write capture among them)."""
    saved = dict(sys.modules)
    yield
    for name in list(sys.modules):
        if name not in saved:
            del sys.modules[name]
    sys.modules.update(saved)


def without_the_testing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if mongomock-ng were not installed: importing it raises ImportError."""
    for name in list(sys.modules):
        if name.startswith(("mongomock_ng.", "presenced.testing.")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mongomock_ng", None)


def test_demo_without_the_testing_extra_says_how_to_install_it_and_exits_1(
    isolated_modules: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    without_the_testing_extra(monkeypatch)

    assert cli.main(["demo"]) == 1

    err = capsys.readouterr().err
    assert "pip install 'presenced[testing]'" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_demo_lets_an_import_error_of_its_own_code_through_as_a_bug(
    isolated_modules: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # mongomock_ng goes too: importing the emulator afresh patches the mongomock_ng it
    # finds, and the loaded one must stay patched by the loaded emulator only.
    for name in list(sys.modules):
        if name.startswith(("mongomock_ng", "presenced.testing.")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "presenced.testing.simulator", None)

    with pytest.raises(ImportError):
        cli.main(["demo"])


# --- what stops `presenced run` --------------------------------------------------------


@pytest.mark.usefixtures("environment")
def test_a_crash_of_the_daemon_exits_70(monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_raising(monkeypatch, RuntimeError("unexpected"))

    assert cli.main(["run"]) == 70


@pytest.mark.usefixtures("environment")
def test_a_crash_is_logged_as_one_critical_line_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon_raising(monkeypatch, RuntimeError("unexpected"))

    cli.main(["run"])

    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if " CRITICAL " in line]) == 1
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: unexpected" in err


@pytest.mark.usefixtures("environment")
@pytest.mark.parametrize("in_task", [False, True], ids=["in-run", "in-a-task"])
def test_a_crash_never_shows_a_secret_from_the_settings(
    in_task: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon_raising(
        monkeypatch,
        ConnectionError(f"login to {MONGO_URL} failed: password {PASSWORD} refused"),
        in_task=in_task,
    )

    assert cli.main(["run"]) == 70

    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    assert f"mongodb://rocket:{MASK}@127.0.0.1:1" in err
    assert f"password {MASK} refused" in err


@pytest.mark.usefixtures("environment")
def test_an_os_error_other_than_binding_the_port_is_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon_raising(monkeypatch, FileNotFoundError(errno.ENOENT, "No such file"))

    assert cli.main(["run"]) == 70
    assert "HEALTH_CHECK_PORT" not in capsys.readouterr().err


@pytest.mark.usefixtures("environment")
def test_a_startup_problem_exits_78_with_its_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon_raising(monkeypatch, presenced.daemon.StartupProblem("MONGO_URL is not a replica set"))

    assert cli.main(["run"]) == 78
    assert capsys.readouterr().err == "presenced: cannot start: MONGO_URL is not a replica set\n"


@pytest.mark.usefixtures("environment")
def test_a_port_in_use_exits_1_saying_to_change_health_check_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon_raising(
        monkeypatch, OSError(errno.EADDRINUSE, "Address already in use"), in_task=True
    )

    assert cli.main(["run"]) == 1
    assert capsys.readouterr().err == (
        "presenced: cannot serve HTTP on port 3005: Address already in use; set"
        " HEALTH_CHECK_PORT to a free port\n"
    )


@pytest.mark.usefixtures("environment")
def test_ctrl_c_exits_0_without_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon_raising(monkeypatch, KeyboardInterrupt())

    assert cli.main(["run"]) == 0
    assert capsys.readouterr().err == ""
