"""Signed hot-swap while serving: ``fedge serve`` follows its store between requests.

Real parts: signed artifacts built from tiny seeded Llamas, the real store (``install``),
the real watcher and the real server (uvicorn in a thread) asked by the official ``openai``
client. Oracles: a fresh load of each version (the in-place adapter swap must give the same
weights bit for bit and the same answers), and the store's own refusals.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from export_helpers import LORA_TARGETS, randomize_lora, tiny_bpe_tokenizer

from fedge.export.artifact import build_artifact
from fedge.runtime.hotswap import ModelSlot, StoreWatcher
from fedge.runtime.infer import load_artifact, load_installed
from fedge.runtime.serve import LocalServer
from fedge.runtime.store import ArtifactRefused, _locked, _write_state, install

CHAT = [{"role": "user", "content": "hello world"}]


def adapter(base_dir: Path, out: Path, seed: int) -> Path:
    from fedge.models import add_lora, load_base

    base = load_base(str(base_dir))
    peft_model = add_lora(base.model, task="causal-lm", r=4, alpha=8.0, dropout=0.0, target_modules=LORA_TARGETS)
    randomize_lora(peft_model, seed=seed)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def artifacts(llama_base_dir, keys, tmp_path_factory) -> dict:
    """Signed adapter artifacts v1..v4 (each its own adapter) and a merged fp32 v5."""
    root = tmp_path_factory.mktemp("hotswap")
    out = {}
    for v in (1, 2, 3, 4):
        a = adapter(llama_base_dir, root / f"adapter-{v}", seed=10 + v)
        out[v] = build_artifact(a, root / f"v{v}", base_source=str(llama_base_dir), private_key=keys.private,
                                version=v)
    out[5] = build_artifact(root / "adapter-4", root / "v5", base_source=str(llama_base_dir),
                            private_key=keys.private, mode="merged", formats=("fp32",), version=5)
    return out


def tampered_copy(src: Path, dst: Path) -> Path:
    """The signed artifact with one payload byte flipped (signature and manifest untouched)."""
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    return dst


def plant_in_store(artifact: Path, store: Path, version: int, previous: int) -> None:
    """A version that reaches the store's pointer without ``install`` and is changed on disk."""
    with _locked(store):
        tampered_copy(artifact, store / "versions" / str(version))
        _write_state(store, {"version": version, "previous": previous, "highest": version})


def test_adapter_swap_in_place_equals_a_fresh_load(artifacts, keys, tmp_path):
    # Prepare
    store = tmp_path / "store"
    install(artifacts[1], store_dir=store, trusted_public_key=keys.public_pem)
    model = load_installed(store, backend="torch")
    slot = ModelSlot(model)
    watcher = StoreWatcher(slot, store, backend="torch")
    install(artifacts[2], store_dir=store, trusted_public_key=keys.public_pem)
    # Execute
    swap = watcher.poll()
    again = watcher.poll()
    # Assert: the loaded model was changed in place (same object, same base) to version 2
    assert swap.how == "adapter" and swap.version == 2 and again is None
    assert slot.model is model and model.version == 2 and model.name.endswith("-v2")
    fresh = load_installed(store, backend="torch")
    got, want = dict(model.model.named_parameters()), dict(fresh.model.named_parameters())
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # PEFT's merge, same operations: bit for bit
    assert model.chat(CHAT, max_new_tokens=8).text == fresh.chat(CHAT, max_new_tokens=8).text


def test_merged_artifact_is_loaded_beside_and_a_bad_one_is_never_served(artifacts, keys, tmp_path, caplog):
    # Prepare
    store = tmp_path / "store"
    install(artifacts[1], store_dir=store, trusted_public_key=keys.public_pem)
    slot = ModelSlot(load_installed(store, backend="torch"))
    old = slot.model
    watcher = StoreWatcher(slot, store, backend="torch")
    install(artifacts[5], store_dir=store, trusted_public_key=keys.public_pem)
    # Execute: a merged artifact, then one changed on disk after it reached the pointer
    merged = watcher.poll()
    plant_in_store(artifacts[4], store, version=6, previous=5)
    bad = watcher.poll()
    retried = watcher.poll()
    # Assert: merged → a new object (the old one stays whole for requests in flight)
    assert merged.how == "full" and slot.model is not old and slot.model.version == 5 and old.version == 1
    # Assert: the changed one is refused, logged, not retried; version 5 still serves
    assert bad.how == "refused" and bad.version == 6 and "sha256" in bad.reason
    assert retried is None and slot.model.version == 5
    assert any("version 6 not served" in r.getMessage() for r in caplog.records)


