"""onnxruntime-genai causal LM: an installed ``genai-*/`` folder (``fedge.export.onnx_genai``) run
without PyTorch.

Nothing here imports torch or transformers. A device needs ``onnxruntime-genai`` (it brings
onnxruntime and numpy) and ``tokenizers``:

* the chat prompt is rendered by onnxruntime-genai's own template engine
  (``og.Tokenizer.apply_chat_template``) from the folder's ``chat_template.jinja`` (or the template in
  ``tokenizer_config.json``), with the generation prompt appended, as the torch runtime renders it;
* text is encoded and decoded by the ``tokenizers`` package from the folder's ``tokenizer.json`` (the
  library transformers' fast tokenizers wrap): chat prompts without special tokens added (as
  ``apply_chat_template(tokenize=True)``), plain completion prompts with them; decoding skips special
  tokens, with transformers' space clean-up when ``tokenizer_config.json`` asks for it. The same ids and
  text as the torch runtime (tested);
* decoding is greedy (``do_sample=False``: the arg max of each step's logits, no temperature, top-k or
  penalties), one token per ``generate_next_token``, and stops after a stop token
  (``genai_config.json``'s ``eos_token_id``: what ``fedge.data.tokenize.stop_token_ids`` gave at export:
  the end-of-turn token and EOS) or ``max_new_tokens`` tokens, or at the model's context length.
  ``on_token`` sees the ids after each new token (``fedge.runtime.stream`` turns them into text pieces).

One ``og.Model`` serves every request; each call makes its own ``og.Generator`` (its own KV cache, sized
prompt + ``max_new_tokens``), so ``fedge serve --workers N`` decodes N requests at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Which folder runs when an artifact holds several: int8 first (+1.5 % answer perplexity at 0.35x llama.cpp
# F32's latency on SmolLM2), then int4 (0.28x, but +41 %), then fp32 (benchmarks/results/export_onnx_genai.md).
GENAI_ORDER = ("genai-int8", "genai-int4", "genai-fp32")
COMPUTE = {"genai-int4": "onnx-genai-int4", "genai-int8": "onnx-genai-int8", "genai-fp32": "onnx-genai-fp32"}
MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
NEEDS = (MODEL_FILE, CONFIG_FILE, "tokenizer.json", "tokenizer_config.json")
# transformers' clean_up_tokenization (PreTrainedTokenizerBase.clean_up_tokenization)
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def genai_folders(files) -> list[str]:
    """The genai folders an artifact's file list holds completely, in :data:`GENAI_ORDER`."""
    files = set(files)
    return [d for d in GENAI_ORDER if all(f"{d}/{n}" in files for n in NEEDS)]


class GenaiLM:
    """Greedy generation with onnxruntime-genai over one genai folder (module docstring)."""

    def __init__(self, folder: str | Path, *, threads: int | None = None):
        import onnxruntime_genai as og
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        config = json.loads((self.folder / CONFIG_FILE).read_text())
        self.context_length = int(config["model"]["context_length"])
        eos = config["model"].get("eos_token_id")
        self.stop_ids = frozenset(int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        tok_config = json.loads((self.folder / "tokenizer_config.json").read_text())
        self.cleanup = bool(tok_config.get("clean_up_tokenization_spaces", False))
        template = self.folder / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else tok_config.get("chat_template")
        if not isinstance(self.chat_template, str):
            self.chat_template = None  # a named-template dict or none: plain "content\n" prompts
        self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        og_config = og.Config(str(self.folder))
        if threads:
            og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
        self._og = og
        self.model = og.Model(og_config)
        self._renderer = og.Tokenizer(self.model)

    # -- text <-> ids --------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.cleanup:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat prompt's ids, ending with the assistant header (as the torch runtime's ``_chat_ids``)."""
        if self.chat_template is None:
            return self.encode("\n".join(m["content"] for m in messages) + "\n", add_special_tokens=True)
        text = self._renderer.apply_chat_template(json.dumps(messages), template_str=self.chat_template,
                                                  add_generation_prompt=True)
        return self.encode(text, add_special_tokens=False)

    # -- generation ----------------------------------------------------------------------------------

    def generate(self, ids: list[int], max_new_tokens: int,
                 on_token: Callable[[list[int]], None] | None = None) -> tuple[list[int], bool]:
        """Greedy continuation of ``ids``: (new ids, the stop token included; whether a stop token ended it)."""
        og = self._og
        if not ids:
            raise ValueError("generation needs at least one prompt token")
        limit = min(len(ids) + max_new_tokens, self.context_length)
        if len(ids) >= limit:
            return [], False
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=limit)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        new: list[int] = []
        while len(ids) + len(new) < limit and not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            new.append(token)
            if on_token is not None:
                on_token(new)
            if token in self.stop_ids:
                return new, True
        return new, False
