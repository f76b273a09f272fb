"""Client side of LoRA-aware federated algorithms: what a round config asks a client to do.

The server's strategy asks for client behaviour through round-config keys (and, where
tensors must travel, extra records in the train message, ``fedge.protocol``); the
client app wraps its local round in :func:`client_round`:

    with client_round(peft, conf, context, msg.content) as hooks:
        ... local training ...
        delta, extra_records = hooks.finish(delta)

``finish`` returns the delta to send (possibly a subset of tensors) and extra Flower
records for the reply. Without any such key the hooks do nothing.

==================  ================================  ==============================================
round-config key    strategy                          client behaviour during the round
==================  ================================  ==============================================
CFG_LORA_EXACT      ``fedex-lora`` (lora_exact.py)    W0 ← W0 + s·R for each module (record
                                                      LORA_RESIDUAL), restored bit for bit on exit
CFG_FREEZE_A        ``ffa-lora``                      lora_A frozen (requires_grad False, restored);
                                                      the reply omits lora_A
CFG_FREEZE_ADAPTER  ``head-only`` (head_only.py)      lora_A and lora_B frozen: only the task head
                                                      trains; the reply carries the head alone
CFG_SCAFFOLD        ``scaffold``                      every gradient g ← g + (c − c_i) (record
                                                      SCAFFOLD_C); reply adds Δc_i (SCAFFOLD_DC);
                                                      c_i kept in the node's state
CFG_HETLORA         ``hetlora``                       train at this client's rank r_i (see
                                                      :func:`client_lora`, :func:`truncate_rank`);
                                                      the reply declares r_i (LORA_META)
==================  ================================  ==============================================

Shapes (PEFT names): ``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight``
(out, r); a LoRA layer computes W0 x + s·B A x with s = alpha / r. The pure functions
here (name pairing, rank truncation / padding) are shared with the server strategies,
which is why torch is imported only where a model is touched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord

from fedge import deltas
from fedge import protocol as P

if TYPE_CHECKING:  # torch is imported lazily at run time (query handlers never need it)
    import torch

State = dict[str, np.ndarray]
Finisher = Callable[[State], tuple[State, dict]]

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


def client_lora(conf, context) -> tuple[int, float]:
    """(rank, alpha) this client builds its PEFT model with.

    Without HetLoRA: the round config's ``lora-r`` and ``lora-alpha``. With HetLoRA
    (``CFG_HETLORA``) the rank r_i is, in order: the node config ``lora-rank`` (the
    device's capacity, deployment), else ``hetlora-ranks[partition-id % len]`` (the
    round config, simulation), else r_max = ``lora-r``; capped at r_max. alpha is
    scaled to alpha·r_i/r_max so every client keeps the global scale s = alpha/r_max:
    the truncated model is exactly the first r_i terms of the global one.
    """
    r_max, alpha = int(conf[P.CFG_LORA_R]), float(conf[P.CFG_LORA_ALPHA])
    if not conf.get(P.CFG_HETLORA, False):
        return r_max, alpha
    nc = context.node_config
    if P.NODE_LORA_RANK in nc:
        r = int(nc[P.NODE_LORA_RANK])
    elif P.CFG_HETLORA_RANKS in conf:
        ranks = [int(x) for x in conf[P.CFG_HETLORA_RANKS]]
        r = ranks[int(nc[P.NODE_PARTITION_ID]) % len(ranks)]
    else:
        r = r_max
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    r = min(r, r_max)
    return r, alpha * r / r_max


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


# -- SCAFFOLD: the client's control variate c_i ---------------------------------------------------

SCAFFOLD_CI = "scaffold-ci"  # key in the node's Context state: c_i (+ the session it belongs to)
_SESSION = "#session"
STATE_DIR_ENV = "FEDGE_CLIENT_STATE"  # same directory as the DP-SGD history (clients/app.py)


def _ci_file(context) -> Path | None:
    nc = context.node_config
    root = nc.get("state-dir") or os.environ.get(STATE_DIR_ENV)
    if not root:
        return None
    return Path(str(root)) / P.client_name(nc) / "scaffold-ci.npz"


def load_control_variate(context, session: int, like: Mapping[str, np.ndarray]) -> State:
    """c_i for this SCAFFOLD session (zeros when new: another session's c_i is never reused)."""
    stored: dict | None = None
    f = _ci_file(context)
    if f is not None and f.exists():
        with np.load(f) as z:
            stored = {k: z[k] for k in z.files}
    elif SCAFFOLD_CI in context.state:
        stored = deltas.from_record(context.state[SCAFFOLD_CI])
    if stored is None or int(stored.pop(_SESSION, np.array([0]))[0]) != session:
        return {k: np.zeros(np.shape(v)) for k, v in like.items()}
    if set(stored) != set(like) or any(np.shape(stored[k]) != np.shape(like[k]) for k in like):
        raise ValueError("stored SCAFFOLD c_i does not match this adapter's tensors (same session id?)")
    return {k: np.asarray(v, np.float64) for k, v in stored.items()}


def save_control_variate(context, session: int, ci: Mapping[str, np.ndarray]) -> None:
    arrays = {**{k: np.asarray(v, np.float64) for k, v in ci.items()}, _SESSION: np.array([session], np.int64)}
    context.state[SCAFFOLD_CI] = deltas.to_record(arrays)
    f = _ci_file(context)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, f)  # atomic: a crash never leaves half a c_i


