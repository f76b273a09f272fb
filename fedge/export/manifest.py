"""The artifact manifest: what a device is asked to install, and the hash of every file.

``manifest.json`` is one JSON object, written as its *canonical bytes*::

    canonical_bytes(m) = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()

(ASCII only, no whitespace, keys sorted), so the bytes on disk are exactly the
bytes that ``manifest.sig`` signs. A verifier checks the signature over the raw
file bytes, then parses them and refuses a file that is not canonical.

Fields::

    format_version  int   1, or 2 for a mean-pooled classifier (``pooling`` "mean"): a runtime
                          that predates the field reads only 1, so it refuses such an artifact
                          (and keeps its model) instead of running it through a fresh CLS pooler
    version         int   artifact version; strictly increasing per signer (no rollback)
    created         str   UTC time, ISO 8601 ("2026-11-25T18:20:54Z")
    mode            str   "adapter" (LoRA adapter for a base the device already has)
                          | "merged" (adapter merged into the base; self-contained)
    task            str   "causal-lm" | "sequence-classification"
    base_model      {id: str, sha256: str, gguf_sha256: str | null}
                          id = model source (packaged name, path or hub id); sha256 =
                          fedge.models.base_hash of the frozen fp32 base tensors;
                          gguf_sha256 = file hash of the base GGUF (llama.cpp adapter mode)
    adapter_config  dict  LoRA settings (peft_type, r, lora_alpha, target_modules, ...)
    quantization    dict  {file name: format}, e.g. {"model.Q8_0.gguf": "gguf-Q8_0",
                          "model.int8.safetensors": "int8-rowwise", "model.onnx": "onnx-fp32",
                          "model.int8.onnx": "onnx-int8-dynamic",
                          "genai-int4/model.onnx": "onnx-genai-int4", ...}; non-model files
                          (tokenizer, config, the Ollama Modelfile) are in ``files`` only
    privacy         {epsilon, delta, accountant, unit} | null   (null: trained without DP)
    metrics         dict  final metrics (numbers; non-finite values become null)
    labels          list[str] | null   class names (classification)
    pooling         str | null   what a classifier's head reads: "cls" (the model's own pooler) or
                          "mean" (masked mean of the last hidden states, fedge.models.use_mean_pooling);
                          null for causal LMs. Absent in older manifests: read as "cls" (:func:`pooling_of`)
    signer          str   sha256 fingerprint of the signer's raw Ed25519 public key
    files           {relative path: {"sha256": hex, "size": bytes}}   every payload file
                          (every file except manifest.json and manifest.sig)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedge.files import is_safe_relpath, sha256_file

FORMAT_VERSION = 1
FORMAT_VERSION_POOLING = 2  # the manifest's ``pooling`` must be honoured to run the model
READABLE_FORMATS = (FORMAT_VERSION, FORMAT_VERSION_POOLING)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODES = ("adapter", "merged")
POOLINGS = ("cls", "mean")


class ManifestError(ValueError):
    """A manifest that is malformed or does not describe the directory it sits in."""


@dataclass(frozen=True, kw_only=True)
class PrivacySpent:
    """Privacy spent by the whole training run, as reported by its accountant.

    ``unit`` says what one "neighbour" is: ``"record"`` (DP-SGD on each device)
    or ``"user"`` (clipping + noise of whole client updates on the server).
    """

    epsilon: float
    delta: float
    accountant: str
    unit: str = "record"

    def __post_init__(self):
        if not (isinstance(self.epsilon, (int, float)) and self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise ManifestError(f"privacy.epsilon must be a finite number >= 0, got {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0 <= self.delta < 1):
            raise ManifestError(f"privacy.delta must be in [0, 1), got {self.delta!r}")
        if not self.accountant:
            raise ManifestError("privacy.accountant must name the accountant (e.g. 'rdp', 'prv')")
        if self.unit not in ("record", "user"):
            raise ManifestError(f"privacy.unit must be 'record' or 'user', got {self.unit!r}")


def canonical_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The signed form: sorted keys, no whitespace, ASCII, no NaN/Infinity."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def payload_files(artifact_dir: str | Path) -> list[str]:
    """Relative POSIX paths of every file except the manifest and its signature, sorted."""
    root = Path(artifact_dir)
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() or p.is_symlink():
            rel = p.relative_to(root).as_posix()
            if rel not in (MANIFEST, SIGNATURE):
                out.append(rel)
    return out


def file_entries(artifact_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{path: {"sha256", "size"}}`` for every payload file."""
    root = Path(artifact_dir)
    return {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
            for rel in payload_files(root)}


