"""Client side of secure aggregation (protocol and math in ``fedge/secagg.py``).

One round is four messages (``fedge/protocol.py``, ``SA_*``). Between them the
client keeps its secrets in the node's Flower ``Context.state`` (which the simulation
engine and the SuperNode keep per node for the whole run), never on the wire:

1. setup:   fresh X25519 pairs (c: share encryption, s: pair masks) -> public keys
2. share:   fresh self-mask seed b; Shamir shares of b and s_sk for itself and each
            neighbour, each encrypted to its holder -> ciphertexts
3. train:   train as usual, then send y = fixed(w·Δ, scalars) + masks (only pair masks
            with neighbours whose shares arrived: the server could not remove others)
4. unmask:  for each neighbour, the b share if it survived or the s_sk share if it
            dropped; never both for one client, and nothing if too few survived
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedge import deltas
from fedge import protocol as P
from fedge import secagg as S

STATE = "secagg-state"  # key in Context.state


class SecAggRefused(RuntimeError):
    """The client will not go on with this round of the protocol (reason in the message)."""


def _state(context: Context, round_id: bytes) -> ConfigRecord:
    st = context.state.get(STATE)
    if st is None or bytes(st[P.SA_ROUND_ID]) != round_id:
        raise SecAggRefused("secure aggregation: no key setup for this round on this client")
    return st


def _at_stage(msg: Message, context: Context, stage: int, refusal: str):
    """(config, round id, state, my index) if this client finished ``stage``; else refuse."""
    conf = msg.content[P.SECAGG]
    rid = bytes(conf[P.SA_ROUND_ID])
    st = _state(context, rid)
    if int(st["stage"]) != stage:
        raise SecAggRefused(f"secure aggregation: {refusal}")
    return conf, rid, st, int(st[P.SA_INDEX])


def _reply(msg: Message, fields: dict) -> Message:
    return Message(RecordDict({P.SECAGG: ConfigRecord(fields)}), reply_to=msg)


def setup(msg: Message, context: Context) -> Message:
    """Stage 1: new key pairs for this round (old state is dropped)."""
    conf = msg.content[P.SECAGG]
    c_sk, c_pk = S.keypair()
    s_sk, s_pk = S.keypair()
    context.state[STATE] = ConfigRecord({P.SA_ROUND_ID: bytes(conf[P.SA_ROUND_ID]), P.SA_INDEX: int(conf[P.SA_INDEX]),
                                         "c-sk": c_sk, "s-sk": s_sk, "stage": 1})
    return _reply(msg, {P.SA_C_PK: c_pk, P.SA_S_PK: s_pk})


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: Shamir-share b and s_sk among {self} ∪ neighbours; encrypt each share to its holder."""
    conf = msg.content[P.SECAGG]
    rid = bytes(conf[P.SA_ROUND_ID])
    st = _state(context, rid)
    me = int(st[P.SA_INDEX])
    nbrs = [int(j) for j in conf[P.SA_NEIGHBOURS]]
    c_pks, s_pks = [bytes(x) for x in conf[P.SA_C_PKS]], [bytes(x) for x in conf[P.SA_S_PKS]]
    if me in nbrs or len(set(nbrs)) != len(nbrs) or not (len(nbrs) == len(c_pks) == len(s_pks)):
        raise SecAggRefused("secure aggregation: malformed neighbour list")
    holders = sorted([me, *nbrs])
    t = int(conf[P.SA_THRESHOLD])
    if not len(holders) // 2 < t <= len(holders):
        raise SecAggRefused(f"secure aggregation: threshold {t} of {len(holders)} holders is not above half")
    b = S.new_seed()
    b_shares = S.split_secret(b, threshold=t, holders=len(holders))
    s_shares = S.split_secret(bytes(st["s-sk"]), threshold=t, holders=len(holders))
    pk_of = dict(zip(nbrs, c_pks))
    dst, cts, own = [], [], b""
    for q, holder in enumerate(holders):
        blob = S.pack_shares(b_shares[q], s_shares[q])
        if holder == me:
            own = blob  # my own share stays here
            continue
        key = S.agree(bytes(st["c-sk"]), pk_of[holder], context=S.share_context(rid, me, holder))
        dst.append(holder)
        cts.append(S.encrypt(key, blob, aad=S.share_context(rid, me, holder)))
    st.update({"b": b, "own-share": own, "nbr": nbrs, "nbr-c-pk": c_pks, "nbr-s-pk": s_pks,
               P.SA_THRESHOLD: t, "stage": 2})
    return _reply(msg, {P.SA_DST: dst, P.SA_CIPHERTEXTS: cts})