def _scaffold(peft_model, conf, context, content, stack: ExitStack) -> Finisher:
    """Gradient hooks g ← g + (c − c_i) for the round; finish computes Δc_i (option II)."""
    import torch

    if P.CFG_DPSGD_DELTA in conf or P.CFG_DP_CLIP_NORM in conf:
        # DP-SGD's per-example gradients bypass the hook, and Δc_i would leave unclipped and unnoised.
        raise ValueError("SCAFFOLD cannot run with DP-SGD or user-level DP")
    if P.SCAFFOLD_C not in content:
        raise ValueError(f"SCAFFOLD round without the server control variate record {P.SCAFFOLD_C!r}")
    session = int(conf[P.CFG_SCAFFOLD])
    c = {k: np.asarray(v, np.float64) for k, v in deltas.from_record(content[P.SCAFFOLD_C]).items()}
    params = adapter_parameters(peft_model)
    if set(c) != set(params) or any(np.shape(c[k]) != tuple(params[k].shape) for k in c):
        raise ValueError("the server's SCAFFOLD c does not match this client's adapter tensors")
    ci = load_control_variate(context, session, c)
    for name, p in params.items():
        if p.requires_grad:
            corr = torch.from_numpy(c[name] - ci[name]).to(device=p.device, dtype=p.dtype)
            stack.callback(p.register_hook(lambda g, d=corr: g + d).remove)

    def finish(delta: State) -> tuple[State, dict]:
        k_steps, lr = int(conf[P.CFG_LOCAL_STEPS]), float(conf[P.CFG_LR])
        # c_i⁺ = c_i − c + (x − y_i)/(Kη) with x − y_i = −Δ_i, so Δc_i = c_i⁺ − c_i = −c − Δ_i/(Kη).
        dc = {k: (-c[k] - np.asarray(delta[k], np.float64) / (k_steps * lr)).astype(np.float32) for k in c}
        # c_i moves by the fp32 Δc_i the server adds (over N) to c: c stays the mean of the c_i.
        save_control_variate(context, session, {k: ci[k] + dc[k] for k in c})
        return delta, {P.SCAFFOLD_DC: deltas.to_record(dc)}

    return finish


# -- FFA-LoRA, head only and HetLoRA -----------------------------------------------------------


def is_lora(name: str) -> bool:
    """An adapter factor (lora_A or lora_B), as opposed to a task head or other trained tensor."""
    return is_lora_a(name) or is_lora_b(name)


def _freeze(peft_model, stack: ExitStack, which: Callable[[str], bool], what: str) -> Finisher:
    """Freeze the adapter tensors ``which`` selects for the round; the reply leaves them out."""
    frozen = {k: p for k, p in adapter_parameters(peft_model).items() if which(k)}
    before = {k: p.requires_grad for k, p in frozen.items()}
    for p in frozen.values():
        p.requires_grad_(False)
    stack.callback(lambda: [p.requires_grad_(before[k]) for k, p in frozen.items()])

    def finish(delta: State) -> tuple[State, dict]:
        moved = [k for k in frozen if np.any(delta[k] != 0)]
        if moved:  # e.g. a training path that ignores requires_grad
            raise RuntimeError(f"{what} changed although frozen: {moved[:3]}")
        return {k: v for k, v in delta.items() if not which(k)}, {}

    return finish


def _declare_rank(delta: State) -> tuple[State, dict]:
    return delta, {P.LORA_META: ConfigRecord({P.META_LORA_RANK: int(rank_of(delta) or 0)})}


# -- the round ------------------------------------------------------------------------------------


class RoundHooks:
    """What ``client_round`` yields: ``finish(delta) -> (delta to send, extra reply records)``."""

    def __init__(self) -> None:
        self.finishers: list[Finisher] = []

    def finish(self, delta: State) -> tuple[State, dict]:
        extra: dict = {}
        for f in self.finishers:
            delta, more = f(delta)
            extra.update(more)
        return delta, extra


def _need_content(content, what: str) -> None:
    if content is None:
        raise ValueError(f"{what} needs the train message's records: call "
                         "client_round(peft, conf, context, msg.content)")


@contextmanager
def client_round(peft_model, conf, context, content=None):
    """Set up the client behaviour a round config asks for (module docstring); undo it on exit.

    ``content``: the train message's ``RecordDict`` (extra records: SCAFFOLD's c,
    FedEx-LoRA's residual). Without any LoRA-aware key this yields no-op hooks.
    """
    hooks = RoundHooks()
    with ExitStack() as stack:
        if conf.get(P.CFG_LORA_EXACT, False):
            _need_content(content, "FedEx-LoRA")
            stack.enter_context(residual_applied(peft_model, message_residual(content)))
        if conf.get(P.CFG_FREEZE_ADAPTER, False):
            hooks.finishers.append(_freeze(peft_model, stack, is_lora, "the adapter"))
        elif conf.get(P.CFG_FREEZE_A, False):
            hooks.finishers.append(_freeze(peft_model, stack, is_lora_a, "lora_A"))
        if P.CFG_SCAFFOLD in conf:
            _need_content(content, "SCAFFOLD")
            hooks.finishers.append(_scaffold(peft_model, conf, context, content, stack))
        if conf.get(P.CFG_HETLORA, False):
            hooks.finishers.append(_declare_rank)
        yield hooks

