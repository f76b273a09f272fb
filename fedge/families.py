"""Default LoRA target modules per architecture (Hugging Face ``config.model_type``).

Used when a scenario leaves ``lora.target_modules`` out. The choice is the LoRA paper's
(Hu et al. 2021, §7.1, Table 5): for a fixed parameter budget, adapting the attention
query and value projections W_q, W_v does as well as adapting all four attention
matrices. That is also what fedge used before this registry (``q_proj, v_proj`` on
SmolLM2), so a scenario that names no modules trains exactly what it trained before.
Adapter size per layer: r · (d + d_q) + r · (d + d_v) parameters.

Why our own table and not PEFT's (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``):
the server sends the resolved names to every client, and an adapter's layout must not
change with a PEFT upgrade on one node. Names are transformers' module names:

* Llama (SmolLM2), Mistral, Qwen2/Qwen3, Gemma/Gemma2/Gemma3, SmolLM3: ``q_proj``, ``v_proj``;
* Phi-1/1.5/2 (``phi``): ``q_proj``, ``v_proj`` (its output projection is ``dense``);
* Phi-3/3.5/4-mini (``phi3``): ``qkv_proj``, the fused projection: W_q and W_v cannot be
  adapted without W_k there, so the adapter covers all three (B: (d_q + 2·d_kv, r));
* BERT-style encoders (MiniLM): ``query``, ``value``.

Register another architecture with :func:`register` (a name is taken once, as in PEFT's
registries).
"""

from __future__ import annotations

from collections.abc import Sequence


class ModelLoadError(RuntimeError):
    """The base model cannot be loaded; the message says what to do instead. Here, beside the
    architectures, because this module imports no torch (``fedge.models`` re-exports it)."""


_TARGETS: dict[str, tuple[str, ...]] = {}


def register(model_type: str, targets: Sequence[str]) -> None:
    """Default LoRA targets for ``model_type``; refuse a name already registered."""
    if model_type in _TARGETS:
        raise ValueError(
            f"LoRA targets for model type {model_type!r} are already registered: {list(_TARGETS[model_type])}"
        )
    if not targets or isinstance(targets, str):
        raise ValueError(f"LoRA targets for {model_type!r} must be a non-empty list of module names")
    _TARGETS[model_type] = tuple(targets)


def registered() -> dict[str, tuple[str, ...]]:
    """model_type -> default target modules (a copy)."""
    return dict(_TARGETS)


def default_targets(model_type: str | None) -> tuple[str, ...]:
    """The registered targets, or a ValueError that says to name ``lora.target_modules``."""
    if model_type in _TARGETS:
        return _TARGETS[model_type]
    raise ValueError(
        f"no default LoRA target modules for model type {model_type!r}: name them in "
        f"lora.target_modules (architectures with a default: {sorted(_TARGETS)})"
    )


for _name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "phi"):
    register(_name, ("q_proj", "v_proj"))
register("phi3", ("qkv_proj",))
register("bert", ("query", "value"))
