"""Artifacts end to end: build → install → load → same answers as the trained model.

Oracle: the unmerged PeftModel (fp32). Merged GGUF / int8 artifacts must agree within
the stated quantization tolerance; adapter artifacts and fp32 merges within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import logits

from fedge.export.artifact import ArtifactBuildError, build_artifact, next_version
from fedge.export.gguf import read_gguf
from fedge.export.manifest import read_manifest
from fedge.export.merge import load_peft_model
from fedge.models import load_base
from fedge.runtime.infer import load_artifact, load_installed
from fedge.runtime.store import install

IDS = torch.tensor([[5, 17, 42, 99, 120, 7, 250, 33]])
LABELS = ["neg", "neutral", "pos"]


@pytest.fixture(scope="module")
def llama_oracle(llama_base_dir, llama_adapter_dir):
    peft_model = load_peft_model(load_base(str(llama_base_dir)).model, llama_adapter_dir)
    return logits(peft_model, IDS)


@pytest.fixture(scope="module")
def bert_oracle(bert_base_dir, bert_adapter_dir):
    base = load_base(str(bert_base_dir), task="sequence-classification", num_labels=3)
    peft_model = load_peft_model(base.model, bert_adapter_dir)
    texts = ["hello world", "the quick brown fox", "what is the capital of france"]
    enc = base.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return texts, torch.softmax(peft_model(**enc).logits, -1).numpy()


def test_merged_llama_gguf_artifact(llama_base_dir, llama_adapter_dir, llama_oracle, keys, tmp_path):
    # Execute
    out = build_artifact(llama_adapter_dir, tmp_path / "art", base_source=str(llama_base_dir),
                         private_key=keys.private, mode="merged", formats=("Q8_0", "Q4_0"), version=7)
    version = install(out, store_dir=tmp_path / "store", trusted_public_key=keys.public_pem)
    model = load_installed(tmp_path / "store", backend="torch")
    # Assert: files, manifest, tokenizer metadata from the HF tokenizer, logits within Q8_0 tolerance
    manifest = read_manifest(out)
    assert version == 7 and manifest["mode"] == "merged"
    assert manifest["quantization"] == {"model.Q8_0.gguf": "gguf-Q8_0", "model.Q4_0.gguf": "gguf-Q4_0"}
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])
    assert model.files == {"model": "model.Q8_0.gguf"}
    assert read_gguf(out / "model.Q8_0.gguf").metadata["tokenizer.ggml.model"] == "gpt2"
    got = logits(model.model, IDS)
    assert np.abs(got - llama_oracle).max() < 0.06 * np.abs(llama_oracle).max()
    assert (out / "model.Q4_0.gguf").stat().st_size < (out / "model.Q8_0.gguf").stat().st_size
    assert isinstance(model.generate("hello", max_new_tokens=3), str)


def test_merged_llama_fp32_artifact_is_exact(llama_base_dir, llama_adapter_dir, llama_oracle, keys, tmp_path):
    out = build_artifact(llama_adapter_dir, tmp_path / "art", base_source=str(llama_base_dir),
                         private_key=keys.private, mode="merged", formats=("fp32", "int8"), version=1)
    model = load_artifact(out, backend="torch")
    assert model.files == {"model": "model.safetensors"}
    assert np.abs(logits(model.model, IDS) - llama_oracle).max() < 1e-5


def test_adapter_llama_artifact_is_exact(llama_base_dir, llama_adapter_dir, llama_oracle, keys, tmp_path):
    out = build_artifact(llama_adapter_dir, tmp_path / "art", base_source=str(llama_base_dir),
                         private_key=keys.private, version=1)
    model = load_artifact(out, backend="torch")
    assert np.abs(logits(model.model, IDS) - llama_oracle).max() < 1e-5
    assert model.generate("hello world", max_new_tokens=5) == model.chat(
        [{"role": "user", "content": "hello world"}], max_new_tokens=5).text


@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_classifier_artifact(mode, bert_base_dir, bert_adapter_dir, bert_oracle, keys, tmp_path):
    # Prepare
    texts, probs = bert_oracle
    # Execute
    out = build_artifact(bert_adapter_dir, tmp_path / "art", base_source=str(bert_base_dir),
                         private_key=keys.private, mode=mode, task="sequence-classification", labels=LABELS,
                         version=1)
    install(out, store_dir=tmp_path / "store", trusted_public_key=keys.public_pem)
    model = load_installed(tmp_path / "store")
    results = model.classify(texts)
    # Assert: same decisions; probabilities exact (adapter) or within int8 tolerance (merged)
    manifest = read_manifest(out)
    got = np.array([r["probs"] for r in results])
    if mode == "merged":
        assert manifest["quantization"] == {"model.int8.safetensors": "int8-rowwise"}
        assert np.abs(got - probs).max() < 0.03
    else:
        assert "adapter.gguf" not in manifest["files"]  # not a Llama model
        assert np.abs(got - probs).max() < 1e-5
    assert [r["label"] for r in results] == list(probs.argmax(-1))
    assert results[0]["label_name"] == LABELS[results[0]["label"]]


def test_gguf_format_refused_for_non_llama(bert_base_dir, bert_adapter_dir, keys, tmp_path):
    with pytest.raises(ArtifactBuildError, match="GGUF needs a Llama"):
        build_artifact(bert_adapter_dir, tmp_path / "art", base_source=str(bert_base_dir), private_key=keys.private,
                       mode="merged", task="sequence-classification", formats=("Q8_0",), version=1)
    assert not (tmp_path / "art").exists()


def test_versions_increase_without_gaps_backwards(tmp_path, llama_base_dir, llama_adapter_dir, keys):
    counter = tmp_path / "artifact-version"
    assert [next_version(counter), next_version(counter)] == [1, 2]
    assert next_version(counter, at_least=10) == 10 and next_version(counter) == 11
    out = build_artifact(llama_adapter_dir, tmp_path / "a", base_source=str(llama_base_dir),
                         private_key=keys.private, version_file=counter, adapter_gguf=False)
    assert read_manifest(out)["version"] == 12 and "adapter.gguf" not in read_manifest(out)["files"]
