"""Bulyan: recursive Krum selection, then a coordinate-wise trimmed mean around the median.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning
in Byzantium", ICML 2018, https://arxiv.org/abs/1802.07927

With n ≥ 4f + 3 clients of which at most f are Byzantine:

1. Selection (on flattened deltas): θ = n − 2f times, pick the Krum winner of
   the n' clients not yet picked and move it to the selection S. The last
   picks have n' < 2f + 3, below Krum's own requirement; their score sums
   max(2, n' − f − 2) neighbour distances (see ``strategies.krum.krum_scores``).
2. Aggregation (coordinate-wise): with β = θ − 2f, for every coordinate j take
   the β values of S closest to median_{i∈S} Δ_i[j] and average them.

Krum bounds the distance of each selected delta to the honest ones; step 2
bounds every coordinate. Weights are ignored (a Byzantine client could claim
any number of examples).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.base import DeltaStrategy
from strategies.krum import check_clients, krum_scores, pairwise_sq_dists, tolerate
from strategies.registry import register


@register("bulyan")
class Bulyan(DeltaStrategy):
    """Krum-selected subset, averaged per coordinate around its median (unweighted; needs n ≥ 4f + 3).

    Parameters (keyword-only, besides the ``DeltaStrategy`` ones)
    ----------
    f : number of Byzantine clients tolerated. ``min_replies`` is raised to
        4f + 3, so a round with fewer valid replies keeps the global adapter.
    """

    name = "bulyan"
    aggregation = "robust"
    secure_aggregation = False  # needs each client's update (or its extra records)
    paper = "El Mhamdi et al. 2018, arXiv:1802.07927"
    weighted = False

    def __init__(self, *, f: int = 1, **base: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(**base)
        self.f = tolerate(self, f, 4)

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        n, f = len(deltas_), self.f
        check_clients(self.name, n, f, 4)
        theta, beta = n - 2 * f, n - 4 * f
        # 1. recursive Krum on the clients not yet selected
        dist, left, chosen = pairwise_sq_dists(deltas_), list(range(n)), []
        for _ in range(theta):
            sub = np.array(left)
            best = int(sub[np.argmin(krum_scores(dist[np.ix_(sub, sub)], f))])
            chosen.append(best)
            left.remove(best)
        # 2. per coordinate: mean of the beta selected values closest to the median
        out = {}
        for k in deltas_[0]:
            s = np.stack([deltas_[i][k] for i in chosen])
            near = np.argsort(np.abs(s - np.median(s, axis=0)), axis=0, kind="stable")[:beta]
            out[k] = np.take_along_axis(s, near, axis=0).mean(axis=0)
        return out
