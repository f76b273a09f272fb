"""Mean-pooled classifier artifacts: the manifest records ``pooling`` and every runtime applies it.

Model: the tiny seeded BERT of ``conftest.py`` (2 layers, hidden 64, 3 labels) trained with
``model.pooling: mean`` (:func:`fedge.models.use_mean_pooling`: the head reads the masked mean
of the last hidden states), random LoRA on query/value and a random head. Oracle: that
training-time model (base + PEFT adapter, unmerged) on 64 seeded texts padded to the longest.
Each runtime gets the same texts twice, padded to the longest and to 40 tokens (the masked
mean must ignore pads, so both must match the oracle):

* fp32 (torch adapter, torch ``model.safetensors``, ONNX ``model.onnx``): max |Δlogit| ≤ 1e-4;
  and the same labels;
* int8 (torch ``model.int8.safetensors``, ONNX ``model.int8.onnx``): max |Δlogit| ≤ 0.1 · max |logit|
  (the bound of test_int8_classifier.py / test_onnx.py; measured 0.31 and 0.74 of it). The head's
  bias centres the logits over the texts (else one class wins every text), which leaves near-ties
  that int8 may flip (ONNX int8: 8 of 64), so int8 labels are not compared;
* the same adapter read through the CLS pooler (what the loaders rebuilt before the manifest
  recorded pooling) is far outside those bounds (max |Δlogit| 6.3, 1 label in 8 the same), so a
  runtime that ignores the field fails here.

Signature: the field is part of the signed canonical bytes like every other; editing any
manifest field after signing is refused generically (tests/export/test_store.py,
"manifest edited after signing"), so it is not repeated here.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from export_helpers import CORPUS, randomize_lora

from fedge.export.artifact import ArtifactBuildError, build_artifact
from fedge.export.manifest import (
    MANIFEST,
    SIGNATURE,
    ManifestError,
    build_manifest,
    canonical_bytes,
    parse_manifest,
    pooling_of,
    read_manifest,
    write_manifest,
)
from fedge.export.onnx_export import missing_modules
from fedge.export.signing import load_private_key, sign_manifest
from fedge.models import MaskedMeanPooler, add_lora, load_base
from fedge.runtime.hotswap import ModelSlot, StoreWatcher
from fedge.runtime.infer import device_base_hash, load_installed
from fedge.runtime.store import ArtifactRefused, install

LABELS = ["neg", "neutral", "pos"]
FP32_TOL = 1e-4  # absolute, on logits
INT8_TOL = 0.1  # of max |logit|
PAD_TO = 40
HAS_ONNX = not missing_modules()


def texts(n: int = 64, seed: int = 3) -> list[str]:
    words = sorted({w.strip(",.?!'") for s in CORPUS for w in s.lower().split()} - {""})
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(n)]


@pytest.fixture(scope="module")
def mean_adapter_dir(bert_base_dir, tmp_path_factory):
    """A mean-pooled classifier's adapter, as a run with ``model.pooling: mean`` saves it."""
    base = load_base(str(bert_base_dir), task="sequence-classification", num_labels=3, pooling="mean")
    peft_model = add_lora(base.model, task="sequence-classification", r=4, alpha=8.0, dropout=0.0,
                          target_modules=("query", "value"))
    randomize_lora(peft_model)
    head = {n.rsplit(".", 1)[-1]: p for n, p in peft_model.named_parameters() if "classifier" in n and p.requires_grad}
    enc = base.tokenizer(texts(), padding=True, return_tensors="pt")
    with torch.no_grad():
        for p in head.values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        # Mean-pooled features share a large common part: centre the logits over the texts, or
        # one class would win every text and the label checks would say little.
        head["bias"] -= peft_model(**enc).logits.mean(0)
    d = tmp_path_factory.mktemp("bert-mean-adapter")
    peft_model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def artifacts(bert_base_dir, bert_adapter_dir, mean_adapter_dir, keys, tmp_path_factory):
    """v1: a CLS classifier (adapter mode); v2-v4: the mean-pooled one as adapter, fp32 and int8
    (each with its ONNX file when the onnx extra is installed)."""
    root = tmp_path_factory.mktemp("mean-artifacts")
    kw = dict(base_source=str(bert_base_dir), private_key=keys.private, task="sequence-classification",
              labels=LABELS)
    onnx = HAS_ONNX
    return {
        "cls": build_artifact(bert_adapter_dir, root / "cls", version=1, **kw),
        "adapter": build_artifact(mean_adapter_dir, root / "adapter", pooling="mean", version=2, **kw),
        "fp32": build_artifact(mean_adapter_dir, root / "fp32", pooling="mean", mode="merged", version=3,
                               formats=("fp32", "onnx") if onnx else ("fp32",), **kw),
        "int8": build_artifact(mean_adapter_dir, root / "int8", pooling="mean", mode="merged", version=4,
                               formats=("int8", "onnx-int8") if onnx else ("int8",), **kw),
    }


