"""K-quant GGUF files made by llama.cpp's own quantizer (optional: ``pip install 'fedge[llamacpp]'``).

gguf-py quantizes F16/Q8_0/Q4_1/Q4_0 in numpy (``fedge.export.gguf``) but raises
``NotImplementedError`` for the K-quants. A K-quant file is therefore made in two steps:

1. :func:`fedge.export.gguf.write_model_gguf` with ``file_type="F32"`` (exact weights,
   metadata, llama.cpp's q/k permutation);
2. llama.cpp's ``llama_model_quantize(F32 file → K-quant file)`` (the library behind
   ``llama-quantize``, reached through llama-cpp-python's ctypes binding) with its own
   per-tensor recipe, no importance matrix.

The recipe (llama.cpp as shipped in llama-cpp-python 0.3.36), per 2-D tensor:

* ``Q4_K_M``: Q4_K, with ``attn_v`` and ``ffn_down`` of about half the layers at Q6_K;
  ``Q5_K_M``: Q5_K, same Q6_K exceptions; ``Q6_K``: Q6_K everywhere;
* the output matrix at Q6_K; with tied embeddings (no ``output.weight``, as the writer
  stores SmolLM2) ``token_embd`` is treated as the output matrix, so embeddings keep
  the higher precision;
* K-quant super-blocks hold 256 values: a row length that is not a multiple of 256
  falls back to a 32-block type (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0). SmolLM2-135M
  has hidden size 576 = 2.25·256, so every tensor that reads the hidden state (q, k, v,
  o, gate, up: 180 of 272 tensors) falls back, and only ``ffn_down`` (rows of 1536)
  holds K-quant blocks. On SmolLM2 "Q4_K_M" is mostly Q5_0 (6.2 bits per weight
  overall), "Q6_K" mostly Q8_0. Models with a hidden size that is a multiple of 256
  get real K-quants.
* ``adapted`` tensors (the weights a merged LoRA adapter changed) are overridden to Q8_0,
  as in the numpy 4-bit files (``fedge.export.gguf``: rounding W0 + ΔW to 4-6 bits erases
  most of a LoRA ΔW).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Collection, Iterable
from pathlib import Path

from fedge.export.gguf import MODEL_TYPES, GGUFExportError, read_gguf, write_model_gguf

log = logging.getLogger(__name__)

QUANT_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")  # file types made by llama.cpp (llama_ftype MOSTLY_<T>)
EXTRA = "llamacpp"  # the pyproject optional extra that installs llama-cpp-python


class LlamaCppMissing(GGUFExportError):
    """A llama.cpp-quantized type was asked for but ``llama_cpp`` does not import."""


def available() -> bool:
    """True when llama-cpp-python imports and exposes the quantizer."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):  # not installed / shared library fails to load
        return False
    return hasattr(llama_cpp, "llama_model_quantize")


def missing_message(formats: Iterable[str], *, field: str = "export.formats") -> str:
    wanted = [f for f in formats if f in QUANT_TYPES]
    return (f"{field}: {wanted} are quantized by llama.cpp, but llama_cpp (llama-cpp-python) does not import "
            f"in this environment. Install the optional extra: pip install 'fedge[{EXTRA}]' (builds llama.cpp "
            f"from source, ~15 min on 2 cores), or choose types written without it: {list(MODEL_TYPES)}")


def require(formats: Iterable[str], *, field: str = "export.formats") -> None:
    """Raise :class:`LlamaCppMissing` when ``formats`` holds a llama.cpp type and llama_cpp is absent."""
    formats = list(formats)
    if any(f in QUANT_TYPES for f in formats) and not available():
        raise LlamaCppMissing(missing_message(formats, field=field))


def quantize_gguf(src: str | Path, dst: str | Path, file_type: str, *, adapted: Collection[str] = (),
                  threads: int | None = None) -> Path:
    """``llama_model_quantize(src → dst)``: an F32/F16 GGUF into ``file_type`` (one of ``QUANT_TYPES``).

    ``adapted``: GGUF tensor names stored Q8_0 whatever the recipe says (llama.cpp tensor-type
    overrides; patterns are regular expressions, so each name is escaped and anchored).
    """
    if file_type not in QUANT_TYPES:
        raise GGUFExportError(f"file_type {file_type!r} is not a llama.cpp type; allowed: {list(QUANT_TYPES)}")
    require([file_type], field="file_type")
    import llama_cpp

    src, dst = Path(src), Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = int(threads or 0)  # 0: all hardware threads
    patterns = [f"^{re.escape(name)}$".encode() for name in sorted(adapted)]
    overrides = (llama_cpp.llama_model_tensor_override * (len(patterns) + 1))(
        *[llama_cpp.llama_model_tensor_override(p, llama_cpp.GGML_TYPE_Q8_0) for p in patterns],
        llama_cpp.llama_model_tensor_override(None, llama_cpp.GGML_TYPE_COUNT))  # terminator: NULL pattern
    if patterns:
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    # llama.cpp reports every tensor: through llama-cpp-python's log callback (which prints
    # what its logger lets through) and, for fallbacks, straight to stderr. Keep it out of
    # the console; log a summary, and the whole report at debug level or on failure.
    cpp_log = logging.getLogger("llama-cpp-python")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        with _stderr_captured() as captured:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        cpp_log.setLevel(level)
    report = captured.get("text", "")
    log.debug("llama.cpp quantizer output:\n%s", report)
    if rc != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        raise GGUFExportError(f"llama.cpp could not quantize {src.name} to {file_type} (llama_model_quantize "
                              f"returned {rc}): {report.strip()[-500:]}")
    types = Counter(t for t, shape in read_gguf(dst).tensors.values() if len(shape) > 1)
    fallbacks = report.count("falling back")
    log.info("%s: %s, 2-D tensor types %s%s", dst.name, file_type, dict(types.most_common()),
             f" ({fallbacks} tensors fell back to 32-value blocks: rows not a multiple of 256)" if fallbacks else "")
    return dst


@contextlib.contextmanager
def _stderr_captured():
    """Send file descriptor 2 (what C code writes) to a temporary file; yield {"text": ...} after."""
    out: dict[str, str] = {}
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out["text"] = tmp.read().decode("utf-8", "replace")


def write_quantized_gguf(model, path: str | Path, *, file_type: str, f32_gguf: str | Path | None = None,
                         adapted: Collection[str] = (), threads: int | None = None, **write_kwargs) -> Path:
    """Write a merged ``LlamaForCausalLM`` as a llama.cpp-quantized GGUF of ``file_type``.

    ``f32_gguf``: an F32 GGUF of the same model already written (reused, left in place);
    otherwise one is written to a temporary directory next to ``path`` and removed.
    ``adapted``: GGUF names kept Q8_0 (``fedge.export.gguf.adapted_tensor_names``).
    ``write_kwargs`` (``reference_gguf``, ``tokenizer``, ``name``) go to ``write_model_gguf``.
    """
    require([file_type], field="file_type")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if f32_gguf is not None:
        return quantize_gguf(f32_gguf, path, file_type, adapted=adapted, threads=threads)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.f32-"))
    try:
        src = write_model_gguf(model, scratch / "model.F32.gguf", file_type="F32", **write_kwargs)
        return quantize_gguf(src, path, file_type, adapted=adapted, threads=threads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
