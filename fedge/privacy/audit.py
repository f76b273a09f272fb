"""Empirical privacy auditing: a lower bound ε_lb from canary scores of one run.

One-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023, arXiv:2305.08846).
m canaries, each included independently with probability ½ (S_i ∈ {−1, +1};
for replace-one adjacency "+1" and "−1" are the two neighbouring canaries).
The auditor sees one score per canary (higher = "looks included"), guesses
T_i = +1 for the k₊ highest, T_i = −1 for the k₋ lowest and abstains on the
rest: r = k₊ + k₋ guesses, v of them correct. If the run is (ε, δ)-DP w.r.t.
every canary, then (their Theorem 3.1 / Appendix D)

    P[v correct or more] ≤ β(ε) + 2 m δ α(ε),        q = e^ε / (1 + e^ε)
    β(ε) = P[Binomial(r, q) ≥ v]
    α(ε) = max_{1≤i≤v} (1/i) · P[v − i ≤ Binomial(r, q) < v]

so when this p-value is below p (= 1 − confidence), (ε, δ)-DP is rejected;
ε_lb = the largest such ε (bisection; p(ε) increases with ε). With δ = 0 the
bound is the one-sided Clopper–Pearson lower limit q_lo on the guess accuracy:
ε_lb = log(q_lo / (1 − q_lo)). With all r guesses correct (δ = 0) this is the
ceiling of an audit with r guesses: ε_max = logit(p^{1/r}).

Choosing k after seeing the scores is itself a test: :func:`one_run_epsilon`
tries a fixed grid of k and pays for it with a Bonferroni correction (p / |grid|).

Also reported, from the same scores:

* the f-DP one-run bounds of :mod:`fedge.privacy.audit_fdp` (Mahloujifar et al. 2024): μ_lb of
  the Gaussian family with its ε at δ, and the (ε, δ) bound read through the trade-off curve;
* exposure (Carlini et al. 2019, "The Secret Sharer", arXiv:1802.08232):
  exposure = log₂|R| − log₂ rank, rank of the canary's score among |R| reference
  scores of canaries that were *not* trained on (rank 1 = above all of them);
* TPR at a fixed low FPR and AUROC of the score as a membership test
  (Mann–Whitney U / (n₁ n₀), ties counted ½).

The audit shows a privacy *bug* when ε_lb > ε; it never proves privacy: ε_lb ≤ ε
is what a correct implementation gives and also what a weak attack gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias, cast

import numpy as np
from scipy import special, stats

DEFAULT_P = 0.05  # 95% confidence
_EPS_HI = 60.0  # bisection ceiling; logit(p^{1/r}) stays below this for any r < 1e25
# Scores and inclusion flags: lists or numpy arrays (everything goes through np.asarray).
Scores: TypeAlias = "Sequence[float] | np.ndarray"
Flags: TypeAlias = "Sequence[bool] | np.ndarray"


def _check_p(p: float) -> float:
    v = float(p)
    if not 0.0 < v < 1.0:
        raise ValueError(f"p (1 - confidence) must be in (0, 1), got {p!r}")
    return v


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 <= d < 1.0 or not math.isfinite(d):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return d


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v of r guesses correct] under (ε, δ)-DP with m canaries (module docstring)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    d = _check_delta(delta)
    q = float(special.expit(epsilon))  # accuracy of ε-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))
    if d == 0.0 or v == 0:
        return min(beta, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v−1], P[Bin = v−2], ..., P[Bin = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(beta + 2.0 * m * d * alpha, 1.0)


def epsilon_from_guesses(*, m: int, r: int, v: int, delta: float, p: float = DEFAULT_P, tol: float = 1e-6) -> float:
    """Largest ε whose p-value for (m, r, v) is below p: ε_lb at confidence 1 − p (0 if none)."""
    pp = _check_p(p)
    lo, hi = 0.0, _EPS_HI
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= pp:
        return 0.0
    if p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < pp:
        return hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < pp else (lo, mid)
    return lo


def _as_arrays(scores: Scores, included: Flags) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).ravel()
    b = np.asarray(included).ravel().astype(bool)
    if s.shape != b.shape or s.size == 0:
        raise ValueError(f"scores and included must be non-empty and the same length, got {s.size} and {b.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite")
    return s, b


def default_k_grid(m: int) -> list[int]:
    """Guesses per side tried by :func:`one_run_epsilon`: ~1%, 2%, 5%, 10%, 20%, 30%, 50% of m."""
    return sorted({max(1, int(round(f * m))) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)} - {0})


def one_run_epsilon(
    scores: Scores, included: Flags, *, delta: float, p: float = DEFAULT_P,
    k_grid: Sequence[int] | None = None,
) -> dict[str, Any]:
    """ε_lb from canary scores: best of the k-grid, Bonferroni-corrected (confidence 1 − p).

    For each k (capped at m/2): guess "included" for the k highest scores and
    "excluded" for the k lowest, r = 2k; v = correct guesses.
    Returns {"epsilon_lb", "confidence", "k", "r", "v", "m", "delta", "k_grid"}.
    """
    s, b = _as_arrays(scores, included)
    m = s.size
    grid = sorted(set(int(k) for k in (k_grid or default_k_grid(m))))
    if not grid or grid[0] < 1:
        raise ValueError(f"k_grid must hold integers >= 1, got {k_grid!r}")
    p_each = _check_p(p) / len(grid)
    order = np.argsort(-s, kind="stable")  # highest first
    best: dict[str, Any] | None = None
    for k in grid:
        k = max(1, min(k, m // 2))
        top, bottom = order[:k], order[m - k:] if m >= 2 else order[:0]
        v = int(b[top].sum() + (~b[bottom]).sum())
        r = len(top) + len(bottom)
        eps = epsilon_from_guesses(m=m, r=r, v=v, delta=delta, p=p_each)
        if best is None or eps > best["epsilon_lb"]:  # ties keep the smallest k
            best = {"epsilon_lb": eps, "k": k, "r": r, "v": v}
    # grid is non-empty (checked above), so the loop has set best.
    return {**cast("dict[str, Any]", best), "m": m, "delta": float(delta), "confidence": 1.0 - float(p), "k_grid": grid}


def perfect_epsilon(*, r: int, p: float = DEFAULT_P) -> float:
    """Ceiling of an audit with r guesses, all correct, δ = 0: logit(p^{1/r})."""
    return float(special.logit(_check_p(p) ** (1.0 / r)))


def clopper_pearson(successes: int, trials: int, *, p: float = DEFAULT_P) -> tuple[float, float]:
    """One-sided Clopper–Pearson limits (lo, hi) of a binomial rate, each at confidence 1 − p.

    lo = Beta⁻¹(p; k, n − k + 1), hi = Beta⁻¹(1 − p; k + 1, n − k), from scipy.stats.beta.
    """
    k, n = int(successes), int(trials)
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {k}, {n}")
    pp = _check_p(p)
    lo = 0.0 if k == 0 else float(stats.beta.ppf(pp, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1.0 - pp, k + 1, n - k))
    return lo, hi


def auroc(scores: Scores, included: Flags) -> float:
    """P[score of an included canary > score of an excluded one] (+½ per tie): U / (n₁ n₀)."""
    s, b = _as_arrays(scores, included)
    if b.all() or not b.any():
        return math.nan
    ranks = stats.rankdata(s)  # average ranks for ties
    n1, n0 = int(b.sum()), int((~b).sum())
    return float((ranks[b].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(scores: Scores, included: Flags, *, fpr: float = 0.01) -> float:
    """Largest TPR of a threshold test "score > t" whose empirical FPR is ≤ ``fpr``."""
    s, b = _as_arrays(scores, included)
    if b.all() or not b.any():
        return math.nan
    neg = np.sort(s[~b])[::-1]
    allowed = int(math.floor(float(fpr) * neg.size + 1e-9))  # false positives allowed
    # Threshold just above the (allowed+1)-th highest excluded score.
    t = neg[allowed] if allowed < neg.size else -np.inf
    return float(np.mean(s[b] > t))


def exposure(scores: Scores, reference: Scores) -> np.ndarray:
    """Carlini exposure of each score against reference (never-trained) scores, in bits.

    rank = 1 + #{reference ≥ score}; exposure = log₂(|R| + 1) − log₂ rank ∈ [0, log₂(|R| + 1)].
    """
    s = np.asarray(scores, np.float64).ravel()
    ref = np.sort(np.asarray(reference, np.float64).ravel())
    if ref.size == 0:
        raise ValueError("exposure needs at least one reference score")
    at_or_above = ref.size - np.searchsorted(ref, s, side="left")
    return cast(np.ndarray, np.log2(ref.size + 1) - np.log2(1 + at_or_above))  # ufuncs are typed Any


def summarize(scores: Scores, included: Flags, *, delta: float, p: float = DEFAULT_P,
              fpr: float = 0.01) -> dict[str, Any]:
    """Every statistic of this module for one set of canary scores, JSON-ready, and the f-DP bounds
    of :mod:`fedge.privacy.audit_fdp` beside Steinke et al.'s ``epsilon_lb`` (which stays the verdict)."""
    from fedge.privacy.audit_fdp import one_run_fdp  # imports this module's helpers: imported here, not at the top

    s, b = _as_arrays(scores, included)
    out = one_run_epsilon(s, b, delta=delta, p=p)
    fdp = one_run_fdp(s, b, delta=delta, p=p)
    exp_in = exposure(s[b], s[~b]) if (~b).any() else np.array([])
    out.update(
        auroc=auroc(s, b), fpr=float(fpr), tpr_at_fpr=tpr_at_fpr(s, b, fpr=fpr),
        n_included=int(b.sum()), n_excluded=int((~b).sum()),
        mu_lb=fdp["mu_lb"], epsilon_lb_gdp=fdp["epsilon_lb_gdp"], epsilon_lb_approx=fdp["epsilon_lb_approx"],
        exposure={"max_bits": float(np.log2((~b).sum() + 1)) if (~b).any() else 0.0,
                  "mean": float(exp_in.mean()) if exp_in.size else math.nan,
                  "median": float(np.median(exp_in)) if exp_in.size else math.nan,
                  "max": float(exp_in.max()) if exp_in.size else math.nan},
        # The most this audit could report (every guess right, δ = 0): ε_lb near it means "add canaries".
        ceiling=perfect_epsilon(r=max(1, 2 * min(max(out["k_grid"]), s.size // 2)), p=p / len(out["k_grid"])),
    )
    return out
