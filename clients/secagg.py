"""Client side of secure aggregation (protocol and math in ``fedge/secagg.py``).

One round is five messages (``fedge/protocol.py``, ``SA_*``). Between them the client
keeps its secrets in the node's Flower ``Context.state`` (which the simulation engine
and the SuperNode keep per node for the whole run), never on the wire:

1. setup:   fresh X25519 pairs (c: share encryption, s: pair masks) -> public keys, signed
            with the client's Ed25519 identity key (on a device's disk when it has a state
            directory, kept across runs; else in ``Context.state`` for the run)
2. share:   check every neighbour's keys (signed by the identity key this client pinned
            for that name at first contact, all distinct); fresh self-mask seed b; Shamir
            shares of b and s_sk for itself and each neighbour, each encrypted to its holder
3. train:   refuse unless shares of at least t − 1 neighbours arrived (else y would carry
            the self mask alone, Bonawitz et al. 2017's first attack), then send
            y = fixed(w·Δ, scalars) + masks (pair masks only with those neighbours)
4. check:   sign the survivor set U4 (once per round: the server cannot show two sets)
5. unmask:  only if t signatures over the U4 it signed arrive and the server's lists name
            only neighbours whose shares it holds: for each, the b share if it survived or
            the s_sk share if it dropped — never both, once per round; then every secret
            of the round is deleted (also when the client refuses: it aborts the round)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedge import deltas
from fedge import protocol as P
from fedge import secagg as S

STATE = "secagg-state"  # key in Context.state: this round's secrets
IDENTITY = "secagg-identity"  # key in Context.state: the client's Ed25519 identity pair
PINS = "secagg-pins"  # key in Context.state: client name -> identity key first seen for it
# With a persistent state directory (a device: node config ``state-dir``) both live on disk
# instead, so the identity key and the pins outlast a run (Context.state lasts one run).
ID_FILE, PINS_FILE = "secagg-identity.key", "secagg-pins.json"
ABORTED = -1


class SecAggRefused(RuntimeError):
    """The client will not go on with this round of the protocol (reason in the message)."""


def _state(context: Context, round_id: bytes) -> ConfigRecord:
    st = context.state.get(STATE)
    if st is None or bytes(st[P.SA_ROUND_ID]) != round_id:
        raise SecAggRefused("secure aggregation: no key setup for this round on this client")
    if int(st["stage"]) == ABORTED:
        raise SecAggRefused("secure aggregation: this client aborted the round (its secrets are deleted)")
    return st


def _forget(context: Context, stage: int) -> None:
    """Delete the round's secrets (keys, b, shares); keep only what refuses a replay."""
    st = context.state[STATE]
    context.state[STATE] = ConfigRecord({P.SA_ROUND_ID: bytes(st[P.SA_ROUND_ID]), P.SA_INDEX: int(st[P.SA_INDEX]),
                                         "stage": stage})


def _aborting(stage_fn):
    """A refusal or error in a stage aborts the round: the secrets go, later requests are refused."""
    def run(msg: Message, context: Context, **kw):
        try:
            return stage_fn(msg, context, **kw)
        except Exception:
            st = context.state.get(STATE)
            if st is not None and bytes(st[P.SA_ROUND_ID]) == bytes(msg.content[P.SECAGG][P.SA_ROUND_ID]):
                _forget(context, ABORTED)
            raise
    run.__doc__, run.__name__, run.__wrapped__ = stage_fn.__doc__, stage_fn.__name__, stage_fn
    return run


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


def _identity(context: Context, key_dir: Path | None) -> tuple[bytes, bytes]:
    """This node's Ed25519 identity pair, made at its first setup: on the device's disk
    (``key_dir``: created 0600 with O_EXCL, kept across runs) or in Context.state (the run)."""
    if key_dir is None:
        rec = context.state.get(IDENTITY)
        if rec is None:
            sk, pk = S.identity_keypair()
            rec = context.state[IDENTITY] = ConfigRecord({"sk": sk, "pk": pk})
        return bytes(rec["sk"]), bytes(rec["pk"])
    path = Path(key_dir) / ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        sk = path.read_bytes()
        if len(sk) != 32:
            raise SecAggRefused(f"secure aggregation: identity key {path} is not a raw 32-byte Ed25519 key") from None
        return sk, S.identity_public(sk)
    sk, pk = S.identity_keypair()
    with os.fdopen(fd, "wb") as f:
        f.write(sk)
    return sk, pk


