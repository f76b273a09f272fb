"""Pure DP math over adapter deltas (flat ``dict[str, np.ndarray]``, float64).

User-level DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963) with m clients per round:

    Δ̃_i = Δ_i · min(1, S / ‖Δ_i‖₂)                  ‖·‖₂ over all tensors as one vector
    Ā   = (1/m) Σ_i Δ̃_i + N(0, σ² I),   σ = z·S/m    m = planned clients per round

One client moves Σ_i Δ̃_i by at most S (add/remove) or 2S (replace-one), so the
noise multiplier z is the std/sensitivity ratio the accountant needs.

Adaptive clipping (Andrew et al. 2021, arXiv:1905.03871), target quantile γ:

    b_i = 1[‖Δ_i‖₂ ≤ S]                  (client i was *not* clipped)
    b̄   = (Σ_i b_i + N(0, σ_b²)) / m
    S'  = S · exp(−η (b̄ − γ))           more than γ unclipped -> S shrinks

Releasing b̄ costs privacy too: the delta noise uses z_Δ with
z^{-2} = z_Δ^{-2} + (2σ_b)^{-2}  (:func:`delta_noise_multiplier`), so the pair
(Ā, b̄) together is exactly as private as one Gaussian release with multiplier z.

No function here keeps state or draws randomness it was not handed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedge.deltas import InvalidUpdate

State = dict[str, np.ndarray]

# Clipped deltas land on S·(1 − ε_clip) instead of S so that rounding in any later
# float64 norm computation (other summation orders, BLAS) cannot push them past S.
_CLIP_MARGIN = 1e-12


def positive(name: str, value: float) -> float:
    """``value`` as a float if finite and > 0, else ValueError naming ``name``."""
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def stable_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """‖Δ‖₂ over all tensors as one vector, in float64 without overflow.

    Computed as a·sqrt(Σ (x/a)²) with a = max|x|, so 1e200-sized entries give a
    finite norm whenever the true norm is finite. Non-finite input -> inf/nan.
    """
    vals = [np.asarray(v, np.float64).ravel() for v in arrays.values()]
    peak = max((float(np.max(np.abs(v))) if v.size else 0.0 for v in vals), default=0.0)
    if peak == 0.0 or not math.isfinite(peak):
        return peak
    return peak * math.sqrt(sum(float(np.sum(np.square(v / peak))) for v in vals))


def clip_update(delta: Mapping[str, np.ndarray], *, clip_norm: float) -> tuple[State, float]:
    """Scale Δ by min(1, S/‖Δ‖₂) over all tensors; return (clipped float64 Δ, ‖Δ‖₂).

    * NaN/Inf anywhere raises :class:`fedge.deltas.InvalidUpdate` (a NaN must never
      pass as "unclipped": ``min(1, S/nan)`` is 1 in naive code).
    * 0-d arrays are part of the vector like any other tensor.
    * An all-zero (or empty) Δ is returned unchanged (no division by zero).
    * fp16/bf16-like inputs are converted to float64 before any arithmetic.
    * The output norm is ≤ S always: deltas above S·(1 − 1e-12) are scaled to exactly
      that, so no later float64 norm (other summation order) can see more than S.
    """
    s = positive("clip_norm", clip_norm)
    out = {k: np.array(v, dtype=np.float64, copy=True) for k, v in delta.items()}
    for k, v in out.items():
        if not np.all(np.isfinite(v)):
            raise InvalidUpdate(f"{k}: delta has NaN/Inf values")
    peak = max((float(np.max(np.abs(v))) if v.size else 0.0 for v in out.values()), default=0.0)
    if peak == 0.0:
        return out, 0.0
    # ‖Δ‖ = peak · r with r = ‖Δ/peak‖ ∈ [1, sqrt(size)]: no overflow even for huge entries.
    r = math.sqrt(sum(float(np.sum(np.square(v / peak))) for v in out.values()))
    norm = peak * r  # may be inf if the true norm exceeds the float64 range
    if norm <= s * (1.0 - _CLIP_MARGIN):  # margin: "unchanged" must also mean ≤ S for any other rounding
        return out, norm
    factor = (s / r) * (1.0 - _CLIP_MARGIN)  # applied to Δ/peak
    clipped = {k: (v / peak) * factor for k, v in out.items()}
    after = stable_norm(clipped)
    if after > s:  # rounding guard (not expected with the margin, kept as a hard invariant)
        clipped = {k: v * (s / after) * (1.0 - _CLIP_MARGIN) for k, v in clipped.items()}
    return clipped, norm


def gaussian_noise_std(*, noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """σ = z·S/m: noise std per coordinate of the mean of m clipped deltas."""
    z = positive("noise_multiplier", noise_multiplier)
    s = positive("clip_norm", clip_norm)
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    return z * s / int(num_clients)


def add_gaussian_noise(aggregate: Mapping[str, np.ndarray], *, std: float, rng: np.random.Generator) -> State:
    """aggregate + N(0, std²) independently per coordinate (float64, shapes kept)."""
    sd = positive("std", std)
    return {k: np.asarray(v, np.float64) + rng.normal(0.0, sd, size=np.shape(v)) for k, v in aggregate.items()}


def delta_noise_multiplier(*, noise_multiplier: float, count_noise_std: float) -> float:
    """z_Δ such that releasing (Ā with z_Δ, noised count with σ_b) costs as much as z.

    z^{-2} = z_Δ^{-2} + (2σ_b)^{-2}   (Andrew et al. 2021, Theorem 1).

    The two releases form one Gaussian mechanism on (Σ Δ̃_i, Σ b_i). Add/remove with
    centred bits: sensitivities S and ½; replace-one with plain bits (what
    :func:`noised_unclipped_fraction` counts): 2S and 1. The ratio is the same, so
    the formula holds for both. Needs 2σ_b > z, else the count alone spends the budget.
    """
    z = positive("noise_multiplier", noise_multiplier)
    sb = positive("count_noise_std", count_noise_std)
    rest = z ** -2 - (2.0 * sb) ** -2
    if rest <= 0:
        raise ValueError(
            f"count_noise_std {sb:g} is too small for noise_multiplier {z:g}: adaptive clipping "
            f"needs count_noise_std > noise_multiplier/2 = {z / 2:g} (Andrew et al. suggest "
            "clients_per_round/20; larger values cost less privacy but track the quantile more slowly)"
        )
    return float(rest ** -0.5)  # float ** negative exponent is typed Any


def noised_unclipped_fraction(
    unclipped: Sequence[float] | np.ndarray, *, count_noise_std: float, rng: np.random.Generator, expected_count: int
) -> float:
    """b̄ = (Σ b_i + N(0, σ_b²)) / m for bits b_i ∈ {0, 1} (values ≥ ½ count as 1)."""
    sb = positive("count_noise_std", count_noise_std)
    if int(expected_count) != expected_count or expected_count < 1:
        raise ValueError(f"expected_count must be an integer >= 1, got {expected_count!r}")
    bits = np.asarray(unclipped, np.float64)
    if not np.all(np.isfinite(bits)):
        raise ValueError("unclipped indicators must be finite")
    count = float(np.sum(bits >= 0.5))
    return (count + float(rng.normal(0.0, sb))) / int(expected_count)


def noised_fraction(
    norms: Sequence[float],
    clip_norm: float,
    *,
    count_noise_std: float,
    rng: np.random.Generator,
    expected_count: int | None = None,
) -> float:
    """b̄ from the clients' pre-clipping norms: bits 1[‖Δ_i‖ ≤ S], see module docstring.

    ``expected_count`` is m, the planned clients per round (default: ``len(norms)``).
    """
    s = positive("clip_norm", clip_norm)
    n = np.asarray(norms, np.float64)
    if np.any(np.isnan(n)):
        raise ValueError("norms must not be NaN")
    m = len(n) if expected_count is None else expected_count
    return noised_unclipped_fraction((n <= s).astype(np.float64), count_noise_std=count_noise_std,
                                     rng=rng, expected_count=max(int(m), 1))


def adaptive_clip_update(
    clip_norm: float, *, unclipped_fraction_noised: float, target_quantile: float, lr: float
) -> float:
    """S' = S · exp(−η (b̄ − γ)): geometric update towards the γ-quantile of the norms.

    If more clients than γ fit under S (b̄ > γ), S shrinks; if fewer, it grows.
    """
    s = positive("clip_norm", clip_norm)
    eta = positive("lr", lr)
    if not 0.0 < target_quantile < 1.0:
        raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
    b = float(unclipped_fraction_noised)
    if not math.isfinite(b):
        raise ValueError(f"unclipped_fraction_noised must be finite, got {b!r}")
    return s * math.exp(-eta * (b - float(target_quantile)))
