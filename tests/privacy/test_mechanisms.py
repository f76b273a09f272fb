"""Pure mechanisms: clipping invariant, noise scale, adaptive clipping direction and convergence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge.deltas import InvalidUpdate
from fedge.privacy import mechanisms as M


def flat_norm(d: dict) -> float:
    """Oracle norm: numpy's own 2-norm of the concatenated float64 vector (after rescaling)."""
    v = np.concatenate([np.asarray(x, np.float64).ravel() for x in d.values()]) if d else np.zeros(0)
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    return 0.0 if peak == 0 else peak * float(np.linalg.norm(v / peak))


# -- clipping -------------------------------------------------------------------

_dtypes = st.sampled_from([np.float16, np.float32, np.float64])
_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@st.composite
def deltas(draw):
    dtype = draw(_dtypes)
    info = np.finfo(dtype)
    n = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e4, float(info.max) / 4]))
    out = {}
    for i in range(n):
        arr = draw(hnp.arrays(dtype, draw(_shapes), elements=st.floats(-1, 1, width=16)))
        out[f"t{i}"] = (arr.astype(np.float64) * scale).astype(dtype)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(delta=deltas(), clip=st.sampled_from([1e-6, 0.1, 1.0, 3.0, 1e6]))
def test_clipped_norm_never_exceeds_the_bound(delta, clip):
    # Execute
    out, norm = M.clip_update(delta, clip_norm=clip)
    # Assert: norm ≤ S by two independent computations; shapes kept; float64; unclipped unchanged
    assert flat_norm(out) <= clip
    assert M.stable_norm(out) <= clip
    assert {k: v.shape for k, v in out.items()} == {k: np.shape(v) for k, v in delta.items()}
    assert all(v.dtype == np.float64 for v in out.values())
    if norm <= clip * (1 - 1e-12):
        for k in delta:
            np.testing.assert_array_equal(out[k], np.asarray(delta[k], np.float64))


@settings(max_examples=200, deadline=None)
@given(arr=hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=30),
                      elements=st.floats(-1, 1).filter(lambda x: abs(x) > 1e-3)),
       ulps=st.integers(-4, 4), clip=st.floats(1e-3, 1e3))
def test_deltas_right_at_the_bound_end_up_within_it(arr, ulps, clip):
    # Prepare: a delta whose float64 norm is S give or take a few ulps (the rounding-prone case)
    scaled = arr * (clip / flat_norm({"a": arr}))
    scaled = scaled * (1 + ulps * np.finfo(np.float64).eps)
    # Execute
    out, _ = M.clip_update({"a": scaled, "b": np.array(0.0)}, clip_norm=clip)
    # Assert
    assert flat_norm(out) <= clip and M.stable_norm(out) <= clip
    assert float(np.sqrt(np.sum(out["a"] ** 2))) <= clip  # naive summation order too


def test_clipping_scales_every_tensor_by_one_factor_including_0d():
    # Prepare: norm 5 over a 0-d tensor and a vector
    delta = {"scalar": np.array(3.0), "vec": np.array([4.0, 0.0])}
    # Execute
    out, norm = M.clip_update(delta, clip_norm=1.0)
    # Assert
    assert norm == pytest.approx(5.0)
    assert out["scalar"].shape == ()
    np.testing.assert_allclose(out["scalar"], 0.6, rtol=1e-11)
    np.testing.assert_allclose(out["vec"], [0.8, 0.0], rtol=1e-11)


def test_a_lone_0d_tensor_is_clipped():
    out, norm = M.clip_update({"s": np.array(-7.0)}, clip_norm=2.0)
    assert norm == 7.0 and out["s"] == pytest.approx(-2.0) and abs(out["s"]) <= 2.0


def test_all_zero_delta_passes_unchanged_without_division():
    with np.errstate(all="raise"):
        out, norm = M.clip_update({"a": np.zeros((2, 2)), "b": np.array(0.0)}, clip_norm=1.0)
    assert norm == 0.0 and all(np.all(v == 0) for v in out.values())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_delta_is_rejected_not_passed(bad):
    delta = {"a": np.array([1.0, bad]), "b": np.zeros(3)}
    with pytest.raises(InvalidUpdate, match="NaN/Inf"):
        M.clip_update(delta, clip_norm=1.0)


def test_fp16_input_is_clipped_in_float64():
    # Prepare: fp16 values whose squares overflow fp16 (300² > 65504)
    delta = {"a": np.full(4, 300.0, np.float16)}
    # Execute
    out, norm = M.clip_update(delta, clip_norm=1.0)
    # Assert
    assert norm == pytest.approx(600.0)
    assert out["a"].dtype == np.float64 and flat_norm(out) <= 1.0
    np.testing.assert_allclose(out["a"], 0.5, rtol=1e-11)


def test_huge_float64_delta_does_not_overflow():
    out, norm = M.clip_update({"a": np.full(10, 1e300)}, clip_norm=1.0)
    assert math.isfinite(norm) and flat_norm(out) <= 1.0 and flat_norm(out) == pytest.approx(1.0)


# -- noise ----------------------------------------------------------------------------


