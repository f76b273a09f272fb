"""Session fixtures for the export / runtime tests (tiny models, adapters, keys; no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_helpers import LORA_TARGETS, bert_tokenizer, randomize_lora, tiny_bpe_tokenizer, tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llama_base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama-base")
    tiny_llama().save_pretrained(d)
    tiny_bpe_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def llama_adapter_dir(llama_base_dir, tmp_path_factory) -> Path:
    from fedge.models import add_lora, load_base

    base = load_base(str(llama_base_dir))
    peft_model = add_lora(base.model, task="causal-lm", r=4, alpha=8.0, dropout=0.0, target_modules=LORA_TARGETS)
    randomize_lora(peft_model)
    d = tmp_path_factory.mktemp("llama-adapter")
    peft_model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def bert_base_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("bert-base")
    tok = bert_tokenizer(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def bert_adapter_dir(bert_base_dir, tmp_path_factory) -> Path:
    from fedge.models import add_lora, load_base

    base = load_base(str(bert_base_dir), task="sequence-classification", num_labels=3)
    peft_model = add_lora(base.model, task="sequence-classification", r=4, alpha=8.0, dropout=0.0,
                          target_modules=("query", "value"))
    randomize_lora(peft_model)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "classifier" in name and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    d = tmp_path_factory.mktemp("bert-adapter")
    peft_model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    from fedge.export.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory):
    from fedge.export.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("other-keys"), name="attacker")
