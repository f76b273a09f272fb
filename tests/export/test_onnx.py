"""ONNX classifier artifacts: export → sign → install → classify with ONNX Runtime, without torch.

Oracles:

* fp32 ``model.onnx`` against the torch runtime on the fp32 merged artifact of the same adapter
  (tiny seeded BERT, 2 layers, hidden 64, 3 labels, random LoRA on query/value and a random head),
  200 seeded texts, batch 1 and 16: max |Δlogit| ≤ 1e-4 (measured ~1e-6: same graph, fp32 both);
* ``model.int8.onnx`` (ONNX Runtime dynamic int8) against the same torch fp32 logits:
  max |Δlogit| ≤ 0.1 · max |logit| and the same label on ≥ 95 % of texts (the bounds of
  tests/export/test_int8_classifier.py for torch's int8);
* with ``import torch`` made to fail in a fresh interpreter, ``fedge infer`` and ``fedge serve``
  still classify, with the same labels as the torch runtime, and no torch module is loaded;
* the verifier refuses a tampered ``.onnx``, a pickle named ``.onnx``, bytes that are not ONNX,
  and an ONNX model whose weights live in an external file, and accepts a valid one.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")  # a guard only: CI installs the onnx extra and runs these
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from export_helpers import CORPUS  # noqa: E402

from fedge.export.artifact import build_artifact  # noqa: E402
from fedge.export.manifest import read_manifest, write_manifest  # noqa: E402
from fedge.export.signing import sign_manifest  # noqa: E402
from fedge.files import sha256_file  # noqa: E402
from fedge.runtime.infer import load_artifact, load_installed  # noqa: E402
from fedge.runtime.store import ArtifactRefused, current, install  # noqa: E402

LABELS = ["neg", "neutral", "pos"]
FP32_TOL = 1e-4  # absolute, on logits
INT8_TOL = 0.1  # of max |fp32 logit|
AGREE_MIN = 0.95
REPO = Path(__file__).resolve().parents[2]


def texts(n: int = 200, seed: int = 0) -> list[str]:
    words = sorted({w.strip(",.?!'") for s in CORPUS for w in s.lower().split()} - {""})
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(n)]


def logits(model, xs: list[str], batch: int) -> np.ndarray:
    """Logits through each backend's own path (torch: HF tokenizer + model; onnxruntime: tokenizers + ORT)."""
    out = []
    for s in range(0, len(xs), batch):
        chunk = xs[s:s + batch]
        if model.backend == "onnxruntime":
            out.append(model.model.logits(chunk))
        else:
            import torch

            enc = model.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                out.append(model.model(**enc).logits.float().numpy())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def onnx_artifacts(bert_base_dir, bert_adapter_dir, keys, tmp_path_factory):
    """The same adapter merged twice: fp32 safetensors + fp32 ONNX, and ONNX int8 alone."""
    root = tmp_path_factory.mktemp("onnx-artifacts")
    kw = dict(base_source=str(bert_base_dir), private_key=keys.private, mode="merged",
              task="sequence-classification", labels=LABELS)
    return {"fp32": build_artifact(bert_adapter_dir, root / "fp32", formats=("fp32", "onnx"), version=1, **kw),
            "int8": build_artifact(bert_adapter_dir, root / "int8", formats=("onnx-int8",), version=2, **kw)}


@pytest.fixture(scope="module")
def onnx_store(onnx_artifacts, keys, tmp_path_factory):
    """A device store holding the int8 ONNX artifact (no file torch can load)."""
    store = tmp_path_factory.mktemp("onnx-store")
    install(onnx_artifacts["int8"], store_dir=store, trusted_public_key=keys.public_pem)
    return store


