"""FedAdagrad: Adagrad on the server over the mean client delta.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295 (Algorithm 2; the shared math is in ``strategies.fedopt``):

    v_t = v_{t-1} + Δ_t²

v only grows, so the per-coordinate step shrinks over the rounds. The default
β₁ = 0 is plain Adagrad (no server momentum), as in Flower.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from strategies.fedopt import FedOpt
from strategies.registry import register


@register("fedadagrad")
class FedAdagrad(FedOpt):
    """Server-side Adagrad over the example-weighted mean delta.

    Parameters: ``eta``, ``beta_1`` (default 0: no momentum), ``tau`` as in ``FedOpt``.
    """

    name = "fedadagrad"
    paper = "Reddi et al. 2021, arXiv:2003.00295"

    def __init__(self, *, beta_1: float = 0.0, **kw: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(beta_1=beta_1, **kw)

    def second_moment(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        return v + d2
