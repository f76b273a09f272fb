"""FedAvgM: FedAvg with server momentum over the mean client delta.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019, https://arxiv.org/abs/1909.06335

The example-weighted mean delta Δ_t = Σ_i w_i Δ_i is the negative pseudo-gradient:

    v_t     = β v_{t-1} + Δ_t          (v_0 = 0, per coordinate, same shapes as A)
    A_{t+1} = A_t + η v_t

With η = 1 the first round is plain FedAvg; in steady state the effective step
is η / (1 − β) times the mean delta (10x for the default β = 0.9).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedge import deltas
from strategies.fedavg import FedAvg
from strategies.registry import register


@register("fedavgm")
class FedAvgM(FedAvg):
    """FedAvg with heavy-ball momentum on the server (v ← βv + Δ, A ← A + ηv).

    Parameters (keyword-only, besides the ``DeltaStrategy`` ones)
    ----------
    server_lr : η > 0, server learning rate.
    momentum : β in [0, 1), server momentum.
    """

    name = "fedavgm"
    paper = "Hsu et al. 2019, arXiv:1909.06335"

    # **base: forwarded to the base __init__, typed there
    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9, **base: Any) -> None:
        super().__init__(**base)
        if not (np.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be a positive number, got {server_lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.server_lr, self.momentum = float(server_lr), float(momentum)
        self.velocity: dict[str, np.ndarray] | None = None  # v_{t-1}; None before round 1

    def server_update(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prev = self.velocity or {k: np.zeros_like(v) for k, v in aggregate.items()}
        if set(prev) != set(aggregate):
            raise ValueError(f"momentum state tensors {sorted(prev)[:3]} differ from the update's {sorted(aggregate)[:3]}")
        self.velocity = {k: self.momentum * prev[k] + aggregate[k] for k in aggregate}
        return deltas.apply_delta(current, {k: self.server_lr * v for k, v in self.velocity.items()})

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"m/{k}": v.copy() for k, v in (self.velocity or {}).items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        bad = sorted(k for k in state if not k.startswith("m/"))
        if bad:
            raise ValueError(f"fedavgm state keys must start with 'm/', got {bad[:3]}")
        self.velocity = {k[2:]: np.array(v, np.float64) for k, v in state.items()} or None
