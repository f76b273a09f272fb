"""Causal-LM ONNX artifacts (onnxruntime-genai): export → sign → install → generate, without torch.

Tiny seeded Llama (2 layers, hidden 64, ChatML BPE tokenizer) with a random LoRA on q, k, v, o
(tests/export/conftest.py), merged and exported as ``genai-fp32/`` and ``genai-int4/``. Oracles:

* fp32: the greedy tokens of onnxruntime-genai equal transformers' own greedy ``generate`` on the same
  merged model (8 new tokens, 3 prompts), and ``LocalModel.chat`` / ``stream.complete`` give the torch
  runtime's text, token counts and finish reason;
* int4: the answer is made of valid tokens, and its first-step logits stay within
  ``INT4_TOL`` · max |fp32 logit| of the fp32 graph's with correlation ≥ ``INT4_CORR`` (measured 0.09-0.28
  and ≥ 0.974 on six prompts: this tiny model's embedding is 4-bit too);
* the int4 graph keeps the adapter's projections (fused qkv, o) at 8 bits and the rest at 4, with the tied
  embedding and LM head as one 4-bit matrix;
* the store refuses a genai ``.onnx`` with one byte flipped (before install, and after install, where the
  served older version keeps answering), and an ``.onnx`` whose weights live in a side file;
* ``fedge serve`` in an interpreter where ``import torch`` fails answers the official ``openai`` client,
  streamed and not, with the same text both ways and as the model called in the test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="the onnx-genai extra (onnxruntime-genai) is not installed")
onnx = pytest.importorskip("onnx", reason="the onnx package (checks .onnx files) is not installed")

from fedge.export import onnx_genai  # noqa: E402
from fedge.export.artifact import ArtifactBuildError, build_artifact  # noqa: E402
from fedge.export.manifest import read_manifest, write_manifest  # noqa: E402
from fedge.export.signing import sign_manifest  # noqa: E402
from fedge.files import sha256_file  # noqa: E402
from fedge.runtime import stream  # noqa: E402
from fedge.runtime.hotswap import ModelSlot, StoreWatcher  # noqa: E402
from fedge.runtime.infer import load_installed  # noqa: E402
from fedge.runtime.ort_genai import GenaiLM  # noqa: E402
from fedge.runtime.store import ArtifactRefused, current, install  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["hello world, how are you?", "what is the capital of france?", "the quick brown fox"]
NEW_TOKENS = 8
INT4_TOL = 0.4  # of max |fp32 logit|, first generated position
INT4_CORR = 0.95
READY = re.compile(r"serving (\S+) \(version (\d+), (\S+) backend\) from .* on (http://\S+) ")
# A device without torch: importing torch or transformers raises; on the way out (Ctrl-C) the process
# reports whether either got loaded anyway.
NO_TORCH = ("import sys\n"
            "sys.modules['torch'] = sys.modules['transformers'] = None\n"
            "from fedge.cli import main\n"
            "try:\n"
            "    sys.exit(main(sys.argv[1:]))\n"
            "finally:\n"
            "    loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
            "                    and sys.modules[m] is not None)\n"
            "    print('fedge-test: loaded', loaded, file=sys.stderr, flush=True)\n")


@pytest.fixture(scope="module")
def art(llama_base_dir, llama_adapter_dir, keys, tmp_path_factory) -> Path:
    """v1: fp32 safetensors (the torch oracle) + genai fp32 + genai int4 of the same merged model."""
    return build_artifact(llama_adapter_dir, tmp_path_factory.mktemp("genai") / "v1",
                          base_source=str(llama_base_dir), private_key=keys.private, mode="merged",
                          formats=("fp32", "onnx", "onnx-int4"), version=1)


@pytest.fixture(scope="module")
def store(art, keys, tmp_path_factory) -> Path:
    s = tmp_path_factory.mktemp("genai-store")
    install(art, store_dir=s, trusted_public_key=keys.public_pem)
    return s


@pytest.fixture(scope="module")
def models(store):
    """The installed v1 as the device runs it: torch (fp32 safetensors), genai int4 (default) and fp32."""
    torch_model = load_installed(store, backend="torch")
    int4 = load_installed(store, backend="onnxruntime")
    lm = GenaiLM(store / "versions" / "1" / "genai-fp32", threads=1)
    fp32 = dataclasses.replace(int4, model=lm, tokenizer=lm, compute="onnx-genai-fp32",
                               files={"model": "genai-fp32/model.onnx"})
    return {"torch": torch_model, "int4": int4, "fp32": fp32}


def _resigned(src: Path, dst: Path, key, *, version: int) -> Path:
    """A copy of ``src`` as another version, signed by ``key``."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    m["version"] = version
    write_manifest(dst, m)
    sign_manifest(dst, key)
    return dst


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _first_logits(lm: GenaiLM, ids: list[int]) -> np.ndarray:
    params = og.GeneratorParams(lm.model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 1)
    gen = og.Generator(lm.model, params)
    gen.append_tokens(np.asarray(ids, np.int32))
    return np.asarray(gen.get_logits(), np.float32).reshape(-1)


