"""int8 classifier artifacts run their Linear layers in int8 on CPU and agree with fp32.

The runtime turns every Linear stored int8 in ``model.int8.safetensors`` into a torch
dynamic-quantized Linear built from the file's own int8 weights and row scales
(``fedge.export.merge.make_int8_linear``). Oracles:

* the packed int8 weights and scales equal the file's, bit for bit;
* one layer: |y − x·Wᵀ| ≤ (step_x / 2) · Σ_j |W_ij| (+ fp32 rounding), W = q·s the file's
  weights and step_x the activation quantization step (range / 255, or / 127 with 7-bit
  activations): the only rounding left is the input's;
* the whole tiny seeded BERT classifier (2 layers, hidden 64, 3 labels, random LoRA on
  query/value and a random head) against the fp32 merged artifact of the same adapter,
  on 200 seeded texts, batch 1 and 16: max |Δlogit| ≤ 0.1 · max |logit| (measured
  0.028-0.033 with 8-bit activations, 0.040-0.057 with 7-bit) and the same label on
  ≥ 95 % of texts (measured 100 % with 8-bit, 97.5-100 % with 7-bit).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from export_helpers import CORPUS
from safetensors.numpy import load_file

from fedge.export.artifact import build_artifact
from fedge.export.merge import SCALE_SUFFIX, full_range_activations, int8_linear_names, make_int8_linear
from fedge.runtime.infer import load_artifact, load_installed
from fedge.runtime.store import install

LABELS = ["neg", "neutral", "pos"]
LOGIT_TOL = 0.1  # of max |fp32 logit|
AGREE_MIN = 0.95


def texts(n: int = 200, seed: int = 0) -> list[str]:
    words = sorted({w.strip(",.?!'") for s in CORPUS for w in s.lower().split()} - {""})
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(n)]


@pytest.fixture(scope="module")
def artifacts(bert_base_dir, bert_adapter_dir, keys, tmp_path_factory):
    """The same adapter merged and exported twice: fp32 only and int8 only."""
    root = tmp_path_factory.mktemp("cls-artifacts")
    return {fmt: build_artifact(bert_adapter_dir, root / fmt, base_source=str(bert_base_dir),
                                private_key=keys.private, mode="merged", task="sequence-classification",
                                labels=LABELS, formats=(fmt,), version=1)
            for fmt in ("fp32", "int8")}


def batched_logits(model, xs: list[str], batch: int) -> np.ndarray:
    out = []
    for s in range(0, len(xs), batch):
        enc = model.tokenizer(xs[s:s + batch], padding=True, return_tensors="pt")
        with torch.no_grad():
            out.append(model.model(**enc).logits.float().numpy())
    return np.concatenate(out)


def test_int8_artifact_loads_with_int8_linear_layers(artifacts, keys, tmp_path):
    # Prepare
    install(artifacts["int8"], store_dir=tmp_path / "store", trusted_public_key=keys.public_pem)
    fp32 = load_artifact(artifacts["fp32"])
    stored = load_file(str(artifacts["int8"] / "model.int8.safetensors"))
    # Execute
    model = load_installed(tmp_path / "store")
    # Assert: every Linear stored int8 runs int8 (no silent fp32), with the file's own weights and scales;
    # only the head (3 × 64, below MIN_DIM, stored fp32) stays a float Linear
    assert model.compute == "int8-dynamic" and model.files == {"model": "model.int8.safetensors"}
    stored_linear = {n for n, m in fp32.model.named_modules()
                     if isinstance(m, torch.nn.Linear) and f"{n}.weight{SCALE_SUFFIX}" in stored}
    names = int8_linear_names(model.model)
    assert set(names) == stored_linear and len(names) == 2 * 6 + 1  # q k v o, up, down per layer; pooler
    float_linear = [n for n, m in model.model.named_modules() if type(m) is torch.nn.Linear]
    assert float_linear == ["classifier"]
    modules = dict(model.model.named_modules())
    for name in names:
        w = modules[name].weight()
        assert w.dtype == torch.qint8 and w.qscheme() == torch.per_channel_affine
        np.testing.assert_array_equal(w.int_repr().numpy(), stored[f"{name}.weight"])
        np.testing.assert_array_equal(w.q_per_channel_scales().float().numpy(), stored[f"{name}.weight{SCALE_SUFFIX}"])
        assert not w.q_per_channel_zero_points().any()
        assert modules[name].reduce_range is (not full_range_activations())


@pytest.mark.parametrize("batch", [1, 16])
def test_int8_classifier_agrees_with_fp32_merged(batch, artifacts):
    # Prepare
    xs = texts()
    fp32, int8 = load_artifact(artifacts["fp32"]), load_artifact(artifacts["int8"])
    want = batched_logits(fp32, xs, batch)
    # Execute
    got = batched_logits(int8, xs, batch)
    results = [r for s in range(0, len(xs), batch) for r in int8.classify(xs[s:s + batch])]
    # Assert: logits within the stated tolerance, same label on most texts, and not fp32 in disguise
    err = np.abs(got - want).max()
    assert 0 < err <= LOGIT_TOL * np.abs(want).max()
    agree = (got.argmax(1) == want.argmax(1)).mean()
    assert agree >= AGREE_MIN
    assert [r["label"] for r in results] == list(got.argmax(1))
    assert {r["label_name"] for r in results} <= set(LABELS)


@pytest.mark.parametrize("reduce_range", [True, False])
def test_int8_linear_error_is_only_the_input_rounding(reduce_range):
    # Prepare: weights in the file's format (int8 rows, fp32 scales), inputs with a wide range
    if not reduce_range and not full_range_activations():
        pytest.skip("8-bit activations are used only where the int8 kernel cannot saturate (AVX512-VNNI)")
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(48, 96)).astype(np.int8)
    s = rng.uniform(0.001, 0.05, size=48).astype(np.float32)
    bias = torch.from_numpy(rng.normal(size=48).astype(np.float32))
    x = torch.from_numpy(rng.normal(size=(5, 96)).astype(np.float32) * 3)
    w = torch.from_numpy(q.astype(np.float32) * s[:, None])
    lin = make_int8_linear(q, s, bias, reduce_range=reduce_range)
    # Execute
    with torch.no_grad():
        got = lin(x)
    # Assert: the closed-form bound (per output: half an input step times Σ_j |W_ij|)
    want = x @ w.T + bias
    levels = 127 if reduce_range else 255
    step = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / levels
    bound = step / 2 * w.abs().sum(1) + 1e-4
    assert (torch.abs(got - want) <= bound).all()
    assert lin.reduce_range is reduce_range


def test_int8_linear_does_not_saturate_at_the_chosen_range():
    # Prepare: the worst case for int16 pair sums, every input at the top of its range against ±127 weights
    q = np.full((16, 64), 127, np.int8)
    q[1::2] *= -1
    x = torch.ones(3, 64)
    x[:, 0] = 0.0  # range [0, 1]: every other input quantizes to the maximum level
    lin = make_int8_linear(q, np.ones(16, np.float32), None)  # the range the runtime picks on this CPU
    # Execute
    with torch.no_grad():
        got = lin(x)
    # Assert: exact (x is on the quantization grid)
    want = x @ torch.from_numpy(q.astype(np.float32)).T
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-3)


def test_int8_compute_can_be_turned_off_and_missing_kernels_fall_back_loudly(artifacts, monkeypatch, caplog):
    # Prepare
    xs = texts(16)
    fp32 = load_artifact(artifacts["fp32"])
    # Execute
    off = load_artifact(artifacts["int8"], int8_compute=False)

    def no_kernels(*args, **kwargs):
        raise RuntimeError("quantized engine unavailable")

    monkeypatch.setattr("fedge.export.merge.make_int8_linear", no_kernels)
    with caplog.at_level(logging.WARNING, logger="fedge.export.merge"):
        fallback = load_artifact(artifacts["int8"])
    # Assert: both dequantize to fp32, say so, and are within the weight-rounding tolerance
    want = batched_logits(fp32, xs, 16)
    for model in (off, fallback):
        assert model.compute == "fp32" and not int8_linear_names(model.model)
        assert np.abs(batched_logits(model, xs, 16) - want).max() <= LOGIT_TOL * np.abs(want).max()
    assert "int8 Linear unavailable" in caplog.text and "running dequantized fp32" in caplog.text


def test_causal_lm_int8_artifact_stays_fp32(llama_base_dir, llama_adapter_dir, keys, tmp_path):
    # Prepare
    out = build_artifact(llama_adapter_dir, tmp_path / "art", base_source=str(llama_base_dir),
                         private_key=keys.private, mode="merged", formats=("int8",), version=1)
    # Execute
    model = load_artifact(out, backend="torch")
    # Assert: causal LMs keep the dequantized path (and its tied head)
    assert model.compute == "fp32" and not int8_linear_names(model.model)
    assert model.model.lm_head.weight.data_ptr() == model.model.model.embed_tokens.weight.data_ptr()
