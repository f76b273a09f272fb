"""K-quant GGUF export through llama.cpp's quantizer (fedge.export.llamacpp).

Oracles: the fp32 source model's logits (within a stated tolerance per type: a writer
naming or permutation error shows here); the model with every weight replaced by the
file's own dequantized tensor (llama.cpp must compute the same function up to its 8-bit
activation rounding, and transformers exactly it); the merged fp32 model (artifact +
runtime). Without llama_cpp (simulated by
patching the availability check) the K-quant types must fail with a message naming
``export.formats`` and the install command.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from export_helpers import read_gguf_tensors, tiny_bpe_tokenizer, unpermute_qk

from fedge import config as fcfg
from fedge.export import llamacpp
from fedge.export.artifact import ArtifactBuildError, build_artifact
from fedge.export.gguf import (
    _gguf_name,
    _tensor_name_map,
    adapted_tensor_names,
    load_gguf_causal_lm,
    permute_qk,
    read_gguf,
)
from fedge.export.manifest import read_manifest

# Stated tolerances on max |Δlogit| / max |logit| against the fp32 model, tiny random Llama
# with hidden size 256 (init std 0.02, seeds 0-3): measured Q4_K_M 0.08-0.10, Q5_K_M
# 0.05-0.06, Q6_K 0.03-0.05. Against the dequantized-weights oracle: 0.009-0.015 (llama.cpp
# rounds activations to 8 bits for K-quant dot products; a misplaced tensor gives ~1).
REL_TOL = {"Q4_K_M": 0.2, "Q5_K_M": 0.12, "Q6_K": 0.1}
ORACLE_TOL = 0.03
K_TYPES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}  # main tensor type of each file type


def kquant_llama(seed: int = 0):
    """2-layer Llama whose rows (256, 512) fill whole 256-value K-quant super-blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.02,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def dequantized_oracle(model, path):
    """``model`` with every stored weight replaced by the GGUF file's dequantized tensor."""
    cfg = model.config
    stored = read_gguf_tensors(path)
    name_map = _tensor_name_map(cfg.num_hidden_layers)
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            w = stored[_gguf_name(name_map, name)]
            if ".q_proj." in name:
                w = unpermute_qk(w, cfg.num_attention_heads)
            elif ".k_proj." in name:
                w = unpermute_qk(w, cfg.num_key_value_heads)
            p.copy_(torch.from_numpy(np.array(w, dtype=np.float32).reshape(p.shape)))
    return oracle


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False, seed=0)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])


@pytest.mark.parametrize("file_type", llamacpp.QUANT_TYPES)
def test_kquant_gguf_runs_in_llama_cpp_close_to_fp32(file_type, tmp_path):
    pytest.importorskip("llama_cpp")
    # Prepare
    model = kquant_llama(seed=0)
    ids = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    fp32 = _logits(model, ids)
    # Execute
    path = llamacpp.write_quantized_gguf(model, tmp_path / f"m.{file_type}.gguf", file_type=file_type,
                                         tokenizer=tiny_bpe_tokenizer())
    got = _llama_cpp_logits(path, ids)
    oracle_model = dequantized_oracle(model, path)
    oracle = _logits(oracle_model, ids)
    torch_got = _logits(load_gguf_causal_lm(path), ids)
    # Assert: real K-quant blocks; embeddings (tied: the output rule) at higher precision; norms F32
    info = read_gguf(path)
    types = {name: t for name, (t, _) in info.tensors.items()}
    assert types["blk.0.ffn_up.weight"] == K_TYPES[file_type]
    assert types["token_embd.weight"] == "Q6_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert not list(tmp_path.glob(".*f32-*"))  # the F32 source was removed
    # Assert: llama.cpp computes the model stored in the file, in the right places
    scale = np.abs(fp32).max()
    assert np.abs(got - oracle).max() / scale < ORACLE_TOL
    # Assert: the torch backend (transformers dequantizes) reads exactly the stored weights
    assert np.abs(torch_got - oracle).max() < 1e-4
    # Assert: within the stated tolerance of the fp32 model
    assert np.abs(got - fp32).max() / scale < REL_TOL[file_type]


