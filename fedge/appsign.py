"""Signed app bundles (FABs): the operator signs the bundle it submits, devices run only that.

Flower 1.42's ``flower-supernode --trusted-entities`` cannot do this for a self-hosted
SuperLink: it checks ``fab.verifications``, which the SuperLink fills only for bundles it
downloads from the Flower platform; a bundle submitted with ``flwr run <dir>`` carries
``{"valid_license": ""}`` and is refused whatever its origin. So fedge signs bundles itself:

* ``flwr run`` builds the bundle deterministically (``flwr.cli.build.build_fab_from_disk``,
  fixed zip timestamps), so the operator can compute its sha256 ``h`` before submitting.
* signature = ``Ed25519.sign(DOMAIN || h)`` with the operator's key (the same key that signs
  model artifacts; devices pin its public half with ``fedge client --trusted-key``).
  ``DOMAIN`` keeps an app signature from ever verifying as an artifact manifest signature.
* ``fedge server`` freezes the bundle first (:func:`snapshot_app`) and submits the frozen
  copy, so an edit in the live directory cannot change what was signed.
* the signature travels in the run config (``fedge-app-signature = "<fingerprint>:<hex>"``);
  the run config is not signed (it selects a scenario, it carries no code).
* the SuperNode (``fedge._supernode``) recomputes ``h`` from the bytes it received and
  verifies before the bundle is stored or any ClientApp process starts from it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.export.signing import fingerprint, load_private_key, load_public_key

RUN_APP_SIGNATURE = "fedge-app-signature"  # run-config key (declared in pyproject's [tool.flwr.app.config])
DOMAIN = b"fedge-app-bundle-v1\x00"


class AppRefused(ValueError):
    """An app bundle that is unsigned, signed by another key, or altered after signing."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # unsigned | malformed | foreign-signer | bad-signature


def fab_bytes(app_dir: str | Path) -> bytes:
    """The bundle ``flwr run <app_dir>`` uploads (Flower's own builder: the same bytes)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir).expanduser().resolve())


def sign_fab(content: bytes, private_key: str | Path | Ed25519PrivateKey) -> str:
    """``"<signer fingerprint>:<hex of Ed25519.sign(DOMAIN || sha256(content))>"``."""
    key = load_private_key(private_key)
    sig = key.sign(DOMAIN + hashlib.sha256(content).digest())
    return f"{fingerprint(key.public_key())}:{sig.hex()}"


def snapshot_app(app_dir: str | Path, dest: str | Path) -> tuple[Path, bytes]:
    """Freeze the bundle of ``app_dir`` into ``dest``; return ``(dest, bundle bytes)``.

    Sign these bytes and ``flwr run dest``: a file edited in ``app_dir`` between signing and
    submitting would otherwise change the bundle and every device would refuse it. ``dest``
    holds exactly the bundle's files, and rebuilding it gives the same bytes (checked).
    """
    import io
    import zipfile

    content = fab_bytes(app_dir)
    dest = Path(dest)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    with zipfile.ZipFile(io.BytesIO(content)) as z:
        for name in z.namelist():
            if name.startswith(".info/"):  # Flower's build writes this manifest itself
                continue
            path = (dest / name).resolve()
            if not path.is_relative_to(dest.resolve()):
                raise ValueError(f"bundle entry outside the app directory: {name}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(z.read(name))
    if fab_bytes(dest) != content:
        raise RuntimeError(f"rebuilding the bundle in {dest} does not give the same bytes (Flower's build changed?)")
    return dest, content


def sign_app(app_dir: str | Path, private_key: str | Path | Ed25519PrivateKey) -> str:
    """Sign the bundle that ``flwr run <app_dir>`` will build."""
    return sign_fab(fab_bytes(app_dir), private_key)


def verify_fab(content: bytes, signature: object, trusted_key: str | Path | bytes | Ed25519PublicKey) -> str:
    """Check ``signature`` over ``content`` against the pinned key; return the bundle's sha256 or raise AppRefused."""
    key = load_public_key(trusted_key)
    digest = hashlib.sha256(content).digest()
    if not isinstance(signature, str) or not signature:
        raise AppRefused("unsigned", f"app bundle {digest.hex()[:12]} carries no {RUN_APP_SIGNATURE}")
    signer, _, sig_hex = signature.partition(":")
    try:
        sig = bytes.fromhex(sig_hex)
    except ValueError:
        sig = b""
    if len(sig) != 64 or len(signer) != 64:
        raise AppRefused("malformed", f"{RUN_APP_SIGNATURE} is not '<64 hex fingerprint>:<128 hex signature>'")
    pinned = fingerprint(key)
    if signer != pinned:
        raise AppRefused("foreign-signer", f"app bundle {digest.hex()[:12]} is signed by key {signer[:16]}…, "
                                           f"this device trusts only {pinned[:16]}…")
    try:
        key.verify(sig, DOMAIN + digest)
    except InvalidSignature:
        raise AppRefused("bad-signature", f"app bundle {digest.hex()[:12]}: the signature does not verify "
                                          "(bundle altered after signing)") from None
    return digest.hex()
