"""Secure aggregation (SecAgg / SecAgg+): the math, without Flower.

Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning") with the sparse neighbour graph of Bell et al. 2020 (CCS,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead"). Honest-but-
curious or actively malicious server (the paper's version against an active adversary:
signed public keys, a consistency check on the survivor set, clients that refuse
inconsistent requests); the server learns Σ_i x_i over the clients that finished,
nothing about any single x_i, as long as fewer than ``threshold`` holders of a
client's shares collude with it and the clients' identity keys are authentic
(docs/secure-aggregation.md, "Trust").

Client i (index 1..n, its position in the round's sampled list) holds x_i ∈ ℤ_{2^64}^d
(fixed point, :func:`encode_fixed`) and sends

    y_i = x_i + PRG(b_i) + Σ_{j ∈ N(i)} ±PRG(s_ij)   (mod 2^64),  + if i < j, − if i > j

b_i: a fresh 32-byte seed; s_ij = KDF(X25519(s_sk_i, s_pk_j)) = s_ji. For j ∈ N(i)
the pair masks cancel in Σ y_i. Before masking, each client Shamir-shares b_i and
s_sk_i among N(i) ∪ {i} (threshold t, shares encrypted to their holder with an
AES-GCM key from a second X25519 pair). At unmasking, every surviving holder reveals
for each neighbour *either* its b share (neighbour survived: remove PRG(b_i)) *or*
its s_sk share (neighbour dropped after sharing: recompute and remove its pair
masks), never both — so the server never holds both secrets of one client.

PRG: AES-256 in CTR mode (a CSPRNG, unlike numpy's generators), keystream read
as little-endian uint64. Shamir: Flower's ``flwr.common.secure_aggregation.crypto.shamir``
(pycryptodome, GF(2^128) per 16-byte chunk). All arithmetic is uint64, which
wraps modulo 2^64 by itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MODULUS_BITS = 64
SEED_BYTES = 32


class SecAggError(RuntimeError):
    """The protocol cannot go on (too few shares, a value out of range, a bad ciphertext)."""


# -- fixed-point encoding ---------------------------------------------------------------

def encode_fixed(x: np.ndarray, *, fraction_bits: int, max_abs: float) -> np.ndarray:
    """float64 → ℤ_{2^64}: trunc(x·2^f) in two's complement.

    Truncation (towards 0) never increases |x_k|, so a clipped delta stays clipped.
    ``max_abs`` bounds |x_k| so that a sum of n such values cannot wrap (the caller
    passes 2^(63−f)/n); a value beyond it is refused rather than silently wrapped.
    """
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        raise SecAggError("refusing to mask a non-finite value")
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak >= max_abs:
        raise SecAggError(f"value {peak:.3g} is outside the secure-aggregation range ±{max_abs:.3g}; "
                          "lower secure_aggregation.fraction_bits")
    return np.trunc(x * 2.0**fraction_bits).astype(np.int64).view(np.uint64)


def decode_fixed(u: np.ndarray, *, fraction_bits: int) -> np.ndarray:
    """ℤ_{2^64} → float64: the signed (two's complement) value / 2^f."""
    return np.asarray(u, np.uint64).view(np.int64).astype(np.float64) / 2.0**fraction_bits


def max_abs_value(*, fraction_bits: int, num_clients: int) -> float:
    """Largest |x_k| one client may send so that n of them sum without wrapping."""
    return 2.0 ** (MODULUS_BITS - 1 - fraction_bits) / max(1, num_clients)


# -- randomness, keys, shares ------------------------------------------------------------

def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` uint64 from AES-256-CTR keyed by the 32-byte seed (zero IV: one stream per seed)."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * size)) + enc.finalize(), dtype="<u8").astype(np.uint64)


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 pair as (private raw 32 bytes, public raw 32 bytes)."""
    sk = X25519PrivateKey.generate()
    return _raw_private(sk), sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def agree(private_raw: bytes, public_raw: bytes, *, context: bytes) -> bytes:
    """32-byte key = HKDF-SHA256(X25519(sk, pk), info=context); symmetric in the two parties."""
    shared = X25519PrivateKey.from_private_bytes(private_raw).exchange(X25519PublicKey.from_public_bytes(public_raw))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)


def pair_context(round_id: bytes, i: int, j: int) -> bytes:
    """KDF context of the pair mask between indices i and j (order-free)."""
    a, b = sorted((i, j))
    return b"fedge-secagg/mask/" + round_id + f"/{a}/{b}".encode()


def share_context(round_id: bytes, src: int, dst: int) -> bytes:
    return b"fedge-secagg/share/" + round_id + f"/{src}/{dst}".encode()


def encrypt(key: bytes, plaintext: bytes, *, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, *, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except Exception as err:  # InvalidTag, short blob
        raise SecAggError(f"share ciphertext does not authenticate ({type(err).__name__})") from None


# -- authentication (the version of Bonawitz et al. 2017 secure against an active server) ---

def identity_keypair() -> tuple[bytes, bytes]:
    """A long-lived Ed25519 signing pair (private raw 32 bytes, public raw 32 bytes): the client's identity."""
    sk = Ed25519PrivateKey.generate()
    return (sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()),
            sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def identity_public(private_raw: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(private_raw: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private_raw).sign(message)


def verify(public_raw: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def keys_message(round_id: bytes, index: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What client ``index`` signs in setup: its two public keys, bound to this round and index."""
    return b"fedge-secagg/keys/" + round_id + index.to_bytes(8, "little") + c_pk + s_pk


def survivors_message(round_id: bytes, survivors: Sequence[int]) -> bytes:
    """What each survivor signs in the consistency check: the round's survivor set U4 (sorted)."""
    return b"fedge-secagg/survivors/" + round_id + b"".join(int(i).to_bytes(8, "little") for i in sorted(survivors))


def split_secret(secret: bytes, *, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares 1..holders of ``secret``; any ``threshold`` of them rebuild it."""
    from flwr.common.secure_aggregation.crypto.shamir import create_shares

    return create_shares(secret, threshold, holders)


def combine_secret(shares: Sequence[bytes]) -> bytes:
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares

    try:
        return combine_shares(list(shares))
    except ValueError as err:
        raise SecAggError(f"Shamir shares do not combine: {err}") from None


def pack_shares(b_share: bytes, s_share: bytes) -> bytes:
    return len(b_share).to_bytes(4, "little") + b_share + s_share


def unpack_shares(blob: bytes) -> tuple[bytes, bytes]:
    n = int.from_bytes(blob[:4], "little")
    return blob[4:4 + n], blob[4 + n:]


# -- the graph and the masks ---------------------------------------------------------------

def neighbours(n: int, k: int, *, seed: int) -> dict[int, list[int]]:
    """SecAgg+ graph over indices 1..n: each index joined to k others (k ≥ n−1: everyone, i.e. SecAgg).

    Indices are placed on a ring in a public, seeded random order and joined to the
    ⌈k/2⌉ nearest on each side (a Harary graph; Bell et al. use a random k-regular graph).
    """
    if k >= n - 1:
        return {i: [j for j in range(1, n + 1) if j != i] for i in range(1, n + 1)}
    half = max(1, math.ceil(k / 2))
    ring = (np.random.default_rng(seed).permutation(n) + 1).tolist()
    pos = {v: p for p, v in enumerate(ring)}
    return {i: sorted({ring[(pos[i] + s) % n] for s in range(-half, half + 1) if s} - {i})
            for i in range(1, n + 1)}


def threshold_for(holders: int, fraction: float) -> int:
    """Shares needed to rebuild a secret held by ``holders`` (the client + its neighbours).

    t = max(⌊holders/2⌋ + 1, ⌈fraction·holders⌉), at most ``holders``: above half, so an
    honest majority never hands the server both secrets of one client.
    """
    return min(holders, max(holders // 2 + 1, math.ceil(fraction * holders - 1e-9)))


def mask(x: np.ndarray, *, self_seed: bytes, pair_seeds: Mapping[int, bytes], me: int) -> np.ndarray:
    """y = x + PRG(b) + Σ_j ±PRG(s_ij) (mod 2^64); + for j > me, − for j < me."""
    y = np.asarray(x, np.uint64) + prg(self_seed, x.size)
    for j, seed in sorted(pair_seeds.items()):
        m = prg(seed, x.size)
        y = y + m if j > me else y - m
    return y


def pair_masks_of_dropped(
    *, dropped: int, dropped_private: bytes, public_keys: Mapping[int, bytes], survivors: Sequence[int],
    round_id: bytes, size: int,
) -> np.ndarray:
    """Σ over survivors i joined to ``dropped`` of the pair mask i added for it (to subtract).

    Survivor i added +PRG(s_ij) if j > i, −PRG(s_ij) if j < i, with j = dropped.
    """
    total = np.zeros(size, np.uint64)
    for i in survivors:
        seed = agree(dropped_private, public_keys[i], context=pair_context(round_id, i, dropped))
        m = prg(seed, size)
        total = total + m if dropped > i else total - m
    return total
