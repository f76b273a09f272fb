"""Local inference over an installed (verified) artifact.

Backends:

* ``torch`` (the default install)
    - adapter mode: the base is loaded with ``fedge.models.load_base(base id)``, its
      content hash must equal the manifest's ``base_model.sha256``, then the PEFT
      adapter is loaded and merged (W0 + (alpha/r)·BA) for speed;
    - merged mode: ``model.safetensors`` (fp32) if present, else
      ``model.int8.safetensors``, else a GGUF file through transformers
      (dequantized to fp32: same numbers as the quantized file, fp32 speed).
      ``model.int8.safetensors`` of a classifier runs its int8 Linear layers as torch
      dynamic-quantized Linear built from the file's own int8 weights and scales
      (``fedge.export.merge``; ~3-4× faster than fp32 on CPU for MiniLM-L6); a causal
      LM's, or any with ``int8_compute=False``, is dequantized to fp32.
      ``LocalModel.compute`` says which: "int8-dynamic" or "fp32".
    - classifiers: the head reads what the manifest's ``pooling`` says, as in training
      ("cls": the model's pooler; "mean": the masked mean of the last hidden states,
      ``fedge.models.use_mean_pooling``; an ONNX graph computes it inside).
* ``llama.cpp`` (only when ``llama_cpp`` imports; causal LMs): a merged GGUF, or the
  base GGUF + ``adapter.gguf`` as runtime LoRA (default model: the packaged SmolLM2
  GGUF, checked against the manifest's ``base_model.gguf_sha256``).
* ``onnxruntime``
    - sequence classifiers (the optional ``onnx`` extra): ``model.int8.onnx``, else
      ``model.onnx`` (``fedge.runtime.ort``); ``LocalModel.compute`` says "onnx-int8" or "onnx-fp32";
    - causal LMs (the optional ``onnx-genai`` extra): onnxruntime-genai over the artifact's
      ``genai-int8/``, else ``genai-int4/``, else ``genai-fp32/`` folder (``fedge.runtime.ort_genai``);
      ``LocalModel.compute`` says "onnx-genai-int4" / "-int8" / "-fp32".
  This path imports neither torch nor transformers: a device needs only onnxruntime (or
  onnxruntime-genai), tokenizers and numpy.

``auto`` picks llama.cpp when it is importable and usable; for an artifact holding ONNX (a
classifier's files or a causal LM's genai folders), onnxruntime when torch is not installed or
the artifact has no file torch loads; else torch. torch is imported only by the torch backend.
Every load re-checks the sha256 of every file against the installed manifest
(the signature was verified at install time by ``fedge.runtime.store``).
Decoding is greedy (deterministic).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.export.manifest import ManifestError, pooling_of, read_manifest
from fedge.export.onnx_export import missing_modules  # find_spec only: imports nothing optional
from fedge.files import sha256_file
from fedge.runtime.store import VERSIONS, ArtifactRefused, current, current_dir, installed_versions

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "llama.cpp", "onnxruntime")
TORCH_CLASSIFIER_FILES = ("model.safetensors", "model.int8.safetensors", "adapter_model.safetensors")
# torch dequantizes anyway: most precise first
TORCH_GGUF_ORDER = ("F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_1", "Q4_0")
# llama.cpp runs quantized: best quality/speed first
LLAMA_GGUF_ORDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_1", "Q4_0", "F16", "F32")


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class LocalModel:
    """An installed model ready for ``generate`` / ``chat`` (causal LM) or ``classify``."""

    task: str
    backend: str
    version: int
    manifest: dict[str, Any]
    model: Any = None
    tokenizer: Any = None
    labels: list[str] | None = None
    files: dict[str, str] = field(default_factory=dict)  # what was loaded, for reports
    compute: str | None = None  # torch: "fp32" | "int8-dynamic"; onnxruntime: "onnx-fp32" | "onnx-int8" |
    # "onnx-genai-int4" | "onnx-genai-int8" | "onnx-genai-fp32"; llama.cpp: None
    fallback_from: dict[str, Any] | None = None  # the current version refused at load, when an older one runs

    @property
    def name(self) -> str:
        base = str(self.manifest["base_model"]["id"]).rstrip("/").split("/")[-1]
        return f"fedge-{base}-v{self.version}"

    # -- causal LM ----------------------------------------------------------------------------

    def generate(self, prompt: str, *, max_new_tokens: int = 64) -> str:
        """Greedy answer to one user turn."""
        return self.chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens).text

    def chat(self, messages: list[dict[str, str]], *, max_new_tokens: int = 64) -> ChatResult:
        """Greedy answer to a chat (``[{"role", "content"}, ...]``)."""
        if self.task != "causal-lm":
            raise ValueError(f"chat needs a causal-lm model; this one is {self.task} (use classify)")
        if self.backend == "llama.cpp":
            out = self.model.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0)
            usage = out.get("usage", {})
            return ChatResult(out["choices"][0]["message"]["content"].strip(), usage.get("prompt_tokens", 0),
                              usage.get("completion_tokens", 0), out["choices"][0].get("finish_reason") or "stop")
        if self.backend == "onnxruntime":
            from fedge.runtime.stream import genai_generate

            return genai_generate(self, self._chat_ids(messages), max_new_tokens, None, strip=True)
        return self._torch_chat(messages, max_new_tokens)

    @property
    def context_length(self) -> int | None:
        """Most tokens (prompt + answer, or one classified text) the model takes: the
        model's ``max_position_embeddings`` (torch, onnxruntime) or llama.cpp's ``n_ctx``."""
        if self.backend == "llama.cpp":
            return int(self.model.n_ctx())
        if self.backend == "onnxruntime":
            return self.model.context_length
        n = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(n) if n else None

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the chat prompt as the model will see it (llama.cpp: the messages' contents
        plus 8 template tokens per message, an upper estimate of its chat template)."""
        if self.backend == "llama.cpp":
            return sum(len(self.model.tokenize(m["content"].encode(), add_bos=False)) + 8 for m in messages)
        return len(self._chat_ids(messages))

    def text_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text as the classifier sees it (special tokens included, no truncation)."""
        if self.backend == "onnxruntime":
            return self.model.token_counts(texts)
        return [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]

    def _chat_ids(self, messages) -> list[int]:
        if self.backend == "onnxruntime":
            return self.model.chat_ids(messages)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            text = "\n".join(m["content"] for m in messages) + "\n"
            ids = tok(text, add_special_tokens=True)["input_ids"]
        return list(ids)

    def _torch_chat(self, messages, max_new_tokens: int) -> ChatResult:
        from fedge.runtime.stream import torch_generate

        return torch_generate(self, self._chat_ids(messages), max_new_tokens, None, strip=True)

    # -- classification -----------------------------------------------------------------------

    def classify(self, text: str | list[str]) -> dict[str, Any] | list[dict[str, Any]]:
        """Label (index and name) and class probabilities for one text or a list of texts."""
        if self.task != "sequence-classification":
            raise ValueError(f"classify needs a sequence-classification model; this one is {self.task}")
        texts = [text] if isinstance(text, str) else list(text)
        if self.backend == "onnxruntime":
            from fedge.runtime.ort import softmax

            probs = softmax(self.model.logits(texts))
        else:
            import torch

            enc = self.tokenizer(texts, padding=True, truncation=True,
                                 max_length=min(512, self.context_length or 512), return_tensors="pt")
            with torch.no_grad():
                probs = torch.softmax(self.model(**enc).logits.float(), dim=-1).numpy()
        out = []
        for row in probs:
            label = int(row.argmax())
            name = self.labels[label] if self.labels and label < len(self.labels) else str(label)
            out.append({"label": label, "label_name": name, "probs": [round(float(p), 6) for p in row]})
        return out[0] if isinstance(text, str) else out


def torch_available() -> bool:
    """True when torch can be imported here (looked up, not imported)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def onnxruntime_genai_available() -> bool:
    """True when onnxruntime-genai and tokenizers can be imported (the optional ``onnx-genai`` extra)."""
    return not missing_modules(("onnxruntime_genai", "tokenizers"))


