"""The live view: events from the message exchange, ETA arithmetic, terminal vs plain output."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from fedge import progress


def test_publish_reaches_listeners_and_the_file(tmp_path):
    # Prepare
    got = []
    stop = progress.subscribe(got.append)
    progress.write_to(tmp_path / "progress.json")
    try:
        # Execute
        progress.publish("train", 3, 8)
        stop()
        progress.publish("train", 4, 8)  # after unsubscribing: the file only
    finally:
        progress.write_to(None)
    # Assert
    assert [(e["phase"], e["received"], e["expected"]) for e in got] == [("train", 3, 8)]
    assert {k: v for k, v in json.loads((tmp_path / "progress.json").read_text()).items() if k != "time"} == \
        {"phase": "train", "received": 4, "expected": 8}


def test_eta_is_mean_round_time_times_rounds_left(monkeypatch):
    # Prepare: a clock we move by hand
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    view = progress.LiveView(5, console=Console(file=io.StringIO()))
    # Execute / Assert: round 0 (base evaluation) does not count toward the per-round mean
    now[0] = 130.0
    view.round_done({"round": 0})
    assert view.eta() is None
    now[0] = 140.0
    view.round_done({"round": 1})  # 10 s
    now[0] = 160.0
    view.round_done({"round": 2})  # 20 s; mean 15 s, rounds 3..5 left
    assert view.eta() == pytest.approx(15.0 * 3)
    now[0] = 166.0  # 6 s into round 3
    assert view.eta() == pytest.approx(15.0 * 3 - 6.0)
    assert view.clock() == "elapsed 1:06 · ETA 0:39"


def _row(r):
    return {"round": r, "line": f"round {r} done"}


def test_terminal_gets_a_live_bar_pipes_get_plain_lines(capsys):
    # Terminal: the bar shows the round and replies received / expected
    buf = io.StringIO()
    term = Console(file=buf, force_terminal=True, width=120)
    with progress.LiveView(3, format_row=lambda r: r["line"], console=term) as view:
        view.round_done(_row(0))
        progress.publish("train", 5, 8)
        view._progress.refresh()
    out = buf.getvalue()
    assert "round 0 done" in out and "round 1/3: train" in out and "5/8 replies" in out
    # Not a terminal: the round lines only, on stdout, no bar
    plain = Console(file=io.StringIO(), force_terminal=False)
    with progress.LiveView(3, format_row=lambda r: r["line"], console=plain) as view:
        view.round_done(_row(0))
        progress.publish("train", 5, 8)
    assert capsys.readouterr().out == "round 0 done\n" and plain.file.getvalue() == ""
    # --quiet: nothing
    with progress.LiveView(3, format_row=lambda r: r["line"], console=term, quiet=True) as view:
        view.round_done(_row(0))
    assert capsys.readouterr().out == ""
