"""Merging LoRA into the base, and the int8 weight-only format.

Oracles: the unmerged PeftModel's logits (merge must not change the function);
the closed-form rounding bound |W − q·s| ≤ s/2 = max|row| / 254 (int8).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import logits

from fedge.export.merge import (
    INT8_FORMAT,
    MergeError,
    dequantize_rowwise,
    load_int8_model,
    load_int8_state,
    load_peft_model,
    merge_lora,
    quantize_rowwise,
    save_int8,
    save_merged,
)
from fedge.models import load_base


def test_merged_llama_logits_equal_unmerged(llama_base_dir, llama_adapter_dir, tmp_path):
    # Prepare
    peft_model = load_peft_model(load_base(str(llama_base_dir)).model, llama_adapter_dir)
    ids = torch.tensor([[5, 17, 42, 99, 120, 7, 250]])
    unmerged = logits(peft_model, ids)
    # Execute
    merged = merge_lora(peft_model)
    files = save_merged(merged, tmp_path / "merged")
    # Assert
    assert np.abs(logits(merged, ids) - unmerged).max() < 1e-5
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert {p.name for p in files} >= {"model.safetensors", "config.json"}
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert np.abs(logits(reloaded, ids) - unmerged).max() < 1e-5


def test_merged_classifier_logits_equal_unmerged(bert_base_dir, bert_adapter_dir):
    # Prepare: the trained head travels with the adapter (modules_to_save)
    base = load_base(str(bert_base_dir), task="sequence-classification", num_labels=3)
    peft_model = load_peft_model(base.model, bert_adapter_dir)
    enc = base.tokenizer(["hello world", "the lazy dog jumps"], padding=True, return_tensors="pt")
    with torch.no_grad():
        unmerged = peft_model(**enc).logits.numpy()
    # Execute
    merged = merge_lora(peft_model)
    with torch.no_grad():
        got = merged(**enc).logits.numpy()
    # Assert
    assert np.abs(got - unmerged).max() < 1e-5
    assert np.abs(unmerged).max() > 0.1  # the head is the trained one, not a zero/fresh one


def test_pickled_adapter_is_refused(tmp_path, llama_base_dir):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(MergeError, match="safetensors"):
        load_peft_model(load_base(str(llama_base_dir)).model, tmp_path)


def test_rowwise_int8_error_is_within_half_a_step():
    # Prepare
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 96)).astype(np.float32) * rng.uniform(0.01, 3, size=(48, 1)).astype(np.float32)
    w[3] = 0.0  # an all-zero row must survive
    # Execute
    q, s = quantize_rowwise(w)
    back = dequantize_rowwise(q, s)
    # Assert
    assert q.dtype == np.int8 and s.shape == (48,)
    bound = np.abs(w).max(axis=1, keepdims=True) / 254 + 1e-7
    assert (np.abs(back - w) <= bound).all()
    assert (back[3] == 0).all()


def test_int8_file_roundtrip_and_size(bert_base_dir, bert_adapter_dir, tmp_path):
    # Prepare
    base = load_base(str(bert_base_dir), task="sequence-classification", num_labels=3)
    merged = merge_lora(load_peft_model(base.model, bert_adapter_dir))
    merged.config.save_pretrained(tmp_path)
    save_merged(merged, tmp_path / "fp32")
    enc = base.tokenizer(["hello world", "what is the capital of france"], padding=True, return_tensors="pt")
    # Execute
    path = save_int8(merged, tmp_path / "model.int8.safetensors")
    state = load_int8_state(path)
    model = load_int8_model(tmp_path, task="sequence-classification")
    # Assert: every weight is the rowwise oracle; small tensors stay exact
    for name, t in merged.state_dict().items():
        w = t.numpy()
        if w.ndim == 2 and min(w.shape) >= 32:
            np.testing.assert_array_equal(state[name].numpy(), dequantize_rowwise(*quantize_rowwise(w)))
        else:
            np.testing.assert_array_equal(state[name].numpy(), w)
    with torch.no_grad():
        want, got = merged(**enc).logits.numpy(), model(**enc).logits.numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert path.stat().st_size < 0.45 * (tmp_path / "fp32" / "model.safetensors").stat().st_size
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert f.metadata()["format"] == INT8_FORMAT


def test_int8_llama_keeps_tied_head(llama_base_dir, tmp_path):
    base = load_base(str(llama_base_dir))
    base.model.config.save_pretrained(tmp_path)
    save_int8(base.model, tmp_path / "model.int8.safetensors")
    model = load_int8_model(tmp_path, task="causal-lm")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[5, 17, 42]])
    want = logits(base.model, ids)
    assert np.abs(logits(model, ids) - want).max() < 0.05 * np.abs(want).max()
