"""Adapter deltas: compute, apply, encode for the wire, validate, count bytes.

An adapter state is a flat ``dict[str, np.ndarray]`` keyed by PEFT parameter
names (``get_peft_model_state_dict`` names). A client sends

    Δ = A_local − A_t

and the server applies an aggregate, A_{t+1} = A_t + agg(Δ_1..Δ_n).

Exactness. ``compute_delta`` works in float64, so for fp32 tensors
``apply_delta(A_t, compute_delta(A_local, A_t)) == A_local`` bit for bit
(the float64 difference of two fp32 numbers is exact unless their magnitudes
differ by more than 2**29). Wire encodings are a separate, lossy-by-design step:

=========  ============================  =====================================
encoding   bytes per value               error per coordinate
=========  ============================  =====================================
fp32       4                             ≤ ½ ulp_fp32(Δ)  (relative 6e-8)
fp16       2                             ≤ ½ ulp_fp16(Δ)  (relative 5e-4); |Δ| ≤ 65504
int8       1 (+4 per tensor for scale)   ≤ ½ s, s = max|Δ_tensor| / 127
=========  ============================  =====================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

State = dict[str, np.ndarray]

ENCODINGS = ("fp32", "fp16", "int8")
SCALE_SUFFIX = "#scale"
_WIRE_DTYPE = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}
_FP16_MAX = float(np.finfo(np.float16).max)


class InvalidUpdate(ValueError):
    """A client update that must not reach the aggregate; the message says why."""


def compute_delta(local: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> State:
    """Δ = local − base per tensor, in float64. Keys and shapes must match."""
    _check_same_layout(local, base)
    return {k: np.asarray(local[k], np.float64) - np.asarray(base[k], np.float64) for k in base}


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> State:
    """base + Δ per tensor, computed in float64 and cast back to base's dtype."""
    _check_same_layout(delta, base)
    return {
        k: (np.asarray(base[k], np.float64) + np.asarray(delta[k], np.float64)).astype(
            np.asarray(base[k]).dtype
        )
        for k in base
    }


def weighted_mean(deltas_: Sequence[Mapping[str, np.ndarray]], weights: Iterable[float],
                  keys: Iterable[str] | None = None) -> State:
    """Σ_i w_i Δ_i per tensor (``keys``, else every tensor of the first delta), summed in client order.

    The weights sum to 1 (``DeltaStrategy`` normalises them); summing in the clients' order
    keeps the aggregate bitwise reproducible across runs and resumes.
    """
    weights = list(weights)
    return {k: sum(w * d[k] for w, d in zip(weights, deltas_)) for k in (deltas_[0] if keys is None else keys)}


def _check_same_layout(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    if set(a) != set(b):
        missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        raise InvalidUpdate(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for k in b:
        if np.shape(a[k]) != np.shape(b[k]):
            raise InvalidUpdate(f"{k}: shape {np.shape(a[k])}, expected {np.shape(b[k])}")


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """‖Δ‖₂ over all tensors taken as one vector (float64)."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


# -- wire encodings -------------------------------------------------------------


def encode(delta: Mapping[str, np.ndarray], encoding: str) -> State:
    """Encode Δ for the wire. int8 adds one ``<name>#scale`` fp32 array per tensor."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; allowed: {list(ENCODINGS)}")
    out: State = {}
    for name, value in delta.items():
        v = np.asarray(value, np.float64)
        if not np.all(np.isfinite(v)):
            raise InvalidUpdate(f"{name}: delta has NaN/Inf values")
        if encoding == "fp32":
            out[name] = v.astype(np.float32)
        elif encoding == "fp16":
            peak = float(np.max(np.abs(v))) if v.size else 0.0
            if peak > _FP16_MAX:
                raise InvalidUpdate(f"{name}: |Δ| = {peak:.3g} exceeds the fp16 range ({_FP16_MAX})")
            out[name] = v.astype(np.float16)
        else:  # int8, symmetric per-tensor scale
            peak = float(np.max(np.abs(v))) if v.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            out[name] = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
            out[name + SCALE_SUFFIX] = np.array([scale], np.float32)
    return out


def decode(wire: Mapping[str, np.ndarray], encoding: str) -> State:
    """Inverse of :func:`encode` (up to its stated error), as float64."""
    if encoding == "int8":
        return {
            k: wire[k].astype(np.float64) * float(wire[k + SCALE_SUFFIX][0])
            for k in wire
            if not k.endswith(SCALE_SUFFIX)
        }
    return {k: np.asarray(v, np.float64) for k, v in wire.items()}


def expected_wire_layout(
    shapes: Mapping[str, tuple[int, ...]], encoding: str
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names, shapes and dtypes a valid encoded delta must have."""
    dt = np.dtype(_WIRE_DTYPE[encoding])
    layout = {k: (tuple(s), dt) for k, s in shapes.items()}
    if encoding == "int8":
        layout.update({k + SCALE_SUFFIX: ((1,), np.dtype(np.float32)) for k in shapes})
    return layout


def validate_wire(
    wire_layout: Mapping[str, tuple[tuple[int, ...], str]],
    expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
) -> None:
    """Check names, shapes and dtypes of an encoded delta before decoding it.

    ``wire_layout`` maps name -> (shape, dtype string) as declared by the sender.
    """
    if set(wire_layout) != set(expected):
        missing = sorted(set(expected) - set(wire_layout))
        extra = sorted(set(wire_layout) - set(expected))
        raise InvalidUpdate(
            f"tensor names differ from the global adapter: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    for k, (shape, dt) in expected.items():
        got_shape, got_dt = wire_layout[k]
        if tuple(got_shape) != tuple(shape):
            raise InvalidUpdate(f"{k}: shape {tuple(got_shape)}, expected {tuple(shape)}")
        if np.dtype(got_dt) != dt:
            raise InvalidUpdate(f"{k}: dtype {got_dt}, expected {dt}")


def validate_values(delta: Mapping[str, np.ndarray], *, max_norm: float | None = None) -> float:
    """Check a decoded Δ is finite (and within ``max_norm``); return ‖Δ‖₂."""
    for k, v in delta.items():
        if not np.all(np.isfinite(v)):
            raise InvalidUpdate(f"{k}: delta has NaN/Inf values")
    norm = l2_norm(delta)
    if not np.isfinite(norm):
        raise InvalidUpdate(f"delta norm overflows ({norm})")
    if max_norm is not None and norm > max_norm:
        raise InvalidUpdate(f"delta norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return norm


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Raw tensor bytes (sum of ``nbytes``); the wire adds a small header per tensor."""
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))


# -- Flower records -------------------------------------------------------------


def to_record(state: Mapping[str, np.ndarray]):
    """``dict[str, ndarray]`` -> Flower ``ArrayRecord`` (npy bytes, never pickle)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record) -> State:
    """Flower ``ArrayRecord`` -> ``dict[str, ndarray]``."""
    return {k: arr.numpy() for k, arr in record.items()}


def record_layout(record) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) as declared in an ``ArrayRecord``, without decoding it."""
    return {k: (tuple(arr.shape), str(arr.dtype)) for k, arr in record.items()}


def record_bytes(record) -> int:
    """Exact serialized payload bytes of an ``ArrayRecord`` (npy header + data per tensor)."""
    return int(sum(len(arr.data) for arr in record.values()))