def test_swaps_under_load(artifacts, keys, tmp_path):
    """A client asks in a loop while v2 and v3 are installed and a tampered artifact is offered twice
    (to ``install``, and planted in the store): no request fails, versions only move forward, every
    answer is its version's own answer, the tampered one is never served."""
    openai = pytest.importorskip("openai")
    # Prepare: each version's answer, from its own fresh load
    want = {v: load_artifact(artifacts[v], backend="torch").chat(CHAT, max_new_tokens=6).text for v in (1, 2, 3)}
    assert len(set(want.values())) == 3  # the versions are told apart by their answers too
    store = tmp_path / "store"
    install(artifacts[1], store_dir=store, trusted_public_key=keys.public_pem)
    slot = ModelSlot(load_installed(store, backend="torch"))
    watcher = StoreWatcher(slot, store, interval=0.1, backend="torch").start()
    answers, failures, stop = [], [], threading.Event()

    def ask_in_a_loop(url: str) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        while not stop.is_set():
            try:
                r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=6)
                answers.append((r.model, r.choices[0].message.content))
            except Exception as err:  # noqa: BLE001 - every failure is a finding
                failures.append(err)

    def wait_for(version: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(name.endswith(f"-v{version}") for name, _ in answers[-3:]):
            assert time.monotonic() < deadline, f"version {version} never served"
            time.sleep(0.05)

    with LocalServer(slot, host="127.0.0.1", port=0, workers=2) as srv:
        client_thread = threading.Thread(target=ask_in_a_loop, args=(srv.url,))
        client_thread.start()
        try:
            # Execute
            wait_for(1)
            install(artifacts[2], store_dir=store, trusted_public_key=keys.public_pem)
            wait_for(2)
            with pytest.raises(ArtifactRefused):
                install(tampered_copy(artifacts[3], tmp_path / "tampered"), store_dir=store,
                        trusted_public_key=keys.public_pem)
            install(artifacts[3], store_dir=store, trusted_public_key=keys.public_pem)
            wait_for(3)
            plant_in_store(artifacts[4], store, version=4, previous=3)
            deadline = time.monotonic() + 30
            while not any(s.version == 4 for s in watcher.history):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            n = len(answers)
            while len(answers) < n + 3:  # a few more answers after the refusal
                time.sleep(0.05)
        finally:
            stop.set()
            client_thread.join(60)
            watcher.stop()
    # Assert
    assert failures == []
    versions = [int(name.rsplit("-v", 1)[1]) for name, _ in answers]
    assert versions == sorted(versions) and set(versions) == {1, 2, 3}
    assert all(text == want[v] for v, (_, text) in zip(versions, answers))
    assert [(s.version, s.how) for s in watcher.history] == [(2, "adapter"), (3, "adapter"), (4, "refused")]


def test_llama_cpp_adapter_swap_keeps_the_base(llama_base_dir, artifacts, keys, tmp_path):
    pytest.importorskip("llama_cpp")
    from fedge.export.gguf import write_model_gguf
    from fedge.models import load_base

    # Prepare: the base as a GGUF for llama.cpp's runtime LoRA
    base_gguf = write_model_gguf(load_base(str(llama_base_dir)).model, tmp_path / "base.F32.gguf", file_type="F32",
                                 tokenizer=tiny_bpe_tokenizer())
    kw = dict(backend="llama.cpp", base_gguf=base_gguf, threads=1)
    store = tmp_path / "store"
    install(artifacts[1], store_dir=store, trusted_public_key=keys.public_pem)
    model = load_installed(store, **kw)
    llm = model.model
    slot = ModelSlot(model)
    watcher = StoreWatcher(slot, store, **kw)
    before = model.chat(CHAT, max_new_tokens=6).text
    install(artifacts[2], store_dir=store, trusted_public_key=keys.public_pem)
    # Execute
    swap = watcher.poll()
    after = model.chat(CHAT, max_new_tokens=6).text
    # Assert: same llama.cpp model object (the base stays loaded), the answers of a fresh v2 load
    assert swap.how == "adapter" and slot.model is model and model.model is llm and model.version == 2
    fresh = load_installed(store, **kw)
    assert after == fresh.chat(CHAT, max_new_tokens=6).text
    assert after != before or before == load_artifact(artifacts[2], **kw).chat(CHAT, max_new_tokens=6).text