def trained_logits(base_dir, adapter_dir, xs: list[str], *, pooling: str) -> np.ndarray:
    """The training-time model (base with ``pooling`` + the PEFT adapter, unmerged) on ``xs``."""
    from fedge.export.merge import load_peft_model

    base = load_base(str(base_dir), task="sequence-classification", num_labels=3, pooling=pooling)
    model = load_peft_model(base.model, adapter_dir)
    enc = base.tokenizer(xs, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float().numpy()


@pytest.fixture(scope="module")
def oracle(bert_base_dir, mean_adapter_dir) -> dict[str, np.ndarray]:
    xs = texts()
    return {p: trained_logits(bert_base_dir, mean_adapter_dir, xs, pooling=p) for p in ("mean", "cls")}


def runtime_logits(model, xs: list[str], *, pad_to: int | None = None) -> np.ndarray:
    """Logits through the runtime's own tokenizer and model; ``pad_to``: extra right padding."""
    if model.backend == "onnxruntime":
        feed = model.model.feed(xs)  # padded to the longest
        if pad_to:
            extra = ((0, 0), (0, pad_to - feed["input_ids"].shape[1]))
            feed = {k: np.pad(v, extra, constant_values=model.model.pad_id if k == "input_ids" else 0)
                    for k, v in feed.items()}
        return model.model.run(feed)
    enc = model.tokenizer(xs, padding="max_length" if pad_to else True, max_length=pad_to, return_tensors="pt")
    with torch.no_grad():
        return model.model(**enc).logits.float().numpy()


RUNTIMES = {  # name: (artifact, backend, compute, fp32)
    "torch-adapter": ("adapter", "torch", "fp32", True),
    "torch-fp32": ("fp32", "torch", "fp32", True),
    "torch-int8": ("int8", "torch", "int8-dynamic", False),
    "onnx-fp32": ("fp32", "onnxruntime", "onnx-fp32", True),
    "onnx-int8": ("int8", "onnxruntime", "onnx-int8", False),
}


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_mean_pooled_artifact_gives_the_trained_models_logits_at_any_padding(runtime, artifacts, oracle, keys,
                                                                              tmp_path):
    # Prepare: installed as `fedge install` does (an adapter is checked against this device's base)
    name, backend, compute, fp32 = RUNTIMES[runtime]
    if backend == "onnxruntime" and not HAS_ONNX:
        pytest.skip(f"the onnx extra is not installed ({', '.join(missing_modules())})")
    manifest = read_manifest(artifacts[name])
    install(artifacts[name], store_dir=tmp_path / "store", trusted_public_key=keys.public_pem,
            local_base_hash=device_base_hash(manifest))
    model = load_installed(tmp_path / "store", backend=backend)
    xs, want, cls = texts(), oracle["mean"], oracle["cls"]
    # Execute: the same texts padded to the longest, then to PAD_TO tokens
    short, padded = runtime_logits(model, xs), runtime_logits(model, xs, pad_to=PAD_TO)
    labels = [r["label"] for r in model.classify(xs)]
    # Assert: the manifest says mean, and the runtime computes it
    assert manifest["pooling"] == "mean" and model.compute == compute
    if backend == "torch":
        assert isinstance(model.model.bert.pooler, MaskedMeanPooler)
    tol = FP32_TOL if fp32 else INT8_TOL * np.abs(want).max()
    for got in (short, padded):
        assert np.abs(got - want).max() <= tol
        if fp32:
            assert list(got.argmax(1)) == list(want.argmax(1))
    assert labels == list(short.argmax(1))
    # ... and what the loaders rebuilt before (the CLS pooler over the same weights) is far off
    assert np.abs(cls - want).max() > 2 * tol
    assert (cls.argmax(1) == want.argmax(1)).mean() < 0.5


def test_mean_adapter_is_another_base_and_hot_swaps_by_a_full_load(artifacts, oracle, keys, tmp_path):
    # Prepare: a device serving the CLS classifier (v1)
    store = tmp_path / "store"
    install(artifacts["cls"], store_dir=store, trusted_public_key=keys.public_pem)
    slot = ModelSlot(load_installed(store, backend="torch"))
    watcher = StoreWatcher(slot, store, backend="torch")
    cls_m, mean_m = read_manifest(artifacts["cls"]), read_manifest(artifacts["adapter"])
    install(artifacts["adapter"], store_dir=store, trusted_public_key=keys.public_pem,
            local_base_hash=device_base_hash(mean_m))
    # Execute
    swap = watcher.poll()
    # Assert: a mean-pooled base has no pooler, hence another hash; the device checks the right one;
    # the swap rebuilds the model (not the CLS model's weights changed in place)
    assert pooling_of(cls_m) == "cls" and pooling_of(mean_m) == "mean"
    assert cls_m["base_model"]["sha256"] != mean_m["base_model"]["sha256"] == device_base_hash(mean_m)
    assert swap.how == "full" and slot.model.version == 2
    assert np.abs(runtime_logits(slot.model, texts()) - oracle["mean"]).max() <= FP32_TOL


def test_manifest_without_pooling_reads_as_cls(artifacts, keys, tmp_path):
    # Prepare: the CLS artifact as a fedge from before the field wrote it (re-signed without it)
    old = shutil.copytree(artifacts["cls"], tmp_path / "old")
    m = read_manifest(old)
    assert m["pooling"] == "cls"
    del m["pooling"]
    write_manifest(old, m)
    sign_manifest(old, keys.private)
    # Execute
    install(old, store_dir=tmp_path / "old-store", trusted_public_key=keys.public_pem,
            local_base_hash=device_base_hash(read_manifest(old)))
    install(artifacts["cls"], store_dir=tmp_path / "new-store", trusted_public_key=keys.public_pem)
    got, want = (load_installed(tmp_path / s, backend="torch") for s in ("old-store", "new-store"))
    # Assert: read as cls, loaded with the model's own pooler, the same logits as the artifact that says cls
    assert "pooling" not in got.manifest and pooling_of(got.manifest) == "cls"
    assert not isinstance(got.model.bert.pooler, MaskedMeanPooler)
    np.testing.assert_array_equal(runtime_logits(got, texts()), runtime_logits(want, texts()))


def test_unknown_pooling_is_refused_naming_the_field(artifacts, bert_adapter_dir, bert_base_dir, keys, tmp_path):
    # Prepare: a manifest saying "max", signed by the trusted key (a newer or broken builder)
    bad = shutil.copytree(artifacts["cls"], tmp_path / "bad")
    m = dict(read_manifest(bad), pooling="max", version=9)
    data = canonical_bytes(m)
    (bad / MANIFEST).write_bytes(data)
    (bad / SIGNATURE).write_bytes(load_private_key(keys.private).sign(data))
    # Execute / Assert: the store refuses it for its manifest, naming the field; nothing is installed
    with pytest.raises(ArtifactRefused) as info:
        install(bad, store_dir=tmp_path / "store", trusted_public_key=keys.public_pem)
    assert info.value.reason == "manifest" and "manifest field 'pooling'" in str(info.value)
    assert not (tmp_path / "store" / "versions").exists() or not any((tmp_path / "store" / "versions").iterdir())
    # ... and neither the builder nor the parser writes or reads such a value
    with pytest.raises(ManifestError, match="manifest field 'pooling'.*'max'"):
        build_manifest(bad, version=1, mode="merged", task="sequence-classification", base_model_id="x",
                       base_hash="0" * 64, signer="s", pooling="max")
    with pytest.raises(ManifestError, match="'pooling' 'mean' is for task sequence-classification"):
        parse_manifest(canonical_bytes(dict(m, pooling="mean", task="causal-lm")))
    with pytest.raises(ArtifactBuildError, match="pooling"):
        build_artifact(bert_adapter_dir, tmp_path / "never", base_source=str(bert_base_dir),
                       private_key=keys.private, task="sequence-classification", pooling="max", version=1)


def test_runtime_older_than_the_field_refuses_a_mean_artifact_and_keeps_its_model(artifacts, keys, tmp_path,
                                                                                    monkeypatch):
    # Prepare: a device that runs the CLS artifact; a runtime from before `pooling` reads format 1 only
    # (its parser compared format_version with 1), so it would rebuild a fresh CLS pooler under a
    # mean-pooled fp32 file: the builder marks such artifacts as format 2 to be refused there.
    from fedge.export import manifest as manifest_mod

    store = tmp_path / "store"
    install(artifacts["cls"], store_dir=store, trusted_public_key=keys.public_pem)
    before = runtime_logits(load_installed(store, backend="torch"), texts())
    assert read_manifest(artifacts["cls"])["format_version"] == 1
    assert read_manifest(artifacts["fp32"])["format_version"] == 2
    monkeypatch.setattr(manifest_mod, "READABLE_FORMATS", (1,))
    # Execute / Assert: the old reader refuses the mean-pooled fp32 artifact for its manifest; the old model stays
    with pytest.raises(ArtifactRefused) as info:
        install(artifacts["fp32"], store_dir=store, trusted_public_key=keys.public_pem)
    assert info.value.reason == "manifest" and "format_version 2 is not supported" in str(info.value)
    np.testing.assert_array_equal(runtime_logits(load_installed(store, backend="torch"), texts()), before)


def test_format_2_without_mean_pooling_is_refused(artifacts):
    m = read_manifest(artifacts["cls"])
    with pytest.raises(ManifestError, match="format_version 2 is for mean pooling"):
        parse_manifest(canonical_bytes(dict(m, format_version=2)))
