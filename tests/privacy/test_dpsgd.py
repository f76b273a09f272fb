"""DP-SGD on a tiny PEFT model: Opacus' clipping equals a slow per-example loop; accounting persists."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

from fedge.data.tokenize import collate
from fedge.privacy import accounting as A
from fedge.privacy import dpsgd
from fedge.train import per_example_loss

VOCAB, PAD = 20, 0


class TinyClassifier(nn.Module):
    """Embedding -> masked mean -> Linear(10, 20) -> ReLU -> Linear(20, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 10)
        self.fc1 = nn.Linear(10, 20)
        self.fc2 = nn.Linear(20, 2)

    def forward(self, input_ids, attention_mask, position_ids=None):
        m = attention_mask.unsqueeze(-1).float()
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        return SimpleNamespace(logits=self.fc2(torch.relu(self.fc1(h))))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_peft(r: int = 2):
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc1", "fc2"], init_lora_weights=False)
    return get_peft_model(TinyClassifier(), cfg)


def tiny_examples(n: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, VOCAB, size=int(rng.integers(2, 7))).tolist(), "label": int(rng.integers(2))}
            for _ in range(n)]


def trainable(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def slow_clipped_mean(model, examples, idx, *, clip: float, expected_batch: float, task: str = "cls"):
    """Oracle: one example at a time, ∇ℓ_i · min(1, C/‖∇ℓ_i‖) summed, / B (no Opacus)."""
    ref = copy.deepcopy(model)
    names = [k for k, p in ref.named_parameters() if p.requires_grad]
    total = {k: torch.zeros_like(p) for k, p in ref.named_parameters() if p.requires_grad}
    for i in idx:
        ref.zero_grad(set_to_none=True)
        per_example_loss(ref, collate([examples[i]], task=task, pad_id=PAD), task=task)[0].backward()
        grads = {k: p.grad.detach().clone() for k, p in ref.named_parameters() if p.requires_grad}
        norm = torch.sqrt(sum((grads[k] ** 2).sum() for k in names))
        factor = min(1.0, clip / float(norm))
        for k in names:
            total[k] += factor * grads[k]
    return {k: v / expected_batch for k, v in total.items()}


def per_example_norms(model, examples, idx, task: str = "cls") -> list[float]:
    ref = copy.deepcopy(model)
    out = []
    for i in idx:
        ref.zero_grad(set_to_none=True)
        per_example_loss(ref, collate([examples[i]], task=task, pad_id=PAD), task=task)[0].backward()
        out.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in ref.parameters() if p.requires_grad))))
    return out


@pytest.mark.parametrize("max_physical_batch", [None, 2])
def test_opacus_clipping_matches_a_slow_per_example_loop(max_physical_batch):
    # Prepare: one batch of 7 of 12 examples, clip norm at the median so some are clipped
    model, ex = tiny_peft(), tiny_examples()
    idx = np.array([0, 2, 3, 5, 7, 8, 11])
    clip = float(np.median(per_example_norms(model, ex, idx)))
    expected = slow_clipped_mean(model, ex, idx, clip=clip, expected_batch=6.0)
    before = trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # Execute: plain SGD with lr 1, so θ_before − θ_after is the privatised gradient (noise 0: test only)
    dpsgd.dp_sgd_steps(model, ex, [idx], task="cls", pad_id=PAD, optimizer=torch.optim.SGD(params, lr=1.0),
                       noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=6.0, generator=None,
                       max_physical_batch=max_physical_batch)
    # Assert (Opacus divides by ‖g‖ + 1e-6: relative 1e-5 covers it)
    after = trainable(model)
    for k in before:
        torch.testing.assert_close(before[k] - after[k], expected[k], rtol=1e-4, atol=1e-7)


