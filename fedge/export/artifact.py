"""Build a signed deployment artifact from a run's final adapter.

One directory (see ``fedge.export.manifest`` for the manifest fields)::

    mode "adapter" (the device already holds the base model):
        adapter_model.safetensors   PEFT LoRA tensors (+ trained head), fp32
        adapter_config.json         PEFT config (base_model_name_or_path = the base model id)
        adapter.gguf                llama.cpp LoRA adapter (Llama bases, when representable)

    mode "merged" (self-contained; the adapter is merged into the base):
        model.<T>.gguf              Llama bases: one GGUF per requested type T ∈ F32/F16/Q8_0/Q4_1/Q4_0
                                    (numpy writer) or Q4_K_M/Q5_K_M/Q6_K (llama.cpp's quantizer,
                                    needs the optional ``llamacpp`` extra; see fedge.export.llamacpp);
                                    below 8 bits the weights the adapter changed (its
                                    target_modules) stay Q8_0, or rounding would erase the update
        model.int8.safetensors      "int8" format: int8 weight-only, per-row scales (any model)
        model.onnx, model.int8.onnx "onnx" / "onnx-int8" formats (sequence classifiers): the merged model
                                    as ONNX fp32 / ONNX Runtime dynamic int8, for devices without
                                    PyTorch (needs the optional ``onnx`` extra; fedge.export.onnx_export)
        genai-fp32/, genai-int8/, genai-int4/   "onnx" / "onnx-int8" / "onnx-int4" formats (causal LMs,
                                    Llama): onnxruntime-genai's model builder; each folder holds
                                    model.onnx (self-contained), genai_config.json and the tokenizer
                                    files (needs the optional ``onnx-genai`` extra; fedge.export.onnx_genai)
        model.safetensors           "fp32" format: merged fp32 weights
        config.json, generation_config.json   for the safetensors formats
        tokenizer.json, tokenizer_config.json, chat_template.jinja, vocab.txt ...   tokenizer

    Modelfile                       Ollama recipe beside GGUF files (merged: FROM the GGUF; adapter: FROM
                                    the base GGUF + ADAPTER adapter.gguf; chat TEMPLATE; fedge.export.ollama)

    manifest.json, manifest.sig     canonical manifest and its Ed25519 signature

Formats in "merged" mode default to ``("Q8_0",)`` for Llama models and
``("int8",)`` otherwise. The int8 choice for non-Llama backbones (e.g. the MiniLM
classifier) is a numpy int8 weight-only safetensors file: no extra dependency, no
pickle, ~4× smaller to ship. For a classifier the torch runtime runs its Linear layers
in int8 (torch dynamic quantization over the file's own int8 weights and scales,
~3-4× faster on CPU); a causal LM's is dequantized to fp32 (see ``fedge.export.merge``,
``benchmarks/results/export_classifier.md``).

Versions: strictly increasing per signer. Pass ``version=`` or let
:func:`next_version` draw the next number from a counter file (default:
``artifact-version`` next to the private key), under a file lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedge.export import llamacpp, ollama, onnx_export, onnx_genai
from fedge.export.gguf import MODEL_TYPES, GGUFExportError, adapted_tensor_names, write_adapter_gguf, write_model_gguf
from fedge.export.manifest import (
    ManifestError,
    PrivacySpent,
    build_manifest,
    check_pooling,
    read_manifest,
    write_manifest,
)
from fedge.export.merge import load_peft_model, merge_lora, save_int8, save_merged, save_tokenizer_files
from fedge.export.signing import fingerprint, load_private_key, sign_manifest
from fedge.files import is_safe_relpath, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
OTHER_FORMATS = ("int8", "fp32")
ADAPTER_CONFIG_KEYS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                       "modules_to_save", "use_rslora", "use_dora", "bias", "fan_in_fan_out")


class ArtifactBuildError(ValueError):
    """An artifact that cannot be built as asked; the message says what is allowed."""


def next_version(counter_file: str | Path, *, at_least: int = 0) -> int:
    """Increment the integer in ``counter_file`` (created at 0) under a lock; return the new value.

    ``at_least``: the result is max(counter + 1, at_least) (an explicit version
    moves the counter forward so later automatic versions stay above it).
    """
    counter_file = Path(counter_file)
    counter_file.parent.mkdir(parents=True, exist_ok=True)
    with open(counter_file, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        last = int(text) if text else 0
        version = max(last + 1, at_least)
        f.seek(0)
        f.truncate()
        f.write(f"{version}\n")
        f.flush()
        os.fsync(f.fileno())
    return version


def packaged_reference_gguf() -> Path:
    """The packaged SmolLM2 GGUF (source of tokenizer metadata for the default model)."""
    from fedge.models import PACKAGED, _package_dir

    module, fname = PACKAGED[DEFAULT_MODEL]
    return _package_dir(module) / fname


def _num_labels_from_adapter(adapter_dir: Path) -> int:
    from safetensors import safe_open

    from fedge.models import HEAD_PREFIXES

    heads = tuple(p.rstrip(".") for p in HEAD_PREFIXES)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="np") as f:
        for key in sorted(f.keys()):
            parts = key.split(".")
            if any(h in parts for h in heads) and key.endswith("weight") and len(f.get_slice(key).get_shape()) == 2:
                return int(f.get_slice(key).get_shape()[0])
    raise ArtifactBuildError(f"cannot infer num_labels from {adapter_dir}: no classification head; pass num_labels")


def _adapter_config(peft_model) -> dict[str, Any]:
    cfg = peft_model.peft_config[peft_model.active_adapter].to_dict()
    out = {}
    for k in ADAPTER_CONFIG_KEYS:
        v = cfg.get(k)
        if isinstance(v, (set, frozenset)):
            v = sorted(v)
        out[k] = v.value if hasattr(v, "value") else v
    return out


def _is_llama(model) -> bool:
    return getattr(model.config, "model_type", None) == "llama"


def build_artifact(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base_source: str,
    private_key,
    mode: str = "adapter",
    task: str = "causal-lm",
    num_labels: int | None = None,
    labels: list[str] | None = None,
    pooling: str = "cls",
    formats: tuple[str, ...] | list[str] | None = None,
    adapter_gguf: bool | None = None,
    reference_gguf: str | Path | None = None,
    version: int | None = None,
    version_file: str | Path | None = None,
    privacy: PrivacySpent | Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    key_password: bytes | None = None,
) -> Path:
    """Build, sign and return ``out_dir`` (layout in the module docstring).

    Parameters
    ----------
    adapter_dir : the run's final adapter (PEFT directory with adapter_model.safetensors).
    base_source : the base model id the run trained on (``fedge.models.load_base`` source).
    private_key : the signer's Ed25519 PEM private key file.
    mode : "adapter" or "merged".
    pooling : what the classifier's head reads, as trained (``model.pooling``): "cls" or "mean"
        (:func:`fedge.models.use_mean_pooling`). Recorded in the manifest; every runtime rebuilds it
        (the ONNX graph computes the masked mean itself).
    formats : merged mode: GGUF types (Llama only; K-quants need llama_cpp) and/or "int8", "fp32";
        "onnx", "onnx-int8" for sequence classifiers (need the ``onnx`` extra); "onnx", "onnx-int8",
        "onnx-int4" for causal LMs of a Llama architecture (need the ``onnx-genai`` extra).
    adapter_gguf : adapter mode: also write adapter.gguf (None: when the model is Llama).
    reference_gguf : GGUF whose tokenizer metadata is copied (default model: the packaged one).
    privacy : privacy spent by the run (None: trained without DP, recorded as null).
    """
    from fedge.models import load_base

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if mode not in ("adapter", "merged"):
        raise ArtifactBuildError(f"mode must be 'adapter' or 'merged', got {mode!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ArtifactBuildError(f"{out_dir} exists and is not empty")
    if isinstance(privacy, Mapping):
        privacy = PrivacySpent(**privacy)
    try:
        check_pooling(pooling, task)
    except ManifestError as err:
        raise ArtifactBuildError(str(err)) from None
    key = load_private_key(private_key, password=key_password)
    if mode == "merged" and formats:
        try:
            llamacpp.require(formats)  # before loading anything
            if task == "sequence-classification":
                onnx_export.require(formats)
            else:
                onnx_genai.require(formats)
        except (llamacpp.LlamaCppMissing, onnx_export.OnnxMissing, onnx_genai.GenaiMissing) as err:
            raise ArtifactBuildError(str(err)) from None
    if task == "sequence-classification" and num_labels is None:
        num_labels = _num_labels_from_adapter(adapter_dir)

    base = load_base(base_source, task=task, num_labels=num_labels, cache_dir=cache_dir, pooling=pooling)
    llama = _is_llama(base.model)
    if formats is None:
        formats = ("Q8_0",) if llama else ("int8",)
    classifier = task == "sequence-classification"
    allowed = ((MODEL_TYPES + llamacpp.QUANT_TYPES if llama else ()) + OTHER_FORMATS
               + (onnx_export.ONNX_FORMATS if classifier else onnx_genai.FORMATS if llama else ()))
    bad = [f for f in formats if f not in allowed]
    if mode == "merged" and (bad or not formats):
        raise ArtifactBuildError(f"formats {bad or list(formats)} not possible for this model; allowed: {list(allowed)}"
                                 + ("" if llama else " (GGUF needs a Llama-architecture model)")
                                 + (" (onnx-int4: causal LMs)" if classifier else
                                    "" if llama else " (ONNX: sequence classifiers, or Llama causal LMs)"))
    if reference_gguf is None and base_source == DEFAULT_MODEL:
        reference_gguf = packaged_reference_gguf()
    peft_model = load_peft_model(base.model, adapter_dir)
    adapter_config = _adapter_config(peft_model)

    base_gguf_sha = sha256_file(packaged_reference_gguf()) if base_source == DEFAULT_MODEL else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        quantization: dict[str, str] = {}
        if mode == "adapter":
            quantization.update(_write_adapter(peft_model, tmp, base_source=base_source, llama=llama,
                                               adapter_gguf=adapter_gguf, adapter_config=adapter_config))
            if "adapter.gguf" in quantization:
                ollama.write_modelfile(tmp, base.tokenizer, version_note="adapter mode", base_id=base_source,
                                       base_gguf_name=Path(reference_gguf).name if reference_gguf else None,
                                       base_gguf_sha256=base_gguf_sha)
        else:
            merged = merge_lora(peft_model)
            quantization.update(_write_merged(merged, base.tokenizer, tmp, formats=formats, task=task,
                                              reference_gguf=reference_gguf,
                                              target_modules=adapter_config.get("target_modules")))
        if version is None:
            if version_file is None and not isinstance(private_key, (str, Path)):
                raise ArtifactBuildError("pass version= or version_file= when private_key is a key object")
            counter = Path(version_file) if version_file else Path(private_key).parent / "artifact-version"
            version = next_version(counter)
        elif version_file:
            next_version(version_file, at_least=version)
        manifest = build_manifest(
            tmp, version=version, mode=mode, task=task, base_model_id=base_source, base_hash=base.hash,
            signer=fingerprint(key.public_key()), adapter_config=adapter_config, quantization=quantization,
            privacy=privacy, metrics=metrics, labels=labels, pooling=pooling, base_gguf_sha256=base_gguf_sha,
        )
        write_manifest(tmp, manifest)
        sign_manifest(tmp, key)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("artifact v%d (%s) written to %s", version, mode, out_dir)
    return out_dir


def _write_adapter(peft_model, tmp: Path, *, base_source: str, llama: bool, adapter_gguf: bool | None,
                   adapter_config: Mapping[str, Any]) -> dict[str, str]:
    from peft import get_peft_model_state_dict

    scratch = tmp / ".peft"
    peft_model.save_pretrained(scratch, safe_serialization=True)
    shutil.move(scratch / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
    cfg = json.loads((scratch / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_source  # not the server's local cache path
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    shutil.rmtree(scratch)
    out = {"adapter_model.safetensors": "fp32"}
    if adapter_gguf is False or (adapter_gguf is None and not llama):
        return out
    try:
        write_adapter_gguf(get_peft_model_state_dict(peft_model), tmp / "adapter.gguf",
                           config=peft_model.base_model.model.config, lora_alpha=adapter_config["lora_alpha"],
                           r=adapter_config["r"], use_rslora=bool(adapter_config.get("use_rslora")),
                           use_dora=bool(adapter_config.get("use_dora")))
        out["adapter.gguf"] = "gguf-lora-F32"
    except GGUFExportError as err:
        if adapter_gguf:
            raise ArtifactBuildError(f"adapter.gguf: {err}") from None
        log.warning("no adapter.gguf: %s", err)
        (tmp / "adapter.gguf").unlink(missing_ok=True)
    return out


def _write_merged(merged, tokenizer, tmp: Path, *, formats, task, reference_gguf, target_modules) -> dict[str, str]:
    out: dict[str, str] = {}
    save_tokenizer_files(tokenizer, tmp)
    gguf_kw = dict(reference_gguf=reference_gguf, tokenizer=tokenizer)
    # The weights the adapter changed stay Q8_0 in files below 8 bits (fedge.export.gguf).
    adapted = adapted_tensor_names(merged, target_modules) if any(f in MODEL_TYPES + llamacpp.QUANT_TYPES
                                                                  for f in formats) else set()
    scratch: Path | None = None  # F32 source of the K-quants when F32 itself is not shipped
    try:
        for fmt in sorted(dict.fromkeys(formats), key=lambda f: f != "F32"):  # F32 first: the K-quants' source
            name = f"model.{fmt}.gguf"
            if fmt in MODEL_TYPES:
                write_model_gguf(merged, tmp / name, file_type=fmt, adapted=adapted, **gguf_kw)
                out[name] = f"gguf-{fmt}"
            elif fmt in llamacpp.QUANT_TYPES:
                src = tmp / "model.F32.gguf"
                if not src.exists():
                    if scratch is None:
                        scratch = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{tmp.name}.f32-"))
                        write_model_gguf(merged, scratch / "model.F32.gguf", file_type="F32", **gguf_kw)
                    src = scratch / "model.F32.gguf"
                llamacpp.quantize_gguf(src, tmp / name, fmt, adapted=adapted)
                out[name] = f"gguf-{fmt}"
            elif fmt == "int8":
                merged.config.save_pretrained(tmp)
                save_int8(merged, tmp / "model.int8.safetensors")
                out["model.int8.safetensors"] = "int8-rowwise"
            elif fmt == "fp32":
                save_merged(merged, tmp)
                out["model.safetensors"] = "fp32"
        if task == "sequence-classification" and any(f in onnx_export.ONNX_FORMATS for f in formats):
            merged.config.save_pretrained(tmp)  # the ONNX runtime reads max_position_embeddings
            out.update(onnx_export.write_onnx(merged, tmp, formats))
        elif task == "causal-lm" and any(f in onnx_genai.FORMATS for f in formats):
            try:
                out.update(onnx_genai.write_genai(merged, tokenizer, tmp, formats, target_modules=target_modules))
            except onnx_genai.GenaiExportError as err:
                raise ArtifactBuildError(str(err)) from None
        ollama.write_modelfile(tmp, tokenizer, version_note="merged mode", merged_files=list(out))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


# -- transport: artifact <-> named byte arrays (e.g. a Flower ArrayRecord) --------------------


def artifact_to_arrays(artifact_dir: str | Path) -> dict[str, np.ndarray]:
    """Every file of the artifact (manifest and signature included) as uint8 arrays keyed by path."""
    root = Path(artifact_dir)
    read_manifest(root)  # refuse to ship something that is not an artifact
    return {p.relative_to(root).as_posix(): np.frombuffer(p.read_bytes(), dtype=np.uint8)
            for p in sorted(root.rglob("*")) if p.is_file()}


def arrays_to_artifact(arrays: Mapping[str, np.ndarray], dest_dir: str | Path) -> Path:
    """Write received arrays back as files (paths checked; nothing is trusted until ``install``)."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for rel, arr in arrays.items():
        if not is_safe_relpath(rel):
            raise ArtifactBuildError(f"unsafe path in received artifact: {rel!r}")
        target = dest.joinpath(*rel.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(np.asarray(arr, dtype=np.uint8).tobytes())
    return dest
