"""Device-side model store: verify, install atomically, keep the previous version, roll back.

Layout of ``store_dir``::

    versions/<version>/     installed artifacts (the current one and the previous one)
    current                 JSON {"version": v, "previous": p | null, "highest": h}, replaced atomically
    .lock                   flock held during install / rollback
    .incoming-*/            an install in progress (removed on failure)

``install`` first checks the *source* without reading any payload byte: its directory
listing (1), then the signature over ``manifest.json`` read once with a size cap (2-3);
only a manifest the trusted key signed makes it copy anything, and then only the files
it lists, each read up to its listed size (a larger file is refused mid-copy), after
checking that their total fits ``max_bytes`` and the free space [size]. Stale
``.incoming-*`` copies left by a killed install are removed first (the lock proves no
install is running). It then verifies the *copy* (so what is checked is what is
installed), in this order, refusing with :class:`ArtifactRefused` (``reason`` = the
short code in brackets):

1. every file is a regular file of an allowed type (``.json``, ``.sig``, ``.safetensors``,
   ``.gguf``, ``.onnx``, ``.txt``, ``.jinja``, ``.model``, or an Ollama ``Modelfile``,
   checked as UTF-8 text and never read by fedge); pickle-based weights
   (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ...) are refused by name      [file-type]
2. ``manifest.sig`` verifies over ``manifest.json`` with the trusted key  [signature]
3. the manifest is canonical and well-formed                               [manifest]
4. its version is greater than every version ever installed here          [version]
5. adapter mode: its base hash equals ``local_base_hash`` (when given)   [base-hash]
6. the files present are exactly the files listed                          [files]
7. every file's size and sha256 match the manifest                        [hash]
8. every file parses as its type (safetensors header, GGUF magic, JSON, an ONNX
   model that ``onnx.checker`` accepts with no external data), and no
   file, whatever its name, holds a pickle stream or a zip archive (checked by
   content: pickle opcodes parsed up to STOP, zip magic)                  [format]

then renames the copy to ``versions/<v>``, fsyncs, and replaces ``current``.
A refusal leaves the store exactly as it was. "highest" never goes down, so a
replayed older artifact is refused even after a local :func:`rollback`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pickletools
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedge.export.manifest import MANIFEST, SIGNATURE, ManifestError
from fedge.export.signing import (
    MAX_MANIFEST_BYTES,
    SIGNATURE_BYTES,
    SignatureError,
    verify_manifest,
    verify_manifest_bytes,
)
from fedge.files import sha256_file

ALLOWED_SUFFIXES = (".json", ".sig", ".safetensors", ".gguf", ".onnx", ".txt", ".jinja", ".model")
ALLOWED_NAMES = ("Modelfile",)  # exact file names without an allowed suffix (text)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".dill", ".h5")
STATE = "current"
VERSIONS = "versions"
INCOMING = ".incoming-"
MAX_ARTIFACT_BYTES = 64 << 30  # default cap on the payload of one artifact (a merged 8B model in fp32 fits)
PICKLE_MAX_OPS = 1_000_000  # a stream that parses this far as pickle opcodes is treated as a pickle

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The store cannot do what was asked (nothing installed, nothing to roll back to)."""


