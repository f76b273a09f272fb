"""GGUF files for llama.cpp / Ollama: merged Llama models and adapter-only LoRA files.

Merged model (:func:`write_model_gguf`), ``general.architecture = "llama"``:

* hyper-parameters from the HF config (``llama.block_count``, ``llama.embedding_length``,
  head counts, rope base, RMS eps, vocab size, context length, rope dimension);
* every other metadata field (tokenizer, chat template, names) copied with
  ``add_key_value`` from a *reference* GGUF when given (for the packaged default,
  the packaged SmolLM2 file), else built from a byte-level BPE HF tokenizer
  (``tokenizer.ggml.model = "gpt2"``), else left out (with a warning);
* tensor names from ``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)``
  (``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``), arrays in
  HF shape (out, in);
* q/k weights re-permuted as llama.cpp's converter does (transformers' GGUF loader
  undoes exactly this), for W of shape (rows, cols) and n heads::

      W.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2).reshape(rows, cols)

  with n = ``num_attention_heads`` for q and ``num_key_value_heads`` for k;
* tied embeddings: no ``output.weight`` (llama.cpp and transformers then tie);
* tensor types: 1-D tensors F32; 2-D tensors the file type (F32, F16, Q8_0, Q4_1,
  Q4_0, quantized here in numpy by ``gguf.quants``), except ``token_embd``/``output``
  kept at Q8_0 in a 4-bit file (all-Q4_0 costs ~+31 % perplexity on SmolLM2, against
  ~+10 %), and F16 when a row length is not a multiple of the 32-value quantization
  block. Q4_1 (x ≈ m + q·d, q ∈ 0..15, per 32 values) is the packaged SmolLM2's own
  type: re-quantizing its dequantized weights gives them back exactly, so for the
  default model every tensor the adapter did not change is stored without loss (Q4_0
  re-rounds every tensor onto another grid). K-quants (Q4_K_M, Q5_K_M, Q6_K) are made
  by llama.cpp's quantizer from an F32 file: ``fedge.export.llamacpp``;
* ``adapted`` tensors (the weights a merged LoRA adapter changed, from
  :func:`adapted_tensor_names`) stay Q8_0 in files below 8 bits. A LoRA update is far
  smaller than a 4-bit step: on SmolLM2 (r=8 on q, v) the merged ΔW has rms ≈ 0.001
  while Q4_1/Q4_0 rounding errors are ≈ 0.0014/0.019, so rounding W0 + ΔW to 4 bits keeps
  almost nothing of ΔW (cosine with ΔW 0.05-0.1; Q8_0: 0.7-0.85) and the file answers
  like the base model (measured: answer perplexity ×3.9 for Q4_1).

Adapter only (:func:`write_adapter_gguf`), the format of llama.cpp's runtime LoRA
(``Llama(model_path=base, lora_path=adapter)``): ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``; tensors
``blk.N.attn_q.weight.lora_a`` = peft ``lora_A.weight`` (r, in) and ``.lora_b`` =
peft ``lora_B.weight`` (out, r), F32 (rows of length r cannot be block-quantized).
llama.cpp scales by alpha / r, so rsLoRA (alpha / √r) is written as alpha·√r.
Only B is permuted for q/k: permute(W + s·B·A) = permute(W) + s·permute(B)·A.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODEL_TYPES = ("F32", "F16", "Q8_0", "Q4_1", "Q4_0")  # written (and quantized) in numpy
BLOCK = 32  # values per Q8_0 / Q4_1 / Q4_0 block
# Metadata never copied from a reference file: the writer sets them itself.
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version", "general.type")
_ADAPTER_SKIP = ("lora_embedding_", "modules_to_save", "lora_magnitude_vector")


class GGUFExportError(ValueError):
    """A model or adapter that cannot be written as a (llama.cpp-compatible) GGUF file."""


# -- helpers ----------------------------------------------------------------------------------


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary-layout permutation of q/k rows (see module docstring)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise GGUFExportError(f"rope scaling {rope_type!r} is not supported by this writer (only 'default')")
    return float(theta)


def _check_llama(config) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise GGUFExportError(
            "GGUF export supports Llama-architecture models only, got "
            f"model_type={getattr(config, 'model_type', None)!r}; "
            "use the int8 safetensors path for other models")


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _tensor_name_map(n_layers: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)


def _gguf_name(name_map, hf_name: str) -> str:
    out = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if out is None:
        raise GGUFExportError(f"no GGUF name for tensor {hf_name!r}")
    return out


def _tensor_type(gguf_name: str, arr: np.ndarray, file_type: str, adapted: Collection[str] = ()):
    """The GGML type one tensor is stored as in a file of ``file_type``."""
    import gguf

    T = gguf.GGMLQuantizationType
    if arr.ndim == 1 or file_type == "F32":
        return T.F32
    if file_type == "F16":
        return T.F16
    if arr.shape[-1] % BLOCK:
        return T.F16  # a row that does not fill whole blocks cannot be block-quantized
    if file_type in ("Q4_0", "Q4_1") and (gguf_name.startswith(("token_embd.", "output.")) or gguf_name in adapted):
        return T.Q8_0
    return T[file_type]


def adapted_tensor_names(model, target_modules) -> set[str]:
    """GGUF names of the weights a LoRA adapter with ``target_modules`` changes (PEFT's matching).

    ``target_modules``: a list of module-name suffixes (``["q_proj", "v_proj"]``), a regular
    expression matched against the full module name, or ``"all-linear"``.
    """
    import re

    import torch

    name_map = _tensor_name_map(model.config.num_hidden_layers)
    out = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        if target_modules == "all-linear":
            hit = isinstance(module, torch.nn.Linear) and module_name != "lm_head"
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, module_name) is not None
        else:
            hit = any(module_name == t or module_name.endswith(f".{t}") for t in target_modules or ())
        if hit:
            out.add(_gguf_name(name_map, f"{module_name}.weight"))
    return out


def _add_tensor(writer, name: str, arr: np.ndarray, qtype) -> None:
    import gguf
    from gguf.quants import quantize

    T = gguf.GGMLQuantizationType
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == T.F32:
        writer.add_tensor(name, arr)
    elif qtype == T.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)


# -- metadata ---------------------------------------------------------------------------------


def _copy_reference_fields(writer, reference: str | Path, *, skip: set[str], vocab_size: int) -> None:
    """Copy every metadata field of ``reference`` except GGUF.* and ``skip`` (value types kept)."""
    import gguf

    reader = gguf.GGUFReader(str(reference))
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None
    if arch != "llama":
        raise GGUFExportError(f"reference GGUF {reference} has architecture {arch!r}, not 'llama'")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != vocab_size:
        raise GGUFExportError(f"reference GGUF tokenizer has {len(tokens.data)} tokens but the model's "
                              f"vocab_size is {vocab_size}: not the same tokenizer")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip or key in _NOT_COPIED:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            if len(field.types) > 2:
                log.warning("skipping nested array metadata %s", key)
                continue
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)


def _bpe_tokenizer_fields(writer, tokenizer, vocab_size: int) -> bool:
    """Write ``tokenizer.ggml.*`` for a byte-level BPE HF tokenizer (llama.cpp's "gpt2" model).

    Token types: 1 normal, 3 control (special added tokens), 4 user-defined
    (other added tokens), 5 unused (ids with no token: ``[PAD{i}]``).
    Returns False (and writes nothing) for any other kind of tokenizer.
    """
    import json

    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        return False
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"tokenizer has ids up to {max(vocab.values())} but vocab_size is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t.special for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if merges:
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            add(int(tid))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return True


# -- merged model -----------------------------------------------------------------------------


def write_model_gguf(
    model,
    path: str | Path,
    *,
    file_type: str = "Q8_0",
    reference_gguf: str | Path | None = None,
    tokenizer=None,
    name: str | None = None,
    adapted: Collection[str] = (),
) -> Path:
    """Write a (merged) ``LlamaForCausalLM`` as a GGUF file of ``file_type``; return the path.

    Parameters
    ----------
    model : transformers LlamaForCausalLM (no LoRA layers left: merge first).
    file_type : one of ``MODEL_TYPES`` (see the module docstring for per-tensor types).
    reference_gguf : a GGUF of the same base whose tokenizer/chat metadata is copied.
    tokenizer : HF tokenizer used when no reference is given (byte-level BPE only).
    adapted : GGUF names of the weights the merged adapter changed (:func:`adapted_tensor_names`):
        stored Q8_0 in 4-bit files.
    """
    import gguf

    if file_type not in MODEL_TYPES:
        raise GGUFExportError(f"file_type {file_type!r} not supported by the numpy writer; allowed: "
                              f"{list(MODEL_TYPES)} (K-quants: fedge.export.llamacpp.write_quantized_gguf)")
    config = model.config
    _check_llama(config)
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise GGUFExportError("the model still has LoRA layers: merge the adapter first (merge_lora)")
    n_layers, n_head, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = _head_dim(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_type("model")
    # Hyper-parameters from the config (the reference file may describe another size).
    hparams = {
        "llama.context_length": (writer.add_context_length, config.max_position_embeddings),
        "llama.embedding_length": (writer.add_embedding_length, config.hidden_size),
        "llama.block_count": (writer.add_block_count, n_layers),
        "llama.feed_forward_length": (writer.add_feed_forward_length, config.intermediate_size),
        "llama.attention.head_count": (writer.add_head_count, n_head),
        "llama.attention.head_count_kv": (writer.add_head_count_kv, n_kv),
        "llama.rope.freq_base": (writer.add_rope_freq_base, _rope_theta(config)),
        "llama.attention.layer_norm_rms_epsilon": (writer.add_layer_norm_rms_eps, float(config.rms_norm_eps)),
        "llama.vocab_size": (writer.add_vocab_size, config.vocab_size),
        "llama.rope.dimension_count": (writer.add_rope_dimension_count, head_dim),
    }
    for add, value in hparams.values():
        add(value)
    written = set(hparams)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        written |= {"llama.attention.key_length", "llama.attention.value_length"}
    if name:
        writer.add_key_value("general.name", name, gguf.GGUFValueType.STRING)
        written.add("general.name")
    if reference_gguf is not None:
        _copy_reference_fields(writer, reference_gguf, skip=written, vocab_size=config.vocab_size)
    elif tokenizer is None or not _bpe_tokenizer_fields(writer, tokenizer, config.vocab_size):
        log.warning("%s: no tokenizer metadata written (no reference GGUF, no byte-level BPE tokenizer); "
                    "llama.cpp will not load it without a tokenizer", path.name)
    writer.add_file_type(int(gguf.LlamaFileType["ALL_F32" if file_type == "F32" else f"MOSTLY_{file_type}"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # Tensors, in HF shape (out, in); tied lm_head is not written.
    name_map = _tensor_name_map(n_layers)
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        arr = tensor.detach().cpu().float().numpy()
        if ".self_attn.q_proj." in hf_name:
            arr = permute_qk(arr, n_head)
        elif ".self_attn.k_proj." in hf_name:
            arr = permute_qk(arr, n_kv)
        g_name = _gguf_name(name_map, hf_name)
        _add_tensor(writer, g_name, arr, _tensor_type(g_name, arr, file_type, adapted))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- adapter only -----------------------------------------------------------------------------


def write_adapter_gguf(
    adapter_state: Mapping[str, Any],
    path: str | Path,
    *,
    config,
    lora_alpha: float,
    r: int,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> Path:
    """Write PEFT LoRA tensors as a llama.cpp adapter GGUF (format in the module docstring).

    ``adapter_state``: ``get_peft_model_state_dict`` / ``get_adapter_state`` names
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ...);
    ``config``: the base model's HF config (layers and head counts).
    """
    import gguf

    _check_llama(config)
    if use_dora:
        raise GGUFExportError("DoRA adapters cannot be written for llama.cpp (it has no magnitude vectors)")
    extra = sorted(k for k in adapter_state if any(s in k for s in _ADAPTER_SKIP) or ".lora_" not in k)
    if extra:
        raise GGUFExportError(f"llama.cpp adapters hold LoRA A/B of linear layers only; cannot write {extra[:3]}")
    alpha = float(lora_alpha) * (math.sqrt(r) if use_rslora else 1.0)
    name_map = _tensor_name_map(config.num_hidden_layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in adapter_state.items():
        module, _, which = key.rpartition(".lora_")  # which = "A.weight" | "B.weight"
        module = module.removeprefix("base_model.model.")
        arr = np.asarray(value.detach().cpu().float().numpy() if hasattr(value, "detach") else value, np.float32)
        pairs.setdefault(module, {})[which[0]] = arr
    for module in sorted(pairs):
        ab = pairs[module]
        if set(ab) != {"A", "B"}:
            raise GGUFExportError(f"{module}: needs both lora_A and lora_B, found {sorted(ab)}")
        a, b = ab["A"], ab["B"]
        if module.endswith("self_attn.q_proj"):
            b = permute_qk(b, config.num_attention_heads)
        elif module.endswith("self_attn.k_proj"):
            b = permute_qk(b, config.num_key_value_heads)
        base_name = _gguf_name(name_map, module + ".weight")
        writer.add_tensor(base_name + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(base_name + ".lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- reading back -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file holds: metadata (long arrays summarised as ``<array n>``) and tensors."""

    architecture: str | None
    file_type: int | None
    metadata: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (GGML type, HF-order shape)


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read metadata and the tensor table (no tensor data is loaded)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > 16:
            meta[key] = f"<array {len(field.data)}>"
        else:
            meta[key] = field.contents()
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())))
               for t in reader.tensors}
    return GGUFInfo(meta.get("general.architecture"), meta.get("general.file_type"), meta, tensors)


def load_gguf_causal_lm(path: str | Path):
    """Load a GGUF model in transformers (dequantized to fp32), as the torch runtime does."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the per-tensor dequantization bar
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model
