"""Merge a LoRA adapter into its base, save the result, and an int8 weight-only format.

Merge (PEFT ``merge_and_unload``), per adapted linear layer::

    W' = W0 + (alpha / r) · B A        A: (r, in), B: (out, r), W0: (out, in)
    (rsLoRA: alpha / √r)

The result is a plain transformers model (no PEFT wrappers; a trained
classification head replaces the fresh one). Saved as a safetensors Hugging Face
directory (``config.json``, ``model.safetensors``, tokenizer files).

int8 weight-only ("int8-rowwise", for models without a GGUF path, e.g. the BERT
classifier): every 2-D float tensor whose dimensions are both ≥ 32 is stored as

    q = round(W / s) ∈ [-127, 127] (int8, shape (out, in)),   s = max_j |W_ij| / 127 (fp32, (out,))

under ``<name>`` and ``<name>@scale``; every other tensor stays fp32. The file is
a safetensors file with metadata ``{"format": "int8-rowwise", "format_version": "1"}``
next to the model's ``config.json``. Per-weight error ≤ s/2 = max|row| / 254.

Loading it (:func:`load_int8_model`), two ways:

* ``int8_linear=False``: every tensor is dequantized (W ≈ q · s) into an fp32 model:
  transfer and storage shrink ~4×; memory and speed are those of fp32.
* ``int8_linear=True`` (what the device runtime does for classifiers): every
  ``nn.Linear`` whose weight is stored int8 becomes a torch dynamic-quantized Linear
  (``torch.ao.nn.quantized.dynamic.Linear``, qint8, per-row symmetric scales) built
  from the file's own q and s — no re-quantization, the int8 weights are bit-identical
  to the file's. Each call quantizes its input per tensor (uint8 asymmetric: the full
  8 bits on x86 CPUs with AVX512-VNNI, else torch's default 7, see
  :func:`full_range_activations`) and multiplies in int8 (fbgemm / qnnpack): the extra
  error over the dequantized model is this activation rounding, and it depends on the
  whole input tensor (a text's logits move slightly with its batch mates and padding). Embeddings,
  norms, tensors below ``MIN_DIM`` and tied weights stay fp32. On MiniLM-L6 this is
  ~3-4× faster on one CPU thread (``benchmarks/results/export_classifier.md``). If the
  quantized kernels are missing (a torch build without them), the loader warns and
  keeps the dequantized fp32 model; :func:`int8_linear_names` says which happened.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

INT8_FORMAT = "int8-rowwise"
SCALE_SUFFIX = "@scale"
MIN_DIM = 32  # smaller tensors (heads, biases, norms) stay fp32


class MergeError(ValueError):
    """An adapter that cannot be merged (not LoRA, or LoRA layers left after merging)."""


def load_peft_model(base_model: torch.nn.Module, adapter_dir: str | Path):
    """Wrap ``base_model`` with the PEFT adapter saved in ``adapter_dir`` (safetensors only)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise MergeError(f"{adapter_dir} has no adapter_model.safetensors (pickled adapters are never loaded)")
    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def merge_lora(peft_model) -> torch.nn.Module:
    """``merge_and_unload`` a LoRA PeftModel (in place: the base weights change); return the plain model."""
    cfg = peft_model.peft_config.get(getattr(peft_model, "active_adapter", "default"))
    peft_type = str(getattr(cfg, "peft_type", ""))
    if "LORA" not in peft_type.upper():
        raise MergeError(f"only LoRA adapters can be merged, got {peft_type!r}")
    merged = peft_model.merge_and_unload()
    left = [n for n, _ in merged.named_modules() if "lora_" in n.split(".")[-1]]
    if left:
        raise MergeError(f"LoRA layers left after merging: {left[:3]}")
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def _clean_config(model) -> None:
    # save_pretrained refuses while a gguf quantization_config is attached.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_merged(model, out_dir: str | Path, *, tokenizer=None) -> list[Path]:
    """Save a merged model as a safetensors HF directory; return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.rglob("*"))
    _clean_config(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return sorted(p for p in set(out_dir.rglob("*")) - before if p.is_file())


def save_tokenizer_files(tokenizer, out_dir: str | Path) -> list[Path]:
    """Tokenizer files only (``tokenizer.json``, ``tokenizer_config.json``, ...)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [Path(p) for p in tokenizer.save_pretrained(out_dir) if Path(p).is_file()]