# -- export --------------------------------------------------------------------------------------


def test_genai_folders_are_signed_self_contained_and_pass_the_store_checks(art):
    # Prepare
    m = read_manifest(art)
    from transformers import AutoTokenizer

    from fedge.data.tokenize import stop_token_ids

    stops = stop_token_ids(AutoTokenizer.from_pretrained(art))
    # Execute
    protos = {d: onnx.load(str(art / d / "model.onnx"), load_external_data=False) for d in ("genai-fp32", "genai-int4")}
    # Assert: listed with their own format labels and hashes; nothing but allowed, self-contained files
    assert {k: v for k, v in m["quantization"].items() if k.startswith("genai-")} == {
        "genai-fp32/model.onnx": "onnx-genai-fp32", "genai-int4/model.onnx": "onnx-genai-int4"}
    for d in ("genai-fp32", "genai-int4"):
        files = sorted(p.name for p in (art / d).iterdir())
        assert files == ["chat_template.jinja", "genai_config.json", "model.onnx", "tokenizer.json",
                         "tokenizer_config.json"]
        for name in files:
            assert m["files"][f"{d}/{name}"]["sha256"] == sha256_file(art / d / name)
        config = json.loads((art / d / "genai_config.json").read_text())
        assert config["model"]["decoder"]["filename"] == "model.onnx" and config["search"]["do_sample"] is False
        assert sorted(np.atleast_1d(config["model"]["eos_token_id"]).tolist()) == stops
        onnx.checker.check_model(protos[d])
        assert not any(onnx.external_data_helper.uses_external_data(t) for t in protos[d].graph.initializer)
        assert "SimplifiedLayerNormalization" not in {n.op_type for n in protos[d].graph.node}
    # Assert: int4 keeps the adapter's projections (q, k, v, o: fused qkv and o_proj) at 8 bits
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in protos["genai-int4"].graph.node if n.op_type == "MatMulNBits"}
    assert {k: v for k, v in bits.items() if "/attn/" in k} == {
        f"/model/layers.{i}/attn/{p}/MatMul_Q8": 8 for i in range(2) for p in ("qkv_proj", "o_proj")}
    assert {v for k, v in bits.items() if "/attn/" not in k} == {4} and len(bits) == 11  # mlp x 3 x 2 + lm_head
    # Assert: the tied embedding is the LM head's 4-bit matrix (one copy), the fp32 graph's one fp32 matrix
    ops = {d: [n.op_type for n in p.graph.node] for d, p in protos.items()}
    assert ops["genai-int4"].count("GatherBlockQuantized") == 1 and "Gather" in ops["genai-fp32"]
    assert sum(320 in t.dims for t in protos["genai-fp32"].graph.initializer) == 1  # vocab 320: one matrix
    assert (art / "genai-int4/model.onnx").stat().st_size < 0.5 * (art / "genai-fp32/model.onnx").stat().st_size


