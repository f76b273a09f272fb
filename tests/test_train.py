"""Local training: the per-example loss against a one-example-at-a-time oracle; FedProx."""

import numpy as np
import torch

from fedge import models
from fedge.data.tokenize import IGNORE, collate, encode_chat
from fedge.train import accepts_logits_to_keep, batch_indices, per_example_loss, train_local


def _examples(tok, n=6):
    pairs = [("hello there", "hi"), ("what is the weather like today", "sunny and warm in the afternoon"),
             ("who are you", "a small model"), ("tell me a joke", "no"), ("how do I reset it", "hold the button"),
             ("bye", "see you soon, take care")]
    return [encode_chat(tok, p, r, 32) for p, r in pairs[:n]]


def test_per_example_loss_matches_unbatched_oracle(tiny_llama_dir, torch_one_thread):
    # Prepare
    base = models.load_base(str(tiny_llama_dir))
    ex = _examples(base.tokenizer)
    pad = base.tokenizer.pad_token_id
    # Execute: batched (padded) vs one example at a time with HF's own token-mean loss
    batched = per_example_loss(base.model, collate(ex, task="causal-lm", pad_id=pad), task="causal-lm")
    oracle = []
    for e in ex:
        ids = torch.tensor([e["input_ids"]])
        oracle.append(float(base.model(input_ids=ids, labels=torch.tensor([e["labels"]])).loss))
    # Assert: padding and batching do not change any example's loss; answers only are scored
    np.testing.assert_allclose(batched.detach().numpy(), oracle, rtol=1e-4)
    assert all(IGNORE in e["labels"] and e["labels"][-1] != IGNORE for e in ex)


def test_answer_only_logits_give_the_full_models_loss_gradient(tiny_llama_dir, torch_one_thread):
    # Prepare: a LoRA model, also behind Opacus's per-sample wrapper (both must take the short path)
    from opacus import GradSampleModule

    base = models.load_base(str(tiny_llama_dir))
    peft = models.add_lora(base.model, task="causal-lm", r=2, alpha=4, dropout=0.0,
                           target_modules=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():  # B = 0 at init would make every LoRA gradient of A zero
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ex = _examples(base.tokenizer)
    batch = collate(ex, task="causal-lm", pad_id=base.tokenizer.pad_token_id)
    lora = [p for p in peft.parameters() if p.requires_grad]
    # Execute: our batch loss vs the oracle, HF's own loss (full logits) one example at a time
    per_example_loss(peft, batch, task="causal-lm").sum().backward()
    ours = [p.grad.clone() for p in lora]
    peft.zero_grad(set_to_none=True)
    for e in ex:
        peft(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.backward()
    oracle = [p.grad.clone() for p in lora]
    # Assert: the path is taken (answers are a few positions of each row), the gradient is the full model's
    assert accepts_logits_to_keep(peft) and accepts_logits_to_keep(GradSampleModule(peft))
    assert (torch.tensor([e["labels"] for e in ex][0]) == IGNORE).float().mean() > 0.5
    for a, b in zip(ours, oracle):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not accepts_logits_to_keep(torch.nn.Linear(2, 2))


def test_batches_cover_each_example_once_per_epoch():
    idx = batch_indices(10, steps=5, batch_size=4, seed=0)  # 4+4, then a new epoch
    assert len(set(idx[0]) | set(idx[1])) == 8 and all(len(b) == 4 for b in idx)


def test_fedprox_term_keeps_the_adapter_closer_to_the_global_one(tiny_llama_dir, torch_one_thread):
    def drift(mu):
        base = models.load_base(str(tiny_llama_dir))
        peft = models.add_lora(base.model, task="causal-lm", r=2, alpha=4, dropout=0.0,
                               target_modules=["q_proj", "v_proj"], seed=0)
        start = models.get_adapter_state(peft)
        train_local(peft, _examples(base.tokenizer), task="causal-lm", pad_id=base.tokenizer.pad_token_id,
                    steps=8, batch_size=3, lr=0.05, seed=0, proximal_mu=mu)
        end = models.get_adapter_state(peft)
        return np.sqrt(sum(np.sum((end[k] - start[k]) ** 2) for k in start))

    assert drift(50.0) < 0.7 * drift(0.0)