def _load_pins(context: Context, key_dir: Path | None) -> dict[str, bytes]:
    if key_dir is None:
        return {k: bytes(v) for k, v in (context.state.get(PINS) or {}).items()}
    path = Path(key_dir) / PINS_FILE
    return {k: bytes.fromhex(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def _save_pins(context: Context, key_dir: Path | None, pins: dict[str, bytes]) -> None:
    if key_dir is None:
        context.state[PINS] = ConfigRecord(pins)
        return
    path = Path(key_dir) / PINS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v.hex() for k, v in sorted(pins.items())}))
    os.replace(tmp, path)  # atomic: a crash never leaves half a pin file


def _refuse(why: str):
    raise SecAggRefused(f"secure aggregation: {why}")


def setup(msg: Message, context: Context, *, key_dir: Path | None = None) -> Message:
    """Stage 1: new key pairs for this round (old state is dropped), signed with the identity key."""
    conf = msg.content[P.SECAGG]
    rid, me = bytes(conf[P.SA_ROUND_ID]), int(conf[P.SA_INDEX])
    id_sk, id_pk = _identity(context, key_dir)
    c_sk, c_pk = S.keypair()
    s_sk, s_pk = S.keypair()
    context.state[STATE] = ConfigRecord({P.SA_ROUND_ID: rid, P.SA_INDEX: me, "c-sk": c_sk, "c-pk": c_pk,
                                         "s-sk": s_sk, "s-pk": s_pk, "stage": 1})
    return _reply(msg, {P.SA_C_PK: c_pk, P.SA_S_PK: s_pk, P.SA_ID_KEY: id_pk,
                        P.SA_KEY_SIG: S.sign(id_sk, S.keys_message(rid, me, c_pk, s_pk))})


@_aborting
def share_keys(msg: Message, context: Context, *, key_dir: Path | None = None) -> Message:
    """Stage 2: check the neighbours' signed keys; Shamir-share b and s_sk among {self} ∪ neighbours."""
    conf, rid, st, me = _at_stage(msg, context, 1, "share request out of order (or repeated)")
    nbrs = [int(j) for j in conf[P.SA_NEIGHBOURS]]
    names = [str(x) for x in conf[P.SA_NAMES]]
    c_pks, s_pks = [bytes(x) for x in conf[P.SA_C_PKS]], [bytes(x) for x in conf[P.SA_S_PKS]]
    id_pks, sigs = [bytes(x) for x in conf[P.SA_ID_KEYS]], [bytes(x) for x in conf[P.SA_KEY_SIGS]]
    if me in nbrs or len(set(nbrs)) != len(nbrs) or len({len(nbrs), len(names), len(c_pks), len(s_pks),
                                                          len(id_pks), len(sigs)}) != 1:
        _refuse("malformed neighbour list")
    holders = sorted([me, *nbrs])
    t = int(conf[P.SA_THRESHOLD])
    if not len(holders) // 2 < t <= len(holders):
        _refuse(f"threshold {t} of {len(holders)} holders is not above half")
    # Unique keys: a server that hands out one key pair twice (its own) could read both shares.
    x_keys = [bytes(st["c-pk"]), bytes(st["s-pk"]), *c_pks, *s_pks]
    if len(set(x_keys)) != len(x_keys) or len(set(id_pks + [_identity(context, key_dir)[1]])) != len(id_pks) + 1 \
            or len(set(names)) != len(names):
        _refuse("two clients have the same public key or name: refusing the neighbour list")
    # Authenticity: each neighbour's keys signed by the identity key pinned for its name.
    pins = _load_pins(context, key_dir)
    for j, name, c, s, vk, sig in zip(nbrs, names, c_pks, s_pks, id_pks, sigs):
        if name in pins and pins[name] != vk:
            _refuse(f"the identity key of client {name!r} (index {j}) differs from the one pinned at first "
                    "contact: refusing a substituted key")
        if not S.verify(vk, S.keys_message(rid, j, c, s), sig):
            _refuse(f"the signature on client {j}'s public keys does not verify: refusing substituted keys")
    _save_pins(context, key_dir, {**pins, **dict(zip(names, id_pks))})
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
    st.update({"b": b, "own-share": own, "nbr": nbrs, "nbr-c-pk": c_pks, "nbr-s-pk": s_pks, "nbr-id-pk": id_pks,
               P.SA_THRESHOLD: t, "stage": 2})
    return _reply(msg, {P.SA_DST: dst, P.SA_CIPHERTEXTS: cts})


