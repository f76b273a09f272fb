"""Causal-LM ONNX artifacts through onnxruntime-genai's model builder, run on devices by
onnxruntime-genai without PyTorch (``fedge.runtime.ort_genai``).

Formats (``export.formats`` of a ``causal-lm`` merged artifact; the ``onnx-genai`` extra) and the
folder each one becomes in the artifact::

    onnx        genai-fp32/   fp32 weights
    onnx-int8   genai-int8/   every projection int8
    onnx-int4   genai-int4/   int4, except the projections the adapter changed: int8 (below)

    each folder: model.onnx          the decoder: input_ids, attention_mask, past key/values ->
                                     logits, present key/values (GroupQueryAttention); every weight
                                     inside the file
                 genai_config.json   onnxruntime-genai's settings; names model.onnx; eos_token_id =
                                     fedge's stop tokens (``fedge.data.tokenize.stop_token_ids``)
                 tokenizer.json, tokenizer_config.json, chat_template.jinja   the artifact's tokenizer

How: the merged model is saved as a Hugging Face directory in a scratch folder and
``python -m onnxruntime_genai.models.builder -i DIR -o OUT -p PRECISION -e cpu`` runs in a subprocess
(it imports torch and transformers and appends its own folder to ``sys.path``: a child process keeps
both out of the caller, and nothing is downloaded: ``HF_HUB_OFFLINE``). Then, per folder:

1. **One self-contained file.** The builder writes the weights to ``model.onnx.data``; the device store
   refuses external data (a side file is a path outside what was signed), so the graph is saved again
   with every tensor inside. Protobuf caps one message at 2 GiB: a model past that is refused here
   (ship it as GGUF).
2. **Standard RMSNorm.** The builder's first RMSNorm is ONNX Runtime's ``SimplifiedLayerNormalization``,
   declared in the standard ONNX domain where ``onnx.checker`` (and so the store) does not know it. ONNX
   opset 23 has the same operator, ``RMSNormalization``: ``Y = X / sqrt(mean(X², axis=-1) + ε) · γ`` with the
   same attributes (axis, epsilon, stash_type); the node is renamed and the model's ONNX opset raised to
   23 (IR version 11). ONNX Runtime runs both with the same kernel (logits bit-identical in tests). The
   later norms are ``com.microsoft`` ops, which the checker leaves to the runtime.
3. **Checked like a device checks it** (``fedge.runtime.store.check_files``): every file of the folder is
   of an allowed type and parses, the ``.onnx`` passes ``onnx.checker`` with no external data.

Quantization (the builder's ``MatMulNBits``, weights only, round to nearest): each row of W (out, in) is
cut into blocks of 32 input values, ``q = round(W / s)``, ``s = max |W_block| / 2^(b-1)``, q stored in b = 4
or 8 bits (symmetric). Norms and attention stay fp32. ONNX Runtime's CPU kernel (``accuracy_level`` 4)
quantizes each MatMul input to int8 per block and multiplies in int8.

* ``onnx-int8``: every projection and the LM head 8-bit; the embedding stays fp32 (the builder's
  quantized embedding lookup, ``GatherBlockQuantized``, is 4-bit only).
* ``onnx-int4``: 4-bit, except the projections of the adapter's ``target_modules``: int8, as in GGUF files
  below 8 bits (``fedge.export.gguf``): a LoRA update is far below a 4-bit step, and rounding W0 + ΔW to 4
  bits erases most of it. The builder fuses q, k, v into one MatMul (``attn/qkv_proj``): adapting any of
  them keeps all three at int8. A model with tied embeddings (SmolLM2) keeps one 4-bit matrix for the
  embedding and the LM head (the builder's ``shared_embeddings``): on SmolLM2 that makes the file 90 instead
  of 198 MiB (an fp32 embedding) for answer perplexity +41 % instead of +36 % against fp32 (both far from
  GGUF Q4_1's −0.02 %: the packaged base is Q4_1, which no symmetric 4-bit grid reproduces;
  ``benchmarks/results/export_onnx_genai.md``).

Architectures: ``LlamaForCausalLM`` (SmolLM2, TinyLlama, Llama 2/3) — the one tested here end to end.
The builder knows more (Mistral, Qwen, Phi, Gemma, ...); they are refused until checked the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-int8", "onnx-int4")
PRECISION = {"onnx": "fp32", "onnx-int8": "int8", "onnx-int4": "int4"}
FOLDERS = {"onnx": "genai-fp32", "onnx-int8": "genai-int8", "onnx-int4": "genai-int4"}
QUANTIZATION = {"onnx": "onnx-genai-fp32", "onnx-int8": "onnx-genai-int8", "onnx-int4": "onnx-genai-int4"}
MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
REQUIRED_MODULES = ("onnxruntime_genai", "onnx", "onnx_ir", "onnxruntime")
PROTOBUF_LIMIT = 2 << 30  # bytes: the largest protobuf message, so the largest self-contained .onnx
RMSNORM_OPSET = 23  # ONNX RMSNormalization
RMSNORM_IR_VERSION = 11
# Hugging Face module name -> the builder's node, per layer (Llama): q, k, v share one fused MatMul.
BUILDER_NODES = {"q_proj": "attn/qkv_proj", "k_proj": "attn/qkv_proj", "v_proj": "attn/qkv_proj",
                 "o_proj": "attn/o_proj", "gate_proj": "mlp/gate_proj", "up_proj": "mlp/up_proj",
                 "down_proj": "mlp/down_proj"}
BUILD_TIMEOUT_S = 3600


class GenaiExportError(ValueError):
    """A causal-LM ONNX export that cannot be done; the message says why and what to do instead."""


class GenaiMissing(GenaiExportError):
    """ONNX formats for a causal LM were asked for but the optional ``onnx-genai`` extra is not installed."""


def missing_modules() -> list[str]:
    """The modules the export needs that do not import here (find_spec: nothing is imported)."""
    from fedge.export.onnx_export import missing_modules as unimportable

    return unimportable(REQUIRED_MODULES)


def missing_message(formats: Iterable[str], *, field: str = "export.formats") -> str:
    asked = [f for f in formats if f in FORMATS]
    return (f"{field}: {asked} are built for causal LMs by onnxruntime-genai's model builder, but "
            f"{', '.join(missing_modules())} do(es) not import here: pip install 'fedge[onnx-genai]'")


def require(formats: Iterable[str]) -> None:
    """Raise :class:`GenaiMissing` when ``formats`` holds a causal-LM ONNX format and the extra is missing."""
    formats = list(formats)
    if any(f in FORMATS for f in formats) and missing_modules():
        raise GenaiMissing(missing_message(formats))


def architecture_of(source: str) -> str | None:
    """The Hugging Face architecture of a base model source without loading it (None: not known here,
    e.g. a hub id; ``build_artifact`` checks the merged model again)."""
    if source == "smollm2-135m-instruct":
        return "LlamaForCausalLM"
    if source == "minilm-l6":
        return "BertModel"
    config = Path(source).expanduser() / "config.json"
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    return str(archs[0]) if archs else None


def check_architecture(architecture: str | None, *, field: str = "export.formats") -> None:
    """Refuse an architecture the builder is not used for here (None passes: not known yet)."""
    if architecture is not None and architecture not in SUPPORTED_ARCHITECTURES:
        raise GenaiExportError(
            f"{field}: onnx / onnx-int8 / onnx-int4 for causal LMs are built by onnxruntime-genai's model builder "
            f"for {list(SUPPORTED_ARCHITECTURES)} (tested here); this model is {architecture}: ship GGUF or "
            "safetensors instead")


def int8_nodes(target_modules: Sequence[str] | None, num_layers: int) -> list[str]:
    """The builder's names of the MatMuls the adapter changed (kept int8 in ``onnx-int4``)."""
    targets = sorted(set(target_modules or ()))
    unknown = [t for t in targets if t not in BUILDER_NODES]
    if unknown:
        raise GenaiExportError(f"onnx-int4: no builder node known for LoRA target module(s) {unknown} "
                               f"(known: {sorted(BUILDER_NODES)}); use onnx-int8")
    parts = sorted({BUILDER_NODES[t] for t in targets})
    return [f"/model/layers.{i}/{p}/MatMul" for i in range(num_layers) for p in parts]