# -- int8 weight-only -------------------------------------------------------------------------


def quantize_rowwise(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 (out, in), s fp32 (out,)) with W ≈ q · s[:, None] (see module docstring)."""
    w = np.asarray(w, np.float32)
    s = np.abs(w).max(axis=1) / 127.0
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
    return q, s


def dequantize_rowwise(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * s[:, None].astype(np.float32)


def _unique_state(model) -> dict[str, torch.Tensor]:
    """state_dict without tied duplicates (a tensor sharing storage with an earlier one)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def save_int8(model, path: str | Path) -> Path:
    """Write ``model``'s weights in the int8-rowwise safetensors format; return the path."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for name, t in _unique_state(model).items():
        arr = t.detach().cpu().numpy()
        if arr.dtype.kind == "f" and arr.ndim == 2 and min(arr.shape) >= MIN_DIM:
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize_rowwise(arr)
        else:
            tensors[name] = np.ascontiguousarray(arr.astype(np.float32) if arr.dtype.kind == "f" else arr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": INT8_FORMAT, "format_version": "1"})
    return path


def _read_int8(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != INT8_FORMAT:
            raise ValueError(f"{path} is not an {INT8_FORMAT} file (metadata {meta})")
        return {k: f.get_tensor(k) for k in f.keys()}


def _dequantized(raw: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    state = {}
    for name, arr in raw.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if name + SCALE_SUFFIX in raw:
            arr = dequantize_rowwise(arr, raw[name + SCALE_SUFFIX])
        state[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return state


def load_int8_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an int8-rowwise file back into an fp32 state dict."""
    return _dequantized(_read_int8(path))


# torch marks its quantized-tensor API deprecated (pytorch/pytorch#184982) but 2.4-2.13 ship
# it; the warning is silenced here only, and a torch without it falls back (module docstring).
_DEPRECATED = r".*(quantiz|_empty_affine_quantized).*"


def full_range_activations() -> bool:
    """Whether int8 Linear may quantize its inputs to the full 8 bits (else 7, torch's default).

    fbgemm multiplies uint8 activations by int8 weights; without AVX512-VNNI it sums pairs of
    products in int16 (``vpmaddubsw``), which saturates unless the activations keep 7 bits.
    With VNNI (``vpdpbusd``, int32 sums) the full range is exact, and halves the activation
    rounding. Other engines (qnnpack, onednn) keep torch's default.
    """
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        return False
    try:
        return bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _int8_linear_class():
    import torch.ao.nn.quantized.dynamic as nnqd

    class Int8Linear(nnqd.Linear):
        """``torch.ao.nn.quantized.dynamic.Linear`` (qint8) with the activation range chosen at load."""

        reduce_range: bool = True  # 7-bit activations (torch's default for this module)

        def forward(self, x):
            y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                   reduce_range=self.reduce_range)
            return y.to(x.dtype)

        def _get_name(self):
            return "Int8Linear"

        def extra_repr(self):
            return super().extra_repr() + f", activations={'7' if self.reduce_range else '8'}-bit"

    return Int8Linear


def make_int8_linear(q: np.ndarray, s: np.ndarray, bias: torch.Tensor | None, *,
                     reduce_range: bool | None = None) -> torch.nn.Module:
    """A dynamic-quantized Linear whose int8 weight is exactly ``q`` (out, in) with row scales ``s``.

    ``reduce_range``: 7-bit activations (None: unless :func:`full_range_activations`).
    """
    q_t = torch.from_numpy(np.ascontiguousarray(q, dtype=np.int8))
    s_t = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)).double()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=UserWarning)
        # Re-quantizing q·s with the same scales gives q back; checked, never assumed.
        w = torch.quantize_per_channel(q_t.float() * s_t.float()[:, None], s_t,
                                       torch.zeros(len(s_t), dtype=torch.long), 0, torch.qint8)
        if not torch.equal(w.int_repr(), q_t):
            raise ValueError("int8 weight changed when packed")
        lin = _int8_linear_class()(q_t.shape[1], q_t.shape[0], bias_=bias is not None, dtype=torch.qint8)
        lin.set_weight_bias(w, None if bias is None else bias.detach().float().contiguous())
    lin.reduce_range = (not full_range_activations()) if reduce_range is None else bool(reduce_range)
    return lin


