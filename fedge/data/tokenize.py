"""Tokenization: chat examples with answer-only labels, and classification text.

Causal LM: the prompt is rendered with the tokenizer's chat template (generation
prompt appended); labels are −100 on the prompt so the loss covers only the
answer tokens (and the end-of-turn token). Shapes: ``input_ids``, ``labels``,
``attention_mask`` are (B, L) with L ≤ max_length, right-padded.
"""

from __future__ import annotations

import torch

IGNORE = -100


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn, ending with the assistant header."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


def end_token_id(tokenizer) -> int:
    """The token that ends an answer: ``<|im_end|>`` for ChatML models, else EOS (or SEP)."""
    # get_vocab() builds a dict of the whole vocabulary (~7 ms for 30k tokens): ask for one token.
    tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tid is not None and tid != tokenizer.unk_token_id:
        return int(tid)
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has no end-of-turn, EOS or SEP token")


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end a generated answer: the end-of-turn token training appends (:func:`end_token_id`)
    and EOS, when the tokenizer has one."""
    return sorted({end_token_id(tokenizer)} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def encode_chat(tokenizer, prompt: str, response: str, max_length: int, end: int | None = None,
                ) -> dict[str, list[int]]:
    """One example: prompt ids + response ids + end token; labels only on the response."""
    p = chat_prompt_ids(tokenizer, prompt)
    end = end if end is not None else end_token_id(tokenizer)
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
    # Keep at least a few answer tokens: truncate the prompt from the left if needed.
    keep_answer = min(len(r), max(1, max_length // 2))
    p = p[-(max_length - keep_answer):] if len(p) + keep_answer > max_length else p
    r = r[: max_length - len(p)]
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}


def collate_causal(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    L = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def encode_dataset(tokenizer, ds, *, task: str, max_length: int) -> list[dict]:
    """Tokenize every record once (lists of ids; batching happens in training)."""
    if len(ds) == 0:  # e.g. a one-record client keeps no held-out set
        return []
    if task == "causal-lm":
        end = end_token_id(tokenizer)
        return [encode_chat(tokenizer, p, r, max_length, end) for p, r in zip(ds["prompt"], ds["response"])]
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
    return [{"input_ids": ids, "label": int(y)} for ids, y in zip(enc["input_ids"], ds["label"])]


def collate_cls(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    L = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
    # Explicit position ids with the real batch size (Opacus per-sample hooks need it).
    pos = torch.arange(L).unsqueeze(0).expand(len(examples), L).contiguous()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


def collate(examples: list[dict], *, task: str, pad_id: int) -> dict[str, torch.Tensor]:
    return collate_causal(examples, pad_id) if task == "causal-lm" else collate_cls(examples, pad_id)