def masked_vector(msg: Message, context: Context, *, delta: dict[str, np.ndarray], weight: float,
                  loss: float | None, unclipped: float) -> ArrayRecord:
    """Stage 3 (after local training): y = fixed([w·Δ, w, w·loss, w·has_loss, bit]) + masks."""
    conf, rid, st, me = _at_stage(msg, context, 2, "train message out of order")
    srcs = [int(j) for j in conf[P.SA_SRC]]
    pk_c = dict(zip([int(j) for j in st["nbr"]], [bytes(x) for x in st["nbr-c-pk"]]))
    pk_s = dict(zip([int(j) for j in st["nbr"]], [bytes(x) for x in st["nbr-s-pk"]]))
    if not set(srcs) <= set(pk_c):
        raise SecAggRefused("secure aggregation: shares from clients that are not my neighbours")
    # Check every share now: a share that does not decrypt must not surface at unmasking time.
    for j, ct in zip(srcs, conf[P.SA_CIPHERTEXTS]):
        key = S.agree(bytes(st["c-sk"]), pk_c[j], context=S.share_context(rid, j, me))
        S.decrypt(key, bytes(ct), aad=S.share_context(rid, j, me))
    n, f = int(conf[P.SA_NUM]), int(conf[P.SA_FRACTION_BITS])
    has_loss = loss is not None and np.isfinite(loss)
    scalars = np.array([weight, weight * loss if has_loss else 0.0, weight if has_loss else 0.0, unclipped])
    flat = np.concatenate([*(weight * np.asarray(delta[k], np.float64).ravel() for k in sorted(delta)), scalars])
    x = S.encode_fixed(flat, fraction_bits=f, max_abs=S.max_abs_value(fraction_bits=f, num_clients=n))
    pair_seeds = {j: S.agree(bytes(st["s-sk"]), pk_s[j], context=S.pair_context(rid, me, j)) for j in srcs}
    y = S.mask(x, self_seed=bytes(st["b"]), pair_seeds=pair_seeds, me=me)
    st.update({P.SA_SRC: srcs, P.SA_CIPHERTEXTS: [bytes(c) for c in conf[P.SA_CIPHERTEXTS]], "stage": 3})
    return deltas.to_record({P.SA_MASKED: y})


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: b shares of survivors, s_sk shares of dropped neighbours; never both for one client."""
    conf, rid, st, me = _at_stage(msg, context, 3, "unmask request out of order (or repeated)")
    survivors = {int(j) for j in conf[P.SA_SURVIVORS]}
    dropped = {int(j) for j in conf[P.SA_DROPPED]}
    if survivors & dropped:
        raise SecAggRefused(f"secure aggregation: clients {sorted(survivors & dropped)} are said to have both "
                            "survived and dropped: revealing both secrets would unmask them")
    if me not in survivors:
        raise SecAggRefused("secure aggregation: I sent my masked vector but am not listed as a survivor")
    if len(survivors) < int(st[P.SA_THRESHOLD]):
        raise SecAggRefused(f"secure aggregation: {len(survivors)} survivors < threshold {int(st[P.SA_THRESHOLD])}")
    pk_c = dict(zip([int(j) for j in st["nbr"]], [bytes(x) for x in st["nbr-c-pk"]]))
    of, kind, shares = [], [], []
    for j, ct in [(me, None), *zip([int(s) for s in st[P.SA_SRC]], st[P.SA_CIPHERTEXTS])]:
        if j not in survivors and j not in dropped:
            continue
        if ct is None:
            blob = bytes(st["own-share"])
        else:
            key = S.agree(bytes(st["c-sk"]), pk_c[j], context=S.share_context(rid, j, me))
            blob = S.decrypt(key, bytes(ct), aad=S.share_context(rid, j, me))
        b_share, s_share = S.unpack_shares(blob)
        of.append(j)
        kind.append(0 if j in survivors else 1)
        shares.append(b_share if j in survivors else s_share)
    st["stage"] = 4  # answered once: a second request with other lists is refused
    return _reply(msg, {P.SA_SHARE_OF: of, P.SA_SHARE_KIND: kind, P.SA_SHARES: shares})
