"""SCAFFOLD: control variates that correct client drift.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, https://arxiv.org/abs/1910.06378 (Algorithm 1, option II).

Every adapter tensor x (PEFT names, A_t's shapes) has a server control variate c
and, on client i, its own c_i; all start at 0. In a round with sampled set S of
N clients in all, K local steps and local learning rate η:

    client i:  y_i ← x, then K steps on the corrected gradient  g_i(y_i) + c − c_i
               c_i⁺ = c_i − c + (x − y_i)/(K η)                          (option II)
               sends Δ_i = y_i − x  and  Δc_i = c_i⁺ − c_i = −c − Δ_i/(K η)
    server:    x ← x + η_g Σ_{i∈S} w_i Δ_i        (w_i = n_i / Σ n; the paper: 1/|S|)
               c ← c + (1/N) Σ_{i∈S} Δc_i  = c + (|S|/N) · mean_i Δc_i

so c stays the mean of all N clients' c_i. c (float64 here, fp32 on the wire) goes
out with each train message as the ArrayRecord ``protocol.SCAFFOLD_C``; Δc_i comes
back as ``protocol.SCAFFOLD_DC`` (fp32 whatever the delta encoding): SCAFFOLD
doubles the bytes in both directions. c_i never leaves the client
(``fedge.lora_fed``: the node's Context state, and disk under FEDGE_CLIENT_STATE);
the round config carries a session id so a client never reuses c_i from another run.

Caveats. The analysis assumes plain SGD local steps; fedge's clients use AdamW,
whose per-coordinate normalisation makes (x − y_i)/(Kη) a rough, sign-like
estimate of the mean gradient (of order 1, not of the gradient's scale), so the
correction c − c_i can dominate small gradients: prefer a modest ``lr``. The
clients refuse SCAFFOLD with DP-SGD (per-example gradients bypass the correction)
and with user-level DP (Δc_i would leave unclipped and unnoised).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Message, MetricRecord
from flwr.serverapp import Grid

from fedge import deltas
from fedge import protocol as P
from strategies.base import ClientUpdate, DeltaStrategy
from strategies.registry import register


@register("scaffold")
class Scaffold(DeltaStrategy):
    """SCAFFOLD: mean client delta, plus control variates c, c_i that correct each client's gradients.

    Parameters (keyword-only, besides the ``DeltaStrategy`` ones)
    ----------
    num_clients : N, clients in the federation (the c update is scaled by |S|/N);
        None = the number of nodes connected when the round was sampled.
    server_lr : η_g > 0, global step size (1 = FedAvg's step).
    """

    name = "scaffold"
    secure_aggregation = False  # needs each client's update (or its extra records)
    user_level_dp = False  # extra records / rank-dependent shapes bypass the clipped, noised mean
    paper = "Karimireddy et al. 2020, arXiv:1910.06378"

    # **base: forwarded to the base __init__, typed there
    def __init__(self, *, num_clients: int | None = None, server_lr: float = 1.0, **base: Any) -> None:
        super().__init__(**base)
        if num_clients is not None and num_clients < self.clients_per_round:
            raise ValueError(f"num_clients {num_clients} < clients_per_round {self.clients_per_round}")
        if not (np.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be a positive number, got {server_lr!r}")
        self.num_clients, self.server_lr = num_clients, float(server_lr)
        self.c: dict[str, np.ndarray] | None = None  # set in the first configure_train
        # A fresh id per run (OS entropy), restored on resume: clients key their c_i by it.
        self.session = int(np.random.default_rng().integers(1, 2**53))
        self._population = 0
        self._dc: list[dict[str, np.ndarray]] = []  # Δc_i of this round's accepted replies

    def round_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {P.CFG_SCAFFOLD: self.session}

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return {k: self.server_lr * v for k, v in deltas.weighted_mean(deltas_, weights).items()}

    # -- c goes out with the train message, Δc_i comes back with the reply --------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        assert self.current is not None  # set by DeltaStrategy.configure_train
        if self.c is None:
            self.c = {k: np.zeros(np.shape(v)) for k, v in self.current.items()}
        if {k: v.shape for k, v in self.c.items()} != {k: np.shape(v) for k, v in self.current.items()}:
            raise ValueError("SCAFFOLD control variate c does not match the global adapter's tensors")
        self._population = len(list(grid.get_node_ids()))
        record = deltas.to_record({k: v.astype(np.float32) for k, v in self.c.items()})
        for m in msgs:  # (the messages share one RecordDict)
            m.content[P.SCAFFOLD_C] = record
        self.report.bytes_down += deltas.record_bytes(record) * len(msgs)
        return msgs

    def decode_reply(self, msg: Message) -> ClientUpdate:
        update = super().decode_reply(msg)
        record = msg.content[P.SCAFFOLD_DC] if P.SCAFFOLD_DC in msg.content else None
        if not isinstance(record, ArrayRecord):
            raise deltas.InvalidUpdate(f"reply has no {P.SCAFFOLD_DC!r} array record (SCAFFOLD's Δc_i)")
        try:
            deltas.validate_wire(deltas.record_layout(record),
                                 deltas.expected_wire_layout(self.expected_shapes(msg), "fp32"))
        except deltas.InvalidUpdate as err:
            raise deltas.InvalidUpdate(f"{P.SCAFFOLD_DC}: {err}") from None
        dc = deltas.decode(deltas.from_record(record), "fp32")
        deltas.validate_values(dc)
        self._dc.append(dc)
        return update

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._dc = []
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self._dc:
            # Accepted clients have moved their c_i whether or not x moved: follow them.
            n = self.num_clients or max(self._population, len(self._dc))
            assert self.c is not None  # set by configure_train, which precedes every reply
            self.c = {k: c + sum(dc[k] for dc in self._dc) / n for k, c in self.c.items()}
        return arrays, metrics

    # -- checkpoint ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.c is None:
            return {}
        return {**{f"c/{k}": v.copy() for k, v in self.c.items()}, "session": np.array([self.session], np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        c = {k[2:]: np.array(v, np.float64) for k, v in state.items() if k.startswith("c/")}
        if set(state) - {"session"} != {f"c/{k}" for k in c} or (state and "session" not in state):
            raise ValueError(f"scaffold state needs 'c/<name>' keys and 'session', got {sorted(state)[:4]}")
        if state:
            self.c, self.session = c, int(np.asarray(state["session"]).ravel()[0])
        else:
            self.c = None
