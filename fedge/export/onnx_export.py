"""ONNX artifacts for sequence classifiers: the merged model as ``model.onnx`` (fp32) and
``model.int8.onnx`` (ONNX Runtime dynamic int8), run on devices by ONNX Runtime without PyTorch.

Graph: ``logits = f(input_ids, attention_mask[, token_type_ids])``, all inputs int64 of shape
(batch, sequence), output float32 (batch, num_labels); batch and sequence are dynamic
(sequence ≤ ``max_position_embeddings``). Exported with ``torch.onnx.export(..., dynamo=True)``
(the ``torch.export`` tracer + onnxscript; needs the optional ``onnx`` extra), weights inside the
file (no external data: one signed file, no path it could point elsewhere with). A mean-pooled
classifier (manifest ``pooling: mean``, ``fedge.models.use_mean_pooling``) computes its masked
mean inside the graph from the ``attention_mask`` input (the encoder's pre-hook hands the traced
mask to the pooler), so the runtime feeds it as any other.

int8 (``onnx-int8``): ``onnxruntime.quantization.quantize_dynamic`` over the fp32 file, weights
``QInt8`` per tensor, symmetric: every MatMul/Gemm weight W becomes q = round(W / s), s = max|W| / 127;
activations are quantized per call to uint8 (asymmetric, range of the whole input tensor) and
multiplied in int8 (``MatMulInteger`` / ``DynamicQuantizeLinear``). Embeddings (Gather), LayerNorm
and the softmax stay fp32. The error is the weight rounding plus the activation rounding, as in
torch's dynamic quantization (``fedge.export.merge``), so a text's logits can move slightly with
its batch mates and padding.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ONNX_FORMATS = ("onnx", "onnx-int8")
FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
QUANTIZATION = {"onnx": "onnx-fp32", "onnx-int8": "onnx-int8-dynamic"}
REQUIRED_MODULES = ("onnx", "onnxscript", "onnxruntime")
OPSET = 20


class OnnxMissing(RuntimeError):
    """ONNX formats were asked for but the optional ``onnx`` extra is not installed."""


def missing_modules(required: tuple[str, ...] = REQUIRED_MODULES) -> list[str]:
    """The modules of ``required`` (default: the ``onnx`` extra's) that do not import here
    (find_spec: nothing is imported)."""
    out = []
    for name in required:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def missing_message(formats, *, field: str = "formats") -> str:
    asked = [f for f in formats if f in ONNX_FORMATS]
    return (f"{field}: {asked} are exported with torch.onnx (dynamo) and ONNX Runtime, but "
            f"{', '.join(missing_modules())} do(es) not import here: pip install 'fedge[onnx]'")


def require(formats) -> None:
    """Raise :class:`OnnxMissing` when ``formats`` holds an ONNX format and the extra is missing."""
    if any(f in ONNX_FORMATS for f in formats) and missing_modules():
        raise OnnxMissing(missing_message(formats))


def input_names(model) -> list[str]:
    """The graph inputs: token_type_ids only for models that take it (BERT)."""
    params = inspect.signature(model.forward).parameters
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in params else [])


def export_classifier(model, path: str | Path) -> Path:
    """Export a (merged, eval-mode) sequence classifier to ``path`` as fp32 ONNX; return the path."""
    import torch

    names = input_names(model)
    max_len = int(getattr(model.config, "max_position_embeddings", 512) or 512)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

    example = {n: torch.ones(2, 8, dtype=torch.long) for n in names}
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("sequence", min=1, max=max_len)
    path = Path(path)
    wrapper = Logits(model).eval()
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (), None, kwargs=example, dynamo=True,
                                    input_names=names, output_names=["logits"], opset_version=OPSET,
                                    dynamic_shapes={n: {0: batch, 1: seq} for n in names}, external_data=False)
    program.save(str(path), external_data=False)
    log.info("exported %s (%d bytes, inputs %s)", path.name, path.stat().st_size, names)
    return path


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """ONNX Runtime dynamic int8 (module docstring) of the fp32 file ``src`` into ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(Path(src), Path(dst), weight_type=QuantType.QInt8)
    return Path(dst)


def write_onnx(model, out_dir: Path, formats) -> dict[str, str]:
    """Write the requested ONNX files into ``out_dir``; return ``{file: quantization}``."""
    wanted = [f for f in ONNX_FORMATS if f in formats]
    if not wanted:
        return {}
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.onnx-") as scratch:
        fp32 = out_dir / FILES["onnx"] if "onnx" in wanted else Path(scratch) / FILES["onnx"]
        export_classifier(model, fp32)
        if "onnx" in wanted:
            out[FILES["onnx"]] = QUANTIZATION["onnx"]
        if "onnx-int8" in wanted:
            quantize_int8(fp32, out_dir / FILES["onnx-int8"])
            out[FILES["onnx-int8"]] = QUANTIZATION["onnx-int8"]
    return out
