"""Why robust rules exist: 4 attackers among 20 clients drag FedAvg out of the honest range, not them."""

from __future__ import annotations

import numpy as np
import pytest

from strategies import build

SHAPES = {"lora_A": (4, 3), "lora_B": (3, 4)}
N, F = 20, 4


def round_with_attackers(seed: int = 0):
    """16 honest deltas around a common mean, then 4 attacks; returns (deltas, honest)."""
    rng = np.random.default_rng(seed)
    mean = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    honest = [{k: mean[k] + 0.1 * rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(N - F)]
    attacks = [
        {k: -10.0 * v for k, v in honest[0].items()},  # sign flip, ×10
        {k: -10.0 * v for k, v in honest[1].items()},  # sign flip, ×10
        {k: 10.0 * rng.standard_normal(s) for k, s in SHAPES.items()},  # Gaussian noise, scale 10
        {k: 20.0 * (rng.standard_normal(s) - mean[k]) for k, s in SHAPES.items()},  # model replacement, ×20
    ]
    return honest + attacks, honest


def outside_honest_range(agg: dict, honest: list[dict]) -> int:
    """Number of coordinates of ``agg`` outside the honest clients' per-coordinate [min, max]."""
    out = 0
    for k in agg:
        stack = np.stack([h[k] for h in honest])
        out += int(np.sum((agg[k] < stack.min(axis=0) - 1e-12) | (agg[k] > stack.max(axis=0) + 1e-12)))
    return out


@pytest.mark.parametrize("name,params", [
    ("median", {}),
    ("trimmed-mean", {"beta": F / N}),
    ("krum", {"f": F}),
    ("multikrum", {"f": F}),
    ("bulyan", {"f": F}),
])
def test_robust_rules_stay_in_the_honest_range(name, params):
    # Prepare: attackers last, then shuffled so position gives nothing away
    ds, honest = round_with_attackers()
    order = np.random.default_rng(1).permutation(N)
    # Execute
    agg = build(name, clients_per_round=N, **params).aggregate([ds[i] for i in order], np.full(N, 1 / N))
    # Assert
    assert outside_honest_range(agg, honest) == 0


def test_fedavg_is_dragged_out_of_the_honest_range():
    ds, honest = round_with_attackers()
    agg = build("fedavg", clients_per_round=N).aggregate(ds, np.full(N, 1 / N))
    n_coords = sum(int(np.prod(s)) for s in SHAPES.values())
    assert outside_honest_range(agg, honest) > n_coords // 2
