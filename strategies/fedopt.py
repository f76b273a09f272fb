"""FedOpt: adaptive server optimisers over the mean client delta (shared base).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295, Algorithm 2. The round's mean client delta
Δ_t = Σ_i w_i Δ_i is the negative pseudo-gradient; per coordinate, with
m_{-1} = 0 and v_{-1} = τ²:

    m_t     = β₁ m_{t-1} + (1 − β₁) Δ_t
    v_t     = FedAdagrad: v_{t-1} + Δ_t²
              FedYogi:    v_{t-1} − (1 − β₂) Δ_t² sign(v_{t-1} − Δ_t²)
              FedAdam:    β₂ v_{t-1} + (1 − β₂) Δ_t²
    A_{t+1} = A_t + η m_t / (√v_t + τ)

m and v have the adapter's shapes and are kept in float64. As in Algorithm 2
there is no bias correction (Flower's FedAdam adds one). Algorithm 2 averages
the deltas uniformly; like FedAvg here, we weight them by example count (the
same when clients hold equal amounts of data).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge import deltas
from strategies.base import DeltaStrategy


def check_beta(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


class FedOpt(DeltaStrategy):
    """Base of FedAdagrad / FedYogi / FedAdam: momentum m_t and an adaptive v_t on the server.

    Parameters (keyword-only, besides the ``DeltaStrategy`` ones)
    ----------
    eta : η > 0, server learning rate.
    beta_1 : β₁ in [0, 1), first-moment decay.
    tau : τ > 0, adaptivity; v starts at τ² and τ guards the division.
    """

    aggregation = "mean"  # the mean of the deltas is the pseudo-gradient; the optimizer is server_update

    # **base: forwarded to the base __init__, typed there
    def __init__(self, *, eta: float = 1e-2, beta_1: float = 0.9, tau: float = 1e-3, **base: Any) -> None:
        super().__init__(**base)
        if not (np.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a positive number, got {eta!r}")
        if not (np.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive number, got {tau!r}")
        self.eta, self.beta_1, self.tau = float(eta), check_beta("beta_1", beta_1), float(tau)
        self.m: dict[str, np.ndarray] | None = None  # None before the first round
        self.v: dict[str, np.ndarray] | None = None

    def second_moment(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        """v_t from v_{t-1} and Δ_t² (the one line that differs between the three)."""
        raise NotImplementedError

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return deltas.weighted_mean(deltas_, weights)

    def server_update(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = self.m or {k: np.zeros_like(d) for k, d in aggregate.items()}
        v = self.v or {k: np.full_like(d, self.tau**2) for k, d in aggregate.items()}
        if set(m) != set(aggregate):
            raise ValueError(f"optimiser state tensors {sorted(m)[:3]} differ from the update's {sorted(aggregate)[:3]}")
        self.m = {k: self.beta_1 * m[k] + (1 - self.beta_1) * d for k, d in aggregate.items()}
        self.v = {k: self.second_moment(v[k], d * d) for k, d in aggregate.items()}
        step = {k: self.eta * self.m[k] / (np.sqrt(self.v[k]) + self.tau) for k in aggregate}
        return deltas.apply_delta(current, step)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.m is None:
            return {}
        assert self.v is not None  # m and v are set together
        return {**{f"m/{k}": a.copy() for k, a in self.m.items()}, **{f"v/{k}": a.copy() for k, a in self.v.items()}}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        m = {k[2:]: np.array(a, np.float64) for k, a in state.items() if k.startswith("m/")}
        v = {k[2:]: np.array(a, np.float64) for k, a in state.items() if k.startswith("v/")}
        if len(m) + len(v) != len(state) or set(m) != set(v):
            raise ValueError(f"{self.name} state needs matching 'm/<name>' and 'v/<name>' keys, got {sorted(state)[:4]}")
        self.m, self.v = (m, v) if state else (None, None)
