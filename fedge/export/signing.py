"""Ed25519 signing of artifact manifests (``cryptography``).

Key files written by :func:`generate_keypair` in ``key_dir``::

    <name>.key      private key, PKCS#8 PEM (unencrypted unless a password is given), mode 0600
    <name>.pub      public key, SubjectPublicKeyInfo PEM (give this to devices at enrolment)
    <name>.pub.hex  the raw 32-byte public key as 64 hex characters (one line)

Signature: ``manifest.sig`` holds the 64 raw bytes of
``Ed25519.sign(manifest.json bytes)``; the manifest bytes are canonical
(:func:`fedge.export.manifest.canonical_bytes`), so this is a signature over the
canonical manifest, and through its sha256 entries over every payload file.

Fingerprint of a public key: sha256 hex of its raw 32 bytes. The manifest names
its signer's fingerprint so a verifier can say "signed by another key" apart
from "edited after signing".
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.export.manifest import MANIFEST, SIGNATURE, ManifestError, parse_manifest

log = logging.getLogger(__name__)

SIGNATURE_BYTES = 64
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KiB; never read an unbounded file before the signature


class SignatureError(ValueError):
    """A manifest whose signature is missing, malformed or does not verify."""


@dataclass(frozen=True)
class KeyPaths:
    private: Path
    public_pem: Path
    public_hex: Path
    fingerprint: str


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: Ed25519PublicKey) -> str:
    """sha256 hex of the raw 32-byte public key."""
    return hashlib.sha256(_raw_public(public)).hexdigest()


def generate_keypair(key_dir: str | Path, *, name: str = "fedge", password: bytes | None = None,
                     overwrite: bool = False) -> KeyPaths:
    """Create a new Ed25519 key pair; the private key file is created with mode 0600."""
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True)
    paths = KeyPaths(key_dir / f"{name}.key", key_dir / f"{name}.pub", key_dir / f"{name}.pub.hex", "")
    if not overwrite:
        existing = [str(p) for p in (paths.private, paths.public_pem, paths.public_hex) if p.exists()]
        if existing:
            raise FileExistsError(f"key files already exist: {existing} (pass overwrite=True to replace them)")
    key = Ed25519PrivateKey.generate()
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    if overwrite and paths.private.exists():
        paths.private.unlink()
    # O_EXCL + mode 0600 at creation: the key is never readable by others, not even briefly.
    fd = os.open(paths.private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key()
    paths.public_pem.write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    paths.public_hex.write_text(_raw_public(pub).hex() + "\n")
    return KeyPaths(paths.private, paths.public_pem, paths.public_hex, fingerprint(pub))


def load_private_key(key: str | Path | Ed25519PrivateKey, *, password: bytes | None = None) -> Ed25519PrivateKey:
    """A private key object, or a PEM file (warns if group/other can read it)."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    path = Path(key)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("private key %s has mode %o: others can read it (chmod 600 %s)", path, mode, path)
    obj = serialization.load_pem_private_key(path.read_bytes(), password=password)
    if not isinstance(obj, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return obj


def load_public_key(key: str | Path | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """A public key from: a key object, 32 raw bytes, 64 hex characters, or a PEM / .hex / raw file."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, bytes) and len(key) == 32:
        return Ed25519PublicKey.from_public_bytes(key)
    if isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdefABCDEF" for c in key):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))
    data = key if isinstance(key, bytes) else Path(key).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        obj = serialization.load_pem_public_key(data)
        if not isinstance(obj, Ed25519PublicKey):
            raise SignatureError("the public key is not an Ed25519 key")
        return obj
    text = data.strip()
    if len(text) == 64:
        try:
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode("ascii")))
        except ValueError:
            pass
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    raise SignatureError("unrecognised public key: expected PEM, 64 hex characters or 32 raw bytes")


def sign_manifest(artifact_dir: str | Path, private_key: str | Path | Ed25519PrivateKey, *,
                  password: bytes | None = None) -> Path:
    """Sign ``manifest.json`` (must be canonical) and write ``manifest.sig``; return its path."""
    artifact_dir = Path(artifact_dir)
    data = (artifact_dir / MANIFEST).read_bytes()
    parse_manifest(data)  # never sign a manifest the verifier would refuse
    sig = load_private_key(private_key, password=password).sign(data)
    out = artifact_dir / SIGNATURE
    out.write_bytes(sig)
    return out


def verify_manifest(artifact_dir: str | Path, public_key) -> dict:
    """Check ``manifest.sig`` over the raw ``manifest.json`` bytes; return the parsed manifest.

    Raises :class:`SignatureError` (wrong signer, edited manifest, bad signature
    file) or :class:`~fedge.export.manifest.ManifestError` (signed but malformed).
    Payload hashes are *not* checked here (see ``fedge.runtime.store``).
    """
    artifact_dir = Path(artifact_dir)
    try:
        data = _read_capped(artifact_dir / MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise SignatureError("artifact has no manifest.json") from None
    try:
        sig = _read_capped(artifact_dir / SIGNATURE, SIGNATURE_BYTES)
    except FileNotFoundError:
        raise SignatureError("artifact has no manifest.sig (unsigned artifact)") from None
    return verify_manifest_bytes(data, sig, public_key)


def _read_capped(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (a longer file is refused by the caller's size check)."""
    with open(path, "rb") as f:
        return f.read(limit + 1)


def verify_manifest_bytes(data: bytes, sig: bytes, public_key) -> dict:
    """:func:`verify_manifest` on bytes already read (the store verifies what it will write)."""
    trusted = load_public_key(public_key)
    if len(data) > MAX_MANIFEST_BYTES:
        raise SignatureError(f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes")
    if len(sig) != SIGNATURE_BYTES:
        raise SignatureError(f"manifest.sig must hold {SIGNATURE_BYTES} bytes, found {len(sig)}")
    try:
        trusted.verify(sig, data)
    except InvalidSignature:
        claimed = _claimed_signer(data)
        mine = fingerprint(trusted)
        if claimed is not None and claimed != mine:
            raise SignatureError(f"artifact is signed by another key (signer {claimed[:16]}…, "
                                 f"trusted key {mine[:16]}…)") from None
        raise SignatureError("signature does not verify: manifest.json was modified after signing "
                             "(or manifest.sig is corrupt)") from None
    manifest = parse_manifest(data)
    if manifest["signer"] != fingerprint(trusted):
        raise ManifestError("manifest names a signer other than the key that signed it")
    return manifest


def _claimed_signer(data: bytes) -> str | None:
    import json

    try:
        value = json.loads(data).get("signer")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