# -- export -------------------------------------------------------------------------------------


def write_genai(merged, tokenizer, out_dir: Path, formats: Iterable[str], *,
                target_modules: Sequence[str] | None) -> dict[str, str]:
    """Write one folder per requested causal-LM ONNX format into ``out_dir``; return ``{model file: format}``.

    ``merged``: the merged (eval) transformers model; ``tokenizer``: its tokenizer (files and stop tokens).
    """
    from fedge.data.tokenize import stop_token_ids
    from fedge.export.merge import save_merged, save_tokenizer_files

    wanted = [f for f in FORMATS if f in formats]
    if not wanted:
        return {}
    require(wanted)
    check_architecture((getattr(merged.config, "architectures", None) or [type(merged).__name__])[0])
    stop_ids = stop_token_ids(tokenizer)
    tied = bool(getattr(merged.config, "tie_word_embeddings", False))
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.genai-") as scratch:
        hf_dir = Path(scratch) / "hf"
        save_merged(merged, hf_dir)
        tok_files = save_tokenizer_files(tokenizer, hf_dir)
        for fmt in wanted:
            folder = out_dir / FOLDERS[fmt]
            nodes = int8_nodes(target_modules, merged.config.num_hidden_layers) if fmt == "onnx-int4" else []
            build(hf_dir, folder, PRECISION[fmt], int8_overrides=nodes, shared_embeddings=tied and fmt == "onnx-int4",
                  cache_dir=Path(scratch) / "cache")
            finish_folder(folder, stop_ids=stop_ids, tokenizer_files=tok_files, int8_overrides=nodes)
            out[f"{FOLDERS[fmt]}/{MODEL_FILE}"] = QUANTIZATION[fmt]
            log.info("exported %s (%s, %d bytes)", folder.name, fmt, (folder / MODEL_FILE).stat().st_size)
    return out


