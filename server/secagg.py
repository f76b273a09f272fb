"""Server side of secure aggregation: one training round as five message exchanges.

Why our own implementation on the message API rather than Flower's SecAggPlusWorkflow:
that workflow drives Flower's legacy ``FitIns``/``FitRes`` round (``DefaultWorkflow``,
``LegacyContext``) and owns the round loop, so it cannot sit inside fedge's round loop
(checkpoints, resume, validation, privacy ledger) nor carry our delta protocol. The
protocol below is SecAgg+ in the version of Bonawitz et al. 2017 that holds against an
active server (setup → share keys → masked input → consistency check → unmask), built
from Flower's Shamir implementation and ``cryptography`` primitives (``fedge/secagg.py``).

Stages and who survives them (U1 = sampled ⊇ U2 ⊇ U3 ⊇ U4 ⊇ U5):

    setup       U1 → U2   clients that returned two public keys signed by their identity key
    share keys  U2 → U3   clients that returned one ciphertext per neighbour in U2
    masked      U3 → U4   clients whose masked vector has the expected length and dtype
    check       U4 → U5   clients that signed U4 (each signs one set per round)
    unmask      U5        survivors return b shares of survivors, s_sk shares of U3 \\ U4,
                          each told only about its own neighbours, with its neighbours'
                          signatures over U4 (a client refuses with fewer than t)

The server then holds Σ_{i∈U4} x_i and nothing else: it rebuilds b_i for survivors
and s_sk_j for clients that dropped after sharing (to cancel their pair masks), and it
never asks for both secrets of one client. A round whose secrets cannot be rebuilt
(fewer than t shares) keeps the global adapter, like a round with too few replies.

``SecureRound`` holds one round's state with one method per stage (``setup``,
``share_keys``, ``masked_input``, ``consistency_check``, ``unmask``, then ``reconstruct``
and ``aggregate``); ``secure_train_round`` runs them in order and stops where too few
clients are left.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedge import deltas
from fedge import protocol as P
from fedge import secagg as S
from fedge.messaging import send_and_receive
from strategies.base import DeltaStrategy

log = logging.getLogger("fedge.secagg")


@dataclass(frozen=True)
class SecAggParams:
    neighbours: int  # SecAgg+ graph degree k; 0 = every other sampled client (SecAgg)
    threshold: float  # fraction (> 1/2) of a secret's holders needed to rebuild it
    fraction_bits: int  # fixed point: x·2^f in ℤ_{2^64}


def _send(grid: Grid, msgs: list[Message], timeout: float) -> dict[int, Message]:
    """node id -> reply (error replies included)."""
    return {int(r.metadata.src_node_id): r for r in send_and_receive(grid, msgs, timeout=timeout)}


def _stage(grid, nodes: dict[int, int], fields: dict[int, dict], msg_type: str, timeout: float,
           ttl: float | None, content: RecordDict | None = None) -> dict[int, Message]:
    """Send one stage to ``nodes`` (index -> node id); return index -> reply."""
    msgs = []
    for i, node in nodes.items():
        rd = RecordDict(dict(content.items())) if content is not None else RecordDict()
        rd[P.SECAGG] = ConfigRecord(fields[i])
        msgs.append(Message(content=rd, message_type=msg_type, dst_node_id=node, ttl=ttl))
    by_node = _send(grid, msgs, timeout)
    return {i: by_node[node] for i, node in nodes.items() if node in by_node}


def secure_train_round(grid: Grid, strategy: DeltaStrategy, server_round: int, arrays: ArrayRecord,
                       train_cfg: ConfigRecord, *, params: SecAggParams, timeout: float,
                       ) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Sample, run the five stages, aggregate Σ w_i Δ_i through ``strategy.aggregate_secure``.

    Stops (global adapter kept, ``(None, metrics)``) as soon as fewer than
    max(t, ``strategy.min_replies``, 2) clients are left, or when a secret cannot be rebuilt.
    """
    rnd = SecureRound(grid, strategy, server_round, arrays, train_cfg, params=params, timeout=timeout)
    for stage, run in (("setup", rnd.setup), ("share keys", rnd.share_keys),
                       ("masked input", rnd.masked_input), ("consistency check", rnd.consistency_check)):
        alive = run()
        if alive < rnd.floor:
            return rnd.too_few(stage, alive)
    rnd.unmask()
    total = rnd.reconstruct()
    if isinstance(total, dict):  # why it could not unmask
        return rnd.stopped(total)
    return rnd.aggregate(total)


