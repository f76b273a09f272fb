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
doubles the bytes in both directions. c_i never leaves the client (``ScaffoldClient``
below: the node's Context state, and disk in the client's state directory); the round
config carries a session id so a client never reuses c_i from another run.

Caveats. The analysis assumes plain SGD local steps; fedge's clients use AdamW,
whose per-coordinate normalisation makes (x − y_i)/(Kη) a rough, sign-like
estimate of the mean gradient (of order 1, not of the gradient's scale), so the
correction c − c_i can dominate small gradients: prefer a modest ``lr``. The
clients refuse SCAFFOLD with DP-SGD (per-example gradients bypass the correction)
and with user-level DP (Δc_i would leave unclipped and unnoised).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Message, MetricRecord
from flwr.serverapp import Grid

from fedge import deltas
from fedge import protocol as P
from fedge.lora_fed import adapter_parameters
from strategies.base import ClientUpdate, DeltaStrategy
from strategies.client_hooks import ClientHook, Extra, Finisher, State, client_hook, need_content
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
        self.tally.bytes_down += deltas.record_bytes(record) * len(msgs)
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


# -- client half: c_i, kept on the device -------------------------------------------------------

SCAFFOLD_CI = "scaffold-ci"  # key in the node's Context state: c_i (+ the session it belongs to)
_SESSION = "#session"


def _ci_file(context: Any) -> Path | None:
    own = P.client_state_dir(context.node_config)
    return own / "scaffold-ci.npz" if own is not None else None


def load_control_variate(context: Any, session: int, like: Mapping[str, np.ndarray]) -> State:
    """c_i for this SCAFFOLD session (zeros when new: another session's c_i is never reused)."""
    stored: State | None = None
    f = _ci_file(context)
    if f is not None and f.exists():
        with np.load(f) as z:
            stored = {k: z[k] for k in z.files}
    elif SCAFFOLD_CI in context.state:
        stored = deltas.from_record(context.state[SCAFFOLD_CI])
    if stored is None or int(stored.pop(_SESSION, np.array([0]))[0]) != session:
        return {k: np.zeros(np.shape(v)) for k, v in like.items()}
    if set(stored) != set(like) or any(np.shape(stored[k]) != np.shape(like[k]) for k in like):
        raise ValueError("stored SCAFFOLD c_i does not match this adapter's tensors (same session id?)")
    return {k: np.asarray(v, np.float64) for k, v in stored.items()}


def save_control_variate(context: Any, session: int, ci: Mapping[str, np.ndarray]) -> None:
    arrays = {**{k: np.asarray(v, np.float64) for k, v in ci.items()}, _SESSION: np.array([session], np.int64)}
    context.state[SCAFFOLD_CI] = deltas.to_record(arrays)
    f = _ci_file(context)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f.name + ".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        os.replace(tmp, f)  # atomic: a crash never leaves half a c_i


@client_hook
class ScaffoldClient(ClientHook):
    """SCAFFOLD's client: gradient hooks g ← g + (c − c_i) for the round; the reply adds Δc_i (option II)."""

    key = P.CFG_SCAFFOLD
    order = 30

    @staticmethod
    def enter(peft_model: Any, conf: Any, context: Any, content: Any, stack: ExitStack) -> Finisher:
        import torch

        if P.CFG_DPSGD_DELTA in conf or P.CFG_DP_CLIP_NORM in conf:
            # DP-SGD's per-example gradients bypass the hook, and Δc_i would leave unclipped and unnoised.
            raise ValueError("SCAFFOLD cannot run with DP-SGD or user-level DP")
        need_content(content, "SCAFFOLD")
        if P.SCAFFOLD_C not in content:
            raise ValueError(f"SCAFFOLD round without the server control variate record {P.SCAFFOLD_C!r}")
        session = int(conf[P.CFG_SCAFFOLD])
        c = {k: np.asarray(v, np.float64) for k, v in deltas.from_record(content[P.SCAFFOLD_C]).items()}
        params = adapter_parameters(peft_model)
        if set(c) != set(params) or any(np.shape(c[k]) != tuple(params[k].shape) for k in c):
            raise ValueError("the server's SCAFFOLD c does not match this client's adapter tensors")
        ci = load_control_variate(context, session, c)
        for name, p in params.items():
            if p.requires_grad:
                corr = torch.from_numpy(c[name] - ci[name]).to(device=p.device, dtype=p.dtype)
                stack.callback(p.register_hook(lambda g, d=corr: g + d).remove)  # type: ignore[no-untyped-call]

        def finish(delta: State, metrics: Any) -> tuple[State, Extra]:
            k_steps, lr = int(conf[P.CFG_LOCAL_STEPS]), float(conf[P.CFG_LR])
            # c_i⁺ = c_i − c + (x − y_i)/(Kη) with x − y_i = −Δ_i, so Δc_i = c_i⁺ − c_i = −c − Δ_i/(Kη).
            dc = {k: (-c[k] - np.asarray(delta[k], np.float64) / (k_steps * lr)).astype(np.float32) for k in c}
            # c_i moves by the fp32 Δc_i the server adds (over N) to c: c stays the mean of the c_i.
            save_control_variate(context, session, {k: ci[k] + dc[k] for k in c})
            return delta, {P.SCAFFOLD_DC: deltas.to_record(dc)}

        return finish
