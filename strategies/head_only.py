"""Head only: the adapter stays at its shared initialisation; only the task head trains and travels.

Linear probing of the frozen backbone: Tramèr & Boneh, "Differentially Private Learning
Needs Better Features (or Much More Data)", ICLR 2021, https://arxiv.org/abs/2011.11660

Per round, with the adapter θ_A (every lora_A and lora_B) and the head θ_H:

    client i:  θ_H,i trained from θ_H,t on f(x; W0, θ_A,0)      (θ_A frozen, not sent)
    server:    θ_H,t+1 = θ_H,t + Σ_i w_i Δθ_H,i,   θ_A stays θ_A,0

Why under DP: the Gaussian mechanism adds noise of the same std to every released
coordinate, so the noise norm grows as √d while the clipped signal does not; a probe
releases the head alone (MiniLM-L6, 8 classes: 3,080 values instead of 12,296 with
FFA-LoRA r = 2) and its clients skip the backward pass through the encoder. Measured on
`dp-user` at ε = 8 (benchmarks/results/dp_utility.md): 0.9415 against 0.9420 with
FFA-LoRA r = 2, so on these features the adapter neither helps nor hurts under DP; the
probe is the baseline a private adapter has to beat.

The round config carries ``protocol.CFG_FREEZE_ADAPTER``; the client half
(``FreezeAdapter`` below) freezes both factors for the round and leaves them out of the reply. Needs a model with a
trainable head (task sequence-classification); a causal LM would train nothing.
"""

from __future__ import annotations

from flwr.app import Message

from fedge import protocol as P
from fedge.lora_fed import is_lora
from strategies.client_hooks import client_hook
from strategies.ffa_lora import FFALoRA, FreezeA
from strategies.registry import register


@register("head-only")
class HeadOnly(FFALoRA):
    """Head only (linear probe): the adapter frozen at its initialisation; the example-weighted mean of the head."""

    name = "head-only"
    paper = "Tramèr & Boneh 2021, arXiv:2011.11660"
    freeze_key = P.CFG_FREEZE_ADAPTER

    @staticmethod
    def frozen(name: str) -> bool:
        return is_lora(name)

    def expected_shapes(self, msg: Message) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(msg)
        if not shapes:
            raise ValueError("head-only: the adapter has no head to train (task sequence-classification has one)")
        return shapes


@client_hook
class FreezeAdapter(FreezeA):
    """Head-only's client: lora_A and lora_B frozen for the round; the reply carries the head."""

    key = P.CFG_FREEZE_ADAPTER
    strategy = HeadOnly
    what = "the adapter"
