"""ONNX Runtime classifier: an installed ``model.onnx`` / ``model.int8.onnx`` run without PyTorch.

Nothing here imports torch (or transformers): the text is tokenized by the ``tokenizers``
package from the artifact's ``tokenizer.json`` (the same fast tokenizer transformers wraps:
same ids, special tokens, lower-casing and truncation), padded on the right to the longest text
of the batch with the tokenizer's pad token, and fed to the graph as int64 arrays
(``fedge.export.onnx_export``: ``input_ids``, ``attention_mask``, ``token_type_ids`` when the
graph takes it). Truncation: ``min(512, max_position_embeddings)`` tokens, as the torch runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Best speed first: the int8 file is what the format exists for (benchmarks/results/export_classifier.md).
ONNX_ORDER = ("model.int8.onnx", "model.onnx")
COMPUTE = {"model.int8.onnx": "onnx-int8", "model.onnx": "onnx-fp32"}


class OrtClassifier:
    """``logits(texts)`` of an ONNX sequence classifier (float32, (batch, num_labels))."""

    def __init__(self, artifact_dir: str | Path, file: str, *, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        artifact_dir = Path(artifact_dir)
        config = json.loads((artifact_dir / "config.json").read_text())
        tok_config = json.loads((artifact_dir / "tokenizer_config.json").read_text())
        self.context_length = int(config.get("max_position_embeddings") or 512)
        self.max_length = min(512, self.context_length)
        # Two tokenizers, each configured once (serve calls them from several threads):
        # one truncating for the model, one not, to count a text's tokens.
        self.tokenizer = Tokenizer.from_file(str(artifact_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self._counter = Tokenizer.from_file(str(artifact_dir / "tokenizer.json"))
        self._counter.no_padding()
        self._counter.no_truncation()
        pad = tok_config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.tokenizer.token_to_id(pad) if pad else None
        self.pad_id, self.pad_token = (pad_id, pad) if pad_id is not None else (0, "[PAD]")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(artifact_dir / file), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.file = file

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text as the classifier sees it (special tokens included, no truncation)."""
        return [len(e.ids) for e in self._counter.encode_batch(texts)]

    def logits(self, texts: list[str]) -> np.ndarray:
        """Tokenize, pad and run the graph: float32 (batch, num_labels)."""
        return self.run(self.feed(texts))

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The graph alone on already tokenized inputs (:meth:`feed`)."""
        return self.session.run(["logits"], feed)[0].astype(np.float32)

    def feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The graph's int64 inputs for ``texts``, padded on the right to the longest."""
        encs = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encs)
        arrays = {name: np.zeros((len(encs), width), np.int64) for name in ("input_ids", "attention_mask",
                                                                           "token_type_ids")}
        arrays["input_ids"][:] = self.pad_id
        for i, e in enumerate(encs):
            n = len(e.ids)
            arrays["input_ids"][i, :n] = e.ids
            arrays["attention_mask"][i, :n] = 1
            arrays["token_type_ids"][i, :n] = e.type_ids
        return {k: arrays[k] for k in self.inputs}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
