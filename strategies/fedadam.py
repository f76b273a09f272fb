"""FedAdam: Adam on the server over the mean client delta.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295 (Algorithm 2; the shared math is in ``strategies.fedopt``):

    v_t = β₂ v_{t-1} + (1 − β₂) Δ_t²
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from strategies.fedopt import FedOpt, check_beta
from strategies.registry import register


@register("fedadam")
class FedAdam(FedOpt):
    """Server-side Adam (no bias correction) over the example-weighted mean delta.

    Parameters: ``eta``, ``beta_1``, ``tau`` as in ``FedOpt``; ``beta_2`` in [0, 1), second-moment decay.
    """

    name = "fedadam"
    paper = "Reddi et al. 2021, arXiv:2003.00295"

    def __init__(self, *, beta_2: float = 0.99, **kw: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(**kw)
        self.beta_2 = check_beta("beta_2", beta_2)

    def second_moment(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        return self.beta_2 * v + (1 - self.beta_2) * d2