def int8_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that run as torch dynamic-quantized (int8) Linear."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    except ImportError:  # a torch without quantized modules: nothing can be int8
        return []
    return [n for n, m in model.named_modules() if isinstance(m, DynamicLinear)]


def _swap_int8_linear(model: torch.nn.Module, raw: Mapping[str, np.ndarray], reduce_range: bool) -> int:
    """Replace every nn.Linear stored as int8 (and not tied) by :func:`make_int8_linear`; return the count."""
    shared = {}
    for _, p in model.named_parameters(remove_duplicate=False):  # tied: one tensor, several modules
        shared[p.data_ptr()] = shared.get(p.data_ptr(), 0) + 1
    swaps = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            key = f"{name}.weight"
            if (type(child) is torch.nn.Linear and key + SCALE_SUFFIX in raw
                    and shared.get(child.weight.data_ptr(), 0) == 1):
                swaps.append((parent, child_name, make_int8_linear(raw[key], raw[key + SCALE_SUFFIX], child.bias,
                                                                  reduce_range=reduce_range)))
    for parent, child_name, lin in swaps:
        setattr(parent, child_name, lin)
    return len(swaps)


def _from_config(model_dir: Path, task: str, pooling: str) -> torch.nn.Module:
    """The architecture of ``model_dir/config.json`` (fresh weights), mean-pooled when ``pooling`` says so."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=torch.float32)
    if pooling == "mean":
        from fedge.models import use_mean_pooling

        use_mean_pooling(model)  # no pooler weights: the merged model was saved without them
    return model


def load_merged_model(model_dir: str | Path, *, task: str, pooling: str = "cls"):
    """The fp32 merged model of ``model_dir`` (``model.safetensors``, strict), in eval mode.

    ``pooling="mean"``: the classifier reads the masked mean of the last hidden states
    (:func:`fedge.models.use_mean_pooling`), as it was trained; its file holds no pooler."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    if pooling == "cls":
        auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
        return auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    from safetensors.torch import load_file

    model = _from_config(model_dir, task, pooling)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model.eval()


def load_int8_model(model_dir: str | Path, *, file: str = "model.int8.safetensors", task: str,
                    int8_linear: bool = False, pooling: str = "cls"):
    """Build the model from ``config.json`` and load the int8 file (strict).

    ``int8_linear``: run the int8-stored Linear layers as torch dynamic-quantized Linear
    (module docstring); otherwise (or when torch lacks the kernels) dequantize to fp32.
    ``pooling="mean"``: a mean-pooled classifier (:func:`load_merged_model`).
    """
    model_dir = Path(model_dir)
    model = _from_config(model_dir, task, pooling)
    raw = _read_int8(model_dir / file)
    state = _dequantized(raw)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight") or "decoder.weight" in n}
    missing = [n for n in missing if n not in tied and not n.endswith(("position_ids", "inv_freq"))]
    if missing or unexpected:
        raise ValueError(f"{file}: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
    if tied:
        model.tie_weights()
    if int8_linear:
        try:
            reduce_range = not full_range_activations()
            n = _swap_int8_linear(model, raw, reduce_range)
            log.info("%s: %d Linear layers run as int8 (torch dynamic quantization, engine %s, %d-bit activations)",
                     file, n, torch.backends.quantized.engine, 7 if reduce_range else 8)
        except (ImportError, AttributeError, RuntimeError, NotImplementedError) as err:  # no kernels
            log.warning("%s: int8 Linear unavailable in this torch (%s); running dequantized fp32", file, err)
    model.eval()
    return model
