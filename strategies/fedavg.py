"""FedAvg over adapter deltas.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, https://arxiv.org/abs/1602.05629

    A_{t+1} = A_t + Σ_i w_i Δ_i,    w_i = n_i / Σ_j n_j   (n_i = client examples)
"""

from __future__ import annotations

import numpy as np

from fedge import deltas
from strategies.base import DeltaStrategy
from strategies.registry import register


@register("fedavg")
class FedAvg(DeltaStrategy):
    """Example-weighted mean of the client deltas."""

    name = "fedavg"
    aggregation = "mean"
    paper = "McMahan et al. 2017, arXiv:1602.05629"

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return deltas.weighted_mean(deltas_, weights)