class SecureRound:
    """One secure round's state, filled stage by stage (clients by index 1..n in sampled order).

    Each stage method sends one message per remaining client, keeps the clients whose reply
    passes its checks and returns how many are left; ``secure_train_round`` stops the round
    when that is below ``floor``. U2..U5 below are the survivor sets of the module docstring.
    """

    def __init__(self, grid: Grid, strategy: DeltaStrategy, server_round: int, arrays: ArrayRecord,
                 train_cfg: ConfigRecord, *, params: SecAggParams, timeout: float) -> None:
        self.grid, self.strategy, self.server_round = grid, strategy, server_round
        self.params, self.timeout = params, timeout
        self.planned = list(strategy.configure_train(server_round, arrays, train_cfg, grid))
        self.rejected: list[tuple[int, str]] = []  # (node id, reason): handed to the strategy once, at the end
        self.nodes = {i + 1: int(m.metadata.dst_node_id) for i, m in enumerate(self.planned)}  # index -> node id
        self.n, self.ttl = len(self.nodes), strategy.message_ttl
        self.content = self.planned[0].content
        self.rid = os.urandom(16)  # fresh round id: binds every key, share and signature to this round
        self.graph = S.neighbours(self.n, params.neighbours or self.n - 1, seed=int.from_bytes(self.rid[:8], "little"))
        self.t = S.threshold_for(1 + max(len(v) for v in self.graph.values()), params.threshold)
        self.floor = max(self.t, strategy.min_replies, 2)  # never unmask fewer than 2: a sum of one is the update
        self.overhead = 0  # protocol bytes up (keys, signatures, ciphertexts, shares)
        self.pks: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}  # U2: index -> (c_pk, s_pk, identity key, sig)
        self.nbrs: dict[int, list[int]] = {}  # index -> its neighbours in U2
        self.cts: dict[int, dict[int, bytes]] = {}  # U3: index -> neighbour -> ciphertext of a share for it
        self.srcs: dict[int, list[int]] = {}  # index in U3 -> the clients whose shares it holds
        self.shapes: dict[str, tuple[int, ...]] = {}  # tensor name -> shape of the expected update
        self.names: list[str] = []
        self.size = 0  # length of a masked vector: every tensor's values, then P.SA_SCALARS
        self.masked: dict[int, np.ndarray] = {}  # U4: index -> masked vector
        self.metrics: dict[int, dict] = {}
        self.u4: list[int] = []
        self.dropped: list[int] = []  # U3 \ U4: dropped after sharing
        self.u4_sigs: dict[int, bytes] = {}  # U5: index -> its signature over U4
        self.u5: list[int] = []
        self.b_shares: dict[int, list[bytes]] = {}
        self.s_shares: dict[int, list[bytes]] = {}
        self.answered = 0

    # -- helpers --------------------------------------------------------------------------

    def _send(self, indices: Iterable[int], fields: dict[int, dict], msg_type: str,
              content: RecordDict | None = None) -> dict[int, Message]:
        """Send one stage to ``indices``; return index -> reply."""
        return _stage(self.grid, {i: self.nodes[i] for i in indices}, fields, msg_type, self.timeout, self.ttl,
                      content=content)

    def _drop(self, i: int, why: str) -> None:
        self.rejected.append((self.nodes[i], f"secagg: {why}"))
        log.warning("round %d: secure aggregation dropped client %d (node %d): %s", self.server_round, i,
                    self.nodes[i], why)

    def stopped(self, secure: dict[str, int | str]) -> tuple[None, MetricRecord]:
        """End the round without an aggregate: the strategy records why (global adapter kept)."""
        self.strategy.record_secure(rejected=self.rejected, secure=secure)
        return None, MetricRecord({"accepted": 0, "rejected": len(self.strategy.report.rejected)})

    def too_few(self, stage: str, alive: int) -> tuple[None, MetricRecord]:
        """Stop the round at ``stage``: ``alive`` < floor clients left, global adapter kept."""
        log.warning("round %d: secure aggregation stopped at %s: %d clients left, %d needed: global adapter kept",
                    self.server_round, stage, alive, self.floor)
        return self.stopped({"stage_failed": stage, "survivors": alive, "threshold": self.t})

    # -- stages ---------------------------------------------------------------------------

    def setup(self) -> int:
        """Stage 1 (U1 → U2): collect each client's two public keys, signed with its identity key.

        Drops a client whose keys are not 32 bytes (X25519/Ed25519) or whose signature over
        (round id, index, c_pk, s_pk) does not verify: its peers would refuse the round.
        """
        rid = self.rid
        replies = self._send(self.nodes, {i: {P.SA_ROUND_ID: rid, P.SA_INDEX: i} for i in self.nodes},
                             P.SA_SETUP_TYPE)
        for i in self.nodes:
            sa = _record(replies.get(i))
            if isinstance(sa, str):
                self._drop(i, f"setup: {sa}")
                continue
            c, s = bytes(sa.get(P.SA_C_PK, b"")), bytes(sa.get(P.SA_S_PK, b""))
            vk, sig = bytes(sa.get(P.SA_ID_KEY, b"")), bytes(sa.get(P.SA_KEY_SIG, b""))
            if len(c) != 32 or len(s) != 32 or len(vk) != 32:
                self._drop(i, "setup: public keys are not 32-byte X25519/Ed25519 keys")
                continue
            if not S.verify(vk, S.keys_message(rid, i, c, s), sig):  # its peers would refuse the round
                self._drop(i, "setup: the signature on its public keys does not verify")
                continue
            self.pks[i] = (c, s, vk, sig)
            self.overhead += 32 * 3 + len(sig)
        return len(self.pks)

    def share_keys(self) -> int:
        """Stage 2 (U2 → U3): hand each client its neighbours' signed keys; collect encrypted shares.

        Each client is told only about its neighbours in U2 (with their names, so it can check the
        identity keys it pinned). Drops a client that does not return exactly one ciphertext per
        neighbour.
        """
        pks = self.pks
        u2 = sorted(pks)
        self.nbrs = nbrs = {i: [j for j in self.graph[i] if j in pks] for i in u2}
        fields = {i: {P.SA_ROUND_ID: self.rid, P.SA_NEIGHBOURS: nbrs[i],
                      P.SA_NAMES: [self.strategy.client_name(self.nodes[j]) for j in nbrs[i]],
                      P.SA_C_PKS: [pks[j][0] for j in nbrs[i]], P.SA_S_PKS: [pks[j][1] for j in nbrs[i]],
                      P.SA_ID_KEYS: [pks[j][2] for j in nbrs[i]], P.SA_KEY_SIGS: [pks[j][3] for j in nbrs[i]],
                      P.SA_THRESHOLD: self.t} for i in u2}
        replies = self._send(u2, fields, P.SA_SHARE_TYPE)
        for i in u2:
            sa = _record(replies.get(i))
            if isinstance(sa, str):
                self._drop(i, f"share keys: {sa}")
                continue
            dst, blobs = [int(j) for j in sa.get(P.SA_DST, [])], [bytes(b) for b in sa.get(P.SA_CIPHERTEXTS, [])]
            if sorted(dst) != nbrs[i] or len(blobs) != len(dst):
                self._drop(i, "share keys: not exactly one ciphertext per neighbour")
                continue
            self.cts[i] = dict(zip(dst, blobs))
            self.overhead += sum(len(b) for b in blobs)
        return len(self.cts)

    def masked_input(self) -> int:
        """Stage 3 (U3 → U4): train; each client masks with the neighbours whose shares reached it.

        Drops a client whose reply is missing or an error, lacks arrays/meta/metrics, was trained
        from another base model, or whose masked vector is not one uint64 vector of the expected
        length (``_masked_reply``).
        """
        cts = self.cts
        u3 = sorted(cts)
        self.srcs = srcs = {i: [j for j in u3 if i in cts[j]] for i in u3}
        fields = {i: {P.SA_ROUND_ID: self.rid, P.SA_SRC: srcs[i], P.SA_CIPHERTEXTS: [cts[j][i] for j in srcs[i]],
                      P.SA_FRACTION_BITS: self.params.fraction_bits, P.SA_NUM: self.n,
                      P.SA_WEIGHTED: bool(self.strategy.weighted)}
                  for i in u3}
        self.shapes = self.strategy.expected_shapes(self.planned[0])
        self.names = sorted(self.shapes)
        self.size = sum(int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.names) + len(P.SA_SCALARS)
        replies = self._send(u3, fields, P.SA_TRAIN_TYPE, content=self.content)
        for i in u3:
            r = replies.get(i)
            try:
                self.masked[i], self.metrics[i] = _masked_reply(r, self.strategy.base_hash, self.size)
            except deltas.InvalidUpdate as err:
                self._drop(i, f"masked input: {err}")
        return len(self.masked)

    def consistency_check(self) -> int:
        """Stage 4 (U4 → U5): every survivor signs U4, so no two clients can be shown different sets.

        A client whose signature over (round id, U4) does not verify under its identity key is
        not asked for shares, but its masked vector stays in the sum (it is not dropped).
        """
        u4 = self.u4 = sorted(self.masked)
        self.dropped = sorted(set(self.cts) - set(self.masked))
        replies = self._send(u4, {i: {P.SA_ROUND_ID: self.rid, P.SA_SURVIVORS: u4} for i in u4}, P.SA_CHECK_TYPE)
        for i in u4:
            sa = _record(replies.get(i))
            sig = b"" if isinstance(sa, str) else bytes(sa.get(P.SA_SIGNATURE, b""))
            if S.verify(self.pks[i][2], S.survivors_message(self.rid, u4), sig):
                self.u4_sigs[i] = sig
                self.overhead += len(sig)
            else:  # its masked vector stays in the sum; it just is not asked for shares
                log.warning("round %d: client %d did not sign the survivor set: %s", self.server_round, i,
                            sa if isinstance(sa, str) else "bad signature")
        return len(self.u4_sigs)

    def unmask(self) -> None:
        """Stage 5 (U5): collect b shares of survivors and s_sk shares of U3 \\ U4 from U5.

        Each client hears only about the neighbours whose shares it holds, with its neighbours'
        signatures over U4 (it refuses with fewer than t). Shares of any other client are ignored;
        a client that gives none is logged and the round goes on.
        """
        self.u5 = u5 = sorted(self.u4_sigs)
        fields = {}
        for i in u5:
            holding = set(self.srcs[i]) | {i}
            signers = [j for j in u5 if j != i and j in self.nbrs[i]]
            fields[i] = {P.SA_ROUND_ID: self.rid, P.SA_SURVIVORS: [j for j in self.u4 if j in holding],
                         P.SA_DROPPED: [j for j in self.dropped if j in holding],
                         P.SA_SIGNERS: signers, P.SA_SIGNATURES: [self.u4_sigs[j] for j in signers]}
        replies = self._send(u5, fields, P.SA_UNMASK_TYPE)
        self.b_shares = {i: [] for i in self.u4}
        self.s_shares = {j: [] for j in self.dropped}
        for i in u5:
            sa = _record(replies.get(i))
            if isinstance(sa, str):
                log.warning("round %d: client %d gave no shares: %s", self.server_round, i, sa)
                continue
            self.answered += 1
            for j, kind, share in zip(sa.get(P.SA_SHARE_OF, []), sa.get(P.SA_SHARE_KIND, []), sa.get(P.SA_SHARES, [])):
                target = self.b_shares if int(kind) == 0 else self.s_shares
                if int(j) in target:
                    target[int(j)].append(bytes(share))
                    self.overhead += len(share)

    def reconstruct(self) -> np.ndarray | dict[str, int | str]:
        """Σ_{i∈U4} y_i − PRG(b_i) − the pair masks survivors added for U3 \\ U4 (mod 2^64).

        Rebuilds each b_i and each dropped client's s_sk from t shares; with fewer, logs why,
        returns the ``stage_failed: unmask`` record instead (global adapter kept).
        """
        total = np.zeros(self.size, np.uint64)
        for i in self.u4:
            total = total + self.masked[i]
        try:
            for i in self.u4:
                total = total - S.prg(_rebuild(self.b_shares[i], self.t, f"self-mask seed of client {i}"), self.size)
            for j in self.dropped:
                sk = _rebuild(self.s_shares[j], self.t, f"mask key of dropped client {j}")
                joined = [i for i in self.u4 if j in self.srcs[i]]
                total = total - S.pair_masks_of_dropped(dropped=j, dropped_private=sk,
                                                        public_keys={i: self.pks[i][1] for i in joined},
                                                        survivors=joined, round_id=self.rid, size=self.size)
        except S.SecAggError as err:
            log.warning("round %d: secure aggregation cannot unmask (%s): global adapter kept", self.server_round, err)
            return {"stage_failed": "unmask", "survivors": len(self.u4), "threshold": self.t, "error": str(err)}
        return total

    def aggregate(self, total: np.ndarray) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the fixed-point sum into Σ w_i Δ_i per tensor and the summed scalars; report; aggregate."""
        flat = S.decode_fixed(total, fraction_bits=self.params.fraction_bits)
        sums, at = {}, 0
        for k in self.names:
            m = int(np.prod(self.shapes[k], dtype=np.int64))
            sums[k] = flat[at:at + m].reshape(self.shapes[k])
            at += m
        scal = dict(zip(P.SA_SCALARS, flat[at:].tolist()))
        u4 = self.u4
        self.strategy.record_secure(
            rejected=self.rejected,
            secure={"survivors": len(u4), "dropped_after_sharing": len(self.dropped), "threshold": self.t,
                    "neighbours": max(len(v) for v in self.graph.values()), "signed_survivor_set": len(self.u5),
                    "unmask_replies": self.answered, "overhead_bytes": self.overhead},
            client_metrics={self.strategy.client_name(self.nodes[i]): self.metrics[i] for i in u4},
            bytes_up=int(sum(m.get(P.M_BYTES_UP, 0) for m in self.metrics.values())))
        return self.strategy.aggregate_secure(self.server_round, sums, weight_sum=scal["weight"],
                                              loss_sum=scal["weighted-loss"], loss_weight=scal["loss-weight"],
                                              unclipped_sum=scal["unclipped"], accepted=len(u4))


def _record(r: Message | None) -> ConfigRecord | str:
    """A stage reply's secure-aggregation record, or why there is none."""
    if r is None:
        return "no reply"
    if r.has_error():
        return r.error.reason
    return r.content[P.SECAGG] if P.SECAGG in r.content else "reply has no secagg record"


