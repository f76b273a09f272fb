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
"""

from __future__ import annotations

import logging
import os
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
    """Sample, run the four stages, aggregate Σ w_i Δ_i through ``strategy.aggregate_secure``."""
    planned = list(strategy.configure_train(server_round, arrays, train_cfg, grid))
    rep = strategy.report
    nodes = {i + 1: int(m.metadata.dst_node_id) for i, m in enumerate(planned)}  # index 1..n in sampled order
    n, ttl = len(nodes), strategy.message_ttl
    content = planned[0].content
    rid = os.urandom(16)
    graph = S.neighbours(n, params.neighbours or n - 1, seed=int.from_bytes(rid[:8], "little"))
    t = S.threshold_for(1 + max(len(v) for v in graph.values()), params.threshold)
    floor = max(t, strategy.min_replies, 2)  # never unmask fewer than 2: a sum of one is the update
    overhead = 0

    def drop(i: int, why: str) -> None:
        rep.rejected.append((nodes[i], f"secagg: {why}"))
        log.warning("round %d: secure aggregation dropped client %d (node %d): %s", server_round, i, nodes[i], why)

    def too_few(stage: str, alive: int) -> tuple[None, MetricRecord]:
        log.warning("round %d: secure aggregation stopped at %s: %d clients left, %d needed: global adapter kept",
                    server_round, stage, alive, floor)
        rep.secure = {"stage_failed": stage, "survivors": alive, "threshold": t}
        return None, MetricRecord({"accepted": 0, "rejected": len(rep.rejected)})

    # 1. setup: public keys, signed with each client's identity key
    replies = _stage(grid, nodes, {i: {P.SA_ROUND_ID: rid, P.SA_INDEX: i} for i in nodes}, P.SA_SETUP_TYPE,
                     timeout, ttl)
    pks: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}  # index -> (c_pk, s_pk, identity key, signature)
    for i in nodes:
        sa = _record(replies.get(i))
        if isinstance(sa, str):
            drop(i, f"setup: {sa}")
            continue
        c, s = bytes(sa.get(P.SA_C_PK, b"")), bytes(sa.get(P.SA_S_PK, b""))
        vk, sig = bytes(sa.get(P.SA_ID_KEY, b"")), bytes(sa.get(P.SA_KEY_SIG, b""))
        if len(c) != 32 or len(s) != 32 or len(vk) != 32:
            drop(i, "setup: public keys are not 32-byte X25519/Ed25519 keys")
            continue
        if not S.verify(vk, S.keys_message(rid, i, c, s), sig):  # its peers would refuse the round
            drop(i, "setup: the signature on its public keys does not verify")
            continue
        pks[i] = (c, s, vk, sig)
        overhead += 32 * 3 + len(sig)
    if len(pks) < floor:
        return too_few("setup", len(pks))

    # 2. share keys: each client gets its neighbours' signed public keys, returns encrypted shares
    u2 = sorted(pks)
    nbrs = {i: [j for j in graph[i] if j in pks] for i in u2}
    fields = {i: {P.SA_ROUND_ID: rid, P.SA_NEIGHBOURS: nbrs[i],
                  P.SA_NAMES: [strategy.client_name(nodes[j]) for j in nbrs[i]],
                  P.SA_C_PKS: [pks[j][0] for j in nbrs[i]], P.SA_S_PKS: [pks[j][1] for j in nbrs[i]],
                  P.SA_ID_KEYS: [pks[j][2] for j in nbrs[i]], P.SA_KEY_SIGS: [pks[j][3] for j in nbrs[i]],
                  P.SA_THRESHOLD: t} for i in u2}
    replies = _stage(grid, {i: nodes[i] for i in u2}, fields, P.SA_SHARE_TYPE, timeout, ttl)
    cts: dict[int, dict[int, bytes]] = {}
    for i in u2:
        sa = _record(replies.get(i))
        if isinstance(sa, str):
            drop(i, f"share keys: {sa}")
            continue
        dst, blobs = [int(j) for j in sa.get(P.SA_DST, [])], [bytes(b) for b in sa.get(P.SA_CIPHERTEXTS, [])]
        if sorted(dst) != nbrs[i] or len(blobs) != len(dst):
            drop(i, "share keys: not exactly one ciphertext per neighbour")
            continue
        cts[i] = dict(zip(dst, blobs))
        overhead += sum(len(b) for b in blobs)
    if len(cts) < floor:
        return too_few("share keys", len(cts))

    # 3. masked input: train, mask with the neighbours whose shares arrived
    u3 = sorted(cts)
    srcs = {i: [j for j in u3 if i in cts[j]] for i in u3}
    fields = {i: {P.SA_ROUND_ID: rid, P.SA_SRC: srcs[i], P.SA_CIPHERTEXTS: [cts[j][i] for j in srcs[i]],
                  P.SA_FRACTION_BITS: params.fraction_bits, P.SA_NUM: n, P.SA_WEIGHTED: bool(strategy.weighted)}
              for i in u3}
    shapes = strategy.expected_shapes(planned[0])
    names = sorted(shapes)
    size = sum(int(np.prod(shapes[k], dtype=np.int64)) for k in names) + len(P.SA_SCALARS)
    replies = _stage(grid, {i: nodes[i] for i in u3}, fields, P.SA_TRAIN_TYPE, timeout, ttl, content=content)
    masked: dict[int, np.ndarray] = {}
    metrics: dict[int, dict] = {}
    for i in u3:
        r = replies.get(i)
        try:
            masked[i], metrics[i] = _masked_reply(r, strategy.base_hash, size)
        except deltas.InvalidUpdate as err:
            drop(i, f"masked input: {err}")
    if len(masked) < floor:
        return too_few("masked input", len(masked))

    # 4. consistency check: every survivor signs U4 (so no two clients can be shown different sets)
    u4, dropped = sorted(masked), sorted(set(u3) - set(masked))
    replies = _stage(grid, {i: nodes[i] for i in u4}, {i: {P.SA_ROUND_ID: rid, P.SA_SURVIVORS: u4} for i in u4},
                     P.SA_CHECK_TYPE, timeout, ttl)
    u4_sigs: dict[int, bytes] = {}
    for i in u4:
        sa = _record(replies.get(i))
        sig = b"" if isinstance(sa, str) else bytes(sa.get(P.SA_SIGNATURE, b""))
        if S.verify(pks[i][2], S.survivors_message(rid, u4), sig):
            u4_sigs[i] = sig
            overhead += len(sig)
        else:  # its masked vector stays in the sum; it just is not asked for shares
            log.warning("round %d: client %d did not sign the survivor set: %s", server_round, i,
                        sa if isinstance(sa, str) else "bad signature")
    if len(u4_sigs) < floor:
        return too_few("consistency check", len(u4_sigs))

    # 5. unmask: each client hears only about the neighbours whose shares it holds
    u5 = sorted(u4_sigs)
    fields = {}
    for i in u5:
        holding = set(srcs[i]) | {i}
        signers = [j for j in u5 if j != i and j in nbrs[i]]
        fields[i] = {P.SA_ROUND_ID: rid, P.SA_SURVIVORS: [j for j in u4 if j in holding],
                     P.SA_DROPPED: [j for j in dropped if j in holding],
                     P.SA_SIGNERS: signers, P.SA_SIGNATURES: [u4_sigs[j] for j in signers]}
    replies = _stage(grid, {i: nodes[i] for i in u5}, fields, P.SA_UNMASK_TYPE, timeout, ttl)
    b_shares: dict[int, list[bytes]] = {i: [] for i in u4}
    s_shares: dict[int, list[bytes]] = {j: [] for j in dropped}
    answered = 0
    for i in u5:
        sa = _record(replies.get(i))
        if isinstance(sa, str):
            log.warning("round %d: client %d gave no shares: %s", server_round, i, sa)
            continue
        answered += 1
        for j, kind, share in zip(sa.get(P.SA_SHARE_OF, []), sa.get(P.SA_SHARE_KIND, []), sa.get(P.SA_SHARES, [])):
            target = b_shares if int(kind) == 0 else s_shares
            if int(j) in target:
                target[int(j)].append(bytes(share))
                overhead += len(share)
    total = np.zeros(size, np.uint64)
    for i in u4:
        total = total + masked[i]
    try:
        for i in u4:
            total = total - S.prg(_rebuild(b_shares[i], t, f"self-mask seed of client {i}"), size)
        for j in dropped:
            sk = _rebuild(s_shares[j], t, f"mask key of dropped client {j}")
            joined = [i for i in u4 if j in srcs[i]]
            total = total - S.pair_masks_of_dropped(dropped=j, dropped_private=sk,
                                                    public_keys={i: pks[i][1] for i in joined},
                                                    survivors=joined, round_id=rid, size=size)
    except S.SecAggError as err:
        log.warning("round %d: secure aggregation cannot unmask (%s): global adapter kept", server_round, err)
        rep.secure = {"stage_failed": "unmask", "survivors": len(u4), "threshold": t, "error": str(err)}
        return None, MetricRecord({"accepted": 0, "rejected": len(rep.rejected)})

    flat = S.decode_fixed(total, fraction_bits=params.fraction_bits)
    sums, at = {}, 0
    for k in names:
        m = int(np.prod(shapes[k], dtype=np.int64))
        sums[k] = flat[at:at + m].reshape(shapes[k])
        at += m
    scal = dict(zip(P.SA_SCALARS, flat[at:].tolist()))
    rep.secure = {"survivors": len(u4), "dropped_after_sharing": len(dropped), "threshold": t,
                  "neighbours": max(len(v) for v in graph.values()), "signed_survivor_set": len(u5),
                  "unmask_replies": answered,
                  "overhead_bytes": overhead}
    rep.client_metrics = {strategy.client_name(nodes[i]): metrics[i] for i in u4}
    rep.bytes_up = int(sum(m.get(P.M_BYTES_UP, 0) for m in metrics.values()))
    return strategy.aggregate_secure(server_round, sums, weight_sum=scal["weight"],
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