class ArtifactRefused(StoreError):
    """An artifact that must not be installed; ``reason`` is a short code, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"artifact refused [{reason}]: {message}")
        self.reason = reason


# -- checks (usable on any directory) ---------------------------------------------------------


def check_file_types(artifact_dir: Path) -> list[str]:
    """Relative paths of all files; refuse links, special files and types not in the allow-list."""
    files = []
    for p in sorted(artifact_dir.rglob("*")):
        rel = p.relative_to(artifact_dir).as_posix()
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise ArtifactRefused("file-type", f"{rel} is a symbolic link (links are never installed)")
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise ArtifactRefused("file-type", f"{rel} is not a regular file")
        suffix = p.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ArtifactRefused("file-type", f"forbidden file type {rel} (pickle-based formats are never loaded)")
        if suffix not in ALLOWED_SUFFIXES and p.name not in ALLOWED_NAMES:
            raise ArtifactRefused("file-type", f"unknown file type {rel} (allowed: {', '.join(ALLOWED_SUFFIXES)})")
        if suffix == ".sig" and rel != SIGNATURE:
            raise ArtifactRefused("file-type", f"unexpected signature file {rel}")
        files.append(rel)
    return files


class _Bounded:
    """Read-only view of an open file for ``pickletools.genops``: no read past the end, bounded lines
    (a length field of 2**63 must not become a 2**63-byte allocation)."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.f.tell()
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline(1 << 20)

    def tell(self) -> int:
        return self.f.tell()


