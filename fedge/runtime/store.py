"""Device-side model store: verify, install atomically, keep the previous version, roll back.

Layout of ``store_dir``::

    versions/<version>/     installed artifacts (the current one and the previous one)
    current                 JSON {"version": v, "previous": p | null, "highest": h}, replaced atomically
    .lock                   flock held during install / rollback
    .incoming-*/            an install in progress (removed on failure)

``install`` copies the artifact into ``.incoming-*`` first and verifies the *copy*
(so what is checked is what is installed), in this order, refusing with
:class:`ArtifactRefused` (``reason`` = the short code in brackets):

1. every file is a regular file of an allowed type (``.json``, ``.sig``, ``.safetensors``,
   ``.gguf``, ``.onnx``, ``.txt``, ``.jinja``, ``.model``); pickle-based weights
   (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ...) are refused by name      [file-type]
2. ``manifest.sig`` verifies over ``manifest.json`` with the trusted key  [signature]
3. the manifest is canonical and well-formed                               [manifest]
4. its version is greater than every version ever installed here          [version]
5. adapter mode: its base hash equals ``local_base_hash`` (when given)   [base-hash]
6. the files present are exactly the files listed                          [files]
7. every file's size and sha256 match the manifest                        [hash]
8. every file parses as its type (safetensors header, GGUF magic, JSON)   [format]

then renames the copy to ``versions/<v>``, fsyncs, and replaces ``current``.
A refusal leaves the store exactly as it was. "highest" never goes down, so a
replayed older artifact is refused even after a local :func:`rollback`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedge.export.manifest import MANIFEST, SIGNATURE, ManifestError, sha256_file
from fedge.export.signing import SignatureError, verify_manifest

ALLOWED_SUFFIXES = (".json", ".sig", ".safetensors", ".gguf", ".onnx", ".txt", ".jinja", ".model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".dill", ".h5")
STATE = "current"
VERSIONS = "versions"


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
        if suffix not in ALLOWED_SUFFIXES:
            raise ArtifactRefused("file-type", f"unknown file type {rel} (allowed: {', '.join(ALLOWED_SUFFIXES)})")
        if suffix == ".sig" and rel != SIGNATURE:
            raise ArtifactRefused("file-type", f"unexpected signature file {rel}")
        files.append(rel)
    return files


def _check_format(path: Path, rel: str) -> None:
    """Cheap structural check of one payload file by its suffix."""
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(16)
        size = path.stat().st_size
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and suffix != ".safetensors":
            raise ArtifactRefused("format", f"{rel} looks like a pickle stream")
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
        elif suffix in (".txt", ".jinja"):
            f.seek(0)
            try:
                f.read().decode("utf-8")
            except UnicodeDecodeError:
                raise ArtifactRefused("format", f"{rel} is not UTF-8 text") from None
        elif head[:4] == b"PK\x03\x04":
            raise ArtifactRefused("format", f"{rel} is a zip archive (torch.save format is never loaded)")


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
    payload = set(present) - {MANIFEST, SIGNATURE}
    if payload - listed:
        raise ArtifactRefused("files", f"file not listed in the manifest: {sorted(payload - listed)[0]}")
    if listed - payload:
        raise ArtifactRefused("files", f"file listed in the manifest is missing: {sorted(listed - payload)[0]}")
    for rel in sorted(listed):
        entry, path = manifest["files"][rel], artifact_dir / rel
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise ArtifactRefused("hash", f"sha256 mismatch for {rel} (corrupted or tampered payload)")
    for rel in sorted(listed):
        _check_format(artifact_dir / rel, rel)
    return manifest


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


def _copy_verbatim(src: Path, dst: Path) -> None:
    """Copy regular files (fsynced); refuse links and special files before reading anything."""
    check_file_types(src)
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "rb") as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
            fout.flush()
            os.fsync(fout.fileno())
    for d in sorted({t.parent for t in dst.rglob("*")} | {dst}, key=lambda x: -len(x.parts)):
        _fsync_dir(d)


def install(
    artifact_dir: str | Path,
    *,
    store_dir: str | Path,
    trusted_public_key,
    local_base_hash: str | None = None,
) -> int:
    """Verify and install an artifact; return its version (see the module docstring).

    ``trusted_public_key``: the server key pinned at enrolment (PEM / hex / raw file,
    bytes, or key object). ``local_base_hash``: this device's
    ``fedge.models.base_hash`` (adapter artifacts; the runtime checks it again at load).
    """
    artifact_dir, store_dir = Path(artifact_dir), Path(store_dir)
    if not (artifact_dir / MANIFEST).is_file():
        raise ArtifactRefused("manifest", f"{artifact_dir} has no manifest.json")
    with _locked(store_dir):
        state = _read_state(store_dir)
        versions = store_dir / VERSIONS
        versions.mkdir(exist_ok=True)
        incoming = store_dir / f".incoming-{uuid.uuid4().hex}"
        try:
            _copy_verbatim(artifact_dir, incoming)
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