def test_noise_std_is_z_s_over_m():
    assert M.gaussian_noise_std(noise_multiplier=1.5, clip_norm=0.2, num_clients=6) == pytest.approx(0.05)


def test_add_gaussian_noise_has_the_requested_std_and_keeps_shapes():
    # Prepare
    agg = {"a": np.ones((200, 50)), "s": np.array(2.0)}
    # Execute
    out = M.add_gaussian_noise(agg, std=0.3, rng=np.random.default_rng(0))
    # Assert: 10,000 samples -> std within 3 %
    assert out["s"].shape == ()
    assert np.std(out["a"] - 1.0) == pytest.approx(0.3, rel=0.03)
    assert abs(np.mean(out["a"] - 1.0)) < 0.01


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=0.0, clip_norm=1.0, num_clients=2), "noise_multiplier"),
    (dict(noise_multiplier=-1.0, clip_norm=1.0, num_clients=2), "noise_multiplier"),
    (dict(noise_multiplier=1.0, clip_norm=0.0, num_clients=2), "clip_norm"),
    (dict(noise_multiplier=1.0, clip_norm=-2.0, num_clients=2), "clip_norm"),
    (dict(noise_multiplier=math.nan, clip_norm=1.0, num_clients=2), "noise_multiplier"),
    (dict(noise_multiplier=1.0, clip_norm=1.0, num_clients=0), "num_clients"),
])
def test_invalid_privacy_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.gaussian_noise_std(**kwargs)


def test_clip_and_noise_refuse_non_positive_values():
    with pytest.raises(ValueError, match="clip_norm"):
        M.clip_update({"a": np.ones(2)}, clip_norm=0.0)
    with pytest.raises(ValueError, match="std"):
        M.add_gaussian_noise({"a": np.ones(2)}, std=0.0, rng=np.random.default_rng(0))


def test_params_are_keyword_only():
    with pytest.raises(TypeError):
        M.gaussian_noise_std(1.0, 1.0, 2)  # type: ignore[misc]
    with pytest.raises(TypeError):
        M.clip_update({"a": np.ones(2)}, 1.0)  # type: ignore[misc]


# -- adaptive clipping ----------------------------------------------------------------


def test_adaptive_clip_shrinks_when_too_many_clients_fit_under_the_bound():
    # Prepare: 90 % of clients unclipped, target 50 %
    s = 1.0
    # Execute
    down = M.adaptive_clip_update(s, unclipped_fraction_noised=0.9, target_quantile=0.5, lr=0.2)
    up = M.adaptive_clip_update(s, unclipped_fraction_noised=0.1, target_quantile=0.5, lr=0.2)
    # Assert: closed form S·exp(−η(b̄ − γ))
    assert down == pytest.approx(math.exp(-0.2 * 0.4)) and down < s
    assert up == pytest.approx(math.exp(0.2 * 0.4)) and up > s


def test_noised_fraction_counts_unclipped_clients_over_planned_m():
    rng = np.random.default_rng(0)
    b = [M.noised_fraction([0.5, 2.0, 0.9, 3.0], 1.0, count_noise_std=0.5, rng=rng, expected_count=8)
         for _ in range(4000)]
    # 2 of 8 planned clients under S=1; noise std 0.5/8
    assert np.mean(b) == pytest.approx(2 / 8, abs=0.005)
    assert np.std(b) == pytest.approx(0.5 / 8, rel=0.05)


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8])
def test_adaptive_clipping_converges_to_the_target_quantile(gamma):
    # Prepare: log-normal client norms, 50 clients per round, Andrew et al.'s η = 0.2, σ_b = m/20
    rng = np.random.default_rng(1)
    m, s = 50, 10.0
    # Execute
    for _ in range(600):
        norms = rng.lognormal(mean=0.0, sigma=1.0, size=m)
        b = M.noised_fraction(norms, s, count_noise_std=m / 20, rng=rng, expected_count=m)
        s = M.adaptive_clip_update(s, unclipped_fraction_noised=b, target_quantile=gamma, lr=0.2)
    # Assert: S sits near the γ-quantile of the norm distribution (fraction under S ≈ γ)
    fraction_under = float(np.mean(rng.lognormal(0.0, 1.0, 100_000) <= s))
    assert fraction_under == pytest.approx(gamma, abs=0.1)


def test_delta_noise_multiplier_splits_the_budget():
    # z^-2 = z_Δ^-2 + (2σ_b)^-2
    zd = M.delta_noise_multiplier(noise_multiplier=1.0, count_noise_std=2.5)
    assert zd ** -2 + 5.0 ** -2 == pytest.approx(1.0)
    assert zd > 1.0
    with pytest.raises(ValueError, match="count_noise_std .* too small"):
        M.delta_noise_multiplier(noise_multiplier=1.0, count_noise_std=0.4)


@pytest.mark.parametrize("kw,match", [
    (dict(target_quantile=0.0, lr=0.2), "target_quantile"),
    (dict(target_quantile=1.0, lr=0.2), "target_quantile"),
    (dict(target_quantile=0.5, lr=0.0), "lr"),
])
def test_adaptive_parameters_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        M.adaptive_clip_update(1.0, unclipped_fraction_noised=0.5, **kw)
