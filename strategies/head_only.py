"""Head only: the adapter stays at its shared initialisation; only the task head trains and travels.

Linear probing of the frozen backbone: Tramèr & Boneh, "Differentially Private Learning
Needs Better Features (or Much More Data)", ICLR 2021, https://arxiv.org/abs/2011.11660

Per round, with the adapter θ_A (every lora_A and lora_B) and the head θ_H:

    client i:  θ_H,i trained from θ_H,t on f(x; W0, θ_A,0)      (θ_A frozen, not sent)
    server:    θ_H,t+1 = θ_H,t + Σ_i w_i Δθ_H,i,   θ_A stays θ_A,0

Why under DP: the Gaussian mechanism adds noise of the same std to every released
coordinate, so the noise norm grows as √d while the clipped signal does not. With
user-level DP on few clients the noise the server adds to B each round accumulates in
the encoder (B_t = B_0 + Σ rounds of N(0, (z S/m)²)) and moves the features the head
reads; freezing the adapter keeps the features fixed and releases only the head
(MiniLM-L6, 8 classes: 3,080 values instead of 12,296 with FFA-LoRA r = 2).
The round config carries ``protocol.CFG_FREEZE_ADAPTER``; ``fedge.lora_fed`` freezes
both factors for the round and leaves them out of the reply. Needs a model with a
trainable head (task sequence-classification); a causal LM would train nothing.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecordValues, Message

from fedge import deltas
from fedge import protocol as P
from fedge.lora_fed import is_lora
from strategies.base import DeltaStrategy
from strategies.registry import register


@register("head-only")
class HeadOnly(DeltaStrategy):
    """Head only (linear probe): the adapter frozen at its initialisation; the example-weighted mean of the head deltas."""

    name = "head-only"
    paper = "Tramèr & Boneh 2021, arXiv:2011.11660"

    def round_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {P.CFG_FREEZE_ADAPTER: True}

    def expected_shapes(self, msg: Message) -> dict[str, tuple[int, ...]]:
        assert self.current is not None, "configure_train sets A_t first"
        shapes = {k: np.shape(v) for k, v in self.current.items() if not is_lora(k)}
        if not shapes:
            raise ValueError("head-only: the adapter has no head to train (task sequence-classification has one)")
        return shapes

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        return deltas.weighted_mean(deltas_, weights, keys=[k for k in deltas_[0] if not is_lora(k)])

    def server_update(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = sorted(k for k in current if not is_lora(k) and k not in aggregate)
        if missing:
            raise ValueError(f"aggregate lacks trained tensors {missing[:3]}")
        step = {k: np.zeros(np.shape(v)) if is_lora(k) else aggregate[k] for k, v in current.items()}
        return deltas.apply_delta(current, step)
