"""FedProx: FedAvg aggregation, proximal term in the clients' local loss.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127

Client i minimises, starting from the global adapter A_t,

    h_i(w) = F_i(w) + (μ/2) ‖w − A_t‖²

which keeps heterogeneous clients close to A_t. The server side is FedAvg:
A_{t+1} = A_t + Σ_i w_i Δ_i. The server only sends μ in the round config.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecordValues

# Round-config key carrying μ (same name as Flower's FedProx); belongs in fedge.protocol.
from fedge.protocol import CFG_PROXIMAL_MU
from strategies.fedavg import FedAvg
from strategies.registry import register


@register("fedprox")
class FedProx(FedAvg):
    """FedAvg whose clients add the proximal term (μ/2)‖w − A_t‖² to their local loss.

    Parameters (keyword-only, besides the ``DeltaStrategy`` ones)
    ----------
    mu : μ ≥ 0, proximal coefficient sent to clients each round (0 = FedAvg).
    """

    name = "fedprox"
    paper = "Li et al. 2020, arXiv:1812.06127"

    def __init__(self, *, mu: float = 0.01, **base: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(**base)
        if not (np.isfinite(mu) and mu >= 0):
            raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
        self.mu = float(mu)

    def round_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {CFG_PROXIMAL_MU: self.mu}