# -- round trip ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_onnx_files_are_signed_listed_and_parse(onnx_artifacts):
    # Prepare
    fp32, int8 = (read_manifest(onnx_artifacts[k]) for k in ("fp32", "int8"))
    # Execute
    proto = onnx.load(str(onnx_artifacts["int8"] / "model.int8.onnx"))
    # Assert: listed with their hashes and formats; the int8 graph multiplies in int8
    assert fp32["quantization"]["model.onnx"] == "onnx-fp32"
    assert int8["quantization"] == {"model.int8.onnx": "onnx-int8-dynamic"}
    for art, m in ((onnx_artifacts["fp32"], fp32), (onnx_artifacts["int8"], int8)):
        for rel in m["quantization"]:
            assert m["files"][rel]["sha256"] == sha256_file(art / rel)
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    size = {k: (onnx_artifacts["fp32"] / "model.onnx").stat().st_size if k == "fp32"
            else (onnx_artifacts["int8"] / "model.int8.onnx").stat().st_size for k in ("fp32", "int8")}
    assert size["int8"] < 0.75 * size["fp32"]  # tiny model: embeddings and norms stay fp32


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 16])
def test_onnx_fp32_equals_torch_and_int8_stays_close(onnx_artifacts, keys, tmp_path, batch):
    # Prepare: installed through the store, as a device does
    for k in ("fp32", "int8"):
        install(onnx_artifacts[k], store_dir=tmp_path / "store", trusted_public_key=keys.public_pem)
        if k == "fp32":
            torch_model = load_installed(tmp_path / "store", backend="torch")
            ort_fp32 = load_installed(tmp_path / "store", backend="onnxruntime")
    ort_int8 = load_installed(tmp_path / "store")  # auto: only ONNX in this artifact
    xs = texts()
    want = logits(torch_model, xs, batch)
    # Execute
    got32, got8 = logits(ort_fp32, xs, batch), logits(ort_int8, xs, batch)
    results = [r for s in range(0, len(xs), batch) for r in ort_int8.classify(xs[s:s + batch])]
    # Assert
    assert (torch_model.compute, ort_fp32.compute, ort_int8.compute) == ("fp32", "onnx-fp32", "onnx-int8")
    assert ort_int8.backend == "onnxruntime" and ort_int8.version == 2
    assert np.abs(got32 - want).max() <= FP32_TOL
    err8 = np.abs(got8 - want).max()
    assert 0 < err8 <= INT8_TOL * np.abs(want).max()
    assert (got8.argmax(1) == want.argmax(1)).mean() >= AGREE_MIN
    assert [r["label"] for r in results] == list(got8.argmax(1))
    assert {r["label_name"] for r in results} <= set(LABELS)
    np.testing.assert_allclose([sum(r["probs"]) for r in results], 1.0, atol=1e-5)


@pytest.mark.slow
def test_onnx_tokenizer_counts_match_the_torch_tokenizer(onnx_artifacts):
    # Prepare
    torch_model = load_artifact(onnx_artifacts["fp32"], backend="torch")
    ort_model = load_artifact(onnx_artifacts["fp32"], backend="onnxruntime")
    xs = texts(50) + [" ".join(["hello"] * 200)]  # one text past the context
    # Execute / Assert: same token counts (the 413 check of fedge serve) and context
    assert ort_model.text_tokens(xs) == torch_model.text_tokens(xs)
    assert ort_model.context_length == torch_model.context_length == 64


# -- no torch on the device ------------------------------------------------------------------------

NO_TORCH = ("import sys; sys.modules['torch'] = None; "  # every `import torch` now raises ImportError
            "from fedge.cli import main; rc = main(sys.argv[1:]); "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch' and sys.modules[m] is not None]; "
            "assert 'transformers' not in sys.modules; sys.exit(rc)")


