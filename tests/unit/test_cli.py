"""Tests for presenced.cli, in-process: the demo without the testing extra."""

from __future__ import annotations

import sys

import pytest

from presenced import cli

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
