"""Tests for presenced.cli, in-process: help and version, and the demo without the
testing extra."""

from __future__ import annotations

import sys

import pytest

from presenced import __version__, cli


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


# --- demo without the testing extra ------------------------------------------------------


def without_the_testing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if mongomock-ng were not installed: importing it raises ImportError."""
    for name in list(sys.modules):
        if name.startswith(("mongomock_ng.", "presenced.testing.")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mongomock_ng", None)


def test_demo_without_the_testing_extra_says_how_to_install_it_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    without_the_testing_extra(monkeypatch)

    assert cli.main(["demo"]) == 1

    err = capsys.readouterr().err
    assert "pip install 'presenced[testing]'" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_demo_lets_an_import_error_of_its_own_code_through_as_a_bug(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name.startswith("presenced.testing."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "presenced.testing.simulator", None)

    with pytest.raises(ImportError):
        cli.main(["demo"])