def test_builder_layout_becomes_one_file_and_past_2_gib_is_refused(art, tmp_path):
    # Prepare: the builder's layout (weights in model.onnx.data) and a limit below the model's size
    src = tmp_path / "raw" / "model.onnx"
    src.parent.mkdir()
    proto = onnx.load(str(art / "genai-fp32/model.onnx"))
    want = [onnx.numpy_helper.to_array(t).tobytes() for t in proto.graph.initializer]
    onnx.save_model(proto, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    limit = onnx_genai.PROTOBUF_LIMIT
    # Execute / Assert: past the limit it is refused with the reason; under it, one file again
    try:
        onnx_genai.PROTOBUF_LIMIT = 1000
        with pytest.raises(onnx_genai.GenaiExportError, match="2 GiB"):
            onnx_genai.self_contained(src)
    finally:
        onnx_genai.PROTOBUF_LIMIT = limit
    onnx_genai.self_contained(src)
    assert sorted(p.name for p in src.parent.iterdir()) == ["model.onnx"]
    again = onnx.load(str(src))
    assert [onnx.numpy_helper.to_array(t).tobytes() for t in again.graph.initializer] == want


def test_config_and_builder_refuse_what_they_cannot_export(bert_base_dir, bert_adapter_dir, keys, tmp_path,
                                                            monkeypatch):
    from fedge.config import ConfigError, load

    # Execute / Assert: Llama causal LM accepted; int4 is not a classifier format; other architectures refused
    merged = ["export.mode=merged"]
    assert load("default", [*merged, "export.formats=[onnx-int4,onnx-int8]"]).export.formats == ("onnx-int4",
                                                                                                  "onnx-int8")
    with pytest.raises(ConfigError, match="export.formats onnx-int4 is for model.task causal-lm"):
        load("classify", [*merged, "export.formats=[onnx-int4]"])
    with pytest.raises(ConfigError, match=r"export.formats: .*\['LlamaForCausalLM'\].*this model is BertModel"):
        load("default", [*merged, "export.formats=[onnx-int4]", "model.source=minilm-l6"])
    with pytest.raises(ArtifactBuildError, match="onnx-int4: causal LMs"):
        build_artifact(bert_adapter_dir, tmp_path / "a", base_source=str(bert_base_dir), private_key=keys.private,
                       mode="merged", task="sequence-classification", formats=("onnx-int4",), version=1)
    # Execute / Assert: without the extra, the config names the field and the install command
    monkeypatch.setattr(onnx_genai, "missing_modules", lambda: ["onnxruntime_genai"])
    with pytest.raises(ConfigError, match=r"export.formats: \['onnx'\] .* pip install 'fedge\[onnx-genai\]'"):
        load("default", [*merged, "export.formats=[onnx]"])


# -- runtime -------------------------------------------------------------------------------------


def test_fp32_greedy_tokens_equal_transformers_generate(art, models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Prepare: the merged fp32 model of the same artifact, in transformers
    tok = AutoTokenizer.from_pretrained(art)
    hf = AutoModelForCausalLM.from_pretrained(art, dtype=torch.float32).eval()
    lm = models["fp32"].model
    for prompt in PROMPTS:
        ids = models["torch"]._chat_ids([{"role": "user", "content": prompt}])
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(lm.stop_ids),
                              pad_token_id=tok.pad_token_id)
        want = out[0, len(ids):].tolist()
        # Execute
        got, _ = lm.generate(ids, NEW_TOKENS)
        # Assert: the same prompt ids through the genai template + tokenizers, the same greedy tokens
        assert lm.chat_ids([{"role": "user", "content": prompt}]) == ids
        assert got == want and len(got) >= 1


def test_fp32_chat_and_completion_equal_the_torch_runtime(models):
    torch_model, fp32 = models["torch"], models["fp32"]
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        # Execute
        want, got = torch_model.chat(chat, max_new_tokens=NEW_TOKENS), fp32.chat(chat, max_new_tokens=NEW_TOKENS)
        want_c = stream.complete(torch_model, prompt, max_new_tokens=NEW_TOKENS)
        got_c = stream.complete(fp32, prompt, max_new_tokens=NEW_TOKENS)
        # Assert
        assert got == want
        assert got_c == want_c
        assert fp32.prompt_tokens(chat) == torch_model.prompt_tokens(chat)
        assert stream.prompt_tokens(fp32, prompt) == stream.prompt_tokens(torch_model, prompt)
    assert fp32.context_length == torch_model.context_length == 256


def test_int4_runs_with_valid_tokens_close_to_fp32(models):
    int4, fp32 = models["int4"], models["fp32"]
    vocab = len(json.loads((fp32.model.folder / "tokenizer.json").read_text())["model"]["vocab"])
    for prompt in PROMPTS:
        ids = fp32._chat_ids([{"role": "user", "content": prompt}])
        # Execute
        tokens, _ = int4.model.generate(ids, NEW_TOKENS)
        r = int4.chat([{"role": "user", "content": prompt}], max_new_tokens=NEW_TOKENS)
        ref, got = _first_logits(fp32.model, ids), _first_logits(int4.model, ids)
        # Assert
        assert (int4.backend, int4.compute, int4.files["model"]) == ("onnxruntime", "onnx-genai-int4",
                                                                     "genai-int4/model.onnx")
        assert 1 <= len(tokens) <= NEW_TOKENS and all(0 <= t < vocab for t in tokens)
        assert r.completion_tokens == len(tokens) and r.text == int4.model.decode(tokens).strip()
        assert 0 < np.abs(got - ref).max() <= INT4_TOL * np.abs(ref).max()
        assert np.corrcoef(got, ref)[0, 1] >= INT4_CORR


def test_streamed_pieces_concatenate_to_the_answer(models):
    for key in ("fp32", "int4"):
        chat = [{"role": "user", "content": PROMPTS[0]}]
        pieces: list[str] = []
        # Execute
        r = stream.chat(models[key], chat, max_new_tokens=12, on_text=pieces.append)
        c_pieces: list[str] = []
        c = stream.complete(models[key], PROMPTS[2], max_new_tokens=12, on_text=c_pieces.append)
        # Assert
        assert "".join(pieces) == r.text == models[key].chat(chat, max_new_tokens=12).text
        assert "".join(c_pieces) == c.text == stream.complete(models[key], PROMPTS[2], max_new_tokens=12).text


# -- the store -----------------------------------------------------------------------------------


def test_a_flipped_byte_is_refused_and_the_old_version_keeps_answering(art, keys, tmp_path):
    # Prepare: v1 installed and served; v2 = the same files, signed as version 2
    store = tmp_path / "store"
    install(art, store_dir=store, trusted_public_key=keys.public_pem)
    slot = ModelSlot(load_installed(store, backend="onnxruntime"))
    watcher = StoreWatcher(slot, store, interval=0, backend="onnxruntime")
    chat = [{"role": "user", "content": PROMPTS[0]}]
    before = slot.model.chat(chat, max_new_tokens=NEW_TOKENS)
    v2 = _resigned(art, tmp_path / "v2", keys.private, version=2)
    bad = tmp_path / "v2-bad"
    shutil.copytree(v2, bad)
    _flip_byte(bad / "genai-int4/model.onnx")
    # Execute: a tampered download
    with pytest.raises(ArtifactRefused) as info:
        install(bad, store_dir=store, trusted_public_key=keys.public_pem)
    # Assert
    assert info.value.reason == "hash" and "genai-int4/model.onnx" in str(info.value) and current(store) == 1
    # Execute: a good v2, then its installed genai file changed on disk before the server loads it
    install(v2, store_dir=store, trusted_public_key=keys.public_pem)
    _flip_byte(store / "versions" / "2" / "genai-int4" / "model.onnx")
    swap = watcher.poll()
    fallback = load_installed(store, backend="onnxruntime")
    # Assert: the swap is refused, v1 keeps answering the same; a fresh load falls back to v1 and says why
    assert swap.how == "refused" and "genai-int4/model.onnx" in swap.reason
    assert slot.model.version == 1 and slot.model.chat(chat, max_new_tokens=NEW_TOKENS) == before
    assert fallback.version == 1 and fallback.fallback_from["version"] == 2
    assert fallback.fallback_from["reason"] == "hash"


@pytest.mark.parametrize("with_side_file", [True, False])
def test_an_onnx_with_external_data_is_refused(art, keys, tmp_path, with_side_file):
    # Prepare: the builder's own layout (weights in model.onnx.data), listed and signed by the trusted key
    dst = tmp_path / "ext"
    shutil.copytree(art, dst)
    folder = dst / "genai-int4"
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    if not with_side_file:
        (folder / "model.onnx.data").unlink()
    m = read_manifest(dst)
    m["files"] = {rel: {"sha256": sha256_file(dst / rel), "size": (dst / rel).stat().st_size}
                  for rel in sorted({*m["files"], *(["genai-int4/model.onnx.data"] if with_side_file else [])})}
    m["version"] = 2
    write_manifest(dst, m)
    sign_manifest(dst, keys.private)
    # Execute
    with pytest.raises(ArtifactRefused) as info:
        install(dst, store_dir=tmp_path / "store", trusted_public_key=keys.public_pem)
    # Assert: the side file is not an installable type; without it, the graph's reference is refused
    if with_side_file:
        assert info.value.reason == "file-type" and "model.onnx.data" in str(info.value)
    else:
        assert info.value.reason == "format" and "external data" in str(info.value)
    assert current(tmp_path / "store") is None


# -- a device without torch ---------------------------------------------------------------------


def _no_torch_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("FEDGE_SERVE_TOKEN", None)
    env.pop("PYTHONSTARTUP", None)
    return env


def test_install_and_infer_without_torch(art, keys, models, tmp_path):
    # Prepare
    want = models["int4"].generate(PROMPTS[1], max_new_tokens=NEW_TOKENS)
    cli = [sys.executable, "-c", NO_TORCH]
    # Execute: fedge install (signature, hashes, the .onnx checks) and fedge infer, importing neither library
    inst = subprocess.run([*cli, "install", str(art), "--store", str(tmp_path / "s"), "--trusted-key",
                           str(keys.public_pem)], capture_output=True, text=True, timeout=120, env=_no_torch_env(),
                          cwd=REPO)
    out = subprocess.run([*cli, "infer", "--store", str(tmp_path / "s"), "--prompt", PROMPTS[1],
                          "--max-new-tokens", str(NEW_TOKENS)], capture_output=True, text=True, timeout=120,
                         env=_no_torch_env(), cwd=REPO)
    # Assert: auto picks onnxruntime-genai (torch absent), the same answer as the model in the test
    assert inst.returncode == 0 and "installed version 1" in inst.stdout, inst.stderr[-2000:]
    assert "fedge-test: loaded []" in inst.stderr
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.rstrip("\n") == want and "fedge-test: loaded []" in out.stderr


# -- fedge serve without torch -------------------------------------------------------------------


@pytest.mark.slow
def test_serve_answers_the_openai_client_streamed_and_not_without_torch(store, models):
    openai = pytest.importorskip("openai")
    oracle = models["int4"]
    chat = [{"role": "user", "content": PROMPTS[0]}]
    proc = subprocess.Popen([sys.executable, "-c", NO_TORCH, "serve", "--store", str(store), "--port", "0",
                             "--backend", "auto"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_no_torch_env(), cwd=REPO)
    try:
        line = proc.stdout.readline()  # printed once the port is bound and the model loaded
        match = READY.search(line)
        assert match, f"fedge serve did not start: {line!r} {proc.stderr.read()[-2000:] if proc.poll() else ''}"
        client = openai.OpenAI(base_url=match.group(4) + "/v1", api_key="unused", max_retries=0, timeout=60)
        # Execute
        full = client.chat.completions.create(model=oracle.name, messages=chat, max_tokens=12)
        chunks = list(client.chat.completions.create(model=oracle.name, messages=chat, max_tokens=12, stream=True))
        text = client.completions.create(model=oracle.name, prompt=PROMPTS[2], max_tokens=10)
        text_chunks = list(client.completions.create(model=oracle.name, prompt=PROMPTS[2], max_tokens=10,
                                                     stream=True))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: uvicorn shuts down, then NO_TORCH's report
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    # Assert: the onnxruntime backend chosen without torch; streamed == not streamed == the model in the test
    want = oracle.chat(chat, max_new_tokens=12)
    want_c = stream.complete(oracle, PROMPTS[2], max_new_tokens=10)
    assert match.group(3) == "onnxruntime" and match.group(2) == "1"
    assert full.choices[0].message.content == want.text and full.choices[0].finish_reason == want.finish_reason
    assert full.usage.completion_tokens == want.completion_tokens and full.usage.prompt_tokens == want.prompt_tokens
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == want.text and sum(1 for p in pieces if p) >= 2
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert text.choices[0].text == want_c.text == "".join(c.choices[0].text for c in text_chunks)
    assert "fedge-test: loaded []" in err  # neither torch nor transformers was imported