def onnxruntime_available() -> bool:
    """True when onnxruntime and tokenizers can be imported (the optional ``onnx`` extra)."""
    return not missing_modules(("onnxruntime", "tokenizers"))


def llama_cpp_available() -> bool:
    """True when llama-cpp-python imports (the optional ``llamacpp`` extra)."""
    from fedge.export import llamacpp

    return llamacpp.available()


def check_hashes(artifact_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse (ArtifactRefused "hash") an installed file changed since it was verified."""
    for rel, entry in manifest["files"].items():
        path = artifact_dir / rel
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise ArtifactRefused("hash", f"installed file {rel} changed since install (sha256 mismatch)")


def device_base_hash(manifest: dict[str, Any], *, base_source: str | None = None,
                     cache_dir: str | Path | None = None) -> str | None:
    """This device's hash of the base an adapter artifact names (None for merged artifacts).

    ``fedge.models.base_hash`` of the base loaded from ``base_source`` (default: the
    manifest's ``base_model.id``); the store refuses the artifact when it differs from
    the manifest's ``base_model.sha256``. Classifier heads are not hashed, so any
    label count loads the same hash; a mean-pooled classifier's base (manifest ``pooling``) has
    no CLS pooler, so it is loaded mean-pooled.
    """
    if manifest["mode"] != "adapter":
        return None
    from fedge.models import load_base

    task = manifest["task"]
    num_labels = (len(manifest.get("labels") or []) or 2) if task == "sequence-classification" else None
    return load_base(base_source or manifest["base_model"]["id"], task=task, num_labels=num_labels,
                     cache_dir=cache_dir, pooling=pooling_of(manifest)).hash


def load_installed(store_dir: str | Path, *, fallback: bool = True, **kwargs) -> LocalModel:
    """Load the store's current version (keyword arguments as :func:`load_artifact`).

    When the current version is refused at load (its base differs from this device's,
    a file changed since install, ...) and ``fallback`` is on, the newest older
    installed version that loads is used instead and ``LocalModel.fallback_from``
    says which version was refused and why. The store is not changed (``fedge
    rollback`` makes the switch permanent); with no older version that loads, the
    first refusal is raised.
    """
    store_dir = Path(store_dir)
    try:
        return load_artifact(current_dir(store_dir), **kwargs)
    except ArtifactRefused as err:
        if not fallback:
            raise
        refused, first = current(store_dir), err
    for v in sorted((v for v in installed_versions(store_dir) if v < refused), reverse=True):
        try:
            model = load_artifact(Path(store_dir) / VERSIONS / str(v), **kwargs)
        except ArtifactRefused as err:
            log.warning("version %d refused too: %s", v, err)
            continue
        model.fallback_from = {"version": refused, "reason": first.reason, "message": str(first)}
        log.warning("installed version %d refused at load (%s); serving version %d instead "
                    "(fedge rollback makes that permanent)", refused, first, v)
        return model
    raise first


def load_artifact(
    artifact_dir: str | Path,
    *,
    backend: str = "auto",
    base_source: str | None = None,
    base_gguf: str | Path | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    n_ctx: int = 2048,
    int8_compute: bool = True,
) -> LocalModel:
    """Load an installed artifact directory for inference.

    ``base_source`` overrides the manifest's base id (adapter mode, e.g. a local copy);
    ``base_gguf`` is the base GGUF for llama.cpp adapter mode (default model: packaged);
    ``int8_compute=False`` dequantizes a classifier's ``model.int8.safetensors`` to fp32
    instead of running its Linear layers in int8 (for comparisons).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} unknown; allowed: {list(BACKENDS)}")
    artifact_dir = Path(artifact_dir)
    try:
        manifest = read_manifest(artifact_dir)
    except (ManifestError, FileNotFoundError) as err:
        raise ArtifactRefused("manifest", str(err)) from None
    check_hashes(artifact_dir, manifest)
    files = set(manifest["files"])
    task = manifest["task"]
    if backend == "auto":
        backend = _auto_backend(artifact_dir, manifest, base_gguf)
    common = dict(task=task, version=manifest["version"], manifest=manifest, labels=manifest.get("labels"))
    if backend == "llama.cpp":
        return _load_llama_cpp(artifact_dir, manifest, base_gguf, threads, n_ctx, common)
    if backend == "onnxruntime":
        return _load_onnxruntime(artifact_dir, manifest, threads, common)
    import torch

    if threads:
        torch.set_num_threads(threads)
    if manifest["mode"] == "adapter":
        return _load_torch_adapter(artifact_dir, manifest, base_source, cache_dir, common)
    return _load_torch_merged(artifact_dir, files, task, common, int8_compute=int8_compute,
                              pooling=pooling_of(manifest))


def _auto_backend(artifact_dir: Path, manifest, base_gguf) -> str:
    from fedge.runtime.ort import ONNX_ORDER
    from fedge.runtime.ort_genai import genai_folders

    files, task = set(manifest["files"]), manifest["task"]
    if task == "causal-lm" and llama_cpp_available() and _llama_cpp_plan(artifact_dir, manifest, base_gguf):
        return "llama.cpp"
    if task == "sequence-classification" and files & set(ONNX_ORDER) and (
            not torch_available() or not files & set(TORCH_CLASSIFIER_FILES)):
        return "onnxruntime"
    torch_loads = files & set(TORCH_CLASSIFIER_FILES) or any(f.startswith("model.") and f.endswith(".gguf")
                                                              for f in files)  # the same files, and GGUF
    if task == "causal-lm" and genai_folders(files) and (not torch_available() or not torch_loads):
        return "onnxruntime"
    return "torch"


def _load_onnxruntime(artifact_dir: Path, manifest, threads, common) -> LocalModel:
    from fedge.runtime.ort import COMPUTE, ONNX_ORDER, OrtClassifier

    if manifest["task"] == "causal-lm":
        return _load_genai(artifact_dir, manifest, threads, common)
    if manifest["task"] != "sequence-classification":
        raise ValueError("the onnxruntime backend runs sequence classifiers and causal LMs only")
    if not onnxruntime_available():
        raise RuntimeError("backend 'onnxruntime' needs onnxruntime and tokenizers: pip install 'fedge[onnx]'")
    files = set(manifest["files"])
    onnx_files = [f for f in ONNX_ORDER if f in files]
    if not onnx_files:
        raise ArtifactRefused("files", f"no ONNX model (model.onnx, model.int8.onnx) in {sorted(files)}")
    for need in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if need not in files:
            raise ArtifactRefused("files", f"the onnxruntime backend needs {need}, which the artifact lacks")
    model = OrtClassifier(artifact_dir, onnx_files[0], threads=threads)
    return LocalModel(backend="onnxruntime", model=model, tokenizer=model.tokenizer, compute=COMPUTE[onnx_files[0]],
                      files={"model": onnx_files[0]}, **common)


def _load_genai(artifact_dir: Path, manifest, threads, common) -> LocalModel:
    from fedge.runtime.ort_genai import COMPUTE, MODEL_FILE, GenaiLM, genai_folders

    if not onnxruntime_genai_available():
        raise RuntimeError("backend 'onnxruntime' runs causal LMs with onnxruntime-genai and tokenizers: "
                           "pip install 'fedge[onnx-genai]'")
    folders = genai_folders(manifest["files"])
    if not folders:
        raise ArtifactRefused("files", "no onnxruntime-genai folder (genai-int8/, genai-int4/, genai-fp32/ with "
                                       "model.onnx, genai_config.json and the tokenizer) in this artifact")
    model = GenaiLM(artifact_dir / folders[0], threads=threads)
    return LocalModel(backend="onnxruntime", model=model, tokenizer=model, compute=COMPUTE[folders[0]],
                      files={"model": f"{folders[0]}/{MODEL_FILE}"}, **common)


def _load_torch_adapter(artifact_dir, manifest, base_source, cache_dir, common) -> LocalModel:
    from fedge.export.merge import load_peft_model, merge_lora
    from fedge.models import load_base

    task = manifest["task"]
    num_labels = None
    if task == "sequence-classification":
        from fedge.export.artifact import _num_labels_from_adapter

        num_labels = len(manifest["labels"]) if manifest.get("labels") else _num_labels_from_adapter(artifact_dir)
    base = load_base(base_source or manifest["base_model"]["id"], task=task, num_labels=num_labels,
                     cache_dir=cache_dir, pooling=pooling_of(manifest))
    if base.hash != manifest["base_model"]["sha256"]:
        raise ArtifactRefused("base-hash", f"local base {base.hash[:16]}… differs from the artifact's base "
                                           f"{manifest['base_model']['sha256'][:16]}…")
    model = merge_lora(load_peft_model(base.model, artifact_dir))
    return LocalModel(backend="torch", model=model, tokenizer=base.tokenizer, compute="fp32",
                      files={"adapter": "adapter_model.safetensors", "base": base.source}, **common)


def _load_torch_merged(artifact_dir: Path, files: set[str], task: str, common, *,
                       int8_compute: bool = True, pooling: str = "cls") -> LocalModel:
    from transformers import AutoTokenizer

    from fedge.export.gguf import load_gguf_causal_lm
    from fedge.export.merge import int8_linear_names, load_int8_model, load_merged_model

    ggufs = [f"model.{t}.gguf" for t in TORCH_GGUF_ORDER if f"model.{t}.gguf" in files]
    if "model.safetensors" in files:
        model, used = load_merged_model(artifact_dir, task=task, pooling=pooling), "model.safetensors"
    elif "model.int8.safetensors" in files:
        model = load_int8_model(artifact_dir, task=task, pooling=pooling,
                                int8_linear=int8_compute and task == "sequence-classification")
        used = "model.int8.safetensors"
    elif ggufs and task == "causal-lm":
        model, used = load_gguf_causal_lm(artifact_dir / ggufs[0]), ggufs[0]
    else:
        raise ArtifactRefused("files", f"no model file the torch backend can load in {sorted(files)}")
    if "tokenizer_config.json" in files:
        tok = AutoTokenizer.from_pretrained(artifact_dir)
    elif ggufs:
        tok = AutoTokenizer.from_pretrained(artifact_dir, gguf_file=ggufs[0])
    else:
        raise ArtifactRefused("files", "merged artifact has no tokenizer files")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    compute = "int8-dynamic" if int8_linear_names(model) else "fp32"
    return LocalModel(backend="torch", model=model, tokenizer=tok, files={"model": used}, compute=compute,
                      **common)


def _llama_cpp_plan(artifact_dir: Path, manifest, base_gguf) -> dict[str, Path] | None:
    """Which files llama.cpp would load, or None when it cannot run this artifact."""
    files = set(manifest["files"])
    if manifest["mode"] == "merged":
        for t in LLAMA_GGUF_ORDER:
            if f"model.{t}.gguf" in files:
                return {"model": artifact_dir / f"model.{t}.gguf"}
        return None
    if "adapter.gguf" not in files:
        return None
    if base_gguf is None and manifest["base_model"]["id"] == "smollm2-135m-instruct":
        from fedge.export.artifact import packaged_reference_gguf

        base_gguf = packaged_reference_gguf()
    if base_gguf is None:
        return None
    return {"model": Path(base_gguf), "lora": artifact_dir / "adapter.gguf"}


def _load_llama_cpp(artifact_dir, manifest, base_gguf, threads, n_ctx, common) -> LocalModel:
    if not llama_cpp_available():
        raise RuntimeError("backend 'llama.cpp' needs llama-cpp-python: pip install 'fedge[llamacpp]'")
    if manifest["task"] != "causal-lm":
        raise ValueError("the llama.cpp backend runs causal LMs only")
    plan = _llama_cpp_plan(Path(artifact_dir), manifest, base_gguf)
    if plan is None:
        raise ValueError("no GGUF usable by llama.cpp (merged model.*.gguf, or adapter.gguf + base_gguf)")
    if "lora" in plan:
        want = manifest["base_model"].get("gguf_sha256")
        if want is None:
            log.warning("manifest records no base GGUF hash: cannot check %s is the trained base", plan["model"])
        elif sha256_file(plan["model"]) != want:
            raise ArtifactRefused("base-hash", f"{plan['model']} is not the base GGUF the adapter was trained on")
    from llama_cpp import Llama

    llm = Llama(model_path=str(plan["model"]), lora_path=str(plan["lora"]) if "lora" in plan else None,
                n_ctx=n_ctx, n_threads=threads or None, verbose=False, seed=0)
    return LocalModel(backend="llama.cpp", model=llm, tokenizer=None,
                      files={k: str(v) for k, v in plan.items()}, **common)