def _no_torch_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("PYTHONSTARTUP", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_infer_classifies_without_torch(onnx_store, backend):
    # Prepare
    want = load_installed(onnx_store).classify("hello world how are you")
    # Execute: a fresh interpreter in which torch cannot be imported
    out = subprocess.run([sys.executable, "-c", NO_TORCH, "infer", "--store", str(onnx_store), "--backend", backend,
                          "--text", "hello world how are you"], capture_output=True, text=True, timeout=120,
                         env=_no_torch_env(), cwd=REPO)
    # Assert
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["label"] == want["label"] and got["label_name"] in LABELS
    np.testing.assert_allclose(got["probs"], want["probs"], atol=1e-6)


def test_cli_store_error_without_torch_is_one_line(tmp_path):
    # Execute: nothing installed, on a device without torch
    out = subprocess.run([sys.executable, "-c", NO_TORCH, "infer", "--store", str(tmp_path / "empty"), "--text", "x"],
                         capture_output=True, text=True, timeout=120, env=_no_torch_env(), cwd=REPO)
    # Assert: the error handler itself imports no torch
    assert out.returncode == 2 and "no model installed" in out.stderr and "Traceback" not in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_classifies_without_torch(onnx_store):
    # Prepare
    port = _free_port()
    want = load_installed(onnx_store).classify(["the quick brown fox", "paris"])
    proc = subprocess.Popen([sys.executable, "-c", NO_TORCH, "serve", "--store", str(onnx_store), "--port",
                             str(port), "--backend", "onnxruntime"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_no_torch_env(), cwd=REPO)
    try:
        # Execute
        body = json.dumps({"input": ["the quick brown fox", "paris"]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/classify", data=body,
                                     headers={"Content-Type": "application/json"})
        deadline, reply = time.monotonic() + 90, None
        while reply is None:
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    reply = json.loads(r.read())
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"fedge serve did not answer: {proc.communicate(timeout=5)}") from None
                time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # Assert
    assert [d["label"] for d in reply["data"]] == [w["label"] for w in want]
    assert reply["model"].endswith("-v2")


# -- the verifier ----------------------------------------------------------------------------------


def tiny_onnx(*, external: bool = False, folder: Path | None = None) -> bytes:
    """A valid one-node ONNX model (y = x · W); with ``external`` its W lives in a side file."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), name="W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    if external:
        from onnx.external_data_helper import convert_model_to_external_data

        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="../../secret.bin",
                                       size_threshold=0)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def plain(bert_base_dir, bert_adapter_dir, keys, tmp_path_factory):
    """A signed classifier adapter artifact (v2) and a store holding v1 (no ONNX export: fast)."""
    root = tmp_path_factory.mktemp("onnx-verify")
    kw = dict(base_source=str(bert_base_dir), private_key=keys.private, task="sequence-classification",
              labels=LABELS)
    v1 = build_artifact(bert_adapter_dir, root / "v1", version=1, **kw)
    v2 = build_artifact(bert_adapter_dir, root / "v2", version=2, **kw)
    return v1, v2


def _signed_with(src: Path, dst: Path, rel: str, data: bytes, key) -> Path:
    """A copy of ``src`` with one more payload file, listed and re-signed by ``key`` (a compromised builder)."""
    shutil.copytree(src, dst)
    (dst / rel).write_bytes(data)
    m = read_manifest(dst)
    m["files"][rel] = {"sha256": sha256_file(dst / rel), "size": len(data)}
    write_manifest(dst, m)
    sign_manifest(dst, key)
    return dst


@pytest.mark.parametrize("case", ["pickle", "not-onnx", "truncated", "external-data"])
def test_verifier_refuses_onnx_files_that_are_not_self_contained_onnx(plain, keys, tmp_path, case):
    # Prepare: each file listed and signed by the trusted key, so only the content check can stop it
    v1, v2 = plain
    store = tmp_path / "store"
    install(v1, store_dir=store, trusted_public_key=keys.public_pem)
    data = {"pickle": pickle.dumps({"weights": [1.0, 2.0]}, protocol=4),
            "not-onnx": os.urandom(4096),
            "truncated": tiny_onnx()[:-9],
            "external-data": tiny_onnx(external=True)}[case]
    src = _signed_with(v2, tmp_path / "art", "model.onnx", data, keys.private)
    # Execute
    with pytest.raises(ArtifactRefused) as info:
        install(src, store_dir=store, trusted_public_key=keys.public_pem)
    # Assert: refused for its format, the store unchanged
    assert info.value.reason == "format" and "model.onnx" in str(info.value)
    assert ("pickle" in str(info.value)) == (case == "pickle")
    assert ("external data" in str(info.value)) == (case == "external-data")
    assert current(store) == 1


def test_verifier_accepts_a_valid_onnx_and_refuses_it_tampered(plain, keys, tmp_path):
    # Prepare
    v1, v2 = plain
    good = _signed_with(v2, tmp_path / "good", "model.onnx", tiny_onnx(), keys.private)
    bad = shutil.copytree(good, tmp_path / "tampered")
    raw = bytearray((bad / "model.onnx").read_bytes())
    raw[-5] ^= 0x01  # one weight bit after signing
    (bad / "model.onnx").write_bytes(bytes(raw))
    store = tmp_path / "store"
    install(v1, store_dir=store, trusted_public_key=keys.public_pem)
    # Execute
    with pytest.raises(ArtifactRefused) as info:
        install(bad, store_dir=store, trusted_public_key=keys.public_pem)
    version = install(good, store_dir=store, trusted_public_key=keys.public_pem)
    # Assert
    assert info.value.reason == "hash" and "model.onnx" in str(info.value)
    assert version == 2 and current(store) == 2


# -- configuration ---------------------------------------------------------------------------------


def test_onnx_formats_by_task(monkeypatch):
    from fedge.config import ConfigError, load
    from fedge.export import onnx_genai

    # Execute / Assert: the config names the field and the task; causal LMs' ONNX goes through the
    # onnx-genai extra (tests/export/test_onnx_genai.py), refused with its install line when it is missing
    assert load("classify", ["export.mode=merged", "export.formats=[onnx,onnx-int8]"]).export.formats == (
        "onnx", "onnx-int8")
    with pytest.raises(ConfigError, match="export.formats onnx-int4 is for model.task causal-lm"):
        load("classify", ["export.mode=merged", "export.formats=[onnx-int4]"])
    with pytest.raises(ConfigError, match=r"export.formats.*unknown format\(s\) \['onnx8'\]"):
        load("classify", ["export.formats=[onnx8]"])
    monkeypatch.setattr(onnx_genai, "missing_modules", lambda: ["onnxruntime_genai"])
    with pytest.raises(ConfigError, match=r"export.formats: \['onnx'\] .*pip install 'fedge\[onnx-genai\]'"):
        load("default", ["export.mode=merged", "export.formats=[onnx]"])