def _masked_reply(r: Message | None, base_hash: str, size: int) -> tuple[np.ndarray, dict]:
    if r is None:
        raise deltas.InvalidUpdate("no reply before the round timeout")
    if r.has_error():
        raise deltas.InvalidUpdate(f"client error: {r.error.reason}")
    c = r.content
    if P.ARRAYS not in c or P.META not in c or P.METRICS not in c:
        raise deltas.InvalidUpdate("reply lacks arrays/meta/metrics")
    if base_hash and c[P.META].get(P.META_BASE_HASH) != base_hash:
        raise deltas.InvalidUpdate("base model hash differs from the server's")
    layout = deltas.record_layout(c[P.ARRAYS])
    if layout != {P.SA_MASKED: ((size,), "uint64")}:
        raise deltas.InvalidUpdate(f"masked vector layout {layout}, expected {{{P.SA_MASKED!r}: (({size},), 'uint64')}}")
    y = c[P.ARRAYS][P.SA_MASKED].numpy()
    return y, {k: float(v) for k, v in c[P.METRICS].items() if isinstance(v, (int, float))}


def _rebuild(shares: list[bytes], t: int, what: str) -> bytes:
    if len(shares) < t:
        raise S.SecAggError(f"{len(shares)} shares of the {what}, {t} needed")
    return S.combine_secret(shares[:t])
