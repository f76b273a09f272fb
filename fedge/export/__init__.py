"""Export: merge, quantize (GGUF for Llama models, int8 safetensors otherwise), manifest, signing.

Entry points: :func:`fedge.export.artifact.build_artifact` (server side, after the
last round) and :func:`fedge.export.signing.generate_keypair`. Nothing here loads
a pickle. Submodules import torch/transformers lazily where they can.
"""

from fedge.export.artifact import ArtifactBuildError, artifact_to_arrays, arrays_to_artifact, build_artifact
from fedge.export.manifest import PrivacySpent, read_manifest
from fedge.export.signing import generate_keypair, verify_manifest

__all__ = ["ArtifactBuildError", "PrivacySpent", "arrays_to_artifact", "artifact_to_arrays", "build_artifact",
           "generate_keypair", "read_manifest", "verify_manifest"]
