"""``DeltaStrategy``: Flower's message-based ``Strategy`` over adapter deltas.

The base class owns everything that is not the aggregation rule:

* seeded, reproducible node sampling (same seed + round -> same clients);
* train/evaluate messages carrying the global adapter A_t and the round config;
* validation of every reply before any aggregation sees it: error replies,
  base hash, encoding, tensor names / shapes / dtypes, finite values, norm bound.
  A rejected reply is logged with its reason; the round goes on with the rest
  if at least ``min_replies`` remain, else the global adapter is kept;
* A_{t+1} = server_update(A_t, aggregate(Δ_1..Δ_n, w_1..w_n)).

A new algorithm subclasses it and overrides :meth:`aggregate` (and, for server
optimisers, :meth:`server_update`); it never touches models or data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import cast

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge import deltas
from fedge import protocol as P
from fedge.privacy.ledger import RoundReleased
from strategies.nodes import NodeDirectory, NotEnoughNodes

__all__ = ["ClientUpdate", "DeltaStrategy", "NotEnoughNodes", "RoundReport", "validate_reply"]

log = logging.getLogger("fedge.strategy")

# Per-client spread of the local evaluation: metric keys "<eval key>-min", "-q25", "-q75", "-max".
SPREAD_NAMES = ("min", "q25", "q75", "max")
SPREAD_QUANTILES = (0.0, 0.25, 0.75, 1.0)


@dataclass
class ClientUpdate:
    """One accepted train reply, decoded: Δ (float64) and its metadata."""

    node_id: int
    delta: dict[str, np.ndarray]
    num_examples: float
    metrics: dict[str, float]
    norm: float


@dataclass(frozen=True)
class RoundReport:
    """What happened in one train round, as the server loop reads it: immutable (``RoundTally.freeze``)."""

    sampled: int = 0
    accepted: int = 0
    rejected: tuple[tuple[int, str], ...] = ()  # (node id, reason)
    updated: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    train_loss: float | None = None
    delta_norms: tuple[float, ...] = ()
    client_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # client name -> reply metrics
    secure: Mapping[str, int | str] | None = None  # secure aggregation: survivors, dropouts, threshold, overhead bytes


@dataclass
class RoundTally:
    """The round in progress, written only by the strategy running it (under secure aggregation the
    ``server/secagg.py`` round hands it what its stages learnt through ``record_secure``)."""

    sampled: int = 0
    accepted: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    updated: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    train_loss: float | None = None
    delta_norms: list[float] = field(default_factory=list)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    secure: dict[str, int | str] | None = None

    def freeze(self) -> RoundReport:
        """A read-only copy: later writes to the tally do not reach it, and it cannot be written."""
        return RoundReport(
            sampled=self.sampled, accepted=self.accepted, rejected=tuple(self.rejected), updated=self.updated,
            bytes_up=self.bytes_up, bytes_down=self.bytes_down, train_loss=self.train_loss,
            delta_norms=tuple(self.delta_norms),
            client_metrics=MappingProxyType({k: MappingProxyType(dict(v)) for k, v in self.client_metrics.items()}),
            secure=None if self.secure is None else MappingProxyType(dict(self.secure)))


Shapes = dict[str, tuple[int, ...]]


def validate_reply(msg: Message, *, base_hash: str, encoding: str, shapes: Shapes | Callable[[], Shapes],
                   max_norm: float | None) -> ClientUpdate:
    """Check one train reply and decode its delta; raise ``deltas.InvalidUpdate`` with the reason.

    In order: a client error, missing or mistyped records, another base model (``base_hash``;
    empty = not checked), another wire ``encoding``, a non-positive example count, tensor
    names / shapes / dtypes other than ``shapes`` in that encoding, non-finite values, and
    ‖Δ‖₂ above ``max_norm`` (None = no bound). ``shapes`` may be a function, called only
    once the reply is known to carry records (HetLoRA's depend on the rank a reply declares).
    Pure: it reads the message and its arguments only.
    """
    if msg.has_error():
        raise deltas.InvalidUpdate(f"client error: {msg.error.reason}")
    content = msg.content
    for key in (P.ARRAYS, P.METRICS, P.META):
        if key not in content:
            raise deltas.InvalidUpdate(f"reply has no {key!r} record")
    meta, metrics, wire = content[P.META], content[P.METRICS], content[P.ARRAYS]
    if not isinstance(wire, ArrayRecord) or not isinstance(metrics, MetricRecord):
        raise deltas.InvalidUpdate("reply records have the wrong types")
    if base_hash and meta.get(P.META_BASE_HASH) != base_hash:
        raise deltas.InvalidUpdate(f"base model hash {str(meta.get(P.META_BASE_HASH))[:12]} "
                                   f"!= server's {base_hash[:12]}")
    if meta.get(P.META_ENCODING) != encoding:
        raise deltas.InvalidUpdate(f"encoding {meta.get(P.META_ENCODING)!r}, expected {encoding!r}")
    num = metrics.get(P.M_NUM_EXAMPLES)
    if not isinstance(num, (int, float)) or not np.isfinite(num) or num <= 0:
        raise deltas.InvalidUpdate(f"{P.M_NUM_EXAMPLES} must be a positive number, got {num!r}")
    expected = shapes() if callable(shapes) else shapes
    deltas.validate_wire(deltas.record_layout(wire), deltas.expected_wire_layout(expected, encoding))
    delta = deltas.decode(deltas.from_record(wire), encoding)
    norm = deltas.validate_values(delta, max_norm=max_norm)
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return ClientUpdate(node_id=int(msg.metadata.src_node_id), delta=delta,
                        num_examples=float(num), metrics=clean, norm=norm)


class DeltaStrategy(Strategy):
    """Base for strategies that aggregate adapter deltas (see module docstring).

    Parameters (keyword-only, set by the server from the scenario)
    ----------
    clients_per_round : clients sampled for training each round (m).
    evaluate_clients_per_round : clients sampled for local held-out evaluation (0 = none).
    min_replies : fewest valid replies needed to update the global adapter.
    encoding : expected wire encoding of deltas (``fedge.deltas.ENCODINGS``).
    base_hash : sha256 of the base model; replies with another hash are rejected.
    max_delta_norm : reject deltas with ‖Δ‖₂ above this (None = no bound).
    seed : sampling seed.
    wait_nodes_s : how long to wait for enough nodes before failing loudly.
    """

    name = "base"
    paper = ""
    weighted = True  # whether ``aggregate`` uses the example-count weights
    # What ``aggregate`` is, declared (never probed): "mean" = Σ w_i Δ_i over the (possibly
    # norm-bounded) deltas, so a clipped, noised mean (user-level DP) or a masked sum (secure
    # aggregation) can stand in for it; "robust" = order statistics or selection (median, Krum);
    # "custom" = anything else, which neither wrapper accepts.
    aggregation = "custom"
    user_level_dp = True  # whether strategies.dp_user_level.UserLevelDP may wrap it
    # Whether the rule needs only Σ w_i Δ_i and Σ w_i (so secure aggregation can hide each Δ_i).
    # Robust rules (median, Krum, ...) and algorithms with extra per-client records set False.
    secure_aggregation = True
    # Under user-level DP which clients replied, were rejected and why depends on their data:
    # True keeps those details out of the log (counts and reasons stay in ``report`` only).
    private_report = False

    def __init__(
        self,
        *,
        clients_per_round: int,
        evaluate_clients_per_round: int = 0,
        min_replies: int = 1,
        encoding: str = "fp32",
        base_hash: str = "",
        max_delta_norm: float | None = None,
        seed: int = 0,
        wait_nodes_s: float = 300.0,
    ) -> None:
        if clients_per_round < 1:
            raise ValueError("clients_per_round must be >= 1")
        if encoding not in deltas.ENCODINGS:
            raise ValueError(f"encoding {encoding!r}; allowed: {list(deltas.ENCODINGS)}")
        self.clients_per_round = clients_per_round
        self.evaluate_clients_per_round = evaluate_clients_per_round
        self.min_replies = min_replies
        self.encoding = encoding
        self.base_hash = base_hash
        self.max_delta_norm = max_delta_norm
        self.seed = seed
        self.wait_nodes_s = wait_nodes_s
        self.current: dict[str, np.ndarray] | None = None  # A_t, set by configure_train
        self.tally = RoundTally()  # the round in progress; ``report`` is its read-only copy
        self.nodes = NodeDirectory()  # who is connected: stable names, installed versions
        # Lifetime of train/evaluate messages (the server sets it to the round timeout): a client
        # that only gets to a message after it expired skips the work instead of delaying later rounds.
        self.message_ttl: float | None = None
        # What the server loop reads or sets on every strategy; the algorithms that use them override.
        self.residual: dict[str, np.ndarray] | None = None  # FedEx-LoRA: served as W0 + s·(R + B A)
        self.last_event: RoundReleased | None = None  # this round's noised release (user-level DP), charged to the ledger
        self.cohorts: dict[int, list[str]] = {}  # round -> secret training cohort (user-level DP), checkpoint only
        # Called before a training cohort is drawn; raises BudgetExceeded past the target ε (user-level DP).
        self.release_guard: Callable[[RoundReleased], None] | None = None

    @property
    def report(self) -> RoundReport:
        """The last (or current) train round, immutable: what the server loop records."""
        return self.tally.freeze()

    # -- the one method an algorithm overrides ----------------------------------

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        """Combine client deltas into one; ``weights`` are non-negative and sum to 1."""
        raise NotImplementedError

    def server_update(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A_{t+1} from A_t and the aggregate. Default: A_t + aggregate."""
        return deltas.apply_delta(current, aggregate)

    def expected_shapes(self, msg: Message) -> dict[str, tuple[int, ...]]:
        """Names and shapes a client's delta must have (default: those of A_t)."""
        assert self.current is not None, "configure_train sets A_t first"
        return {k: v.shape for k, v in self.current.items()}

    def round_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        """Extra keys this algorithm sends to clients in the train config (e.g. FedProx μ)."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server-side algorithm state (momentum, moments...) for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)[:3]}")

    def summary(self) -> None:
        log.info("strategy %s: %d clients/round, encoding %s, min replies %d",
                 self.name, self.clients_per_round, self.encoding, self.min_replies)

    # -- sampling -----------------------------------------------------------------

    def discover(self, grid: Grid, nodes: list[int]) -> None:
        """Learn the stable names of nodes not seen before (``strategies.nodes``)."""
        self.nodes.discover(grid, nodes)

    def client_name(self, node: int) -> str:
        return self.nodes.name(node)

    def sample(self, grid: Grid, server_round: int, k: int, purpose: int) -> list[int]:
        """k distinct node ids, reproducible for (seed, round, purpose) given the client names."""
        nodes = self.connected_nodes(grid, server_round, k)
        rng = np.random.default_rng([self.seed, server_round, purpose])
        # Choose indices, not ids: node ids are uint64 and numpy would round them.
        return [nodes[int(i)] for i in rng.choice(len(nodes), size=k, replace=False)]

    def connected_nodes(self, grid: Grid, server_round: int, k: int) -> list[int]:
        """Every connected node id, sorted by client name, once at least k are connected
        (waits up to ``wait_nodes_s``, then raises NotEnoughNodes)."""
        return self.nodes.connected(grid, server_round, k, wait_s=self.wait_nodes_s)

    # -- Flower Strategy API --------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = deltas.from_record(arrays)
        nodes = self.sample(grid, server_round, self.clients_per_round, purpose=0)
        cfg = ConfigRecord({**dict(config), **self.round_config(server_round), P.CFG_ROUND: server_round})
        self.tally = RoundTally(sampled=len(nodes), bytes_down=deltas.record_bytes(arrays) * len(nodes))
        content = RecordDict({P.ARRAYS: arrays, P.CONFIG: cfg})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n, ttl=self.message_ttl)
                for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.current is None:
            raise RuntimeError("aggregate_train called before configure_train")
        updates = []
        # A fixed order (by client name) makes the floating-point sums reproducible.
        for msg in sorted(replies, key=lambda m: self.client_name(int(m.metadata.src_node_id))):
            node = int(msg.metadata.src_node_id)
            try:
                updates.append(self.decode_reply(msg))
            except deltas.InvalidUpdate as err:
                self.tally.rejected.append((node, str(err)))
                if not self.private_report:
                    log.warning("round %d: rejected reply from node %d: %s", server_round, node, err)
        rep = self.tally
        rep.accepted = len(updates)
        rep.bytes_up = int(sum(u.metrics.get(P.M_BYTES_UP, 0) for u in updates))
        rep.delta_norms = [u.norm for u in updates]
        rep.client_metrics = {self.client_name(u.node_id): u.metrics for u in updates}
        if rep.accepted < rep.sampled and not self.private_report:
            # Fewer replies than planned: the round's statistics (and any DP guarantee
            # calibrated on clients_per_round) rest on fewer clients.
            log.warning("round %d: %d of %d sampled clients contributed", server_round, rep.accepted, rep.sampled)
        n_ex = np.array([u.num_examples for u in updates], np.float64)
        metrics = MetricRecord({"accepted": rep.accepted, "rejected": len(rep.rejected)})
        losses = [(u.metrics[P.M_TRAIN_LOSS], n) for u, n in zip(updates, n_ex) if P.M_TRAIN_LOSS in u.metrics]
        if losses:  # DP-SGD clients do not report their (unprivatised) train loss
            rep.train_loss = float(np.average([x for x, _ in losses], weights=[n for _, n in losses]))
            metrics[P.M_TRAIN_LOSS] = rep.train_loss
        if rep.accepted < self.min_replies:
            log.warning("round %d: %d valid replies < min_replies %d: global adapter kept",
                        server_round, rep.accepted, self.min_replies)
            return None, metrics
        # (no replies reach here only when min_replies is 0: Poisson-sampled user-level DP releases noise alone)
        weights = n_ex / n_ex.sum() if self.weighted else np.full(len(updates), 1.0 / max(len(updates), 1))
        agg = self.aggregate([u.delta for u in updates], weights)
        self.current = self.server_update(self.current, agg)
        rep.updated = True
        return deltas.to_record(self.current), metrics

    def record_secure(self, *, rejected: Sequence[tuple[int, str]], secure: Mapping[str, int | str],
                      client_metrics: Mapping[str, Mapping[str, float]] | None = None,
                      bytes_up: int | None = None) -> None:
        """What the secure stages of this round learnt (``server/secagg.py``), before ``aggregate_secure``:
        the clients they dropped, with reasons; the protocol's counters; when it unmasked, the
        survivors' public metrics and their bytes up. The strategy stays the only writer of its tally."""
        self.tally.rejected.extend(rejected)
        self.tally.secure = dict(secure)
        if client_metrics is not None:
            self.tally.client_metrics = {k: dict(v) for k, v in client_metrics.items()}
        if bytes_up is not None:
            self.tally.bytes_up = int(bytes_up)

    def aggregate_secure(self, server_round: int, weighted_sum: dict[str, np.ndarray], *, weight_sum: float,
                         loss_sum: float, loss_weight: float, unclipped_sum: float, accepted: int,
                         ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A_{t+1} from what secure aggregation reveals: Σ w_i Δ_i, Σ w_i (and summed scalars).

        The weighted mean Σ w_i Δ_i / Σ w_i is what ``aggregate`` computes for the rules that
        allow secure aggregation; it is checked (finite, norm bound) like a single reply.
        """
        rep = self.tally
        rep.accepted = accepted
        metrics = MetricRecord({"accepted": accepted, "rejected": len(rep.rejected)})
        if loss_weight > 0:
            rep.train_loss = loss_sum / loss_weight
            metrics[P.M_TRAIN_LOSS] = rep.train_loss
        if accepted < self.min_replies:
            log.warning("round %d: %d securely aggregated replies < min_replies %d: global adapter kept",
                        server_round, accepted, self.min_replies)
            return None, metrics
        try:
            step = self.secure_step(weighted_sum, weight_sum=weight_sum, unclipped_sum=unclipped_sum,
                                    accepted=accepted)
        except deltas.InvalidUpdate as err:
            rep.rejected.append((0, f"secure aggregate: {err}"))
            log.warning("round %d: secure aggregate rejected: %s: global adapter kept", server_round, err)
            return None, metrics
        rep.delta_norms = [deltas.l2_norm(step)]
        assert self.current is not None, "configure_train sets A_t first"
        self.current = self.server_update(self.current, step)
        rep.updated = True
        return deltas.to_record(self.current), metrics

    def secure_step(self, weighted_sum: dict[str, np.ndarray], *, weight_sum: float, unclipped_sum: float,
                    accepted: int) -> dict[str, np.ndarray]:
        """What ``server_update`` gets under secure aggregation: Σ w_i Δ_i / Σ w_i, checked
        (finite, norm bound) like a single reply; raise InvalidUpdate to keep A_t."""
        if not (np.isfinite(weight_sum) and weight_sum > 0):
            raise deltas.InvalidUpdate(f"sum of weights is {weight_sum!r}")
        mean = {k: v / weight_sum for k, v in weighted_sum.items()}
        deltas.validate_values(mean, max_norm=self.max_delta_norm)
        return mean

    def decode_reply(self, msg: Message) -> ClientUpdate:
        """Validate one reply against this round's expectations (:func:`validate_reply`)."""
        return validate_reply(msg, base_hash=self.base_hash, encoding=self.encoding,
                              shapes=lambda: self.expected_shapes(msg), max_norm=self.max_delta_norm)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.evaluate_clients_per_round <= 0:
            return []
        nodes = self.sample(grid, server_round, self.evaluate_clients_per_round, purpose=1)
        cfg = ConfigRecord({**dict(config), P.CFG_ROUND: server_round})
        content = RecordDict({P.ARRAYS: arrays, P.CONFIG: cfg})
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n, ttl=self.message_ttl)
                for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows = []
        for msg in replies:
            if msg.has_error() or P.METRICS not in msg.content:
                log.warning("round %d: evaluation failed on node %d: %s", server_round,
                            msg.metadata.src_node_id, msg.error.reason if msg.has_error() else "no metrics")
                continue
            m = cast(MetricRecord, msg.content[P.METRICS])  # the reply's metrics record (fedge.protocol)
            n = m.get(P.M_NUM_EXAMPLES, 0)
            if isinstance(n, (int, float)) and n > 0 and np.isfinite(m.get(P.M_EVAL_LOSS, np.nan)):
                rows.append(m)
        if not rows:
            return None
        w = np.array([r[P.M_NUM_EXAMPLES] for r in rows], np.float64)
        out = MetricRecord({P.M_EVAL_LOSS: float(np.average([r[P.M_EVAL_LOSS] for r in rows], weights=w)),
                            "clients": len(rows)})
        keys = [P.M_EVAL_LOSS] + ([P.M_EVAL_ACC] if all(P.M_EVAL_ACC in r for r in rows) else [])
        if P.M_EVAL_ACC in keys:
            out[P.M_EVAL_ACC] = float(np.average([r[P.M_EVAL_ACC] for r in rows], weights=w))
        for key in keys:  # the spread across clients, each client counted once (not by examples)
            q = np.quantile(np.array([r[key] for r in rows], np.float64), SPREAD_QUANTILES)
            out.update({f"{key}-{name}": float(v) for name, v in zip(SPREAD_NAMES, q)})
        return out
