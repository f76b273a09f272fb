"""Krum and Multi-Krum: keep the client deltas closest to their neighbours.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017, https://arxiv.org/abs/1703.02757

Each delta is one vector x_i: the flattened concatenation of all its tensors.
With n clients of which at most f are Byzantine (n ≥ 2f + 3),

    score(i) = Σ_{j ∈ N_i} ‖x_i − x_j‖²,   N_i = the n − f − 2 nearest other clients

(at least two neighbours where there are: see ``krum_scores``).

Krum returns the delta with the lowest score; Multi-Krum the uniform mean of
the ``num_selected`` lowest-scoring ones (default n − f). Weights are ignored:
a Byzantine client could claim any number of examples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from strategies.base import DeltaStrategy
from strategies.registry import register


def pairwise_sq_dists(deltas_: list[dict[str, np.ndarray]]) -> NDArray[np.float64]:
    """(n, n) matrix of ‖x_i − x_j‖² over the flattened deltas, one tensor at a time."""
    n = len(deltas_)
    dist = np.zeros((n, n))
    for k in deltas_[0]:
        x = np.stack([d[k].ravel() for d in deltas_])
        for i in range(n):
            dist[i] += np.sum((x - x[i]) ** 2, axis=1)
    return dist


def krum_scores(dist: NDArray[np.float64], f: int) -> NDArray[np.float64]:
    """Krum score of each row of a squared-distance matrix.

    Sums the n − f − 2 smallest distances to others, but at least two (where
    there are): with one, mutual nearest neighbours tie and the pick would
    depend on the client order. This only departs from the paper for n = 3,
    f = 0 and in Bulyan's last recursive picks, where n − f − 2 < 2.
    """
    n = len(dist)
    c = int(np.clip(n - f - 2, 2, n - 1))
    scores: NDArray[np.float64] = np.sort(dist, axis=1)[:, 1:c + 1].sum(axis=1)  # column 0: zero self-distance
    return scores


def check_clients(rule: str, n: int, f: int, factor: int) -> None:
    """Refuse n < factor·f + 3 (factor 2 for Krum, 4 for Bulyan)."""
    if n < factor * f + 3:
        raise ValueError(f"{rule} needs n >= {factor}f+3 clients: got n={n}, f={f}")


def tolerate(strategy: DeltaStrategy, f: object, factor: int) -> int:
    """Validate f, refuse clients_per_round < factor·f + 3 and raise min_replies to it; return f."""
    f_ = check_f(f)
    check_clients(strategy.name, strategy.clients_per_round, f_, factor)
    strategy.min_replies = max(strategy.min_replies, factor * f_ + 3)
    return f_


def check_f(f: object) -> int:
    """f as an int, refusing negatives and non-integers."""
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
        raise ValueError(f"f (number of Byzantine clients) must be an integer >= 0, got {f!r}")
    return int(f)


@register("krum")
class Krum(DeltaStrategy):
    """The client delta with the lowest Krum score (unweighted; needs n ≥ 2f + 3).

    Parameters (keyword-only, besides the ``DeltaStrategy`` ones)
    ----------
    f : number of Byzantine clients tolerated. ``min_replies`` is raised to
        2f + 3, so a round with fewer valid replies keeps the global adapter.
    """

    name = "krum"
    aggregation = "robust"
    secure_aggregation = False  # needs each client's update (or its extra records)
    paper = "Blanchard et al. 2017, arXiv:1703.02757"
    weighted = False

    def __init__(self, *, f: int = 1, **base: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(**base)
        self.f = tolerate(self, f, 2)

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        check_clients(self.name, len(deltas_), self.f, 2)
        best = int(np.argmin(krum_scores(pairwise_sq_dists(deltas_), self.f)))
        return {k: v.copy() for k, v in deltas_[best].items()}


@register("multikrum")
class MultiKrum(Krum):
    """Uniform mean of the ``num_selected`` lowest-scoring client deltas (needs n ≥ 2f + 3).

    Parameters: ``f`` as in Krum; ``num_selected`` = m, deltas averaged (default
    n − f; at most the number of replies).
    """

    name = "multikrum"
    secure_aggregation = False  # needs each client's update (or its extra records)
    paper = "Blanchard et al. 2017, arXiv:1703.02757"

    def __init__(self, *, num_selected: int | None = None, **kw: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(**kw)
        if num_selected is not None and not 1 <= num_selected <= self.clients_per_round:
            raise ValueError(f"num_selected must be in [1, clients_per_round={self.clients_per_round}], "
                             f"got {num_selected!r}")
        self.num_selected = num_selected

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        n = len(deltas_)
        check_clients(self.name, n, self.f, 2)
        m = min(self.num_selected or n - self.f, n)
        chosen = np.argsort(krum_scores(pairwise_sq_dists(deltas_), self.f), kind="stable")[:m]
        return {k: np.mean([deltas_[i][k] for i in chosen], axis=0) for k in deltas_[0]}
