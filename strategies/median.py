"""Coordinate-wise median of the client deltas.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498

    agg[j] = median_i Δ_i[j]      for every coordinate j of every tensor

Coordinate-wise: each tensor entry is treated on its own (the result need not
be any client's delta). It stays within the honest clients' range at every
coordinate while fewer than half of the clients are Byzantine.
"""

from __future__ import annotations

import numpy as np

from strategies.base import DeltaStrategy
from strategies.registry import register


@register("median")
class Median(DeltaStrategy):
    """Coordinate-wise median of the client deltas (unweighted: example counts are ignored).

    A Byzantine client can claim any number of examples, so a robust rule must
    not trust the weights; every accepted client counts once.
    """

    name = "median"
    aggregation = "robust"
    secure_aggregation = False  # needs each client's update (or its extra records)
    paper = "Yin et al. 2018, arXiv:1803.01498"
    weighted = False

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.median(np.stack([d[k] for d in deltas_]), axis=0) for k in deltas_[0]}
