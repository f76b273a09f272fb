"""Coordinate-wise β-trimmed mean of the client deltas.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498

For every coordinate j of every tensor, sort the n values Δ_1[j] ≤ … ≤ Δ_n[j]
(order statistics Δ_(1)[j] ≤ … ≤ Δ_(n)[j]), drop the k = ⌊βn⌋ smallest and the
k largest, and average the rest:

    agg[j] = 1/(n − 2k) · Σ_{r=k+1}^{n−k} Δ_(r)[j]

β < 1/2 keeps at least one value. With at most k Byzantine clients the result
stays within the honest clients' range at every coordinate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.base import DeltaStrategy
from strategies.registry import register


@register("trimmed-mean")
class TrimmedMean(DeltaStrategy):
    """Coordinate-wise mean after dropping the ⌊βn⌋ largest and smallest values (unweighted).

    Parameters (keyword-only, besides the ``DeltaStrategy`` ones)
    ----------
    beta : fraction trimmed at each end, in [0, 0.5); 0 = plain uniform mean.
        Set it to at least f/n to tolerate f Byzantine clients of n.

    Example counts are ignored: a Byzantine client could claim any number.
    """

    name = "trimmed-mean"
    aggregation = "robust"
    secure_aggregation = False  # needs each client's update (or its extra records)
    paper = "Yin et al. 2018, arXiv:1803.01498"
    weighted = False

    def __init__(self, *, beta: float = 0.1, **base: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(**base)
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        self.beta = float(beta)

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        n = len(deltas_)
        k = int(np.floor(self.beta * n))
        return {key: np.sort(np.stack([d[key] for d in deltas_]), axis=0)[k:n - k].mean(axis=0) for key in deltas_[0]}