@_aborting
def masked_vector(msg: Message, context: Context, *, delta: dict[str, np.ndarray], weight: float,
                  loss: float | None, unclipped: float) -> ArrayRecord:
    """Stage 3 (after local training): y = fixed([w·Δ, w, w·loss, w·has_loss, bit]) + masks."""
    conf, rid, st, me = _at_stage(msg, context, 2, "train message out of order")
    srcs = [int(j) for j in conf[P.SA_SRC]]
    t = int(st[P.SA_THRESHOLD])
    pk_c = dict(zip([int(j) for j in st["nbr"]], [bytes(x) for x in st["nbr-c-pk"]]))
    pk_s = dict(zip([int(j) for j in st["nbr"]], [bytes(x) for x in st["nbr-s-pk"]]))
    if not set(srcs) <= set(pk_c) or len(set(srcs)) != len(srcs) or len(srcs) != len(conf[P.SA_CIPHERTEXTS]):
        _refuse("shares from clients that are not my neighbours (or twice, or without a ciphertext)")
    if len(srcs) + 1 < t:  # with fewer, y would be unmasked by my own b alone
        _refuse(f"only {len(srcs)} neighbours' shares reached me, {t - 1} needed (t = {t}): refusing to send "
                "a vector whose only mask the server could ask the others to remove")
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
    st.update({P.SA_SRC: srcs, P.SA_CIPHERTEXTS: [bytes(c) for c in conf[P.SA_CIPHERTEXTS]], P.SA_NUM: n,
               "stage": 3})
    return deltas.to_record({P.SA_MASKED: y})


@_aborting
def consistency_check(msg: Message, context: Context, *, key_dir: Path | None = None) -> Message:
    """Stage 4: sign U4, the set of clients whose masked vectors the server holds — once per round."""
    conf, rid, st, me = _at_stage(msg, context, 3, "consistency check out of order (or repeated)")
    u4 = sorted({int(j) for j in conf[P.SA_SURVIVORS]})
    holders = {me, *(int(j) for j in st[P.SA_SRC])}
    if me not in u4:
        _refuse("I sent my masked vector but am not in the survivor set")
    if not all(1 <= j <= int(st[P.SA_NUM]) for j in u4):
        _refuse("the survivor set names clients outside this round")
    if len(holders & set(u4)) < int(st[P.SA_THRESHOLD]):
        _refuse(f"{len(holders & set(u4))} of my share holders survived, threshold {int(st[P.SA_THRESHOLD])}")
    st.update({"u4": u4, "stage": 4})
    return _reply(msg, {P.SA_SIGNATURE: S.sign(_identity(context, key_dir)[0], S.survivors_message(rid, u4))})


@_aborting
def unmask(msg: Message, context: Context) -> Message:
    """Stage 5: b shares of survivors, s_sk shares of dropped neighbours; never both for one client."""
    conf, rid, st, me = _at_stage(msg, context, 4, "unmask request out of order (or repeated)")
    survivors = [int(j) for j in conf[P.SA_SURVIVORS]]
    dropped = [int(j) for j in conf[P.SA_DROPPED]]
    t, u4 = int(st[P.SA_THRESHOLD]), {int(j) for j in st["u4"]}
    holding = {me, *(int(j) for j in st[P.SA_SRC])}  # clients whose shares I hold
    if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
        _refuse("a client is listed twice")
    if set(survivors) & set(dropped):
        _refuse(f"clients {sorted(set(survivors) & set(dropped))} are said to have both survived and dropped: "
                "revealing both secrets would unmask them")
    unknown = (set(survivors) | set(dropped)) - holding
    if unknown:
        _refuse(f"clients {sorted(unknown)} never sent me shares (not my neighbours, or gone before sharing)")
    if me not in survivors:
        _refuse("I sent my masked vector but am not listed as a survivor")
    if not set(survivors) <= u4 or set(dropped) & u4:
        _refuse("the lists differ from the survivor set I signed")
    if len(survivors) < t:
        _refuse(f"{len(survivors)} survivors < threshold {t}")
    # Consistency: t signatures (mine included) over the very U4 I signed, by clients I know.
    vk = dict(zip([int(j) for j in st["nbr"]], [bytes(x) for x in st["nbr-id-pk"]]))
    signed = S.survivors_message(rid, sorted(u4))
    valid = {me} | {int(j) for j, sig in zip(conf[P.SA_SIGNERS], conf[P.SA_SIGNATURES])
                    if int(j) in u4 and int(j) in vk and S.verify(vk[int(j)], signed, bytes(sig))}
    if len(valid) < t:
        _refuse(f"{len(valid)} valid signatures over the survivor set, {t} needed: the server may have shown "
                "other clients another set")
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
    _forget(context, 5)  # answered once; nothing of this round is left to reveal
    return _reply(msg, {P.SA_SHARE_OF: of, P.SA_SHARE_KIND: kind, P.SA_SHARES: shares})
