"""Local training and evaluation loops (plain PyTorch; no Flower here).

Loss. Per-example mean, then batch mean:

    ℓ_i = (1/|T_i|) Σ_{t∈T_i} −log p(y_t | y_<t)      T_i = answer tokens of example i
    L   = (1/B) Σ_i ℓ_i

(HF's built-in ``labels=`` loss averages over all tokens of the batch, which
weights examples by answer length; per-example means are what per-example
clipping in DP-SGD needs, and they make held-out losses comparable.)
For classification ℓ_i is the cross-entropy of example i.
"""

from __future__ import annotations

import inspect
import math
import time
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from fedge.data.tokenize import IGNORE, chat_prompt_ids, collate, stop_token_ids
from fedge.devices import model_device, to_device


def per_example_loss(model, batch: dict[str, torch.Tensor], *, task: str) -> torch.Tensor:
    """ℓ_i for each example in the batch, shape (B,), fp32 (on the batch's device).

    Logits are upcast first (a no-op in fp32): over a bf16 base, a bf16 log-softmax across a 49k-token
    vocabulary is too coarse for the loss and its gradient."""
    if task == "causal-lm":
        labels = batch["labels"][:, 1:]
        extra = {}
        # The LM head (a 49k-token vocabulary) and its softmax cost ~20 % of a step, and chat examples label only
        # the answer (~8 % of positions): project only positions that predict a label in some row. Same loss,
        # same gradient (the other positions' logits never enter it).
        keep = (labels != IGNORE).any(dim=0).nonzero().squeeze(1)
        if 0 < keep.numel() < labels.size(1) and accepts_logits_to_keep(model):
            extra["logits_to_keep"], labels = keep, labels[:, keep]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits.float()
        logits = logits if extra else logits[:, :-1, :]
        tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                              ignore_index=IGNORE, reduction="none").view(labels.shape)
        count = (labels != IGNORE).sum(dim=1).clamp(min=1)
        return tok.sum(dim=1) / count
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    return F.cross_entropy(logits, batch["labels"], reduction="none")


@cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def accepts_logits_to_keep(model) -> bool:
    """Whether the transformers model under the PEFT / Opacus wrappers takes ``logits_to_keep`` (a 1-D tensor
    of sequence positions: the logits of only those positions are computed)."""
    for _ in range(4):  # GradSampleModule -> PeftModel -> LoraModel -> *ForCausalLM
        inner = getattr(model, "_module", None)
        if inner is None and hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        if inner is None or inner is model:
            break
        model = inner
    return _forward_takes_logits_to_keep(type(model))


def batch_indices(n: int, *, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Index batches for ``steps`` steps: shuffled epochs, batches never repeat an example."""
    rng = np.random.default_rng(seed)
    out, perm, pos = [], rng.permutation(n), 0
    b = min(batch_size, n)
    for _ in range(steps):
        if pos + b > n:
            perm, pos = rng.permutation(n), 0
        out.append(perm[pos:pos + b])
        pos += b
    return out


def is_head(name: str) -> bool:
    """A trainable parameter of the task head: peft keeps its trainable copy under ``modules_to_save``."""
    return ".modules_to_save." in name


def param_groups(model: torch.nn.Module, *, lr: float, head_lr: float | None = None) -> list[dict]:
    """Optimizer groups of the trainable parameters: the adapter at ``lr``, the head at ``head_lr``.

    One group when ``head_lr`` is None (the head trains at ``lr`` too)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head_lr is None:
        return [{"params": [p for _, p in named], "lr": lr}]
    head = [p for n, p in named if is_head(n)]
    if not head:
        raise ValueError("train.head_lr: the model has no trainable head (modules_to_save)")
    return [{"params": [p for n, p in named if not is_head(n)], "lr": lr}, {"params": head, "lr": head_lr}]


def frozen_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The one module holding every trainable parameter when only the task head trains, else None.

    peft wraps a classifier's head in a ``ModulesToSaveWrapper`` (its trainable copy under
    ``modules_to_save``): when nothing else trains (head-only, a linear probe), the head's
    input is a fixed function of each example, so it can be computed once
    (:func:`head_features`) instead of at every step."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named or not all(is_head(n) for n, _ in named):
        return None
    owners = {n.split(".modules_to_save.", 1)[0] for n, _ in named}
    if len(owners) != 1:  # a head of several modules (e.g. pre_classifier + classifier): no single input
        return None
    return model.get_submodule(owners.pop())


@torch.no_grad()
def head_features(model, head: torch.nn.Module, examples: list[dict], *, task: str, pad_id: int,
                  batch_size: int = 64) -> torch.Tensor | None:
    """The head's input for every example, shape (n, d), in eval mode (no dropout): what the frozen
    encoder (and pooler) feeds the head. One forward pass per example instead of one per step.
    None when the head reads more than one vector per example (e.g. RoBERTa's head takes the
    hidden states of every position, padded per batch): train through the whole model then."""
    got: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    device = model_device(model)
    model.eval()
    try:
        for s in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[s:s + batch_size], task=task, pad_id=pad_id), device)
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        hook.remove()
    if any(g.dim() != 2 for g in got):
        return None
    return torch.cat(got)


