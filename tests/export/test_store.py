"""Signing, manifests and the device store: every refusal leaves the installed version working.

Store under test: v1 then v2 installed (current 2, previous 1). Each bad artifact is a
copy of a good v3 with one thing wrong; after each refusal, v2 must still be current,
its files untouched and loadable.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest

from fedge.export.artifact import arrays_to_artifact, artifact_to_arrays, build_artifact
from fedge.export.manifest import (
    MANIFEST,
    SIGNATURE,
    ManifestError,
    PrivacySpent,
    canonical_bytes,
    read_manifest,
    write_manifest,
)
from fedge.export.signing import SignatureError, fingerprint, load_public_key, verify_manifest
from fedge.files import sha256_file
from fedge.models import load_base
from fedge.runtime.infer import load_installed
from fedge.runtime.store import ArtifactRefused, StoreError, current, install, installed_versions, rollback

PRIVACY = PrivacySpent(epsilon=1.7, delta=1e-5, accountant="rdp")


def _build(adapter_dir, base_dir, out, key, version, **kw):
    return build_artifact(adapter_dir, out, base_source=str(base_dir), private_key=key.private, version=version,
                          privacy=PRIVACY, metrics={"eval_loss": 1.25, "nan_metric": float("nan")}, **kw)


@pytest.fixture(scope="module")
def artifacts(llama_base_dir, llama_adapter_dir, keys, other_keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "v1": _build(llama_adapter_dir, llama_base_dir, root / "v1", keys, 1),
        "v2": _build(llama_adapter_dir, llama_base_dir, root / "v2", keys, 2),
        "v3": _build(llama_adapter_dir, llama_base_dir, root / "v3", keys, 3),
        "v3-other-signer": _build(llama_adapter_dir, llama_base_dir, root / "v3o", other_keys, 3),
    }


@pytest.fixture(scope="module")
def base_hash(llama_base_dir):
    return load_base(str(llama_base_dir)).hash


@pytest.fixture()
def store(artifacts, keys, base_hash, tmp_path):
    d = tmp_path / "store"
    for v in ("v1", "v2"):
        install(artifacts[v], store_dir=d, trusted_public_key=keys.public_pem, local_base_hash=base_hash)
    return d


def _tree_digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


# -- keys, manifest, signature ----------------------------------------------------------------


def test_keypair_files_and_formats(keys):
    assert stat.S_IMODE(keys.private.stat().st_mode) == 0o600
    pem, hexkey = load_public_key(keys.public_pem), load_public_key(keys.public_hex.read_text().strip())
    assert fingerprint(pem) == fingerprint(hexkey) == keys.fingerprint


def test_manifest_is_canonical_and_lists_every_payload_file(artifacts, keys, llama_adapter_dir):
    # Execute
    d = artifacts["v1"]
    raw = (d / MANIFEST).read_bytes()
    manifest = verify_manifest(d, keys.public_pem)
    # Assert
    assert raw == canonical_bytes(manifest) == json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert set(manifest["files"]) == {"adapter_model.safetensors", "adapter_config.json", "adapter.gguf", "Modelfile"}
    for rel, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(d / rel), "size": (d / rel).stat().st_size}
    assert manifest["privacy"] == {"epsilon": 1.7, "delta": 1e-5, "accountant": "rdp", "unit": "record"}
    assert manifest["metrics"] == {"eval_loss": 1.25, "nan_metric": None}
    assert manifest["adapter_config"]["r"] == 4 and manifest["adapter_config"]["lora_alpha"] == 8.0
    assert manifest["signer"] == keys.fingerprint and manifest["mode"] == "adapter"
    shipped_config = json.loads((d / "adapter_config.json").read_text())
    assert shipped_config["base_model_name_or_path"] == manifest["base_model"]["id"]


def test_privacy_is_checked_at_construction():
    with pytest.raises(ManifestError, match="epsilon"):
        PrivacySpent(epsilon=-1.0, delta=1e-5, accountant="rdp")
    with pytest.raises(ManifestError, match="delta"):
        PrivacySpent(epsilon=1.0, delta=1.5, accountant="rdp")


def test_wrong_key_and_edit_are_told_apart(artifacts, keys, other_keys, tmp_path):
    with pytest.raises(SignatureError, match="another key"):
        verify_manifest(artifacts["v3-other-signer"], keys.public_pem)
    edited = shutil.copytree(artifacts["v3"], tmp_path / "edited")
    manifest = read_manifest(edited)
    manifest["privacy"]["epsilon"] = 0.1  # claim a smaller ε
    write_manifest(edited, manifest)
    with pytest.raises(SignatureError, match="modified after signing"):
        verify_manifest(edited, keys.public_pem)


# -- install / refuse / rollback --------------------------------------------------------------


def test_install_round_trip_and_load(store, keys):
    assert current(store) == 2 and installed_versions(store) == [1, 2]
    model = load_installed(store)
    assert model.version == 2 and model.backend == "torch"
    assert isinstance(model.generate("hello world", max_new_tokens=4), str)
    assert not [p for p in store.iterdir() if p.name.startswith(".incoming")]


def _flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(d: Path) -> None:
    m = read_manifest(d)
    m["metrics"]["eval_loss"] = 0.01
    write_manifest(d, m)


def _pickle_file(name):
    def add(d: Path) -> None:
        (d / name).write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    return add


def _unsigned_extra(d: Path) -> None:
    (d / "extra.json").write_text("{}")


def _noncanonical(d: Path) -> None:
    m = read_manifest(d)
    (d / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True))


def _symlink(d: Path) -> None:
    os.symlink("/etc/hostname", d / "link.txt")


CASES = {
    # name: (artifact, mutation, install kwargs, reason, message fragment)
    "flipped byte in adapter safetensors": ("v3", lambda d: _flip_byte(d / "adapter_model.safetensors"), {},
                                            "hash", "sha256 mismatch for adapter_model.safetensors"),
    "flipped byte in adapter gguf": ("v3", lambda d: _flip_byte(d / "adapter.gguf", 0.9), {},
                                     "hash", "sha256 mismatch for adapter.gguf"),
    "flipped byte in adapter config": ("v3", lambda d: _flip_byte(d / "adapter_config.json", 0.2), {},
                                       "hash", "adapter_config.json"),
    "wrong signer": ("v3-other-signer", None, {}, "signature", "another key"),
    "manifest edited after signing": ("v3", _edit_manifest, {}, "signature", "modified after signing"),
    "signature removed": ("v3", lambda d: (d / SIGNATURE).unlink(), {}, "signature", "unsigned"),
    "non-canonical manifest": ("v3", _noncanonical, {}, "signature", "modified after signing"),
    "older version": ("v1", None, {}, "version", "version 1 is not newer than installed version 2"),
    "equal version": ("v2", None, {}, "version", "version 2 is not newer than installed version 2"),
    "base hash mismatch": ("v3", None, {"local_base_hash": "0" * 64}, "base-hash", "trained on base"),
    "pickle .pkl": ("v3", _pickle_file("extra.pkl"), {}, "file-type", "forbidden file type extra.pkl"),
    "pickle .bin": ("v3", _pickle_file("pytorch_model.bin"), {}, "file-type", "pickle-based"),
    "pickle .pt": ("v3", _pickle_file("adapter.pt"), {}, "file-type", "forbidden file type adapter.pt"),
    "unknown type": ("v3", lambda d: (d / "run.sh").write_text("rm -rf /"), {}, "file-type", "unknown file type"),
    "unlisted file": ("v3", _unsigned_extra, {}, "files", "not listed in the manifest: extra.json"),
    "missing file": ("v3", lambda d: (d / "adapter.gguf").unlink(), {}, "files", "missing: adapter.gguf"),
    "symlink": ("v3", _symlink, {}, "file-type", "symbolic link"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_artifact_is_refused_and_current_stays(case, store, artifacts, keys, base_hash, tmp_path):
    # Prepare
    src, mutate, kwargs, reason, fragment = CASES[case]
    bad = shutil.copytree(artifacts[src], tmp_path / "bad", symlinks=True)
    if mutate:
        mutate(bad)
    kwargs = {"local_base_hash": base_hash, **kwargs}
    before = _tree_digest(store / "versions")
    # Execute
    with pytest.raises(ArtifactRefused) as info:
        install(bad, store_dir=store, trusted_public_key=keys.public_pem, **kwargs)
    # Assert: the specific reason, and the store exactly as before
    assert info.value.reason == reason
    assert fragment in str(info.value)
    assert current(store) == 2 and installed_versions(store) == [1, 2]
    assert _tree_digest(store / "versions") == before
    assert not [p for p in store.iterdir() if p.name.startswith(".incoming")]
    assert load_installed(store).version == 2


def test_rollback_keeps_high_water_mark(store, artifacts, keys, base_hash, llama_adapter_dir, llama_base_dir,
                                        tmp_path):
    # Execute: install v3, roll back to v2
    install(artifacts["v3"], store_dir=store, trusted_public_key=keys.public_pem, local_base_hash=base_hash)
    assert current(store) == 3 and installed_versions(store) == [2, 3]  # v1 pruned, v2 kept
    assert rollback(store) == 2
    # Assert
    assert current(store) == 2 and load_installed(store).version == 2
    with pytest.raises(ArtifactRefused, match="not newer than installed version 3"):
        install(artifacts["v3"], store_dir=store, trusted_public_key=keys.public_pem)
    with pytest.raises(StoreError, match="no previous version"):
        rollback(store)
    v4 = _build(llama_adapter_dir, llama_base_dir, tmp_path / "v4", keys, 4)
    assert install(v4, store_dir=store, trusted_public_key=keys.public_pem) == 4


def test_tampering_after_install_is_caught_at_load(store):
    _flip_byte(store / "versions" / "2" / "adapter_model.safetensors")
    with pytest.raises(ArtifactRefused, match="changed since install"):
        load_installed(store, fallback=False)
    model = load_installed(store)  # the default: fall back to the previous version, say why
    assert model.version == 1 and model.fallback_from["reason"] == "hash"


def test_transport_as_arrays_round_trip(artifacts, keys, tmp_path):
    # Execute
    arrays = artifact_to_arrays(artifacts["v1"])
    received = arrays_to_artifact(arrays, tmp_path / "received")
    # Assert
    assert install(received, store_dir=tmp_path / "s", trusted_public_key=keys.public_hex) == 1
    with pytest.raises(ValueError, match="unsafe path"):
        arrays_to_artifact({"../evil.json": arrays[MANIFEST]}, tmp_path / "r2")
