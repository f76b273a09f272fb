"""Unreliable devices, on purpose: a Flower client mod that makes some replies fail.

For resilience testing in simulation (``simulation.fault_rate`` > 0). For each
(seed, round, client) the mod decides, reproducibly, whether this train reply
fails and how:

* ``exception``: the ClientApp raises (Flower returns an error reply);
* ``timeout``:   the client hangs past the round timeout (the server cuts it off);
* ``garbage``:   the reply carries NaN deltas, or a truncated masked vector under
                 secure aggregation (validation must reject it).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Message, MessageType

from fedge import deltas
from fedge import protocol as P

KINDS = ("exception", "timeout", "garbage")


class InjectedFault(RuntimeError):
    """A failure injected by the fault mod (not a bug)."""


def make_fault_mod(*, rate: float, kinds: tuple[str, ...], seed: int, hang_s: float):
    """A ClientApp mod failing a fraction ``rate`` of train replies."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"simulation.fault_kinds: unknown {unknown}; allowed: {list(KINDS)}")

    def fault_mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:  # train and train.secagg
            return call_next(msg, context)
        rnd = int(msg.content[P.CONFIG][P.CFG_ROUND])
        pid = int(context.node_config.get(P.NODE_PARTITION_ID, 0))
        rng = np.random.default_rng([seed, rnd, pid, 7])
        if rng.random() >= rate:
            return call_next(msg, context)
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "exception":
            raise InjectedFault(f"injected failure (round {rnd}, partition {pid})")
        if kind == "timeout":
            time.sleep(hang_s)
            return call_next(msg, context)
        reply = call_next(msg, context)
        wire = deltas.from_record(reply.content[P.ARRAYS])
        # NaN deltas; a masked (integer) vector cannot hold NaN, so it loses its last element.
        reply.content[P.ARRAYS] = deltas.to_record({k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v[:-1]
                                                    for k, v in wire.items()})
        return reply

    return fault_mod
