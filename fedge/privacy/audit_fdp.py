"""The f-DP one-run bound: ε_lb from canary guesses through the mechanism's whole trade-off curve.

Mahloujifar, Melis, Chaudhuri, "Auditing f-Differential Privacy in One Run" (2024,
arXiv:2410.22235). Same game as :mod:`fedge.privacy.audit` (m canaries, each included with
probability ½; c' guesses, c of them correct), but where Steinke et al. bound every guess by
ε-DP randomized response, this bound uses a trade-off function f (Dong, Roth, Su 2022: no
test of "canary in" against "canary out" at type-I error α has type-II error below f(α)).
With the blow-up f̄(x) = 1 − f(x) (the most an event of probability x can weigh under the
neighbouring input) and a confidence level 1 − τ:

    r_c = τ c / m,     h_c = τ (c' − c) / m
    for i = c − 1, …, 0:
        h_i = max(h_{i+1}, f̄⁻¹(r_{i+1}))
        r_i = r_{i+1} + i / (c' − i) · (h_i − h_{i+1})

If r_0 + h_0 > c' / m, then P[≥ c correct] < τ for every f-DP mechanism: f is rejected.
Two families of f:

* Gaussian (μ-GDP): f(α) = Φ(Φ⁻¹(1 − α) − μ), so f̄⁻¹(y) = Φ(Φ⁻¹(y) − μ). Rejection holds for
  every μ below a threshold (f̄⁻¹ shrinks as μ grows); μ_lb is that threshold (bisection), and
  ε_lb its ε at δ, from δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2). A statement about the
  Gaussian family: "the run is not μ-GDP for any μ < μ_lb". It is exact for the user-level
  Gaussian mechanism (T rounds at noise z, q = 1, is μ-GDP with μ = √T / z) and, by the central
  limit theorem of Dong et al., close for DP-SGD's many subsampled steps; it is not a lower bound
  on the (ε, δ) of an arbitrary mechanism.
* (ε, δ)-DP: f(α) = max(0, 1 − δ − e^ε α, e^{−ε} (1 − δ − α)), so
  f̄⁻¹(y) = max(0, e^{−ε} (y − δ), 1 − δ − e^ε (1 − y)): a true (ε, δ) lower bound, the
  quantity Steinke et al.'s bound estimates.

As in :func:`fedge.privacy.audit.one_run_epsilon`, the guesses are the k highest and k lowest
scores for each k of a fixed grid, and the grid is paid for with a Bonferroni correction (τ / |grid|).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import special

from fedge.privacy.audit import DEFAULT_P, Flags, Scores, _as_arrays, _check_delta, _check_p, default_k_grid

_MU_HI = 40.0  # bisection ceiling on μ; the rejection boundary of any m < 1e6 lies far below it
_EPS_HI = 60.0
InverseBlowUp = Callable[[float], float]


def gaussian_inverse_blow_up(mu: float) -> InverseBlowUp:
    """f̄⁻¹(y) = Φ(Φ⁻¹(y) − μ) for μ-GDP."""
    return lambda y: float(special.ndtr(special.ndtri(y) - mu))


def approx_dp_inverse_blow_up(epsilon: float, delta: float) -> InverseBlowUp:
    """f̄⁻¹(y) = max(0, e^{−ε}(y − δ), 1 − δ − e^ε (1 − y)) for (ε, δ)-DP."""
    return lambda y: max(0.0, math.exp(-epsilon) * (y - delta), 1.0 - delta - math.exp(epsilon) * (1.0 - y))


def rejects(inverse_blow_up: InverseBlowUp, *, m: int, guesses: int, correct: int, tau: float) -> bool:
    """Whether c = ``correct`` of c' = ``guesses`` right is below probability τ under f (module docstring)."""
    if not (0 <= correct <= guesses <= m) or m < 1:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")
    if correct == 0:
        return False
    r, h = tau * correct / m, tau * (guesses - correct) / m
    for i in range(correct - 1, -1, -1):
        h_next = h
        h = max(h_next, inverse_blow_up(min(r, 1.0)))
        r = r + i / (guesses - i) * (h - h_next)
        if r + h > guesses / m:  # the sums only grow from here: already rejected
            return True
    return r + h > guesses / m


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε of μ-GDP at δ: the root of Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) = δ (0 if δ(0) ≤ δ)."""
    d = _check_delta(delta)
    if mu <= 0.0:
        return 0.0

    def delta_of(eps: float) -> float:
        return float(special.ndtr(-eps / mu + mu / 2) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2))

    if delta_of(0.0) <= d:
        return 0.0
    lo, hi = 0.0, _EPS_HI
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_of(mid) > d else (lo, mid)
    return hi


def _bisect_threshold(reject_at: Callable[[float], bool], hi: float, tol: float) -> float:
    """sup{x ∈ [0, hi]: reject_at(x)} for a rejection set of the form [0, x*)."""
    if not reject_at(0.0):
        return 0.0
    if reject_at(hi):
        return hi
    lo = 0.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if reject_at(mid) else (lo, mid)
    return lo


def mu_from_guesses(*, m: int, guesses: int, correct: int, p: float = DEFAULT_P, tol: float = 1e-4) -> float:
    """μ_lb: the largest μ whose μ-GDP the guesses reject at confidence 1 − p (0 if none)."""
    tau = _check_p(p)
    return _bisect_threshold(
        lambda mu: rejects(gaussian_inverse_blow_up(mu), m=m, guesses=guesses, correct=correct, tau=tau),
        _MU_HI, tol)


def epsilon_from_guesses(*, m: int, guesses: int, correct: int, delta: float, p: float = DEFAULT_P,
                         tol: float = 1e-4) -> float:
    """ε_lb of the (ε, δ) family: the largest ε whose (ε, δ)-DP the guesses reject (0 if none)."""
    tau, d = _check_p(p), _check_delta(delta)
    return _bisect_threshold(
        lambda eps: rejects(approx_dp_inverse_blow_up(eps, d), m=m, guesses=guesses, correct=correct, tau=tau),
        _EPS_HI, tol)


def one_run_fdp(scores: Scores, included: Flags, *, delta: float, p: float = DEFAULT_P,
                k_grid: Sequence[int] | None = None) -> dict[str, Any]:
    """Both f-DP bounds from canary scores, each the best of the k-grid (Bonferroni, confidence 1 − p).

    Returns {"mu_lb", "epsilon_lb_gdp", "k_gdp", "epsilon_lb_approx", "k_approx", "m", "confidence",
    "k_grid"}; ``epsilon_lb_gdp`` is ε(μ_lb, δ) (a Gaussian-family statement, module docstring).
    """
    s, b = _as_arrays(scores, included)
    m = s.size
    grid = sorted({max(1, min(int(k), m // 2)) for k in (k_grid or default_k_grid(m))})
    p_each = _check_p(p) / len(grid)
    order = np.argsort(-s, kind="stable")
    best_mu, best_eps = (0.0, grid[0]), (0.0, grid[0])
    for k in grid:
        top, bottom = order[:k], order[m - k:]
        correct = int(b[top].sum() + (~b[bottom]).sum())
        guesses = len(top) + len(bottom)
        mu = mu_from_guesses(m=m, guesses=guesses, correct=correct, p=p_each)
        eps = epsilon_from_guesses(m=m, guesses=guesses, correct=correct, delta=delta, p=p_each)
        best_mu = max(best_mu, (mu, k), key=lambda t: t[0])
        best_eps = max(best_eps, (eps, k), key=lambda t: t[0])
    return {"mu_lb": best_mu[0], "epsilon_lb_gdp": gdp_epsilon(best_mu[0], delta), "k_gdp": best_mu[1],
            "epsilon_lb_approx": best_eps[0], "k_approx": best_eps[1], "m": m,
            "confidence": 1.0 - float(p), "k_grid": grid}