def _clean_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):  # numpy / torch scalars
        return _clean_number(v.item())
    if isinstance(v, Mapping):
        return {str(k): _clean_number(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v) if isinstance(v, (set, frozenset)) else v
        return [_clean_number(x) for x in items]
    return v


def build_manifest(
    artifact_dir: str | Path,
    *,
    version: int,
    mode: str,
    task: str,
    base_model_id: str,
    base_hash: str,
    signer: str,
    adapter_config: Mapping[str, Any] | None = None,
    quantization: Mapping[str, str] | None = None,
    privacy: PrivacySpent | Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    labels: list[str] | None = None,
    pooling: str = "cls",
    base_gguf_sha256: str | None = None,
    created: datetime | None = None,
) -> dict[str, Any]:
    """Describe the payload files already written in ``artifact_dir`` (format above)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"version must be an integer >= 1, got {version!r}")
    if mode not in MODES:
        raise ManifestError(f"mode must be one of {list(MODES)}, got {mode!r}")
    check_pooling(pooling, task)
    if isinstance(privacy, Mapping):
        privacy = PrivacySpent(**privacy)
    files = file_entries(artifact_dir)
    if not files:
        raise ManifestError(f"{artifact_dir} holds no payload files")
    quantization = dict(quantization or {})
    unknown = sorted(set(quantization) - set(files))
    if unknown:
        raise ManifestError(f"quantization names files that are not in the artifact: {unknown}")
    created = (created or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return _clean_number({
        "format_version": FORMAT_VERSION_POOLING if pooling == "mean" else FORMAT_VERSION,
        "version": version,
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode,
        "task": task,
        "base_model": {"id": base_model_id, "sha256": base_hash, "gguf_sha256": base_gguf_sha256},
        "adapter_config": dict(adapter_config or {}),
        "quantization": quantization,
        "privacy": asdict(privacy) if privacy is not None else None,
        "metrics": dict(metrics or {}),
        "labels": list(labels) if labels is not None else None,
        "pooling": pooling if task == "sequence-classification" else None,
        "signer": signer,
        "files": files,
    })


def write_manifest(artifact_dir: str | Path, manifest: Mapping[str, Any]) -> bytes:
    """Write ``manifest.json`` as its canonical bytes; return those bytes."""
    data = canonical_bytes(manifest)
    (Path(artifact_dir) / MANIFEST).write_bytes(data)
    return data


REQUIRED = {"format_version": int, "version": int, "created": str, "mode": str, "task": str,
            "base_model": dict, "adapter_config": dict, "quantization": dict, "metrics": dict,
            "signer": str, "files": dict}


def parse_manifest(data: bytes) -> dict[str, Any]:
    """Parse manifest bytes; refuse non-canonical bytes, unknown formats and missing fields."""
    try:
        manifest = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ManifestError(f"manifest.json is not valid ASCII JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise ManifestError("manifest.json must hold a JSON object")
    if canonical_bytes(manifest) != data:
        raise ManifestError("manifest.json is not in canonical form (sorted keys, no whitespace)")
    for key, typ in REQUIRED.items():
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool) and typ is int:
            raise ManifestError(f"manifest field {key!r} is missing or not a {typ.__name__}")
    if manifest["format_version"] not in READABLE_FORMATS:
        raise ManifestError(f"manifest format_version {manifest['format_version']} is not supported "
                            f"(this runtime reads {list(READABLE_FORMATS)})")
    if manifest["mode"] not in MODES:
        raise ManifestError(f"manifest mode {manifest['mode']!r} is not one of {list(MODES)}")
    if manifest.get("pooling") is not None:
        check_pooling(manifest["pooling"], manifest["task"])
    # Format 2 exists only to say "mean pooling": one without it is broken. (Format 1 with mean
    # pooling was written between the field and the version bump; this runtime honours it.)
    if manifest["format_version"] == FORMAT_VERSION_POOLING and manifest.get("pooling") != "mean":
        raise ManifestError(f"manifest format_version {FORMAT_VERSION_POOLING} is for mean pooling, but "
                            f"field 'pooling' is {manifest.get('pooling')!r}")
    for rel, entry in manifest["files"].items():
        if not is_safe_relpath(rel):
            raise ManifestError(f"manifest lists an unsafe path {rel!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("size"), int)):
            raise ManifestError(f"manifest entry for {rel!r} needs sha256 and size")
    return manifest


def check_pooling(pooling: Any, task: Any) -> None:
    """Refuse a pooling that is unknown, or ``"mean"`` for anything but a classifier."""
    if pooling not in POOLINGS:
        raise ManifestError(f"manifest field 'pooling' must be one of {list(POOLINGS)}, got {pooling!r} "
                            "(an artifact from a newer fedge? this runtime cannot rebuild that classifier)")
    if pooling == "mean" and task != "sequence-classification":
        raise ManifestError(f"manifest field 'pooling' 'mean' is for task sequence-classification, not {task!r}")


def pooling_of(manifest: Mapping[str, Any]) -> str:
    """The classifier's pooling (``"cls"`` | ``"mean"``): ``"cls"`` when the field is absent
    (artifacts from before it was recorded) or null (causal LMs)."""
    return str(manifest.get("pooling") or "cls")


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """Parse ``<artifact_dir>/manifest.json`` (no signature check: see fedge.export.signing)."""
    return parse_manifest((Path(artifact_dir) / MANIFEST).read_bytes())
