"""Send messages through a Flower ``Grid`` and collect the replies, polling briskly.

Flower's deployment ``Grid.send_and_receive`` sleeps 3 s between pulls, so every message
exchange of a round costs up to 3 s of idle waiting on the server on top of the client's
work (a round is 2 exchanges, 5 under secure aggregation). Pushing and pulling ourselves
at ``poll_s`` keeps the same semantics (all replies, or what arrived by the timeout).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from flwr.app import Message

from fedge import progress
from fedge import protocol as P

POLL_ENV = "FEDGE_GRID_POLL_S"
DEFAULT_POLL_S = 0.2


def poll_interval() -> float:
    return float(os.environ.get(POLL_ENV, DEFAULT_POLL_S))


def send_and_receive(grid, messages: Iterable[Message], *, timeout: float | None,
                     poll_s: float | None = None) -> list[Message]:
    """Push ``messages``; pull until every one has a reply or ``timeout`` seconds passed."""
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))  # a minimal grid (tests, adapters)
    messages = list(messages)
    phase = messages[0].metadata.message_type if messages else ""
    pending = set(grid.push_messages(messages))
    expected = len(pending)
    progress.publish(phase, 0, expected)  # the live view's "replies received / expected"
    poll = poll_interval() if poll_s is None else poll_s
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    steps = 0
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        if got:
            steps += sum(_local_steps(m) for m in got)
            progress.publish(phase, len(replies), expected, steps=steps)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll)
    return replies


def _local_steps(msg: Message) -> int:
    """The local optimizer steps a reply reports it took (0 when it reports none)."""
    if msg.has_error() or P.METRICS not in msg.content:
        return 0
    v = msg.content[P.METRICS].get(P.M_LOCAL_STEPS, 0)
    return int(v) if isinstance(v, (int, float)) else 0
