"""Answers as they are generated: streamed chat turns and raw-text completions (``fedge serve``).

``chat(model, messages, max_new_tokens=, on_text=)`` gives the same greedy answer as
``LocalModel.chat`` and calls ``on_text(piece)`` with each new piece of its text while the
model decodes; ``complete(model, prompt, ...)`` continues a plain text prompt (no chat
template: ``/v1/completions``), streamed or not.

* torch: the same ``model.generate`` call as ``LocalModel.chat`` (greedy), with a streamer
  that, after each new token, decodes all answer tokens so far and passes on the text not
  yet passed on (a trailing U+FFFD, a character whose bytes are split across tokens, waits
  for the next token). Pieces therefore concatenate to ``tokenizer.decode(answer ids)``.
* llama.cpp: llama-cpp-python's ``create_chat_completion`` / ``create_completion`` with
  ``stream=True`` (its own incremental detokenizer).
* onnxruntime (causal LMs, ``fedge.runtime.ort_genai``): onnxruntime-genai's greedy loop, one token per
  step, through the same streamer as torch (decode all answer tokens so far, pass on the new text).

A chat answer is stripped of leading and trailing whitespace, as ``LocalModel.chat`` strips
it: :class:`_Stripped` holds whitespace back until non-whitespace follows, so the streamed
pieces concatenate to exactly the non-streamed answer. Completions are not stripped.

``on_text`` may raise to stop generation (the server does when its client went away); the
exception propagates out of ``chat`` / ``complete``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedge.runtime.infer import ChatResult, LocalModel

OnText = Callable[[str], None]


class _Stripped:
    """``on_text`` filter: the concatenation of what it passes on is ``"".join(pieces).strip()``."""

    def __init__(self, on_text: OnText):
        self.on_text, self.started, self.pending = on_text, False, ""

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.started = True
        body = text.rstrip()
        if body:
            self.on_text(self.pending + body)
            self.pending = text[len(body):]
        else:
            self.pending += text


class _TextStreamer:
    """What ``model.generate(streamer=)`` calls (and the onnxruntime-genai loop): ``put`` the prompt ids once,
    then each new token; ``end``. ``tokenizer`` needs ``decode(ids, skip_special_tokens=True)``."""

    def __init__(self, tokenizer, on_text: OnText):
        self.tok, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent, self.prompt_seen = "", False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, *, final: bool) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.sent):
            return
        new, self.sent = text[len(self.sent):], text
        if new:
            self.on_text(new)


def torch_generate(model: LocalModel, ids: list[int], max_new_tokens: int, on_text: OnText | None,
                    *, strip: bool) -> ChatResult:
    """Greedy decoding with the arguments ``LocalModel.chat`` uses; ``on_text`` gets the text as it grows."""
    import torch

    from fedge.data.tokenize import stop_token_ids

    tok = model.tokenizer
    prompt = torch.tensor([ids])
    end_ids = stop_token_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (end_ids[0] if end_ids else 0)
    streamer = _TextStreamer(tok, on_text) if on_text is not None else None
    with torch.no_grad():
        out = model.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_ids or None,
                                   pad_token_id=pad, streamer=streamer)
    new = out[0, prompt.shape[1]:].tolist()
    stopped = bool(new) and new[-1] in end_ids
    text = tok.decode(new, skip_special_tokens=True)
    return ChatResult(text.strip() if strip else text, prompt.shape[1], len(new),
                      "stop" if stopped or len(new) < max_new_tokens else "length")


def genai_generate(model: LocalModel, ids: list[int], max_new_tokens: int, on_text: OnText | None,
                   *, strip: bool) -> ChatResult:
    """Greedy decoding with onnxruntime-genai (``model.model``: a ``fedge.runtime.ort_genai.GenaiLM``), the
    result and the streamed pieces built exactly as :func:`torch_generate` builds them."""
    import numpy as np

    lm = model.model
    streamer = _TextStreamer(lm, on_text) if on_text is not None else None
    if streamer is not None:
        streamer.put(np.asarray(ids))  # the prompt, skipped as generate() passes it
    new, stopped = lm.generate(ids, max_new_tokens,
                               None if streamer is None else lambda so_far: streamer.put(np.asarray(so_far[-1:])))
    if streamer is not None:
        streamer.end()
    text = lm.decode(new, skip_special_tokens=True)
    return ChatResult(text.strip() if strip else text, len(ids), len(new),
                      "stop" if stopped or len(new) < max_new_tokens else "length")


def _llama_stream(chunks, on_text: OnText, key: str) -> tuple[str, int, str]:
    """Drain a llama-cpp-python stream: (text, pieces, finish reason); ``key`` is "delta" (chat) or "text"."""
    parts, finish = [], "stop"
    for chunk in chunks:
        choice = chunk["choices"][0]
        piece = choice["delta"].get("content") if key == "delta" else choice.get("text")
        if piece:
            parts.append(piece)
            on_text(piece)
        finish = choice.get("finish_reason") or finish
    return "".join(parts), len(parts), finish


def chat(model: LocalModel, messages: list[dict[str, str]], *, max_new_tokens: int = 64,
         on_text: OnText | None = None) -> ChatResult:
    """``LocalModel.chat`` with ``on_text`` called on each new piece of the (stripped) answer.

    llama.cpp streams no token counts: ``completion_tokens`` is then the number of pieces
    (one per token, fewer when a character spans tokens) and ``prompt_tokens`` the
    estimate of ``LocalModel.prompt_tokens``.
    """
    if on_text is None:
        return model.chat(messages, max_new_tokens=max_new_tokens)
    if model.task != "causal-lm":
        raise ValueError(f"chat needs a causal-lm model; this one is {model.task}")
    out = _Stripped(on_text)
    if model.backend == "llama.cpp":
        chunks = model.model.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0,
                                                    stream=True)
        text, pieces, finish = _llama_stream(chunks, out, "delta")
        return ChatResult(text.strip(), model.prompt_tokens(messages), pieces, finish)
    if model.backend == "onnxruntime":
        return genai_generate(model, model._chat_ids(messages), max_new_tokens, out, strip=True)
    return torch_generate(model, model._chat_ids(messages), max_new_tokens, out, strip=True)


def prompt_tokens(model: LocalModel, prompt: str) -> int:
    """Tokens of a plain completion prompt as the model sees it (with the tokenizer's BOS)."""
    if model.backend == "llama.cpp":
        return len(model.model.tokenize(prompt.encode(), add_bos=True, special=True))
    if model.backend == "onnxruntime":
        return len(model.model.encode(prompt, add_special_tokens=True))
    return len(model.tokenizer(prompt, add_special_tokens=True)["input_ids"])


def complete(model: LocalModel, prompt: str, *, max_new_tokens: int = 16, on_text: OnText | None = None
             ) -> ChatResult:
    """Greedy continuation of ``prompt`` (not stripped); ``on_text`` as in :func:`chat`."""
    if model.task != "causal-lm":
        raise ValueError(f"completions need a causal-lm model; this one is {model.task}")
    if model.backend == "llama.cpp":
        llm: Any = model.model
        if on_text is None:
            r = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0)
            usage = r.get("usage", {})
            return ChatResult(r["choices"][0]["text"], usage.get("prompt_tokens", 0),
                              usage.get("completion_tokens", 0), r["choices"][0].get("finish_reason") or "stop")
        chunks = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, stream=True)
        text, pieces, finish = _llama_stream(chunks, on_text, "text")
        return ChatResult(text, prompt_tokens(model, prompt), pieces, finish)
    if model.backend == "onnxruntime":
        return genai_generate(model, model.model.encode(prompt, add_special_tokens=True), max_new_tokens, on_text,
                              strip=False)
    ids = model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return torch_generate(model, list(ids), max_new_tokens, on_text, strip=False)
