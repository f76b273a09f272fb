"""LoRA algebra shared by the LoRA-aware algorithms: names, ranks, residuals, PEFT access.

Shapes (PEFT names): ``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight``
(out, r); a LoRA layer computes W0 x + s·B A x with s = alpha / r. The pure functions
here (name pairing, rank truncation / padding) are shared by the server strategies and
their client halves (``strategies/client_hooks.py``); torch is imported only where a
model is touched. What a client does for an algorithm lives in that algorithm's module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from fedge import deltas
from fedge import protocol as P

if TYPE_CHECKING:  # torch is imported lazily at run time (query handlers never need it)
    import torch

State = dict[str, np.ndarray]

# -- names: which tensor is A, which is B, which residual belongs to them -----------------

_A = re.compile(r"(^|\.)lora_A(\.|$)")
_B = re.compile(r"(^|\.)lora_B(\.|$)")
_R = re.compile(r"(^|\.)lora_residual(\.|$)")


def is_lora_a(name: str) -> bool:
    return bool(_A.search(name))


def is_lora_b(name: str) -> bool:
    return bool(_B.search(name))


def lora_pairs(names) -> list[tuple[str, str, str]]:
    """(A name, B name, residual name) for every module that has both A and B, sorted.

    ``x.q_proj.lora_A.weight`` pairs with ``x.q_proj.lora_B.weight``; its residual is
    ``x.q_proj.lora_residual.weight`` (shape (out, in) = B.shape[0], A.shape[1]).
    """
    names = set(names)
    out = []
    for a in sorted(n for n in names if is_lora_a(n)):
        b = _A.sub(r"\1lora_B\2", a)
        if b in names:
            out.append((a, b, _A.sub(r"\1lora_residual\2", a)))
    return out


def module_of_residual(name: str) -> str:
    """``x.q_proj.lora_residual.weight`` -> ``x.q_proj`` (the LoRA layer's module path)."""
    if not _R.search(name):
        raise ValueError(f"{name!r} is not a residual name ('<module>.lora_residual.weight')")
    return _R.split(name)[0]


# -- HetLoRA: ranks, truncation, zero padding ------------------------------------------------


def rank_of(state: Mapping[str, np.ndarray]) -> int | None:
    """The LoRA rank r of an adapter state (A: (r, in), B: (out, r)); None without LoRA tensors."""
    ranks = {np.shape(v)[0] for k, v in state.items() if is_lora_a(k)}
    ranks |= {np.shape(v)[1] for k, v in state.items() if is_lora_b(k)}
    if len(ranks) > 1:
        raise ValueError(f"adapter tensors have different LoRA ranks {sorted(ranks)}")
    return ranks.pop() if ranks else None


def truncate_rank(state: Mapping[str, np.ndarray], r: int) -> State:
    """The first r rank components: A[:r, :], B[:, :r]; other tensors unchanged.

    With the same scale s, W0 + s·B[:, :r] A[:r] keeps exactly the first r of the
    global adapter's rank-1 terms Σ_j B[:, j] A[j, :].
    """
    full = rank_of(state)
    if full is not None and not 1 <= r <= full:
        raise ValueError(f"cannot truncate a rank-{full} adapter to rank {r}")
    return {k: (v[:r] if is_lora_a(k) else v[:, :r] if is_lora_b(k) else v) for k, v in state.items()}


def pad_rank(state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> State:
    """Zero-pad A rows / B columns up to ``shapes`` (inverse of :func:`truncate_rank` on the kept part)."""
    out = {}
    for k, v in state.items():
        v, target = np.asarray(v), tuple(shapes[k])
        if v.shape == target:
            out[k] = v
            continue
        axis = 0 if is_lora_a(k) else 1 if is_lora_b(k) else None
        if axis is None or v.ndim != len(target) or any(
                n != t for i, (n, t) in enumerate(zip(v.shape, target)) if i != axis) or v.shape[axis] > target[axis]:
            raise ValueError(f"{k}: cannot pad shape {v.shape} to {target}")
        widths = [(0, 0)] * v.ndim
        widths[axis] = (0, target[axis] - v.shape[axis])
        out[k] = np.pad(v, widths)
    return out


def client_view(global_state: Mapping[str, np.ndarray], r: int) -> State:
    """The global adapter as this client sees it: truncated to its rank r (HetLoRA), else unchanged."""
    return truncate_rank(global_state, r) if rank_of(global_state) not in (None, r) else dict(global_state)


# -- PEFT model access --------------------------------------------------------------------------


def adapter_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    """Adapter state name (``get_peft_model_state_dict`` name) -> the model's Parameter."""
    from peft import get_peft_model_state_dict

    by_storage = {p.data_ptr(): p for p in peft_model.parameters()}
    out = {}
    for name, t in get_peft_model_state_dict(peft_model).items():
        if t.data_ptr() not in by_storage:
            raise ValueError(f"adapter tensor {name} is not a parameter of the model")
        out[name] = by_storage[t.data_ptr()]
    return out


def _lora_layer(peft_model, residual_name: str):
    layer = peft_model.get_submodule(module_of_residual(residual_name))
    if not hasattr(layer, "get_base_layer") or not hasattr(layer, "scaling"):
        raise ValueError(f"{module_of_residual(residual_name)} is not a LoRA layer")
    active = list(getattr(layer, "active_adapters", ["default"]))
    if len(active) != 1:
        raise ValueError(f"{module_of_residual(residual_name)}: expected one active adapter, got {active}")
    return layer, float(layer.scaling[active[0]])


def _residual_weights(peft_model, residual: Mapping[str, np.ndarray]):
    """(base weight Parameter, W0 + s·R in its dtype) per module, computed in float64."""
    import torch

    out = []
    for name, r in sorted(residual.items()):
        layer, s = _lora_layer(peft_model, name)
        w = layer.get_base_layer().weight
        upd = s * np.asarray(r, np.float64)
        if getattr(layer, "fan_in_fan_out", False):  # Conv1D layers store W0 as (in, out)
            upd = upd.T
        if upd.shape != tuple(w.shape):
            raise ValueError(f"{name}: residual shape {np.shape(r)} does not fit weight {tuple(w.shape)}")
        out.append((w, (w.detach().double() + torch.from_numpy(upd).to(w.device)).to(w.dtype)))
    return out


@contextmanager
def residual_applied(peft_model, residual: Mapping[str, np.ndarray] | None):
    """FedEx-LoRA: serve W0 + s·R + s·B A while inside; W0 restored bit for bit on exit.

    ``residual``: residual name -> R (out, in), unscaled (see ``strategies/lora_exact.py``);
    None or empty does nothing. Used for client training and evaluation, and for the
    server's central evaluation of the served model.
    """
    import torch

    saved = []
    try:
        with torch.no_grad():
            for w, new in _residual_weights(peft_model, residual or {}):
                saved.append((w, w.detach().clone()))
                w.copy_(new)
        yield
    finally:
        with torch.no_grad():
            for w, original in reversed(saved):
                w.copy_(original)


def message_residual(content) -> State | None:
    """The FedEx-LoRA residual a train/evaluate message carries (None if it carries none)."""
    if content is None or P.LORA_RESIDUAL not in content:
        return None
    return deltas.from_record(content[P.LORA_RESIDUAL])


def is_lora(name: str) -> bool:
    """An adapter factor (lora_A or lora_B), as opposed to a task head or other trained tensor."""
    return is_lora_a(name) or is_lora_b(name)