def is_pickle(path: Path) -> bool:
    """True when the file, read from byte 0, parses as a pickle program up to its STOP opcode.

    Content, not name: ``pickletools.genops`` decodes opcodes without executing any. Any
    text or binary format fedge installs hits an unknown opcode within a few bytes
    (JSON starts with ``{``/``[``, safetensors' 8-byte length holds 0x00 bytes, GGUF's
    magic is not a program); a pickle of any protocol, including the all-ASCII protocol
    0 that is valid UTF-8 "text", reaches STOP. (``manifest.sig`` is random bytes and is
    never loaded by anything but the verifier: it is not checked.)
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            for n, (op, _, _) in enumerate(pickletools.genops(_Bounded(f, size)), 1):
                if (op.name == "STOP" and n > 1) or n >= PICKLE_MAX_OPS:  # pickle.dumps never writes a bare STOP
                    return True
        except Exception:  # noqa: BLE001 - any decoding error means "not a pickle program"
            return False
    return False


def _check_format(path: Path, rel: str) -> None:
    """Structural check of one payload file: by content for pickle/zip, by suffix for its own format."""
    suffix = path.suffix.lower()
    if is_pickle(path):
        raise ArtifactRefused("format", f"{rel} holds a pickle stream (pickle is never loaded, whatever the name)")
    with open(path, "rb") as f:
        head = f.read(16)
        size = path.stat().st_size
        if head[:4] == b"PK\x03\x04":
            raise ArtifactRefused("format", f"{rel} is a zip archive (torch.save format is never loaded)")
        if suffix == ".safetensors":
            n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
            if n <= 0 or n > size - 8:
                raise ArtifactRefused("format", f"{rel} is not a valid safetensors file (bad header length)")
            f.seek(8)
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ArtifactRefused("format", f"{rel} is not a valid safetensors file (bad header)") from None
            if not isinstance(header, dict):
                raise ArtifactRefused("format", f"{rel} is not a valid safetensors file")
        elif suffix == ".gguf":
            if head[:4] != b"GGUF":
                raise ArtifactRefused("format", f"{rel} is not a GGUF file (no GGUF magic)")
        elif suffix == ".json":
            f.seek(0)
            try:
                json.loads(f.read().decode("utf-8"))
            except ValueError:
                raise ArtifactRefused("format", f"{rel} is not valid UTF-8 JSON") from None
        elif suffix == ".onnx":
            _check_onnx(path, rel)
        elif suffix in (".txt", ".jinja") or path.name in ALLOWED_NAMES:
            f.seek(0)
            try:
                f.read().decode("utf-8")
            except UnicodeDecodeError:
                raise ArtifactRefused("format", f"{rel} is not UTF-8 text") from None


def _check_onnx(path: Path, rel: str) -> None:
    """An ``.onnx`` file must parse as an ONNX model that ``onnx.checker`` accepts, with every weight
    inside the file: external data names a path the runtime would open, outside what was signed."""
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError:
        raise ArtifactRefused("format", f"{rel} is an ONNX file and the onnx package, which checks it, is "
                                        "not installed: pip install 'fedge[onnx]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf DecodeError and the like: all mean "not ONNX"
        raise ArtifactRefused("format", f"{rel} is not a valid ONNX model ({type(err).__name__})") from None
    graphs, tensors = [model.graph], []
    while graphs:  # subgraphs (If/Loop bodies) carry initializers too
        g = graphs.pop()
        tensors += list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.HasField("t")]
        tensors += [t for n in g.node for a in n.attribute for t in a.tensors]
        graphs += [a.g for n in g.node for a in n.attribute if a.HasField("g")]
        graphs += [sub for n in g.node for a in n.attribute for sub in a.graphs]
    if any(uses_external_data(t) for t in tensors):
        raise ArtifactRefused("format", f"{rel} refers to external data files (weights must be inside the file)")
    try:
        onnx.checker.check_model(model)
    except Exception as err:  # noqa: BLE001 - ValidationError and the like
        raise ArtifactRefused("format", f"{rel} is not a valid ONNX model ({type(err).__name__})") from None


def check_files(directory: str | Path) -> list[str]:
    """Checks 1 and 8 (file types, then each file's format) on every file under ``directory``; the
    relative paths. Exporters run them before signing, so that they never write what a device refuses."""
    directory = Path(directory)
    files = check_file_types(directory)
    for rel in files:
        _check_format(directory / rel, rel)
    return files


def _verified_manifest(data: bytes, sig: bytes, trusted_public_key) -> dict[str, Any]:
    try:
        return verify_manifest_bytes(data, sig, trusted_public_key)
    except SignatureError as err:
        raise ArtifactRefused("signature", str(err)) from None
    except ManifestError as err:
        raise ArtifactRefused("manifest", str(err)) from None


def _check_claims(manifest: dict[str, Any], present: list[str], *, local_base_hash: str | None,
                  newer_than: int) -> None:
    """Checks 4-6: version, base hash, listed files == present files (no payload byte is read)."""
    version = manifest["version"]
    if version <= newer_than:
        raise ArtifactRefused("version", f"version {version} is not newer than installed version "
                                         f"{newer_than} (downgrade / replay refused)")
    if manifest["mode"] == "adapter" and local_base_hash is not None:
        want = manifest["base_model"].get("sha256")
        if want != local_base_hash:
            raise ArtifactRefused("base-hash", f"adapter was trained on base {str(want)[:16]}… "
                                               f"({manifest['base_model'].get('id')}), this device's base is "
                                               f"{local_base_hash[:16]}…")
    listed = set(manifest["files"])
    if listed & {MANIFEST, SIGNATURE}:
        raise ArtifactRefused("manifest", "the manifest lists manifest.json or manifest.sig as a payload file")
    bad_size = sorted(rel for rel, e in manifest["files"].items() if e["size"] < 0)
    if bad_size:
        raise ArtifactRefused("manifest", f"negative size for {bad_size[0]}")
    payload = set(present) - {MANIFEST, SIGNATURE}
    if payload - listed:
        raise ArtifactRefused("files", f"file not listed in the manifest: {sorted(payload - listed)[0]}")
    if listed - payload:
        raise ArtifactRefused("files", f"file listed in the manifest is missing: {sorted(listed - payload)[0]}")


def verify_artifact(
    artifact_dir: str | Path,
    *,
    trusted_public_key,
    local_base_hash: str | None = None,
    newer_than: int = 0,
) -> dict[str, Any]:
    """Run checks 1–8 of the module docstring on a directory; return the verified manifest."""
    artifact_dir = Path(artifact_dir)
    present = check_file_types(artifact_dir)
    try:
        manifest = verify_manifest(artifact_dir, trusted_public_key)
    except SignatureError as err:
        raise ArtifactRefused("signature", str(err)) from None
    except ManifestError as err:
        raise ArtifactRefused("manifest", str(err)) from None
    _check_claims(manifest, present, local_base_hash=local_base_hash, newer_than=newer_than)
    listed = set(manifest["files"])
    for rel in sorted(listed):
        entry, path = manifest["files"][rel], artifact_dir / rel
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise ArtifactRefused("hash", f"sha256 mismatch for {rel} (corrupted or tampered payload)")
    for rel in sorted(listed):
        _check_format(artifact_dir / rel, rel)
    return manifest


def verify_source(artifact_dir: str | Path, *, trusted_public_key) -> tuple[dict[str, Any], bytes, bytes]:
    """Checks 1-3 on an artifact where it lies, reading only ``manifest.json`` (capped) and
    ``manifest.sig``: (manifest, manifest bytes, signature bytes). Nothing is copied yet."""
    artifact_dir = Path(artifact_dir)
    present = check_file_types(artifact_dir)
    if MANIFEST not in present:
        raise ArtifactRefused("manifest", f"{artifact_dir} has no manifest.json")
    if SIGNATURE not in present:
        raise ArtifactRefused("signature", "artifact has no manifest.sig (unsigned artifact)")
    data, sig = _read_capped(artifact_dir / MANIFEST, MAX_MANIFEST_BYTES), \
        _read_capped(artifact_dir / SIGNATURE, SIGNATURE_BYTES)
    return _verified_manifest(data, sig, trusted_public_key), data, sig


def _read_capped(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit + 1)  # one byte more: an oversized file fails the size check, unread


# -- store state ------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_state(store_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((store_dir / STATE).read_text())
    except FileNotFoundError:
        return {"version": None, "previous": None, "highest": 0}
    return state


def _write_state(store_dir: Path, state: dict[str, Any]) -> None:
    tmp = store_dir / f".{STATE}.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(state, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, store_dir / STATE)  # atomic pointer switch
    _fsync_dir(store_dir)


@contextmanager
def _locked(store_dir: Path):
    store_dir.mkdir(parents=True, exist_ok=True)
    with open(store_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _copy_listed(src: Path, dst: Path, manifest: dict[str, Any], data: bytes, sig: bytes) -> None:
    """Copy exactly the listed files (fsynced), each cut off one byte past its listed size.

    The manifest and signature written are the bytes that were verified, not a re-read.
    """
    dst.mkdir()
    _write_synced(dst / MANIFEST, data)
    _write_synced(dst / SIGNATURE, sig)
    for rel in sorted(manifest["files"]):
        size = manifest["files"][rel]["size"]
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(src / rel, os.O_RDONLY | os.O_NOFOLLOW)  # a link swapped in after the listing is refused
        with os.fdopen(fd, "rb") as fin, open(target, "xb") as fout:
            if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
                raise ArtifactRefused("file-type", f"{rel} is not a regular file")
            left = size
            while left > 0:
                chunk = fin.read(min(left, 1 << 22))
                if not chunk:
                    break
                fout.write(chunk)
                left -= len(chunk)
            if left or fin.read(1):
                raise ArtifactRefused("hash", f"size mismatch for {rel} (the manifest says {size} bytes)")
            fout.flush()
            os.fsync(fout.fileno())
    for d in sorted({t.parent for t in dst.rglob("*")} | {dst}, key=lambda x: -len(x.parts)):
        _fsync_dir(d)


def sweep_incoming(store_dir: Path) -> list[str]:
    """Remove partial copies left by an install that was killed (call with the store lock held)."""
    gone = []
    for p in store_dir.iterdir():
        if p.name.startswith(INCOMING) or (p.name.startswith(f".{STATE}.") and p.is_file()):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
            gone.append(p.name)
    return gone


def install(
    artifact_dir: str | Path,
    *,
    store_dir: str | Path,
    trusted_public_key,
    local_base_hash: str | None = None,
    max_bytes: int = MAX_ARTIFACT_BYTES,
) -> int:
    """Verify and install an artifact; return its version (see the module docstring).

    ``trusted_public_key``: the server key pinned at enrolment (PEM / hex / raw file,
    bytes, or key object). ``local_base_hash``: this device's
    ``fedge.models.base_hash`` (adapter artifacts; the runtime checks it again at load).
    ``max_bytes``: the largest payload (sum of the listed sizes) accepted.
    """
    artifact_dir, store_dir = Path(artifact_dir), Path(store_dir)
    if not (artifact_dir / MANIFEST).is_file():
        raise ArtifactRefused("manifest", f"{artifact_dir} has no manifest.json")
    with _locked(store_dir):
        gone = sweep_incoming(store_dir)
        if gone:
            log.warning("removed %d partial install(s) left in %s: %s", len(gone), store_dir, gone)
        state = _read_state(store_dir)
        # Signature and claims on the source first: an unsigned or foreign artifact costs no copy.
        manifest, data, sig = verify_source(artifact_dir, trusted_public_key=trusted_public_key)
        _check_claims(manifest, check_file_types(artifact_dir), local_base_hash=local_base_hash,
                      newer_than=int(state["highest"]))
        total = sum(e["size"] for e in manifest["files"].values())
        if total > max_bytes:
            raise ArtifactRefused("size", f"artifact payload is {total} bytes, more than the {max_bytes} allowed")
        free = shutil.disk_usage(store_dir).free
        if total > free:
            raise ArtifactRefused("size", f"artifact payload is {total} bytes, {store_dir} has {free} free")
        versions = store_dir / VERSIONS
        versions.mkdir(exist_ok=True)
        incoming = store_dir / f"{INCOMING}{uuid.uuid4().hex}"
        try:
            _copy_listed(artifact_dir, incoming, manifest, data, sig)
            manifest = verify_artifact(incoming, trusted_public_key=trusted_public_key,
                                       local_base_hash=local_base_hash, newer_than=int(state["highest"]))
            version = manifest["version"]
            final = versions / str(version)
            if final.exists():  # left by a crash before the pointer switch: never current
                shutil.rmtree(final)
            os.replace(incoming, final)
            _fsync_dir(versions)
            _write_state(store_dir, {"version": version, "previous": state["version"], "highest": version})
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        _prune(store_dir, keep={version, state["version"]})
    return version


def _prune(store_dir: Path, keep: set) -> None:
    for d in (store_dir / VERSIONS).iterdir():
        if d.name.isdigit() and int(d.name) not in keep:
            shutil.rmtree(d, ignore_errors=True)


def installed_versions(store_dir: str | Path) -> list[int]:
    d = Path(store_dir) / VERSIONS
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def current(store_dir: str | Path) -> int | None:
    """The current version, or None when nothing is installed."""
    return _read_state(Path(store_dir))["version"]


def current_dir(store_dir: str | Path) -> Path:
    """Directory of the current version; :class:`StoreError` when nothing is installed."""
    v = current(store_dir)
    if v is None:
        raise StoreError(f"no model installed in {store_dir}")
    return Path(store_dir) / VERSIONS / str(v)


def rollback(store_dir: str | Path) -> int:
    """Make the previous version current again (the current one is removed); return it.

    The high-water mark stays: the rolled-back version cannot be re-installed; the
    next install must carry a newer version.
    """
    store_dir = Path(store_dir)
    with _locked(store_dir):
        state = _read_state(store_dir)
        if state["version"] is None:
            raise StoreError(f"no model installed in {store_dir}")
        older = [v for v in installed_versions(store_dir) if v < state["version"]]
        if not older:
            raise StoreError(f"no previous version to roll back to (current is {state['version']})")
        target = older[-1]
        below = [v for v in older if v < target]
        _write_state(store_dir, {"version": target, "previous": below[-1] if below else None,
                                 "highest": state["highest"]})
        shutil.rmtree(store_dir / VERSIONS / str(state["version"]), ignore_errors=True)
    return target