HEAD_MOMENTUM = 0.9  # heavy-ball momentum of the SGD head (train.head_optimizer: sgd)


class Chain(torch.optim.Optimizer):
    """One optimizer object over optimizers that each own some parameter groups.

    Opacus wraps exactly one optimizer; this lets the adapter keep AdamW while the head
    takes SGD with momentum. ``param_groups`` are the parts' own dicts (a change of lr
    reaches the part); each part keeps its own state (clients build a fresh one per round).
    """

    def __init__(self, *parts: torch.optim.Optimizer) -> None:
        self.parts = parts
        super().__init__([p for o in parts for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in parts for g in o.param_groups]

    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for o in self.parts:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)


def make_optimizer(model: torch.nn.Module, *, lr: float, head_lr: float | None = None, head_optimizer: str = "adamw",
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters (head at ``head_lr``), or with ``head_optimizer="sgd"``
    the head by SGD with momentum μ = HEAD_MOMENTUM: v ← μv + g, θ ← θ − head_lr·v.

    Why SGD for the head under DP-SGD: Adam divides each coordinate by its running RMS,
    which noise dominates, so every coordinate moves by ~lr per step whatever its signal;
    SGD moves in proportion to the noisy gradient, whose noise averages out across steps
    (benchmarks/results/dp_head_replay.md: +1.0 to +3.1 points at ε 8 to 1, lr 0.5)."""
    groups = param_groups(model, lr=lr, head_lr=head_lr)
    if head_optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if head_optimizer != "sgd":
        raise ValueError(f"train.head_optimizer must be 'adamw' or 'sgd', got {head_optimizer!r}")
    if head_lr is None:
        raise ValueError("train.head_optimizer 'sgd' needs train.head_lr (the SGD head's step size)")
    adapter, head = groups
    head_opt = torch.optim.SGD([head], lr=head["lr"], momentum=HEAD_MOMENTUM, weight_decay=weight_decay)
    if not adapter["params"]:
        return Chain(head_opt)
    return Chain(torch.optim.AdamW([adapter], weight_decay=weight_decay), head_opt)


def train_local(
    model,
    examples: list[dict],
    *,
    task: str,
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    head_lr: float | None = None,
    head_optimizer: str = "adamw",
    weight_decay: float = 0.0,
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Run ``steps`` optimizer steps (:func:`make_optimizer`) on the trainable parameters; return mean train loss.

    Batches go to the model's device (``model.device`` placed it, :func:`fedge.models.load_base`).

    With ``proximal_mu`` = μ > 0 (FedProx) the objective is L + (μ/2)‖w − w_0‖², w_0 the
    trainable parameters at entry (the global adapter); the reported loss is L alone.
    """
    if not examples:
        raise ValueError("no local training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    opt = make_optimizer(model, lr=lr, head_lr=head_lr, head_optimizer=head_optimizer, weight_decay=weight_decay)
    torch.manual_seed(seed)
    device = model_device(model)
    model.train()
    losses, t0 = [], time.perf_counter()
    for idx in batch_indices(len(examples), steps=steps, batch_size=batch_size, seed=seed):
        batch = to_device(collate([examples[i] for i in idx], task=task, pad_id=pad_id), device)
        loss = per_example_loss(model, batch, task=task).mean()
        objective = loss
        if anchor is not None:
            objective = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return {"loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0, "steps": len(losses)}


@torch.no_grad()
def evaluate(
    model, examples: list[dict], *, task: str, pad_id: int, batch_size: int = 16, max_examples: int | None = None
) -> dict[str, float]:
    """Mean per-example loss (and accuracy for classification) over ``examples``."""
    ex = examples[:max_examples] if max_examples else examples
    if not ex:
        return {"loss": math.nan, "n": 0}
    model.eval()
    device = model_device(model)
    # Batch examples of similar length: right padding to each batch's longest is wasted compute (~30 % of the
    # chat held-out set in random order); the mean is over examples, so the order does not enter it.
    ex = sorted(ex, key=lambda e: len(e["input_ids"]))
    total, correct = 0.0, 0
    for s in range(0, len(ex), batch_size):
        batch = to_device(collate(ex[s:s + batch_size], task=task, pad_id=pad_id), device)
        total += float(per_example_loss(model, batch, task=task).sum())
        if task != "causal-lm":
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            correct += int((model(**inputs).logits.argmax(-1) == batch["labels"]).sum())
    out = {"loss": total / len(ex), "n": len(ex)}
    if task != "causal-lm":
        out["accuracy"] = correct / len(ex)
    return out


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 40) -> str:
    """Greedy answer to ``prompt`` as a chat turn (deterministic, for side-by-side views)."""
    ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)], device=model_device(model))
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