def test_causal_lm_lora_clipping_matches_the_slow_loop(tiny_llama_dir):
    # Prepare: the 2-layer test Llama with fedge's own LoRA wrapper; answer-only labels, right padding
    from transformers import AutoModelForCausalLM

    from fedge.data.tokenize import IGNORE
    from fedge.models import add_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = add_lora(base, task="causal-lm", r=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))
    with torch.no_grad():  # B = 0 at init would make every lora_A gradient zero
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.1)
    rng = np.random.default_rng(0)
    ex = []
    for _ in range(8):
        prompt = [int(t) for t in rng.integers(5, 100, size=int(rng.integers(2, 6)))]
        answer = [int(t) for t in rng.integers(5, 100, size=int(rng.integers(1, 5)))]
        ex.append({"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer})
    idx = np.array([0, 1, 3, 4, 6])
    clip = float(np.median(per_example_norms(model, ex, idx, task="causal-lm")))
    expected = slow_clipped_mean(model, ex, idx, clip=clip, expected_batch=4.0, task="causal-lm")
    before = trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # Execute
    dpsgd.dp_sgd_steps(model, ex, [idx], task="causal-lm", pad_id=PAD, optimizer=torch.optim.SGD(params, lr=1.0),
                       noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=4.0, generator=None)
    # Assert
    after = trainable(model)
    for k in before:
        torch.testing.assert_close(before[k] - after[k], expected[k], rtol=1e-3, atol=1e-6)
    assert get_peft_model_state_dict(model)


def test_noise_has_std_z_c_over_expected_batch():
    # Prepare: 25 empty Poisson batches -> each step adds only noise z·C/B
    model, ex = tiny_peft(r=8), tiny_examples()
    before = trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    z, c, b, steps = 1.3, 0.7, 4.0, 25
    # Execute
    out = dpsgd.dp_sgd_steps(model, ex, [np.array([], int)] * steps, task="cls", pad_id=PAD,
                             optimizer=torch.optim.SGD(params, lr=1.0), noise_multiplier=z, max_grad_norm=c,
                             expected_batch_size=b, generator=torch.Generator().manual_seed(0))
    # Assert: per coordinate, the sum of 25 draws of N(0, (zC/B)²)
    change = torch.cat([(before[k] - v).ravel() for k, v in trainable(model).items()])
    assert out["empty_batches"] == steps
    assert change.numel() > 400
    assert float(change.std()) == pytest.approx(np.sqrt(steps) * z * c / b, rel=0.12)


def test_history_persists_across_rounds_and_state_dict_still_works():
    # Prepare
    model, ex = tiny_peft(), tiny_examples()
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    kw = dict(task="cls", pad_id=PAD, steps=4, sample_rate=0.25, lr=0.05, noise_multiplier=1.1,
              max_grad_norm=1.0, delta=1e-3, seed=3)
    # Execute: two rounds, each a fresh optimizer and fresh hooks; history carried through a ConfigRecord
    m1, h1 = dpsgd.train_local_dp(model, ex, history=[], **kw)
    stored = ConfigRecord(dpsgd.history_to_config(h1))
    m2, h2 = dpsgd.train_local_dp(model, ex, history=dpsgd.history_from_config(stored), **kw)
    # Assert: ε after round 2 = one accountant over all 8 steps, and it grew
    assert h2 == [(1.1, 0.25, 4), (1.1, 0.25, 4)]
    assert m2["epsilon"] == pytest.approx(A.epsilon(noise_multiplier=1.1, sample_rate=0.25, steps=8, delta=1e-3))
    assert m1["epsilon"] < m2["epsilon"]
    sd = get_peft_model_state_dict(model)
    assert sd and all("lora_" in k for k in sd)
    assert not hasattr(model.base_model.model.fc1.lora_A["default"].weight, "grad_sample")
    for k, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[k]), k  # frozen base weights bit-identical


def test_client_refuses_when_the_budget_would_be_exceeded():
    model, ex = tiny_peft(), tiny_examples()
    before = trainable(model)
    spent = [(1.0, 0.25, 40)]
    with pytest.raises(dpsgd.BudgetExceeded, match="budget"):
        dpsgd.train_local_dp(model, ex, task="cls", pad_id=PAD, steps=40, sample_rate=0.25, lr=0.05,
                             noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, history=spent,
                             max_epsilon=A.record_level_epsilon(spent, delta=1e-3) + 0.01, seed=0)
    assert all(torch.equal(before[k], v) for k, v in trainable(model).items())  # nothing trained


@pytest.mark.parametrize("kw,match", [
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(delta=0.1), r"1/12"),
    (dict(sample_rate=0.0), "sample_rate"),
])
def test_dp_sgd_refusals(kw, match):
    args = {**dict(task="cls", pad_id=PAD, steps=1, sample_rate=0.25, lr=0.05, noise_multiplier=1.0,
                   max_grad_norm=1.0, delta=1e-3, seed=0), **kw}
    with pytest.raises(ValueError, match=match):
        dpsgd.train_local_dp(tiny_peft(), tiny_examples(), **args)


def test_calibrated_noise_covers_the_whole_planned_run():
    z = dpsgd.calibrate_noise(target_epsilon=4.0, delta=1e-3, sample_rate=0.25, steps_per_round=4, rounds=5)
    assert A.epsilon(noise_multiplier=z, sample_rate=0.25, steps=20, delta=1e-3) <= 4.0


def test_poisson_batches_include_each_example_with_rate_q():
    batches = dpsgd.poisson_batches(50, sample_rate=0.2, steps=400, rng=np.random.default_rng(0))
    sizes = np.array([len(b) for b in batches])
    assert sizes.mean() == pytest.approx(10.0, rel=0.05) and sizes.min() < sizes.max()


