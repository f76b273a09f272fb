"""Device-side doors, each shown by replaying the attack (issue 11, item 6).

Store: a signed v1 (base A) is installed; each attack then tries to get something
past ``fedge install`` / the store, or to make ``infer`` unusable. Oracles: the
store's state and files before/after, which files the installer opened (Python's
audit hook sees every ``open``), the key files' bytes and modes.
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import sys
from pathlib import Path

import pytest

from fedge.export.artifact import build_artifact
from fedge.export.manifest import MANIFEST, SIGNATURE, read_manifest, write_manifest
from fedge.export.signing import sign_manifest
from fedge.files import sha256_file
from fedge.runtime.infer import load_installed
from fedge.runtime.store import ArtifactRefused, current, install, installed_versions

# -- which files the installer opens -----------------------------------------------------------

_OPENED: list[str] | None = None


def _audit(event, args):
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # permanent for the process; records only while _OPENED is a list


def opened_during(fn):
    global _OPENED
    _OPENED = []
    try:
        fn()
    finally:
        seen, _OPENED = _OPENED, None
    return seen


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as ``llama_base_dir``, other weights: another base hash."""
    from export_helpers import tiny_bpe_tokenizer, tiny_llama

    d = tmp_path_factory.mktemp("llama-other-base")
    tiny_llama(seed=1).save_pretrained(d)
    tiny_bpe_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def built(llama_base_dir, llama_adapter_dir, other_base_dir, keys, other_keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    v1 = build_artifact(llama_adapter_dir, root / "v1", base_source=str(llama_base_dir), private_key=keys.private,
                        version=1)
    v2 = build_artifact(llama_adapter_dir, root / "v2", base_source=str(llama_base_dir), private_key=keys.private,
                        version=2)
    # Correctly signed by the trusted key, trained on base B, but naming the device's base A by id
    # (what a server that fine-tuned another checkpoint under the same name would ship).
    foreign = build_artifact(llama_adapter_dir, root / "foreign", base_source=str(other_base_dir),
                             private_key=keys.private, version=2)
    m = read_manifest(foreign)
    m["base_model"]["id"] = str(llama_base_dir)
    write_manifest(foreign, m)
    sign_manifest(foreign, keys.private)
    forged = build_artifact(llama_adapter_dir, root / "forged", base_source=str(llama_base_dir),
                            private_key=other_keys.private, version=2)
    return {"v1": v1, "v2": v2, "foreign-base": foreign, "forged": forged}


@pytest.fixture()
def store(built, keys, tmp_path):
    d = tmp_path / "store"
    install(built["v1"], store_dir=d, trusted_public_key=keys.public_pem)
    return d


def _copy(src: Path, dst: Path) -> Path:
    return shutil.copytree(src, dst)


def _add_signed_file(d: Path, rel: str, data: bytes, key) -> None:
    """Add a payload file, list it in the manifest and re-sign with ``key``."""
    (d / rel).write_bytes(data)
    m = read_manifest(d)
    m["files"][rel] = {"sha256": sha256_file(d / rel), "size": len(data)}
    write_manifest(d, m)
    sign_manifest(d, key)


# -- base hash: fedge install checks it, infer falls back -------------------------------------


def test_cli_install_refuses_a_signed_artifact_for_another_base(built, store, keys, capsys):
    from fedge.cli import main

    # Execute: the operator's command, no --base (the manifest's id is this device's base A)
    rc = main(["install", str(built["foreign-base"]), "--store", str(store), "--trusted-key", str(keys.public_pem)])
    # Assert: refused for the base, v1 stays current and loads
    err = capsys.readouterr().err
    assert rc == 3 and "[base-hash]" in err
    assert current(store) == 1 and installed_versions(store) == [1]
    assert load_installed(store).version == 1


def test_cli_install_accepts_the_right_base(built, store, keys, capsys):
    from fedge.cli import main

    rc = main(["install", str(built["v2"]), "--store", str(store), "--trusted-key", str(keys.public_pem)])
    assert rc == 0 and "installed version 2" in capsys.readouterr().out
    assert current(store) == 2


def test_infer_falls_back_to_the_previous_version_when_current_is_refused(built, store, keys, capsys):
    from fedge.cli import main

    # Prepare: the foreign-base artifact installed without a base check (as the old CLI did)
    install(built["foreign-base"], store_dir=store, trusted_public_key=keys.public_pem)
    assert current(store) == 2
    # Execute
    model = load_installed(store)
    rc = main(["infer", "--store", str(store), "--prompt", "hello", "--max-new-tokens", "3"])
    # Assert: v1 answers, the refusal is reported, the store is not changed behind the operator's back
    assert model.version == 1 and model.fallback_from["version"] == 2
    assert model.fallback_from["reason"] == "base-hash"
    assert rc == 0
    assert current(store) == 2
    with pytest.raises(ArtifactRefused, match="base-hash"):
        load_installed(store, fallback=False)


# -- signature before copy, listed files only, size cap, stale partial copies -------------------


def test_foreign_signature_is_refused_before_any_payload_byte_is_read(built, store, keys):
    src = built["forged"]
    refusals = []

    def attempt():
        with pytest.raises(ArtifactRefused) as info:
            install(src, store_dir=store, trusted_public_key=keys.public_pem)
        refusals.append(info.value.reason)

    # Execute
    opened = opened_during(attempt)
    # Assert: refused for the signature; of the source, only manifest.json and manifest.sig were opened
    assert refusals == ["signature"]
    from_source = {Path(p).name for p in opened if Path(p).resolve().is_relative_to(src.resolve())}
    assert from_source == {MANIFEST, SIGNATURE}
    assert current(store) == 1


def test_unlisted_huge_file_is_never_read(built, store, keys, tmp_path):
    # Prepare: a signed v2 plus a 1 GiB (sparse) file the manifest does not list
    src = _copy(built["v2"], tmp_path / "v2-plus")
    with open(src / "extra.gguf", "wb") as f:
        f.truncate(1 << 30)
    # Execute
    def attempt():
        with pytest.raises(ArtifactRefused) as info:
            install(src, store_dir=store, trusted_public_key=keys.public_pem)
        assert info.value.reason == "files" and "extra.gguf" in str(info.value)

    opened = opened_during(attempt)
    # Assert
    assert not [p for p in opened if Path(p).name == "extra.gguf"]
    assert current(store) == 1


def test_payload_over_the_size_cap_is_refused_before_copying(built, store, keys):
    total = sum(e["size"] for e in read_manifest(built["v2"])["files"].values())
    with pytest.raises(ArtifactRefused) as info:
        install(built["v2"], store_dir=store, trusted_public_key=keys.public_pem, max_bytes=total - 1)
    assert info.value.reason == "size" and str(total) in str(info.value)
    assert current(store) == 1
    assert install(built["v2"], store_dir=store, trusted_public_key=keys.public_pem, max_bytes=total) == 2


def test_file_larger_than_listed_is_cut_off(built, store, keys, tmp_path):
    # Prepare: the listed adapter grown by appending bytes after signing
    src = _copy(built["v2"], tmp_path / "grown")
    with open(src / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(ArtifactRefused) as info:
        install(src, store_dir=store, trusted_public_key=keys.public_pem)
    assert info.value.reason == "hash" and "size mismatch for adapter_model.safetensors" in str(info.value)
    assert not [p for p in store.iterdir() if p.name.startswith(".incoming")]


def test_partial_copy_of_a_killed_install_is_swept(built, store, keys):
    # Prepare: what a SIGKILL during the copy of a 1 GiB artifact leaves (sparse: no real disk used)
    partial = store / ".incoming-0123456789abcdef"
    partial.mkdir()
    with open(partial / "model.F32.gguf", "wb") as f:
        f.truncate(1 << 30)
    # Execute: the next install
    install(built["v2"], store_dir=store, trusted_public_key=keys.public_pem)
    # Assert
    assert not partial.exists()
    assert not [p for p in store.iterdir() if p.name.startswith(".incoming")]
    assert current(store) == 2


# -- pickle by content, whatever the file is called ---------------------------------------------


class _Payload:
    def __reduce__(self):
        return (print, ("code ran at load",))


@pytest.mark.parametrize("name, protocol", [
    ("notes.txt", 0),  # protocol 0 is ASCII: valid UTF-8 "text"
    ("tokenizer.model", 1),
    ("model.onnx", 0),
    ("chat_template.jinja", 0),
])
def test_signed_pickle_under_an_allowed_name_is_refused(built, store, keys, tmp_path, name, protocol):
    # Prepare: listed and signed by the trusted key (a compromised build host), so only the content check can stop it
    src = _copy(built["v2"], tmp_path / "pickled")
    _add_signed_file(src, name, pickle.dumps(_Payload(), protocol=protocol), keys.private)
    # Execute
    with pytest.raises(ArtifactRefused) as info:
        install(src, store_dir=store, trusted_public_key=keys.public_pem)
    # Assert
    assert info.value.reason == "format" and "pickle" in str(info.value) and name in str(info.value)
    assert current(store) == 1 and installed_versions(store) == [1]


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_is_pickle_finds_every_protocol_and_no_artifact_file(protocol, built, tmp_path):
    from fedge.runtime.store import is_pickle

    p = tmp_path / "x.txt"
    p.write_bytes(pickle.dumps({"w": [1.0, 2.0], "f": _Payload()}, protocol=protocol))
    assert is_pickle(p)
    payload = [f for f in sorted(built["v2"].iterdir()) if f.name != SIGNATURE]  # the signature is random bytes
    assert {f.suffix for f in payload} == {".safetensors", ".gguf", ".json", ""}  # "": the Ollama Modelfile
    for f in payload:  # none of the real formats is a pickle program
        assert not is_pickle(f), f.name


# -- secret key files and the CA ----------------------------------------------------------------


def test_make_certs_never_overwrites_an_existing_ca(tmp_path):
    from fedge.launch import DeployError, make_certs

    certs = make_certs(tmp_path / "certs")
    before = {n: (tmp_path / "certs" / n).read_bytes() for n in ("ca.crt", "ca.key", "server.pem", "server.key")}
    # Execute: a second run in the same directory (a typo, a script re-run)
    with pytest.raises(DeployError, match="ca.crt"):
        make_certs(tmp_path / "certs")
    # Assert: the CA every device trusts, and its key, are byte for byte the same
    assert {n: (tmp_path / "certs" / n).read_bytes() for n in before} == before
    for key in (certs.server_key, tmp_path / "certs" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_reissue_keeps_the_ca_and_chains_to_it(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedge.launch import make_certs

    d = tmp_path / "certs"
    first = make_certs(d, hosts=("10.0.0.1",))
    ca = {n: (d / n).read_bytes() for n in ("ca.crt", "ca.key")}
    old_server = first.server_cert.read_bytes()
    first.server_cert.unlink()
    first.server_key.unlink()
    # Execute: a new server address, same CA
    second = make_certs(d, hosts=("10.0.0.2",))
    # Assert: CA untouched; the new certificate is signed by it and names the new address
    assert {n: (d / n).read_bytes() for n in ca} == ca
    cert = x509.load_pem_x509_certificate(second.server_cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca["ca.crt"])
    ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == ca_cert.subject and second.server_cert.read_bytes() != old_server
    ips = {str(ip) for ip in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
           .get_values_for_type(x509.IPAddress)}
    assert "10.0.0.2" in ips and "10.0.0.1" not in ips


def test_planted_link_at_a_key_path_does_not_receive_the_key(tmp_path):
    from fedge.launch import DeployError, make_certs, make_node_keys

    # Prepare: another local user planted links where the keys will be written
    leak = tmp_path / "attacker-readable"
    leak.write_bytes(b"")
    os.chmod(leak, 0o644)
    (tmp_path / "certs").mkdir()
    os.symlink(leak, tmp_path / "certs" / "server.key")
    (tmp_path / "keys").mkdir()
    os.symlink(leak, tmp_path / "keys" / "shop-1")
    # Execute
    with pytest.raises((DeployError, FileExistsError)):
        make_certs(tmp_path / "certs")
    with pytest.raises((DeployError, FileExistsError)):
        make_node_keys(tmp_path / "keys", "shop-1")
    # Assert: no private key went through the links
    assert leak.read_bytes() == b""


def test_key_files_are_created_owner_only_whatever_the_umask(tmp_path):
    from fedge.launch import make_certs, make_node_keys

    old = os.umask(0)  # the most permissive umask: mode must come from the create call itself
    try:
        certs = make_certs(tmp_path / "certs")
        node = make_node_keys(tmp_path / "keys", "shop-1")
    finally:
        os.umask(old)
    for key in (certs.server_key, tmp_path / "certs" / "ca.key", node.private_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key.name