def build(hf_dir: Path, out: Path, precision: str, *, int8_overrides: Sequence[str] = (),
          shared_embeddings: bool = False, cache_dir: Path) -> Path:
    """Run onnxruntime-genai's model builder (CPU target) on ``hf_dir`` into ``out``, in a child process.

    ``int8_overrides``: MatMul names kept 8-bit in a 4-bit build; ``shared_embeddings``: one 4-bit matrix
    for the embedding and the (tied) LM head."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache_dir)]
    if int8_overrides or shared_embeddings:
        weights = {"type": precision, "op_types": ["MatMul", "Gather"] if shared_embeddings else ["MatMul"],
                   "overrides": [{"match": {"name": n}, "type": "int8"} for n in int8_overrides]}
        cmd += ["--target_options", json.dumps({"quant_config": {"weights": weights}})]
    if shared_embeddings:
        cmd += ["--extra_options", "shared_embeddings=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile("w+") as logf:
        rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=BUILD_TIMEOUT_S,
                            cwd=str(hf_dir.parent)).returncode
        if rc != 0 or not (out / MODEL_FILE).is_file():
            logf.seek(0)
            tail = "\n".join(logf.read().splitlines()[-12:])
            raise GenaiExportError(f"onnxruntime-genai's model builder failed for {precision} (exit {rc}):\n{tail}")
    return out


def finish_folder(folder: Path, *, stop_ids: Sequence[int], tokenizer_files: Sequence[Path],
                  int8_overrides: Sequence[str] = ()) -> None:
    """Steps 1-3 of the module docstring, the stop tokens into ``genai_config.json``, the artifact's own
    tokenizer files in place of the builder's copies."""
    from fedge.runtime.store import ArtifactRefused, check_files

    self_contained(folder / MODEL_FILE)
    if int8_overrides:
        check_int8(folder / MODEL_FILE, int8_overrides)
    config_path = folder / CONFIG_FILE
    config = json.loads(config_path.read_text())
    decoder = config["model"]["decoder"]
    if decoder.get("filename") != MODEL_FILE:
        raise GenaiExportError(f"{config_path.name} names {decoder.get('filename')!r}, not {MODEL_FILE}")
    config["model"]["eos_token_id"] = list(stop_ids) if len(stop_ids) != 1 else stop_ids[0]
    config.setdefault("search", {})["do_sample"] = False  # fedge decodes greedily
    config_path.write_text(json.dumps(config, indent=4, sort_keys=True) + "\n")
    keep = {MODEL_FILE, CONFIG_FILE}
    for p in folder.iterdir():
        if p.name in keep:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    for src in tokenizer_files:
        shutil.copyfile(src, folder / Path(src).name)
    try:
        check_files(folder)
    except ArtifactRefused as err:
        raise GenaiExportError(f"{folder.name}: a device would refuse this export: {err}") from None


def self_contained(path: Path) -> Path:
    """Re-save ``path`` with every tensor inside the file (and RMSNorm as the standard op); delete its
    external data files. Refuse a model past protobuf's 2 GiB."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    head = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in _tensors(head) if uses_external_data(t)}
    for loc in locations:
        if Path(loc).name != loc:
            raise GenaiExportError(f"{path.name} refers to external data outside its folder: {loc!r}")
    total = path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)
    if total >= PROTOBUF_LIMIT:
        raise GenaiExportError(
            f"{path.parent.name}: the ONNX graph with its weights is {total / 2**30:.2f} GiB, above protobuf's 2 GiB "
            "limit for one self-contained file (devices refuse external data): choose onnx-int4 / onnx-int8, a "
            "smaller model, or GGUF")
    model = onnx.load(str(path), load_external_data=True)
    standard_rmsnorm(model)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, str(tmp), save_as_external_data=False)
    os.replace(tmp, path)
    for loc in locations:
        (path.parent / loc).unlink(missing_ok=True)
    return path


def standard_rmsnorm(model) -> int:
    """Rename ONNX-domain ``SimplifiedLayerNormalization`` nodes to opset 23's ``RMSNormalization``
    (module docstring, step 2); return how many were renamed."""
    n = 0
    for node in model.graph.node:
        if node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx"):
            node.op_type = "RMSNormalization"
            n += 1
    if n:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, RMSNORM_OPSET)
        model.ir_version = max(model.ir_version, RMSNORM_IR_VERSION)
    return n


def check_int8(path: Path, names: Sequence[str]) -> None:
    """Every MatMul named in ``names`` became an 8-bit MatMulNBits (the builder names it ``<name>_Q8``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    bits = {n.name: next((a.i for a in n.attribute if a.name == "bits"), None)
            for n in model.graph.node if n.op_type == "MatMulNBits"}
    wrong = [name for name in names if bits.get(f"{name}_Q8") != 8]
    if wrong:
        raise GenaiExportError(f"onnx-int4: the builder did not keep {wrong[:3]} at int8 (node names changed?)")


def _tensors(model) -> list:
    out, graphs = [], [model.graph]
    while graphs:
        g = graphs.pop()
        out += list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.HasField("t")]
        graphs += [a.g for n in g.node for a in n.attribute if a.HasField("g")]
    return out
