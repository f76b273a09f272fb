"""Export: merge, quantize (GGUF for Llama models, int8 safetensors otherwise), manifest, signing.

Entry points: :func:`fedge.export.artifact.build_artifact` (server side, after the
last round) and :func:`fedge.export.signing.generate_keypair`. Nothing here loads
a pickle. The names below are imported on first use (PEP 562), so that light
submodules (``fedge.export.llamacpp``, read by the config schema) do not pull in
torch; submodules import torch/transformers lazily where they can.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ArtifactBuildError": "fedge.export.artifact",
    "artifact_to_arrays": "fedge.export.artifact",
    "arrays_to_artifact": "fedge.export.artifact",
    "build_artifact": "fedge.export.artifact",
    "PrivacySpent": "fedge.export.manifest",
    "read_manifest": "fedge.export.manifest",
    "generate_keypair": "fedge.export.signing",
    "verify_manifest": "fedge.export.signing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
