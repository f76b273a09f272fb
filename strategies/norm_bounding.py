"""Norm bounding: clip each client delta to norm M, then FedAvg.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?",
2019, https://arxiv.org/abs/1911.07963

    Δ̃_i = Δ_i · min(1, M / ‖Δ_i‖₂),    A_{t+1} = A_t + Σ_i w_i Δ̃_i

‖Δ_i‖₂ is taken over the flattened concatenation of all tensors, so clipping
keeps each delta's direction. A delta is only ever shrunk (never stretched);
zero deltas are left alone (no division). Unlike ``max_delta_norm``, which
rejects a reply, this keeps every client but bounds its influence: ‖agg‖₂ ≤ M.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedge import deltas
from strategies.fedavg import FedAvg
from strategies.registry import register


def clip_to_norm(delta: dict[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """Δ · min(1, bound / ‖Δ‖₂); Δ itself when ‖Δ‖₂ ≤ bound (including Δ = 0)."""
    norm = deltas.l2_norm(delta)
    if norm <= bound:
        return delta
    return {k: v * (bound / norm) for k, v in delta.items()}


@register("norm-bounding")
class NormBounding(FedAvg):
    """Example-weighted mean of the client deltas, each first clipped to L2 norm M.

    Parameters (keyword-only, besides the ``DeltaStrategy`` ones)
    ----------
    norm_bound : M > 0, the largest L2 norm a client delta keeps.
    """

    name = "norm-bounding"
    secure_aggregation = False  # needs each client's update (or its extra records)
    paper = "Sun et al. 2019, arXiv:1911.07963"

    def __init__(self, *, norm_bound: float = 1.0, **base: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(**base)
        if not (np.isfinite(norm_bound) and norm_bound > 0):
            raise ValueError(f"norm_bound must be a positive number, got {norm_bound!r}")
        self.norm_bound = float(norm_bound)

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return super().aggregate([clip_to_norm(d, self.norm_bound) for d in deltas_], weights)
