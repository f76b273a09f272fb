"""The end-of-run demo: base vs fine-tuned answers to prompts from the global held-out set.

Prompts are picked without looking at any model: the held-out records are shuffled with
the run's seed and taken one category (client group) at a time in turn, so the sample
spans the branches' data and is the same for every strategy run on one scenario.
Each sample also carries the loss of the reference answer under both models,

    ℓ(x, y) = (1/|y|) Σ_t −log p(y_t | x, y_<t)        (answer tokens only, as in training)

so "the fine-tuned model is closer to what this branch would answer" is a number.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from fedge import config as fcfg
from fedge import lora_fed, models
from fedge.data.tokenize import chat_prompt_ids, collate, encode_dataset, end_token_id
from fedge.devices import model_device, to_device
from fedge.train import per_example_loss

GROUP_COLUMNS = ("category", "client", "language")


def pick_prompts(holdout, k: int, *, seed: int, column: str | None = None,
                 only: set[str] | None = None) -> list[dict]:
    """k records of ``holdout`` (prompt, response, group), one group at a time in turn.

    ``only``: keep records whose ``column`` is one of these (the branches' own groups).
    """
    if k <= 0 or len(holdout) == 0:
        return []
    order = np.random.default_rng(seed).permutation(len(holdout))
    col = column or next((c for c in GROUP_COLUMNS if c in holdout.column_names), None)
    groups = [str(holdout[int(i)][col]) if col else "" for i in order]
    if only and col and any(g in only for g in groups):
        order, groups = zip(*[(i, g) for i, g in zip(order, groups) if g in only])
    queues: dict[str, list[int]] = {}
    for i, g in zip(order, groups):
        queues.setdefault(g, []).append(int(i))
    picked: list[int] = []
    while len(picked) < min(k, len(holdout)):
        for g in list(queues):
            if queues[g] and len(picked) < k:
                picked.append(queues[g].pop(0))
    return [{"prompt": holdout[i]["prompt"], "reference": holdout[i]["response"],
             "source": f"held-out, {col} {holdout[i][col]}" if col else "held-out"} for i in picked]


def tidy(text: str, *, cut: bool) -> str:
    """One line; if generation stopped at the token limit, end at the last sentence or word."""
    text = " ".join(text.split())
    if not cut:
        return text
    m = list(re.finditer(r"[.!?](?=\s|$)", text))
    if m and m[-1].end() > len(text) // 2:
        return text[: m[-1].end()]
    return text.rsplit(" ", 1)[0] + " …" if " " in text else text


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], s: fcfg.SampleSection) -> list[str]:
    """Greedy answers to all prompts in one left-padded batch (one pass per token for all of them)."""
    rows = [chat_prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    pad = int(tokenizer.pad_token_id)
    device = model_device(model)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    ends = {end_token_id(tokenizer)} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=s.max_new_tokens, do_sample=False,
                         repetition_penalty=s.repetition_penalty, eos_token_id=sorted(ends), pad_token_id=pad)
    answers = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in ends), None)
        new = row if stop is None else row[:stop]
        answers.append(tidy(tokenizer.decode(new, skip_special_tokens=True), cut=stop is None))
    return answers


@torch.no_grad()
def reference_losses(model, tokenizer, prompts: list[str], references: list[str], *, max_length: int) -> list[float]:
    """ℓ(x, y) of each reference answer y given its prompt x (one batch)."""
    import datasets

    ex = encode_dataset(tokenizer, datasets.Dataset.from_dict({"prompt": prompts, "response": references}),
                        task="causal-lm", max_length=max_length)
    batch = to_device(collate(ex, task="causal-lm", pad_id=int(tokenizer.pad_token_id)), model_device(model))
    return [float(v) for v in per_example_loss(model, batch, task="causal-lm")]


def answer_samples(ev, cfg: fcfg.RunConfig, holdout, adapter: dict, residual: dict | None = None) -> list[dict]:
    """Each picked prompt (and ``cfg.sample_prompt``) answered by the base and the fine-tuned model."""
    column = only = None
    if cfg.data.partition == "natural":  # held-out prompts of the branches' own groups, not of unused ones
        from fedge.data import data_args, federated_split

        column, only = cfg.data.partition_by, set(federated_split(**data_args(cfg)).client_names)
    items = pick_prompts(holdout, cfg.sample.num_prompts, seed=cfg.seed, column=column, only=only)
    if cfg.sample_prompt:
        items.append({"prompt": cfg.sample_prompt, "reference": None, "source": "sample_prompt"})
    if not items:
        return []
    tok, model = ev.base.tokenizer, ev.model
    models.set_adapter_state(model, adapter)
    model.eval()
    prompts = [it["prompt"] for it in items]
    scored = [i for i, it in enumerate(items) if it["reference"] is not None]
    out = [dict(it) for it in items]
    for who in ("base", "finetuned"):
        with (model.disable_adapter() if who == "base" else lora_fed.residual_applied(model, residual)):
            for row, answer in zip(out, generate_batch(model, tok, prompts, cfg.sample)):
                row[who] = answer
            losses = reference_losses(model, tok, [prompts[i] for i in scored],
                                      [items[i]["reference"] for i in scored],
                                      max_length=cfg.model.max_length) if scored else []
        for row in out:
            row[f"{who}_loss"] = None
        for i, v in zip(scored, losses):
            out[i][f"{who}_loss"] = v
    return out
