"""Delta algebra and wire encodings against exact oracles."""

import numpy as np
import pytest

from fedge import deltas


def _state(rng, scale=1.0):
    return {"a.lora_A.weight": (rng.standard_normal((4, 6)) * scale).astype(np.float32),
            "a.lora_B.weight": np.zeros((6, 4), np.float32),
            "head.bias": (rng.standard_normal(3) * scale).astype(np.float32)}


def test_apply_of_compute_is_exact_roundtrip():
    # Prepare: a global adapter and a local one after "training" (mixed signs and scales)
    rng = np.random.default_rng(0)
    g = _state(rng)
    local = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 10.0 ** rng.integers(-6, 2, v.shape)).astype(np.float32)
             for k, v in g.items()}
    # Execute
    back = deltas.apply_delta(g, deltas.compute_delta(local, g))
    # Assert: bit-identical, same dtype
    for k in g:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], local[k])


@pytest.mark.parametrize("encoding, rtol", [("fp32", 6e-8), ("fp16", 5e-4)])
def test_float_encodings_error_bound(encoding, rtol):
    rng = np.random.default_rng(1)
    d = {k: v.astype(np.float64) for k, v in _state(rng, 0.01).items()}
    back = deltas.decode(deltas.encode(d, encoding), encoding)
    for k in d:
        np.testing.assert_allclose(back[k], d[k], rtol=rtol, atol=1e-12)


def test_int8_error_at_most_half_step():
    rng = np.random.default_rng(2)
    d = {k: v.astype(np.float64) for k, v in _state(rng).items()}
    wire = deltas.encode(d, "int8")
    back = deltas.decode(wire, "int8")
    for k in d:
        step = np.max(np.abs(d[k])) / 127 if np.any(d[k]) else 0
        assert np.max(np.abs(back[k] - d[k])) <= step / 2 + 1e-12
        assert wire[k].dtype == np.int8


def test_encode_refuses_nan_and_fp16_overflow():
    with pytest.raises(deltas.InvalidUpdate, match="NaN"):
        deltas.encode({"x": np.array([1.0, np.nan])}, "fp32")
    with pytest.raises(deltas.InvalidUpdate, match="fp16 range"):
        deltas.encode({"x": np.array([1e6])}, "fp16")


def test_validate_wire_reasons():
    exp = deltas.expected_wire_layout({"w": (2, 3)}, "fp32")
    with pytest.raises(deltas.InvalidUpdate, match="missing"):
        deltas.validate_wire({}, exp)
    with pytest.raises(deltas.InvalidUpdate, match="shape"):
        deltas.validate_wire({"w": ((3, 2), "float32")}, exp)
    with pytest.raises(deltas.InvalidUpdate, match="dtype"):
        deltas.validate_wire({"w": ((2, 3), "float64")}, exp)
    deltas.validate_wire({"w": ((2, 3), "float32")}, exp)


def test_validate_values_norm_bound():
    d = {"w": np.full((2, 2), 3.0)}
    assert deltas.validate_values(d) == pytest.approx(6.0)
    with pytest.raises(deltas.InvalidUpdate, match="exceeds the bound"):
        deltas.validate_values(d, max_norm=5.0)
    with pytest.raises(deltas.InvalidUpdate, match="NaN"):
        deltas.validate_values({"w": np.array([np.inf])})


def test_record_roundtrip_and_exact_bytes():
    rng = np.random.default_rng(3)
    s = _state(rng)
    rec = deltas.to_record(s)
    back = deltas.from_record(rec)
    for k in s:
        np.testing.assert_array_equal(back[k], s[k])
    assert deltas.payload_bytes(s) == sum(v.nbytes for v in s.values())
    # npy serialisation adds a fixed header per tensor, never less than the raw bytes
    assert deltas.payload_bytes(s) < deltas.record_bytes(rec) <= deltas.payload_bytes(s) + 256 * len(s)
