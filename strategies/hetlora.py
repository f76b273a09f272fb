"""HetLoRA: clients train LoRA at their own ranks; the server pads, averages per rank slice, truncates.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024, https://arxiv.org/abs/2401.06432

The global adapter has rank r_max (the scenario's ``lora.r``). Client i, of rank
r_i ≤ r_max, receives the full adapter and truncates it (``fedge.lora_fed.truncate_rank``;
the client half is ``HetLoRAClient`` below):

    A^(i) = A[:r_i, :]   (r_i, in)        B^(i) = B[:, :r_i]   (out, r_i)

and trains with alpha_i = alpha·r_i/r_max, so its scale alpha_i/r_i = s is the
global one and its model W0 + s B^(i) A^(i) is exactly the first r_i rank-1 terms
Σ_{j<r_i} B[:, j] A[j, :] of the global model. It replies with ΔA^(i), ΔB^(i) of
its own shapes and declares r_i (``protocol.LORA_META``; absent = r_max). The
server zero-pads to r_max and averages each rank slice j over the clients that
have it (S_j = {i : r_i > j}), the rank-aware weighting:

    ΔA[j, :] = Σ_{i∈S_j} w_i ΔA^(i)[j, :] / Σ_{i∈S_j} w_i       (and ΔB[:, j] alike)
    A_{t+1} = A_t + ΔA,  B_{t+1} = B_t + ΔB;   a slice no client has does not move

Other tensors (heads) are averaged over all clients. Plain zero-padding (dividing
every slice by Σ_i w_i) would shrink the high-rank slices by the share of
low-rank clients; the paper's sparsity-weighted aggregation (weights ∝ ‖B_i A_i‖_F)
and its local rank self-pruning are not implemented here.

Ranks: a SuperNode's node config ``lora-rank`` (``protocol.NODE_LORA_RANK``, the
device's capacity, capped at r_max) wins; else the ``ranks`` parameter, sent in the
round config, gives partition p the rank ``ranks[p % len(ranks)]`` (simulation,
where node configs are uniform); else r_max. Evaluation messages carry no HetLoRA
key: clients evaluate the full-rank global adapter.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Message
from flwr.serverapp import Grid

from fedge import deltas
from fedge import protocol as P
from fedge.lora_fed import is_lora_a, is_lora_b, pad_rank, rank_of, truncate_rank
from strategies.base import DeltaStrategy
from strategies.client_hooks import ClientHook, Extra, Finisher, State, client_hook
from strategies.registry import register


def slice_mean(tensors: list[np.ndarray], weights: np.ndarray, axis: int) -> np.ndarray:
    """Weighted mean of 2-D tensors of different lengths along ``axis``: slice j over those that have it.

    Shorter tensors are zero-padded to the longest; a slice whose holders all have weight 0 is 0.
    """
    n = max(t.shape[axis] for t in tensors)
    num, den = 0.0, np.zeros(n)
    for t, w in zip(tensors, weights):
        widths = [(0, 0), (0, 0)]
        widths[axis] = (0, n - t.shape[axis])
        num = num + w * np.pad(t, widths)
        den[: t.shape[axis]] += w
    per_slice = np.divide(1.0, den, out=np.zeros(n), where=den > 0)
    return num * np.expand_dims(per_slice, 1 - axis)


@register("hetlora")
class HetLoRA(DeltaStrategy):
    """HetLoRA: heterogeneous client ranks; zero-padded deltas averaged per rank slice over the clients that have it.

    Parameters (keyword-only, besides the ``DeltaStrategy`` ones)
    ----------
    ranks : ranks assigned by partition id, ``ranks[partition % len(ranks)]``, where a
        node config does not set ``lora-rank``; each in 1..r_max. None = r_max.
    """

    name = "hetlora"
    secure_aggregation = False  # needs each client's update (or its extra records)
    user_level_dp = False  # extra records / rank-dependent shapes bypass the clipped, noised mean
    paper = "Cho et al. 2024, arXiv:2401.06432"

    def __init__(self, *, ranks: list[int] | None = None, **base: Any) -> None:  # forwarded to the base __init__, typed there
        super().__init__(**base)
        if ranks is not None:
            if not ranks or any(not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1 for r in ranks):
                raise ValueError(f"ranks must be a non-empty list of integers >= 1, got {ranks!r}")
            ranks = [int(r) for r in ranks]
        self.ranks = ranks

    def round_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {P.CFG_HETLORA: True, **({P.CFG_HETLORA_RANKS: list(self.ranks)} if self.ranks else {})}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        msgs = super().configure_train(server_round, arrays, config, grid)
        assert self.current is not None  # set by DeltaStrategy.configure_train
        r_max = rank_of(self.current)
        if r_max is None:
            raise ValueError("hetlora needs LoRA tensors (lora_A / lora_B) in the global adapter")
        if self.ranks and max(self.ranks) > r_max:
            raise ValueError(f"hetlora ranks {self.ranks} exceed the global adapter's rank {r_max} (lora.r)")
        return msgs

    def expected_shapes(self, msg: Message) -> dict[str, tuple[int, ...]]:
        """A_t's shapes truncated to the rank the reply declares (absent: r_max)."""
        assert self.current is not None, "configure_train sets A_t first"
        r_max = rank_of(self.current)
        r: ConfigRecordValues | None = r_max
        meta = msg.content[P.LORA_META] if P.LORA_META in msg.content else None
        if meta is not None:
            r = meta.get(P.META_LORA_RANK) if isinstance(meta, ConfigRecord) else None
            if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= (r_max or 0):
                raise deltas.InvalidUpdate(f"declared LoRA rank {r!r} is not an integer in 1..{r_max}")
        # r is None only when A_t has no LoRA tensors (configure_train refuses that); truncate_rank keeps all then.
        return {k: np.shape(v) for k, v in truncate_rank(self.current, cast(int, r)).items()}

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for k in deltas_[0]:
            ts = [np.asarray(d[k], np.float64) for d in deltas_]
            if is_lora_a(k) or is_lora_b(k):
                out[k] = slice_mean(ts, weights, axis=0 if is_lora_a(k) else 1)
            else:
                out[k] = sum(w * t for w, t in zip(weights, ts))
        return out

    def server_update(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ranks no client had this round get a zero step.
        return deltas.apply_delta(current, pad_rank(aggregate, {k: np.shape(v) for k, v in current.items()}))


# -- client half --------------------------------------------------------------------------------


def _declare_rank(delta: State, metrics: Any) -> tuple[State, Extra]:
    return delta, {P.LORA_META: ConfigRecord({P.META_LORA_RANK: int(rank_of(delta) or 0)})}


@client_hook
class HetLoRAClient(ClientHook):
    """HetLoRA's client: build the model at this client's rank r_i; the reply declares r_i."""

    key = P.CFG_HETLORA
    order = 40

    @staticmethod
    def lora(conf: Any, context: Any, r: int, alpha: float) -> tuple[int, float]:
        """r_i is, in order: the node config ``lora-rank`` (the device's capacity, deployment),
        else ``hetlora-ranks[partition-id % len]`` (the round config, simulation), else
        r_max = ``lora-r``; capped at r_max. alpha is scaled to alpha·r_i/r_max so every client
        keeps the global scale s = alpha/r_max: the truncated model is exactly the first r_i
        terms of the global one."""
        r_max, nc = r, context.node_config
        if P.NODE_LORA_RANK in nc:
            r = int(nc[P.NODE_LORA_RANK])
        elif P.CFG_HETLORA_RANKS in conf:
            ranks = [int(x) for x in conf[P.CFG_HETLORA_RANKS]]
            r = ranks[int(nc[P.NODE_PARTITION_ID]) % len(ranks)]
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        r = min(r, r_max)
        return r, alpha * r / r_max

    @staticmethod
    def enter(peft_model: Any, conf: Any, context: Any, content: Any, stack: ExitStack) -> Finisher:
        return _declare_rank