def test_merged_artifact_with_kquants_runs_on_llama_cpp_backend(llama_base_dir, llama_adapter_dir, keys, tmp_path):
    """Hidden size 64: llama.cpp falls back to 32-value blocks (Q4_K → Q5_0, Q6_K → Q8_0)."""
    pytest.importorskip("llama_cpp")
    from fedge.export.merge import load_peft_model, merge_lora
    from fedge.models import load_base
    from fedge.runtime.infer import load_installed
    from fedge.runtime.store import install

    # Prepare: the oracle is the merged fp32 model
    base = load_base(str(llama_base_dir))
    merged = merge_lora(load_peft_model(base.model, llama_adapter_dir))
    ids = base.tokenizer("hello world, how are you today?")["input_ids"]
    want = _logits(merged, ids)[-1]
    # Execute
    out = build_artifact(llama_adapter_dir, tmp_path / "art", base_source=str(llama_base_dir),
                         private_key=keys.private, mode="merged", formats=("Q4_K_M", "Q6_K"), version=1)
    install(out, store_dir=tmp_path / "store", trusted_public_key=keys.public_pem)
    local = load_installed(tmp_path / "store", threads=1)
    llm = local.model
    llm.reset()
    llm.eval(ids)
    import llama_cpp

    got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    answer = local.chat([{"role": "user", "content": "hello world"}], max_new_tokens=4)
    # Assert: the artifact holds the two files, signed and hashed, and no scratch F32 file
    manifest = read_manifest(out)
    assert manifest["quantization"] == {"model.Q4_K_M.gguf": "gguf-Q4_K_M", "model.Q6_K.gguf": "gguf-Q6_K"}
    assert {"model.Q4_K_M.gguf", "model.Q6_K.gguf"} <= set(manifest["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # Assert: row length 64 is not a multiple of 256: llama.cpp's documented fallbacks; the tensors
    # the adapter changed (q, k, v, o) overridden to Q8_0
    q4 = {name: t for name, (t, _) in read_gguf(out / "model.Q4_K_M.gguf").tensors.items()}
    assert q4["blk.0.ffn_gate.weight"] == "Q5_0" and "Q4_K" not in q4.values()
    assert {q4[f"blk.{i}.attn_{m}.weight"] for i in (0, 1) for m in ("q", "k", "v", "output")} == {"Q8_0"}
    # Assert: auto picks llama.cpp and the best-quality file; logits within the Q8_0 tolerance of fp32
    assert local.backend == "llama.cpp" and local.files["model"].endswith("model.Q6_K.gguf")
    assert np.abs(got - want).max() / np.abs(want).max() < 0.06
    assert 0 < answer.completion_tokens <= 4


# -- without llama_cpp ------------------------------------------------------------------------


@pytest.fixture()
def no_llama_cpp(monkeypatch):
    """Simulate an environment where llama_cpp does not import."""
    monkeypatch.setattr(llamacpp, "available", lambda: False)


def test_kquant_without_llama_cpp_fails_in_config_with_install_hint(no_llama_cpp):
    # Execute / Assert: refused when the merged export would need it
    with pytest.raises(fcfg.ConfigError) as err:
        fcfg.load("default", ["export.mode=merged", "export.formats=[Q8_0,Q4_K_M]"])
    assert "export.formats" in str(err.value) and "pip install 'fedge[llamacpp]'" in str(err.value)
    assert "['Q4_K_M']" in str(err.value)
    # Execute / Assert: numpy-written types and an adapter-mode export do not need it
    assert fcfg.load("default", ["export.mode=merged", "export.formats=[Q4_1,Q8_0]"]).export.formats == ("Q4_1",
                                                                                                          "Q8_0")
    assert fcfg.load("default", ["export.mode=adapter", "export.formats=[Q4_K_M]"]).export.mode == "adapter"


def test_unknown_format_is_refused_by_config():
    with pytest.raises(fcfg.ConfigError, match=r"export.formats: unknown format\(s\) \['Q3_K'\]; allowed: .*Q4_K_M"):
        fcfg.load("default", ["export.mode=merged", "export.formats=[Q3_K]"])


def test_kquant_without_llama_cpp_fails_in_build_artifact(no_llama_cpp, llama_base_dir, llama_adapter_dir, keys,
                                                          tmp_path):
    # Execute
    with pytest.raises(ArtifactBuildError) as err:
        build_artifact(llama_adapter_dir, tmp_path / "art", base_source=str(llama_base_dir),
                       private_key=keys.private, mode="merged", formats=("Q6_K",), version=1)
    # Assert: a clear message, and nothing written
    assert "export.formats" in str(err.value) and "pip install 'fedge[llamacpp]'" in str(err.value)
    assert not (tmp_path / "art").exists()
    with pytest.raises(llamacpp.LlamaCppMissing, match="file_type"):
        llamacpp.write_quantized_gguf(None, tmp_path / "m.gguf", file_type="Q4_K_M")


# -- the weights the adapter changed stay Q8_0 below 8 bits -----------------------------------


def test_adapted_tensor_names_follow_peft_matching():
    from export_helpers import tiny_llama

    model = tiny_llama()
    linear = {f"blk.{i}.{m}.weight" for i in (0, 1)
              for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert adapted_tensor_names(model, ["q_proj", "v_proj"]) == {f"blk.{i}.attn_{m}.weight" for i in (0, 1)
                                                                 for m in ("q", "v")}
    assert adapted_tensor_names(model, r"model\.layers\.1\.self_attn\.k_proj") == {"blk.1.attn_k.weight"}
    assert adapted_tensor_names(model, "all-linear") == linear
    assert adapted_tensor_names(model, None) == set()


def test_4bit_merged_artifact_keeps_the_adapter_update(llama_base_dir, llama_adapter_dir, keys, tmp_path):
    """Numpy Q4_1 (no llama.cpp needed): adapted tensors are the Q8_0 round trip of the merged weight."""
    import gguf
    from gguf.quants import dequantize, quantize

    from fedge.export.merge import load_peft_model, merge_lora
    from fedge.models import load_base

    # Prepare: oracle = Q8_0 round trip of the merged (permuted) q weight; Q4_1 one of the ffn weight
    base = load_base(str(llama_base_dir))
    merged = merge_lora(load_peft_model(base.model, llama_adapter_dir))
    q = permute_qk(merged.model.layers[1].self_attn.q_proj.weight.detach().numpy(), 4)
    up = merged.model.layers[1].mlp.up_proj.weight.detach().numpy()
    T = gguf.GGMLQuantizationType
    want_q = np.asarray(dequantize(quantize(q, T.Q8_0), T.Q8_0), np.float32).reshape(q.shape)
    want_up = np.asarray(dequantize(quantize(up, T.Q4_1), T.Q4_1), np.float32).reshape(up.shape)
    # Execute
    out = build_artifact(llama_adapter_dir, tmp_path / "art", base_source=str(llama_base_dir),
                         private_key=keys.private, mode="merged", formats=("Q4_1",), version=1)
    info = read_gguf(out / "model.Q4_1.gguf")
    stored = read_gguf_tensors(out / "model.Q4_1.gguf", ["blk.1.attn_q.weight", "blk.1.ffn_up.weight"])
    # Assert
    types = {name: t for name, (t, _) in info.tensors.items()}
    assert {types[f"blk.{i}.attn_{m}.weight"] for i in (0, 1) for m in ("q", "k", "v", "output")} == {"Q8_0"}
    assert {types[f"blk.{i}.ffn_{m}.weight"] for i in (0, 1) for m in ("gate", "up", "down")} == {"Q4_1"}
    np.testing.assert_array_equal(stored["blk.1.attn_q.weight"], want_q)
    np.testing.assert_array_equal(stored["blk.1.ffn_up.weight"], want_up)
