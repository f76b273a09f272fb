"""Live progress of a federation: which round, how many replies are in, elapsed and ETA.

The server's message exchange (:func:`fedge.messaging.send_and_receive`) publishes
``{"phase", "received", "expected"}`` every time replies arrive. In-process listeners
(``fedge simulate``, ``fedge bench``) get the events directly; a deployment's ServerApp
runs in another process, so the run also writes the latest event to
``<run_dir>/progress.json``, which ``fedge server`` polls.

:class:`LiveView` draws the events with rich when stdout is a terminal; otherwise it
prints the plain round lines only (CI logs, pipes). ETA after round t of T:

    ETA = mean(duration of rounds 1..t) · (T − t) − (time into round t+1)
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

_lock = threading.Lock()
_listeners: list[Callable[[dict], None]] = []
_file: Path | None = None
_withhold = False  # user-level DP: how many clients replied is not published (it reveals the cohort size)


def subscribe(fn: Callable[[dict], None]) -> Callable[[], None]:
    """Call ``fn(event)`` on every published event; returns the unsubscribe function."""
    with _lock:
        _listeners.append(fn)

    def unsubscribe() -> None:
        with _lock:
            if fn in _listeners:
                _listeners.remove(fn)

    return unsubscribe


def write_to(path: Path | None) -> None:
    """Also keep the latest event in ``path`` (None: stop)."""
    global _file
    _file = Path(path) if path is not None else None


def withhold_counts(on: bool) -> None:
    """Under user-level DP the realized cohort size is not released: events then carry no counts."""
    global _withhold
    _withhold = bool(on)


def publish(phase: str, received: int, expected: int, *, steps: int = 0) -> None:
    """``steps``: local optimizer steps the replies received so far report (sum over clients)."""
    if _withhold:
        received = expected = steps = 0  # the view then shows the phase and the clock only
    event = {"phase": phase, "received": int(received), "expected": int(expected), "steps": int(steps),
             "time": time.time()}
    with _lock:
        listeners, path = list(_listeners), _file
    for fn in listeners:
        try:
            fn(event)
        except Exception:  # a broken view must never stop a federation
            pass
    if path is not None:
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(event))
            os.replace(tmp, path)  # readers never see half a file
        except OSError:
            pass


def read_file(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LiveView:
    """Context manager: a live bar on a terminal, plain round lines elsewhere, nothing but errors with ``quiet``."""

    def __init__(self, total_rounds: int, *, format_row: Callable[[dict], str] | None = None, quiet: bool = False,
                 title: str = "", console=None, print_rows: bool = True, start_round: int = 0):
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self.total = int(total_rounds)
        self.format_row = format_row
        self.quiet = quiet
        self.print_rows = print_rows
        self.title = title
        self.live = self.console.is_terminal and not quiet
        self.t0 = time.monotonic()
        self.round = start_round  # the round in progress (0: loading models, evaluating the base)
        self.round_t0 = self.t0
        self.durations: list[float] = []
        self.phase, self.received, self.expected, self.steps = "starting", 0, 0, 0
        self._progress = self._task = self._unsubscribe = None

    # -- numbers -------------------------------------------------------------------
    def eta(self, now: float | None = None) -> float | None:
        if not self.durations:
            return None
        now = time.monotonic() if now is None else now
        left = max(0, self.total - self.round + 1) if self.round >= 1 else self.total
        per = sum(self.durations) / len(self.durations)
        return max(0.0, per * left - (now - self.round_t0))

    def status(self) -> str:
        if self.round > self.total:
            what = "finishing: final adapter, export, samples"
        elif self.round == 0:
            what = "round 0: loading the model, evaluating the base"
        else:
            what = f"round {self.round}/{self.total}: {self.phase}"
        return f"{self.title + ' · ' if self.title else ''}{what}"

    def replies(self) -> str:
        """'3/10 replies · 42 local steps' (the steps the replies report; nothing under user-level DP)."""
        if not self.expected:
            return ""
        return f"{self.received}/{self.expected} replies" + (f" · {self.steps} local steps" if self.steps else "")

    def clock(self) -> str:
        return f"elapsed {_hms(time.monotonic() - self.t0)} · ETA {_hms(self.eta())}"

    # -- events --------------------------------------------------------------------
    def on_event(self, event: dict) -> None:
        self.phase = event.get("phase", self.phase)
        self.received, self.expected = int(event.get("received", 0)), int(event.get("expected", 0))
        self.steps = int(event.get("steps", 0))
        self._refresh()

    def round_done(self, row: dict) -> None:
        now = time.monotonic()
        if row["round"] >= 1:
            self.durations.append(now - self.round_t0)
        self.round, self.round_t0 = int(row["round"]) + 1, now
        self.phase, self.received, self.expected, self.steps = "train", 0, 0, 0
        if self.print_rows and not self.quiet and self.format_row is not None:
            line = self.format_row(row)
            if self.live and self._progress is not None:
                self._progress.console.print(line, markup=False, highlight=False)
            else:
                print(line, flush=True)
        self._refresh()

    def _refresh(self) -> None:
        if self._progress is None:
            return
        self._progress.update(self._task, description=self.status(), total=max(self.expected, 1),
                              completed=self.received)

    # -- context -------------------------------------------------------------------
    def __enter__(self) -> LiveView:
        self._unsubscribe = subscribe(self.on_event)
        if self.live:
            from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
            from rich.text import Text

            view = self

            class _Replies(ProgressColumn):
                def render(self, task):
                    return Text(view.replies())

            class _Clock(ProgressColumn):
                def render(self, task):
                    return Text(view.clock(), style="progress.elapsed")

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Replies(),
                                      _Clock(), console=self.console, transient=True, refresh_per_second=4)
            self._progress.start()
            self._task = self._progress.add_task(self.status(), total=1, completed=0)
        return self

    def __exit__(self, *exc) -> None:
        if self._unsubscribe:
            self._unsubscribe()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