@pytest.mark.parametrize("freeze_a", [False, True])
def test_a_dp_step_updates_every_lora_tensor_of_a_real_bert(freeze_a):
    """Guard for Opacus issue #820 (LoRA updates silently lost with some Opacus/PEFT versions):
    one DP-SGD round on a real transformers BERT + PEFT LoRA + head changes every trainable
    tensor (with FFA-LoRA's frozen A: every B and the head, and A not at all), base untouched."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedge import models

    # Prepare: a tiny random BERT classifier, LoRA on query/value as the classify scenarios use
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2,
                                                    max_position_embeddings=16))
    for p in bert.parameters():
        p.requires_grad_(False)
    peft = models.add_lora(bert, task="sequence-classification", r=4, alpha=8, dropout=0.0,
                           target_modules=["query", "value"])
    if freeze_a:
        for k, p in peft.named_parameters():
            if "lora_A" in k:
                p.requires_grad_(False)
    start = {k: p.detach().clone() for k, p in peft.named_parameters()}
    train = {k for k, p in peft.named_parameters() if p.requires_grad}
    # Execute
    dpsgd.train_local_dp(peft, tiny_examples(32), task="cls", pad_id=PAD, steps=2, sample_rate=0.5, lr=1e-2,
                         noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, seed=0)
    # Assert
    after = dict(peft.named_parameters())
    changed = {k for k in start if not torch.equal(start[k], after[k].detach())}
    assert train and changed == train
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)
    assert any("lora_A" in k for k in changed) != freeze_a


def tiny_bert_peft(*, freeze: str):
    """A tiny random BERT classifier without dropout, LoRA on query/value; ``freeze``: 'adapter' (head-only) or ''."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedge import models

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=2, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    for p in bert.parameters():
        p.requires_grad_(False)
    peft = models.add_lora(bert, task="sequence-classification", r=4, alpha=8, dropout=0.0,
                           target_modules=["query", "value"])
    for k, p in peft.named_parameters():
        if freeze == "adapter" and "lora_" in k:
            p.requires_grad_(False)
    return peft


def test_head_only_dp_sgd_on_frozen_features_equals_full_forward_passes():
    """Oracle: the same DP-SGD round (same Poisson batches, same noise) through the whole model at
    every step. Without dropout the head's input is a fixed function of each example, so training
    the head on features computed once must give the same head, bit for bit up to float error."""
    from fedge.train import frozen_head

    # Prepare: two identical head-only models (adapter frozen), one of them with LoRA trainable for the guard
    fast, slow = tiny_bert_peft(freeze="adapter"), tiny_bert_peft(freeze="adapter")
    assert frozen_head(fast) is not None and frozen_head(tiny_bert_peft(freeze="")) is None
    start = trainable(fast)
    kw = dict(task="sequence-classification", pad_id=PAD, steps=6, sample_rate=0.4, lr=1e-2, head_lr=0.5,
              head_optimizer="sgd", noise_multiplier=1.0, max_grad_norm=0.5, delta=1e-3, seed=7,
              max_physical_batch=4)
    # Execute
    m_fast, h_fast = dpsgd.train_local_dp(fast, tiny_examples(32), **kw)
    m_slow, h_slow = dpsgd.train_local_dp(slow, tiny_examples(32), frozen_features=False, **kw)
    # Assert: the cached path was taken and gives the whole-model result; the head moved; same ledger
    assert m_fast["frozen_features"] and not m_slow["frozen_features"]
    got, want = trainable(fast), trainable(slow)
    assert set(got) == set(start) and all("classifier" in k for k in got)
    for k in got:
        assert not torch.equal(got[k], start[k])
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert h_fast == h_slow and m_fast["loss"] == pytest.approx(m_slow["loss"], rel=1e-5)
    assert {k: p for k, p in fast.named_parameters() if "lora_" in k}.keys()  # the adapter is there, untouched
    for (k, a), (_, b) in zip(fast.named_parameters(), tiny_bert_peft(freeze="adapter").named_parameters()):
        if "classifier" not in k:
            assert torch.equal(a, b), k


def test_a_head_that_reads_every_position_trains_through_the_whole_model():
    """RoBERTa's classification head takes the hidden states of every position (padded per batch), not one
    vector per example: the frozen-feature path must step aside, and the head still trains."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fedge import models

    # Prepare: a tiny random RoBERTa classifier, head-only (LoRA frozen)
    torch.manual_seed(0)
    rob = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=2, max_position_embeddings=24, pad_token_id=PAD))
    for p in rob.parameters():
        p.requires_grad_(False)
    peft = models.add_lora(rob, task="sequence-classification", r=2, alpha=4, dropout=0.0,
                           target_modules=["query", "value"])
    for k, p in peft.named_parameters():
        if "lora_" in k:
            p.requires_grad_(False)
    start = trainable(peft)
    # Execute
    metrics, _ = dpsgd.train_local_dp(peft, tiny_examples(32), task="sequence-classification", pad_id=PAD, steps=2,
                                      sample_rate=0.5, lr=1e-2, head_lr=0.1, head_optimizer="sgd",
                                      noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, seed=0)
    # Assert
    assert not metrics["frozen_features"]
    after = trainable(peft)
    assert start and all(not torch.equal(after[k], start[k]) for k in start)
