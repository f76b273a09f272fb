"""FedEx-LoRA: exact aggregation of LoRA adapters through a residual in the frozen weights.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025, https://arxiv.org/abs/2410.09432

Averaging A and B separately is not averaging the clients' models: per module,
Σ w_i B_i A_i ≠ (Σ w_i B_i)(Σ w_i A_i). FedEx-LoRA keeps A and B as FedAvg does
and adds the difference, a residual R: (out, in), to the frozen weight. Round t,
every client starts from the same served model W0 + s(R_t + B_t A_t), s = alpha/r,
and trains A_i: (r, in), B_i: (out, r) with R_t frozen:

    client i:   W_i     = W0 + s (R_t + B_i A_i)
    server:     A_{t+1} = A_t + Σ_i w_i ΔA_i,     B_{t+1} = B_t + Σ_i w_i ΔB_i     (FedAvg)
                R_{t+1} = R_t + Σ_i w_i B_i A_i − B_{t+1} A_{t+1}
    served:     W0 + s (R_{t+1} + B_{t+1} A_{t+1})  =  Σ_i w_i W_i                 (exact)

With B_i = B_t + ΔB_i, A_i = A_t + ΔA_i and Σ w_i = 1 the mean of products is

    Σ_i w_i B_i A_i = B_t A_t + B_t ΔĀ + ΔB̄ A_t + Σ_i w_i ΔB_i ΔA_i

so ``aggregate`` needs only the deltas (it returns the means and the cross term
Σ w_i ΔB_i ΔA_i), and ``server_update`` subtracts the product of the A_{t+1}, B_{t+1}
actually stored (fp32): their rounding goes into R and never accumulates.

Wire and state. R is carried in the server state (``residual/<module>.lora_residual.weight``,
float64) and sent to clients in every train and evaluate message as the ArrayRecord
``protocol.LORA_RESIDUAL`` (fp32, (out, in) per module: dense, so this costs
Σ out·in values down per client and round, far more than the adapter). The client
(``FedExClient`` below, through ``fedge.lora_fed.residual_applied``) adds s·R to the
frozen base weight for the round and restores it bit for bit afterwards.

Serving and export: the served model is NOT the adapter alone. Evaluate it inside
``lora_fed.residual_applied(model, strategy.residual)``. The run ships R next to the PEFT
adapter (``adapter/lora_residual.safetensors``); the device export does not carry R, so
the config refuses ``export`` with this strategy.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Message
from flwr.serverapp import Grid

from fedge import deltas
from fedge import protocol as P
from fedge.lora_fed import lora_pairs, message_residual, residual_applied
from strategies.base import DeltaStrategy
from strategies.client_hooks import ClientHook, client_hook, need_content
from strategies.registry import register

CROSS = "cross/"  # aggregate keys of the term Σ_i w_i ΔB_i ΔA_i, per residual name
_STATE = "residual/"


@register("fedex-lora")
class FedExLoRA(DeltaStrategy):
    """FedEx-LoRA: FedAvg on A and B plus a residual R in the frozen weights (served model = clients' mean)."""

    name = "fedex-lora"
    secure_aggregation = False  # needs each client's update (or its extra records)
    user_level_dp = False  # extra records / rank-dependent shapes bypass the clipped, noised mean
    paper = "Singhal et al. 2024, arXiv:2410.09432"

    def __init__(self, **base: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(**base)
        self.residual: dict[str, np.ndarray] | None = None  # R per module; None before the first update

    def round_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {P.CFG_LORA_EXACT: True}

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        out = deltas.weighted_mean(deltas_, weights)
        for a, b, r in lora_pairs(deltas_[0]):
            out[CROSS + r] = sum(w * (d[b] @ d[a]) for w, d in zip(weights, deltas_))
        return out

    def server_update(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        step = {k: v for k, v in aggregate.items() if not k.startswith(CROSS)}
        new = deltas.apply_delta(current, step)
        residual = dict(self.residual or {})
        for a, b, r in lora_pairs(current):
            if CROSS + r not in aggregate:
                raise ValueError(f"aggregate lacks the cross term of {r} (aggregated by another rule?)")
            A, B = np.asarray(current[a], np.float64), np.asarray(current[b], np.float64)
            mean_product = B @ A + B @ step[a] + step[b] @ A + aggregate[CROSS + r]
            served = np.asarray(new[b], np.float64) @ np.asarray(new[a], np.float64)
            residual[r] = residual.get(r, 0.0) + mean_product - served
        self.residual = residual
        return new

    # -- R goes out with train and evaluate messages -------------------------------------

    def _attach(self, msgs: list[Message]) -> int:
        """Add R to the messages (they share one RecordDict); return the downlink bytes this adds."""
        if not (self.residual and msgs):
            return 0
        record = deltas.to_record({k: v.astype(np.float32) for k, v in self.residual.items()})
        for m in msgs:
            m.content[P.LORA_RESIDUAL] = record
        return deltas.record_bytes(record) * len(msgs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.tally.bytes_down += self._attach(msgs)
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        msgs = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._attach(msgs)
        return msgs

    # -- checkpoint ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        return {_STATE + k: v.copy() for k, v in (self.residual or {}).items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        bad = sorted(k for k in state if not k.startswith(_STATE))
        if bad:
            raise ValueError(f"fedex-lora state has only '{_STATE}<name>' keys, got {bad[:3]}")
        self.residual = {k[len(_STATE):]: np.array(v, np.float64) for k, v in state.items()} or None


@client_hook
class FedExClient(ClientHook):
    """FedEx-LoRA's client: train on W0 + s·R (the message's residual), W0 restored on exit."""

    key = P.CFG_LORA_EXACT
    order = 10  # first: every other hook and the training see the served model

    @staticmethod
    def enter(peft_model: Any, conf: Any, context: Any, content: Any, stack: ExitStack) -> None:
        need_content(content, "FedEx-LoRA")
        stack.enter_context(residual_applied(peft_model, message_residual(content)))
