"""An Ollama ``Modelfile`` beside GGUF artifacts, so an Ollama user can ``ollama create`` from a verified artifact.

Written by :func:`fedge.export.artifact.build_artifact` next to the GGUF files, signed and listed in the
manifest like every other file (``fedge install`` checks it; fedge itself never reads it)::

    merged:   FROM ./model.<T>.gguf                  the file llama.cpp would run (Q8_0 first, as the runtime)
    adapter:  FROM ./<base>.gguf                     the base GGUF the adapter was trained on (edit the path;
              ADAPTER ./adapter.gguf                 its sha256 is in the comment and the manifest)
    both:     TEMPLATE / SYSTEM / PARAMETER stop     from the model's own chat template (ChatML here),
              PARAMETER temperature 0                fedge decodes greedily

The TEMPLATE is Go template text: for ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then
``<|im_start|>assistant\\n``) it renders the same prompt as the Hugging Face template; a default system
message that the HF template inserts when a conversation has none becomes Ollama's ``SYSTEM`` (Ollama
prepends it to such conversations). A chat template that is not ChatML gets no TEMPLATE line: Ollama then
takes the template from the GGUF's ``tokenizer.chat_template``.
"""

from __future__ import annotations

from pathlib import Path

MODELFILE = "Modelfile"
GGUF_ORDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_1", "Q4_0", "F16", "F32")  # = infer.LLAMA_GGUF_ORDER
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{{- range .Messages }}" + IM_START + "{{ .Role }}\n{{ .Content }}" + IM_END + "\n{{ end }}"
    + IM_START + "assistant\n"
)


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('text with """ cannot be written in a Modelfile')
    return f'"""{text}"""'


def chat_lines(tokenizer) -> list[str]:
    """TEMPLATE, SYSTEM and stop lines matching ``tokenizer``'s chat template (module docstring)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    lines: list[str] = []
    if IM_START in template and IM_END in template:
        lines.append(f"TEMPLATE {_quote(CHATML_TEMPLATE)}")
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                              add_generation_prompt=True)
        head = f"{IM_START}system\n"
        if probe.startswith(head):  # the HF template adds a default system message
            lines.append(f"SYSTEM {_quote(probe[len(head):probe.index(IM_END)])}")
        stops = [IM_START, IM_END]
    else:
        lines.append("# chat template: not ChatML; Ollama uses the GGUF's tokenizer.chat_template")
        stops = []
    eos = getattr(tokenizer, "eos_token", None)
    stops += [eos] if eos and eos not in stops else []
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    return lines


def write_modelfile(out_dir: Path, tokenizer, *, version_note: str, merged_files: list[str] | None = None,
                    base_gguf_name: str | None = None, base_gguf_sha256: str | None = None,
                    base_id: str | None = None) -> Path | None:
    """Write ``out_dir/Modelfile`` (merged: pick from ``merged_files``; adapter: FROM the base + ADAPTER).

    Returns None when there is no GGUF to point at.
    """
    head = [f"# Ollama recipe for this fedge artifact ({version_note}). Install and verify it first",
            "# (fedge install ... --trusted-key ...), then: ollama create NAME -f Modelfile"]
    if merged_files is not None:
        ggufs = [f"model.{t}.gguf" for t in GGUF_ORDER if f"model.{t}.gguf" in merged_files]
        if not ggufs:
            return None
        body = [f"FROM ./{ggufs[0]}"]
    else:
        name = base_gguf_name or "base.gguf"
        head += [f"# FROM: the base GGUF the adapter was trained on ({base_id or 'see manifest base_model.id'}, "
                 f"sha256 {base_gguf_sha256 or 'not recorded'}): put it beside this file or edit the path."]
        body = [f"FROM ./{name}", "ADAPTER ./adapter.gguf"]
    path = out_dir / MODELFILE
    path.write_text("\n".join(head + body + chat_lines(tokenizer)) + "\n")
    return path
