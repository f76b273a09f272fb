"""FFA-LoRA: freeze A at its shared initialisation, train and average only B.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
https://arxiv.org/abs/2403.12313

Per adapted module, with A_0: (r, in) the random initialisation every client
shares (the global adapter A_0), B: (out, r), scale s = alpha / r:

    client i:  W_i = W0 + s · B_i A_0          (lora_A frozen; B_i trained from B_t)
    server:    B_{t+1} = B_t + Σ_i w_i ΔB_i,   A stays A_0

Averaging is exact here: Σ_i w_i (W0 + s B_i A_0) = W0 + s (Σ_i w_i B_i) A_0,
whereas averaging A and B separately is not (mean of products ≠ product of means).
Only B (and heads) travel up: Σ out·r instead of Σ (in + out)·r values per module,
half the bytes for square projections. Under DP-SGD the noise enters B only, not
a product of two noised factors (the paper's motivation). The paper suggests a
larger alpha than for LoRA, since only half of the adapter learns.

The round config carries ``protocol.CFG_FREEZE_A``; the client half (``FreezeA``
below) freezes lora_A for the round and leaves it out of the reply. Linear LoRA layers only
(``lora_A`` / ``lora_B`` names); ``lora_embedding_A`` is not frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np
from flwr.app import ConfigRecordValues, Message

from fedge import deltas
from fedge import protocol as P
from fedge.lora_fed import adapter_parameters, is_lora_a
from strategies.base import DeltaStrategy
from strategies.client_hooks import ClientHook, Extra, Finisher, State, client_hook
from strategies.registry import register


@register("ffa-lora")
class FFALoRA(DeltaStrategy):
    """FFA-LoRA: lora_A frozen at its shared initialisation; the example-weighted mean of the B deltas."""

    name = "ffa-lora"
    aggregation = "mean"
    paper = "Sun et al. 2024, arXiv:2403.12313"
    freeze_key = P.CFG_FREEZE_A  # the round-config key that makes clients freeze (FreezeA below)

    @staticmethod
    def frozen(name: str) -> bool:
        """Whether the tensor ``name`` stays at its initialisation (and replies leave it out)."""
        return is_lora_a(name)

    def round_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {self.freeze_key: True}

    def expected_shapes(self, msg: Message) -> dict[str, tuple[int, ...]]:
        assert self.current is not None, "configure_train sets A_t first"
        return {k: np.shape(v) for k, v in self.current.items() if not self.frozen(k)}

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return deltas.weighted_mean(deltas_, weights, keys=[k for k in deltas_[0] if not self.frozen(k)])

    def server_update(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = sorted(k for k in current if not self.frozen(k) and k not in aggregate)
        if missing:
            raise ValueError(f"aggregate lacks trained tensors {missing[:3]}")
        step = {k: np.zeros(np.shape(v)) if self.frozen(k) else aggregate[k] for k, v in current.items()}
        return deltas.apply_delta(current, step)


# -- client half ------------------------------------------------------------------------------


def freeze(peft_model: Any, stack: ExitStack, which: Callable[[str], bool], what: str) -> Finisher:
    """Freeze the adapter tensors ``which`` selects for the round (restored through ``stack``);
    the finisher leaves them out of the reply and refuses a round in which one moved."""
    frozen = {k: p for k, p in adapter_parameters(peft_model).items() if which(k)}
    before = {k: p.requires_grad for k, p in frozen.items()}
    for p in frozen.values():
        p.requires_grad_(False)
    stack.callback(lambda: [p.requires_grad_(before[k]) for k, p in frozen.items()])

    def finish(delta: State, metrics: Any) -> tuple[State, Extra]:
        moved = [k for k in frozen if k in delta and np.any(delta[k] != 0)]
        if moved:  # e.g. a training path that ignores requires_grad
            raise RuntimeError(f"{what} changed although frozen: {moved[:3]}")
        return {k: v for k, v in delta.items() if not which(k)}, {}

    return finish


@client_hook
class FreezeA(ClientHook):
    """FFA-LoRA's client: lora_A frozen for the round; the reply omits it."""

    key = P.CFG_FREEZE_A
    order = 20
    strategy: type[FFALoRA] = FFALoRA  # whose ``frozen`` rule the client applies
    what = "lora_A"

    @classmethod
    def enter(cls, peft_model: Any, conf: Any, context: Any, content: Any, stack: ExitStack) -> Finisher:
        return freeze(peft_model, stack, cls.strategy.frozen, cls.what)
