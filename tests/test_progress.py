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
        {"phase": "train", "received": 4, "expected": 8, "steps": 0}


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
        progress.publish("train", 5, 8, steps=40)
        view._progress.refresh()
    out = buf.getvalue()
    assert "round 0 done" in out and "round 1/3: train" in out and "5/8 replies · 40 local steps" in out
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


class _TwoBatchGrid:
    """A grid whose replies arrive in two pulls (the part of Flower's Grid that send_and_receive drives)."""

    def __init__(self, steps: list[int]):
        self.steps, self.sent, self.pulls = steps, [], 0

    def push_messages(self, messages):
        self.sent = list(messages)
        for i, m in enumerate(self.sent):  # Flower's Grid stamps the id when it pushes
            m.metadata.__dict__["_message_id"] = f"id-{i}"
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, ids):
        from flwr.app import Message, MetricRecord, RecordDict

        from fedge import protocol as P

        self.pulls += 1
        half = len(self.sent) // 2
        batch = range(half) if self.pulls == 1 else range(half, len(self.sent))
        out = []
        for i in batch:
            out.append(Message(RecordDict({P.METRICS: MetricRecord({P.M_LOCAL_STEPS: self.steps[i]})}),
                               reply_to=self.sent[i]))
        return out


def test_the_view_counts_the_local_steps_the_replies_report(flower_identity):
    from flwr.app import Message, RecordDict

    from fedge.messaging import send_and_receive

    # Prepare: four train messages; the replies report 4, 8, 6 and 12 local steps, two per pull
    grid = _TwoBatchGrid([4, 8, 6, 12])
    msgs = [Message(RecordDict(), dst_node_id=i + 1, message_type="train") for i in range(4)]
    seen = []
    stop = progress.subscribe(seen.append)
    try:
        # Execute
        replies = send_and_receive(grid, msgs, timeout=5, poll_s=0.0)
    finally:
        stop()
    # Assert: one event per pull, steps summed over the replies so far
    assert len(replies) == 4
    assert [(e["received"], e["expected"], e["steps"]) for e in seen] == [(0, 4, 0), (2, 4, 12), (4, 4, 30)]
