"""model.device / model.dtype / simulation.client_gpus: the rules, their refusals, and CPU results unchanged.

The rules are checked on CPU by passing the hardware flags; paths that need a CUDA device are
marked and skipped with a reason on machines without one.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedge import config as fcfg
from fedge import models
from fedge.data.tokenize import IGNORE, collate, encode_chat
from fedge.devices import DeviceError, resolve_device, trainables_fp32
from fedge.train import batch_indices, evaluate, train_local
from simulations import runner
from tests.conftest import tiny_scenario_overrides

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
PAIRS = [("hello there", "hi"), ("what is the weather like today", "sunny and warm"), ("who are you", "a model"),
         ("tell me a joke", "no"), ("how do I reset it", "hold the button")]


# -- the rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "dtype", "cuda", "bf16", "expected"), [
    ("auto", "auto", False, False, ("cpu", torch.float32)),
    ("auto", "auto", True, True, ("cuda", torch.bfloat16)),
    ("auto", "auto", True, False, ("cuda", torch.float32)),  # pre-Ampere GPU: fp16 is never picked for you
    ("cpu", "auto", True, True, ("cpu", torch.float32)),
    ("cuda:1", "float16", True, False, ("cuda:1", torch.float16)),
    ("cuda", "float32", True, True, ("cuda", torch.float32)),
])
def test_resolution_rules(device, dtype, cuda, bf16, expected):
    dev, dt = resolve_device(device, dtype, cuda_available=cuda, bf16_supported=bf16, device_count=2)
    assert (str(dev), dt) == expected


@pytest.mark.parametrize(("device", "dtype", "cuda", "bf16", "message"), [
    ("cuda", "auto", False, False, r"model.device 'cuda': no CUDA device is visible"),
    ("cuda:2", "auto", True, True, r"model.device 'cuda:2': this node sees 2 CUDA device\(s\)"),
    ("gpu", "auto", True, True, r"model.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("cpu", "bfloat16", True, True, r"model.dtype 'bfloat16' needs a CUDA device"),
    ("auto", "float16", False, False, r"model.dtype 'float16' needs a CUDA device"),  # auto on a CPU node
    ("cuda", "bfloat16", True, False, r"model.dtype 'bfloat16': CUDA device 'cuda' does not support it"),
    ("auto", "fp8", True, True, r"model.dtype must be one of"),
])
def test_refusals_name_the_key(device, dtype, cuda, bf16, message):
    with pytest.raises(DeviceError, match=message):
        resolve_device(device, dtype, cuda_available=cuda, bf16_supported=bf16, device_count=2)


@pytest.mark.parametrize(("overrides", "field", "message"), [
    (["model.device=gpu"], "model.device", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["model.device=cuda:x"], "model.device", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["model.dtype=fp8"], "model.dtype", "'auto', 'float32', 'bfloat16' or 'float16'"),
    (["model.device=cpu", "model.dtype=bfloat16"], "model.dtype", "needs a CUDA device"),
    (["simulation.client_gpus=-0.5"], "simulation.client_gpus", "greater than or equal to 0"),
])
def test_config_validation_names_the_field(overrides, field, message):
    with pytest.raises(fcfg.ConfigError) as err:
        fcfg.load("default", overrides)
    assert field in str(err.value) and message in str(err.value)


def test_config_accepts_devices_and_defaults_to_auto():
    cfg = fcfg.load("default", ["model.device=cuda:1", "model.dtype=bfloat16", "simulation.client_gpus=0.25"])
    assert (cfg.model.device, cfg.model.dtype, cfg.simulation.client_gpus) == ("cuda:1", "bfloat16", 0.25)
    default = fcfg.load("default")
    assert (default.model.device, default.model.dtype, default.simulation.client_gpus) == ("auto", "auto", 0.0)


# -- the simulation runner --------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [0.0, 0.125, 0.5, 1.0])
def test_ray_client_resources_carry_client_gpus(gpus):
    cfg = fcfg.load("default", [f"simulation.client_gpus={gpus}", "simulation.client_cpus=2"])
    assert runner.backend_config(cfg)["client_resources"] == {"num_cpus": 2.0, "num_gpus": gpus}


def test_device_checks_before_ray_starts():
    gpus = fcfg.load("default", ["simulation.client_gpus=0.5"])
    with pytest.raises(fcfg.ConfigError, match=r"simulation.client_gpus is 0.5 but no CUDA device is visible"):
        runner.check_devices(gpus, cuda_available=False)
    runner.check_devices(gpus, cuda_available=True)  # a GPU machine: accepted
    hidden = fcfg.load("default", ["model.device=cuda"])  # explicit CUDA, but clients reserve no GPU
    with pytest.raises(fcfg.ConfigError, match=r"model.device 'cuda' with simulation.client_gpus 0"):
        runner.check_devices(hidden, cuda_available=True)
    with pytest.raises(fcfg.ConfigError, match=r"model.device 'cuda': no CUDA device"):  # the server's evaluator
        runner.check_devices(hidden, cuda_available=False)


@needs_no_cuda
def test_simulate_refuses_client_gpus_without_cuda_before_the_engine_starts(tmp_path, tiny_llama_dir, monkeypatch):
    # Prepare
    cfg = fcfg.load("default", [*tiny_scenario_overrides(tiny_llama_dir), "simulation.client_gpus=0.25"])
    started = []
    monkeypatch.setattr("flwr.simulation.run_simulation", lambda **kw: started.append(kw))
    # Execute / Assert
    with pytest.raises(fcfg.ConfigError, match="simulation.client_gpus"):
        runner.simulate(cfg, tmp_path / "run")
    assert not started


# -- CPU results unchanged --------------------------------------------------------------------------


def _examples(tok):
    return [encode_chat(tok, p, r, 32) for p, r in PAIRS]


def _reference_train(peft, examples, *, pad_id, steps, batch_size, lr, seed):
    """train_local's loop before devices existed: AdamW, token-mean loss per answer, batch mean."""
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    torch.manual_seed(seed)
    peft.train()
    losses = []
    for idx in batch_indices(len(examples), steps=steps, batch_size=batch_size, seed=seed):
        b = collate([examples[i] for i in idx], task="causal-lm", pad_id=pad_id)
        logits = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1, :]
        labels = b["labels"][:, 1:]
        tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                              reduction="none").view(labels.shape)
        loss = (tok.sum(dim=1) / (labels != IGNORE).sum(dim=1).clamp(min=1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    peft.eval()
    return float(np.mean(losses))


def _lora(base):
    return models.add_lora(base.model, task="causal-lm", r=2, alpha=4, dropout=0.0,
                           target_modules=["q_proj", "v_proj"], seed=0)


@needs_no_cuda
def test_cpu_training_through_train_local_is_bit_for_bit_the_plain_loop(tiny_llama_dir, torch_one_thread):
    # Prepare: one model placed by model.device auto (cpu here), one loaded as before devices existed
    placed = models.load_base(str(tiny_llama_dir), device="auto", dtype="auto")
    plain = models.load_base(str(tiny_llama_dir))
    ex, pad = _examples(plain.tokenizer), plain.tokenizer.pad_token_id
    peft_placed, peft_plain = _lora(placed), _lora(plain)
    # Execute
    got = train_local(peft_placed, ex, task="causal-lm", pad_id=pad, steps=3, batch_size=2, lr=0.05, seed=0)
    want = _reference_train(peft_plain, ex, pad_id=pad, steps=3, batch_size=2, lr=0.05, seed=0)
    # Assert: same hash, same loss, same adapter, bit for bit; still fp32 on CPU
    assert placed.hash == plain.hash and got["loss"] == want
    a, b = models.get_adapter_state(peft_placed), models.get_adapter_state(peft_plain)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in peft_placed.parameters())
    held = evaluate(peft_placed, ex, task="causal-lm", pad_id=pad, batch_size=2)
    assert held == evaluate(peft_plain, ex, task="causal-lm", pad_id=pad, batch_size=2)


def test_a_reduced_precision_base_keeps_fp32_trainables_and_deltas(tiny_llama_dir, torch_one_thread):
    """bf16 is refused on CPU nodes, but the dtype handling itself is device-free: checked here on CPU."""
    from transformers import LlamaForSequenceClassification

    # Prepare: the same classifier in fp32 and with a bf16 base (head and LoRA from the same seed)
    def classifier(dtype):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=3, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.parameters():
            p.data = p.data.to(dtype)
        return models.add_lora(model, task="sequence-classification", r=2, alpha=4, dropout=0.0,
                               target_modules=["q_proj", "v_proj"], seed=0)

    fp32, bf16 = classifier(torch.float32), classifier(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # Execute
    with torch.no_grad():
        want, got = fp32(**batch).logits, bf16(**batch).logits
    # Assert: every trainable tensor is fp32 (LoRA by PEFT, the head by trainables_fp32), logits are
    # fp32 and agree with the fp32 model to bf16 precision; the adapter state is fp32 numpy, as on the wire
    assert all(p.dtype == torch.float32 for p in bf16.parameters() if p.requires_grad)
    assert any(p.dtype == torch.bfloat16 for p in bf16.parameters() if not p.requires_grad)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    state = models.get_adapter_state(bf16)
    assert any(k.startswith("base_model.model.score") for k in state)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    assert trainables_fp32(fp32) is fp32  # fp32 models: untouched


# -- on a CUDA device -------------------------------------------------------------------------------


@needs_cuda
def test_one_local_step_and_evaluation_on_cuda_return_cpu_fp32_deltas(tiny_llama_dir):
    # Prepare: the same adapter on CPU (fp32) and on the GPU (model.dtype auto: bf16 where supported)
    cpu = models.load_base(str(tiny_llama_dir))
    gpu = models.load_base(str(tiny_llama_dir), device="cuda", dtype="auto")
    ex, pad = _examples(cpu.tokenizer), cpu.tokenizer.pad_token_id
    peft_cpu, peft_gpu = _lora(cpu), _lora(gpu)
    start = models.get_adapter_state(peft_gpu)
    # Execute
    kw = {"task": "causal-lm", "pad_id": pad, "steps": 1, "batch_size": 2, "lr": 0.05, "seed": 0}
    got, want = train_local(peft_gpu, ex, **kw), train_local(peft_cpu, ex, **kw)
    held_gpu = evaluate(peft_gpu, ex, task="causal-lm", pad_id=pad, batch_size=2)
    held_cpu = evaluate(peft_cpu, ex, task="causal-lm", pad_id=pad, batch_size=2)
    # Assert: same base hash; state comes back as CPU fp32 numpy; results agree to bf16 precision
    assert gpu.hash == cpu.hash and next(peft_gpu.parameters()).device.type == "cuda"
    state = models.get_adapter_state(peft_gpu)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    assert any(not np.array_equal(state[k], start[k]) for k in state)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=0.05)
    np.testing.assert_allclose(held_gpu["loss"], held_cpu["loss"], rtol=0.05)
    models.set_adapter_state(peft_gpu, start)  # a CPU node's global adapter loads onto the GPU model
    back = models.get_adapter_state(peft_gpu)
    assert all(np.array_equal(back[k], start[k]) for k in start)


@needs_cuda
def test_dp_sgd_step_on_cuda(tiny_llama_dir):
    from fedge.privacy.dpsgd import train_local_dp

    base = models.load_base(str(tiny_llama_dir), device="cuda", dtype="auto")
    peft = _lora(base)
    start = models.get_adapter_state(peft)
    out, history = train_local_dp(peft, _examples(base.tokenizer), task="causal-lm", pad_id=base.tokenizer.pad_token_id,
                                  steps=2, sample_rate=0.5, lr=0.05, noise_multiplier=1.0, max_grad_norm=1.0,
                                  delta=1e-3, seed=0)
    state = models.get_adapter_state(peft)
    assert history == [(1.0, 0.5, 2)] and out["epsilon"] > 0
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())
    assert any(not np.array_equal(state[k], start[k]) for k in state)
