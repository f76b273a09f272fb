"""Export benchmark on the default model (SmolLM2-135M-Instruct): size, speed, quality per format.

Not run by the tests (minutes). Usage::

    nice .venv/bin/python benchmarks/export_bench.py [--adapter runs/<id>/adapter] [--out benchmarks/results/export.md]

What it does, in one run (so every ratio compares numbers measured side by side):
  1. adapter: the given PEFT adapter, or a quick one (LoRA r=8 on q,v; ``--steps`` AdamW steps on
     the packaged chatterbot English QA pairs, held-out pairs excluded);
  2. one signed "merged" artifact with every format (fp32 safetensors, int8-rowwise safetensors,
     GGUF F32/F16/Q8_0/Q4_1/Q4_0 written in numpy, and, when ``llama_cpp`` imports, Q4_K_M/Q5_K_M/Q6_K
     made by llama.cpp's quantizer) and one "adapter" artifact, through ``build_artifact``;
  3. llama.cpp (what a device runs; needs llama-cpp-python), per GGUF file: size and bits per weight;
     held-out perplexity of the same token ids for every file; CPU latency of a fixed chat prompt +
     a fixed number of greedy new tokens (prefill, decode, total; median of ``--repeats`` runs,
     formats interleaved run by run, ``--threads`` threads); ratios against the F32 GGUF
     (the merged fp32 model, bit-exact) and the goals of issue #5;
  4. download size: adapter mode vs merged mode per format;
  5. torch backend (``--torch`` / ``--no-torch``), loaded the way the device runtime loads each file:
     perplexity against the fp32 merged model, max |Δlogit|, load time, forward latency and tokens/s
     (it dequantizes to fp32 at load, so its speed does not change with the format);
  6. when the ``onnx-genai`` extra imports: the causal-LM ONNX formats (``onnx``, ``onnx-int8``,
     ``onnx-int4``: onnxruntime-genai's model builder, ``fedge.export.onnx_genai``) on onnxruntime-genai,
     the device runtime for them, beside llama.cpp F32 / Q8_0 in the same latency loop: size, the same
     perplexities (logits of the same graph through onnxruntime, the whole sequence at once), latency and
     tokens/s of the same prompt, and an ``onnx-int4 plain`` row (every projection 4-bit: what the
     exporter's keep-the-adapter-int8 rule avoids). ``--onnx-genai-only`` runs just this part (and the
     adapter, and the F32 / Q8_0 references) and writes ``benchmarks/results/export_onnx_genai.md``.

Perplexity, both over ``--eval-n`` held-out chatterbot pairs: *answer ppl* = exp(mean over pairs of the
mean answer-token loss, chat template) — the project's eval metric (``fedge.train.evaluate``);
*text ppl* = exp(total loss / tokens) of "prompt response" as plain text.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedge.data.corpora import chatterbot_pairs  # noqa: E402
from fedge.data.tokenize import IGNORE, chat_prompt_ids, encode_chat  # noqa: E402
from fedge.export import llamacpp, onnx_genai  # noqa: E402
from fedge.export.artifact import build_artifact  # noqa: E402
from fedge.export.gguf import MODEL_TYPES, load_gguf_causal_lm  # noqa: E402
from fedge.export.merge import load_int8_model  # noqa: E402
from fedge.export.signing import generate_keypair  # noqa: E402
from fedge.models import add_lora, load_base  # noqa: E402
from fedge.train import evaluate, train_local  # noqa: E402

MODEL = "smollm2-135m-instruct"
DEFAULT_OUT = Path(__file__).parent / "results" / "export.md"
PROMPT = "My computer won't turn on. What should I check first, and when should I take it to a repair shop?"
# Issue #5 goals: latency quantized / fp32 <= 0.6; perplexity change vs fp32: Q8 <= 1 %, 4-bit <= 5 %.
LATENCY_GOAL = 0.6
PPL_GOAL = {"Q8_0": 1.0, "Q4_1": 5.0, "Q4_0": 5.0, "Q4_K_M": 5.0}


def split_pairs(n_eval: int, seed: int = 0):
    pairs = chatterbot_pairs(("english",))
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = [pairs[i] for i in order[:n_eval]]
    train = [pairs[i] for i in order[n_eval:]]
    return train, held


def quick_adapter(out: Path, train_pairs, *, steps: int, max_length: int) -> Path:
    base = load_base(MODEL)
    model = add_lora(base.model, task="causal-lm", r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    examples = [encode_chat(base.tokenizer, p["prompt"], p["response"], max_length) for p in train_pairs]
    t0 = time.perf_counter()
    stats = train_local(model, examples, task="causal-lm", pad_id=base.tokenizer.pad_token_id, steps=steps,
                        batch_size=4, lr=2e-3)
    print(f"quick adapter: {steps} steps, loss {stats['loss']:.3f}, {time.perf_counter() - t0:.0f}s", flush=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bits_per_weight(path: Path) -> float:
    """8 · bytes / values over the 2-D (quantized) tensors of a GGUF file."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) > 1]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def tensor_types(path: Path) -> str:
    """'Q5_0 180, Q4_K 16, ...': how many 2-D tensors of each GGML type the file holds."""
    from collections import Counter

    import gguf

    c = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) > 1)
    return ", ".join(f"{k} {v}" for k, v in c.most_common())


# -- llama.cpp --------------------------------------------------------------------------------


def open_llama(path: Path, *, threads: int, logits_all: bool, n_ctx: int = 256):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False, seed=0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ppl_of(logits_fn, held_examples, text_ids) -> dict:
    """Answer ppl (per-example mean answer loss, as ``fedge.train.evaluate``) and plain-text ppl, from
    ``logits_fn(ids)``: the next-token logits at every position, (len(ids), vocab)."""
    losses = []
    for ex in held_examples:
        ids, labels = ex["input_ids"], ex["labels"]
        logp = _log_softmax(np.asarray(logits_fn(ids))[: len(ids) - 1])
        pos = [t for t in range(1, len(ids)) if labels[t] != IGNORE]
        losses.append(-np.mean([logp[t - 1, ids[t]] for t in pos]))
    total, count = 0.0, 0
    for ids in text_ids:
        logp = _log_softmax(np.asarray(logits_fn(ids))[: len(ids) - 1])
        total -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return {"ppl": math.exp(float(np.mean(losses))), "text_ppl": math.exp(total / count)}


def llama_ppl(llm, held_examples, text_ids) -> dict:
    def logits(ids):
        llm.reset()
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)])

    return ppl_of(logits, held_examples, text_ids)


def llama_generate(llm, prompt_ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """Greedy: prefill the prompt, then decode until ``new_tokens`` tokens exist (EOS ignored).

    Token 1 comes from the prefill logits; tokens 2..N take one decode forward each.
    Returns (prefill seconds, decode seconds, the new tokens).
    """
    import llama_cpp

    n_vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    out = [next_token()]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([out[-1]])
        out.append(next_token())
    return t1 - t0, time.perf_counter() - t1, out


def llama_cpp_rows(files: dict[str, Path], held, text_ids, prompt_ids, args) -> list[dict]:
    """One row per GGUF file (``files``: label -> path; the first is the F32 reference)."""
    rows = []
    for t, path in files.items():
        t0 = time.perf_counter()
        llm = open_llama(path, threads=args.ppl_threads, logits_all=True)
        row = {"type": t, "path": path, "bytes": path.stat().st_size, "bpw": bits_per_weight(path),
               "tensors": tensor_types(path), **llama_ppl(llm, held, text_ids)}
        del llm
        rows.append(row)
        print(f"llama.cpp {t:12s} {row['bytes'] / 2**20:6.1f} MiB {row['bpw']:.2f} bpw  answer ppl {row['ppl']:.3f}  "
              f"text ppl {row['text_ppl']:.2f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    # Latency: every model open at once; one warm-up each, then formats interleaved run by run so
    # that load from elsewhere on the machine falls on all of them alike.
    llms = {r["type"]: open_llama(r["path"], threads=args.threads, logits_all=False) for r in rows}
    runs: dict[str, list[tuple[float, float]]] = {t: [] for t in llms}
    tokens: dict[str, list[int]] = {}
    for t in llms:
        tokens[t] = llama_generate(llms[t], prompt_ids, args.new_tokens)[2]
    for _ in range(args.repeats):
        for t in llms:
            prefill, decode, out = llama_generate(llms[t], prompt_ids, args.new_tokens)
            assert out == tokens[t], "greedy decoding is not deterministic"
            runs[t].append((prefill, decode))
    llms.clear()
    first = next(iter(files))
    for r in rows:
        pre = statistics.median(p for p, _ in runs[r["type"]])
        dec = statistics.median(d for _, d in runs[r["type"]])
        tot = statistics.median(p + d for p, d in runs[r["type"]])
        r.update(prefill_s=pre, decode_s=dec, total_s=tot, decode_tok_s=(args.new_tokens - 1) / dec,
                 same_tokens=_common_prefix(tokens[r["type"]], tokens[first]))
        print(f"llama.cpp {r['type']:12s} prefill {pre * 1000:.0f} ms  decode {dec * 1000:.0f} ms  "
              f"total {tot * 1000:.0f} ms  {r['decode_tok_s']:.1f} tok/s", flush=True)
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plain_files(merged_dir: Path, out: Path, tok) -> dict[str, Path]:
    """The 4-bit files as written before adapted tensors were kept at Q8_0 (every tensor 4-bit / recipe)."""
    from transformers import AutoModelForCausalLM

    from fedge.export.artifact import packaged_reference_gguf
    from fedge.export.gguf import write_model_gguf

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    files = {}
    for t in ("Q4_1", "Q4_0"):
        files[f"{t} plain"] = write_model_gguf(merged, out / f"model.{t}.gguf", file_type=t,
                                               reference_gguf=packaged_reference_gguf(), tokenizer=tok)
    files["Q4_K_M plain"] = llamacpp.quantize_gguf(merged_dir / "model.F32.gguf", out / "model.Q4_K_M.gguf", "Q4_K_M")
    return files


# -- torch ------------------------------------------------------------------------------------


@torch.no_grad()
def text_ppl(model, text_ids: list[list[int]]) -> float:
    """Plain-text perplexity: exp(total next-token loss / total predicted tokens), no chat template."""
    total, count = 0.0, 0
    for ids in text_ids:
        ids = torch.tensor([ids])
        total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def torch_metrics(model, tok, held_examples, text_ids, probe_ids, *, decode_tokens: int, repeats: int) -> dict:
    model.eval()
    ev = evaluate(model, held_examples, task="causal-lm", pad_id=tok.pad_token_id, batch_size=8)
    tppl = text_ppl(model, text_ids)
    logits = model(input_ids=probe_ids).logits.float().numpy()
    fwd = median_time(lambda: model(input_ids=probe_ids), repeats)
    prompt = probe_ids[:, :16]

    def decode():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=decode_tokens,
                       min_new_tokens=decode_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    dec = median_time(decode, max(1, repeats // 2))
    return {"ppl": math.exp(ev["loss"]), "text_ppl": tppl, "logits": logits, "forward_s": fwd,
            "tok_s": decode_tokens / dec}


def torch_rows(merged_dir: Path, gguf_types, tok, held, text_ids, probe_ids, args) -> list[dict]:
    from transformers import AutoModelForCausalLM

    loaders = {
        "fp32 safetensors": ("model.safetensors",
                             lambda: AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)),
        "int8-rowwise safetensors": ("model.int8.safetensors", lambda: load_int8_model(merged_dir, task="causal-lm")),
        **{f"GGUF {t}": (f"model.{t}.gguf", (lambda t=t: load_gguf_causal_lm(merged_dir / f"model.{t}.gguf")))
           for t in gguf_types},
    }
    rows, ref = [], None
    for name, (fname, load) in loaders.items():
        t0 = time.perf_counter()
        model = load()
        t_load = time.perf_counter() - t0
        m = torch_metrics(model, tok, held, text_ids, probe_ids, decode_tokens=args.decode_tokens,
                          repeats=args.repeats)
        ref = ref or m
        row = {"name": name, "file": fname, "bytes": (merged_dir / fname).stat().st_size, "load_s": t_load, **m,
               "dlogit": float(np.abs(m["logits"] - ref["logits"]).max())}
        rows.append(row)
        print(f"torch {name:26s} {row['bytes'] / 2**20:7.1f} MiB  ppl {row['ppl']:.3f}  text ppl "
              f"{row['text_ppl']:.2f}  dlogit {row['dlogit']:.3f}  fwd {row['forward_s'] * 1000:.0f} ms  "
              f"{row['tok_s']:.1f} tok/s  load {t_load:.1f}s", flush=True)
        del model
    return rows


# -- onnxruntime-genai (causal-LM ONNX) ---------------------------------------------------------


def genai_available() -> bool:
    return not onnx_genai.missing_modules()


def ort_scorer(folder: Path, threads: int):
    """Next-token logits of every position of ``ids`` through onnxruntime on the folder's graph (the same
    graph onnxruntime-genai runs; empty past, the whole sequence in one call): ids -> (len, vocab)."""
    import json

    import onnxruntime as ort

    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(folder / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])
    past = {f"past_key_values.{i}.{k}": np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), np.float32)
            for i in range(dec["num_hidden_layers"]) for k in ("key", "value")}

    def logits(ids):
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64), **past}
        return sess.run(["logits"], feed)[0][0]

    return logits


def open_genai(folder: Path, threads: int):
    """onnxruntime-genai on ``threads`` threads, end-of-turn ignored as in :func:`llama_generate`: its
    ``eos_token_id`` is moved to the last vocabulary id at load (the signed file is not changed)."""
    import json

    import onnxruntime_genai as og

    vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"eos_token_id": vocab - 1, "decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def genai_generate(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """As :func:`llama_generate` with onnxruntime-genai (``model`` from :func:`open_genai`): prefill =
    ``append_tokens`` (the prompt forward) and token 1; decode = tokens 2..N, one forward each."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray(prompt_ids, np.int32))
    gen.generate_next_token()
    out = [int(gen.get_next_tokens()[0])]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return t1 - t0, time.perf_counter() - t1, out


def matmul_bits(path: Path) -> str:
    """'4-bit 91, 8-bit 60': MatMulNBits nodes per bit width (fp32 MatMul: 'fp32 211')."""
    from collections import Counter

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    c = Counter(f"{next(a.i for a in n.attribute if a.name == 'bits')}-bit" if n.op_type == "MatMulNBits" else "fp32"
                for n in graph.node if n.op_type in ("MatMulNBits", "MatMul"))
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


def plain_int4(merged_dir: Path, out: Path, tok) -> Path:
    """The int4 folder without the adapter-int8 rule (every projection 4-bit), for comparison only."""
    import shutil

    from fedge.data.tokenize import stop_token_ids

    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    names = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja")
    for name in names:
        if (merged_dir / name).exists():
            shutil.copyfile(merged_dir / name, hf / name)
    folder = out / "genai-int4-plain"
    onnx_genai.build(hf, folder, "int4", cache_dir=out / "cache")
    onnx_genai.finish_folder(folder, stop_ids=stop_token_ids(tok),
                             tokenizer_files=[hf / n for n in names[3:] if (hf / n).exists()])
    return folder


def genai_rows(ggufs: dict[str, Path], folders: dict[str, Path], held, text_ids, prompt_ids, args) -> list[dict]:
    """Rows for the GGUF references (llama.cpp) and the genai folders (onnxruntime-genai); the first GGUF
    (F32) is the reference. Latency: every runner open at once, interleaved run by run."""
    rows = []
    for label, path in ggufs.items():
        t0 = time.perf_counter()
        llm = open_llama(path, threads=args.ppl_threads, logits_all=True)
        rows.append({"label": label, "runtime": "llama.cpp", "file": path.name, "bytes": path.stat().st_size,
                     "folder_bytes": path.stat().st_size, "weights": tensor_types(path),
                     **llama_ppl(llm, held, text_ids)})
        del llm
        print(f"{label:16s} llama.cpp answer ppl {rows[-1]['ppl']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    for label, folder in folders.items():
        t0 = time.perf_counter()
        rows.append({"label": label, "runtime": "onnxruntime-genai", "file": f"{folder.name}/model.onnx",
                     "bytes": (folder / "model.onnx").stat().st_size,
                     "folder_bytes": sum(p.stat().st_size for p in folder.iterdir()),
                     "weights": matmul_bits(folder / "model.onnx"),
                     **ppl_of(ort_scorer(folder, args.ppl_threads), held, text_ids)})
        print(f"{label:16s} onnxruntime answer ppl {rows[-1]['ppl']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    runners = {}
    for r in rows:
        if r["runtime"] == "llama.cpp":
            llm = open_llama(ggufs[r["label"]], threads=args.threads, logits_all=False)
            runners[r["label"]] = (lambda ids, n, llm=llm: llama_generate(llm, ids, n))
        else:
            model = open_genai(folders[r["label"]], args.threads)
            runners[r["label"]] = (lambda ids, n, model=model: genai_generate(model, ids, n))
    tokens = {k: run(prompt_ids, args.new_tokens)[2] for k, run in runners.items()}  # warm-up
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, run in runners.items():
            pre, dec, out = run(prompt_ids, args.new_tokens)
            assert out == tokens[k], "greedy decoding is not deterministic"
            times[k].append((pre, dec))
    first = rows[0]["label"]
    for r in rows:
        t = times[r["label"]]
        r.update(prefill_s=statistics.median(p for p, _ in t), decode_s=statistics.median(d for _, d in t),
                 total_s=statistics.median(p + d for p, d in t),
                 same_tokens=_common_prefix(tokens[r["label"]], tokens[first]))
        r["decode_tok_s"] = (args.new_tokens - 1) / r["decode_s"]
        print(f"{r['label']:16s} prefill {r['prefill_s'] * 1000:.0f} ms  decode {r['decode_s'] * 1000:.0f} ms  "
              f"total {r['total_s'] * 1000:.0f} ms  {r['decode_tok_s']:.1f} tok/s", flush=True)
    return rows


def genai_lines(rows, args, prompt_len: int, build_s: float | None) -> list[str]:
    from importlib.metadata import version

    ref = rows[0]
    lines = [
        "## Causal-LM ONNX (onnxruntime-genai) beside llama.cpp",
        "",
        f"onnxruntime-genai {version('onnxruntime-genai')}, onnxruntime {version('onnxruntime')}. Same held-out "
        f"token ids and formulas as above; the ONNX perplexities come from the same graph run by onnxruntime on the "
        f"whole sequence (logits equal onnxruntime-genai's token-by-token ones within 1e-6 in a check). Latency: the "
        f"chat prompt above ({prompt_len} tokens) then {args.new_tokens} greedy new tokens (end-of-turn ignored), "
        f"median of {args.repeats} runs after one warm-up, {args.threads} thread(s), every runner interleaved run by "
        f"run in one process (llama.cpp F32 / Q8_0 included, so ratios are side by side). Size = the model file "
        f"(the folder adds `genai_config.json` and the tokenizer, ~3.5 MiB).",
        "",
        "| format | runtime | file | size MiB | size / F32 | weights (2-D) | answer ppl | Δ vs F32 | text ppl | Δ vs F32 "
        "| prefill ms | decode ms | total ms | total / F32 | decode tok/s | same tokens |",
        "|---|---|---|" + "---:|" * 2 + "---|" + "---:|" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['runtime']} | `{r['file']}` | {r['bytes'] / 2**20:.1f} | {r['bytes'] / ref['bytes']:.3f} | "
            f"{r['weights']} | {r['ppl']:.3f} | {pct(r['ppl'], ref['ppl'])} | {r['text_ppl']:.2f} | "
            f"{pct(r['text_ppl'], ref['text_ppl'])} | {r['prefill_s'] * 1000:.0f} | {r['decode_s'] * 1000:.0f} | "
            f"{r['total_s'] * 1000:.0f} | {r['total_s'] / ref['total_s']:.2f} | {r['decode_tok_s']:.1f} | "
            f"{r['same_tokens']}/{args.new_tokens} |")
    lines += [
        "",
        "Notes:",
        "- `onnx-int4` keeps the projections the adapter changed at int8 (q, v here: the builder fuses q, k, v into "
        "one MatMul, so that node is 8-bit in every layer); `onnx-int4 plain` (not shipped) quantizes every projection "
        "to 4 bits, to show what that rule is for. Both keep SmolLM2's tied embedding and LM head as one 4-bit "
        "matrix; `onnx-int8` keeps the embedding fp32 (the builder's quantized lookup is 4-bit only) and its LM head "
        "8-bit. Weights are round-to-nearest in blocks of 32 (symmetric); onnxruntime's CPU kernel multiplies with "
        "int8 activations (accuracy level 4).",
        "- The base is the packaged SmolLM2 Q4_1 GGUF expanded to fp32, so every 4-bit format rounds most weights a "
        "second time onto another grid (as GGUF Q4_0 does); llama.cpp Q4_1 alone gives them back exactly.",
    ]
    if build_s is not None:
        lines.append(f"- Build: the merged artifact with these formats took {build_s:.0f} s (the builder runs once per "
                     "ONNX format in a child process, then each graph is re-saved as one file and checked as a device "
                     "checks it).")
    return lines + [""]


def onnx_genai_main(args) -> None:
    """``--onnx-genai-only``: the adapter, one merged artifact (fp32, F32, Q8_0, onnx, onnx-int8, onnx-int4),
    the plain int4 folder, and the rows of :func:`genai_rows`."""
    from transformers import AutoTokenizer

    if not genai_available():
        raise SystemExit(onnx_genai.missing_message(onnx_genai.FORMATS, field="--onnx-genai-only"))
    if not llamacpp.available():
        raise SystemExit("--onnx-genai-only compares against llama.cpp F32 / Q8_0: pip install 'fedge[llamacpp]'")
    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedge-export-genai-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    train_pairs, held_pairs = split_pairs(args.eval_n)
    adapter = args.adapter or quick_adapter(work / "adapter", train_pairs, steps=args.steps,
                                            max_length=args.max_length)
    keys = generate_keypair(work / "keys", overwrite=True)
    t0 = time.perf_counter()
    merged_dir = build_artifact(adapter, work / "merged", base_source=MODEL, private_key=keys.private, mode="merged",
                                formats=("fp32", "F32", "Q8_0", *onnx_genai.FORMATS), version=1)
    build_s = time.perf_counter() - t0
    print(f"artifact built: {build_s:.0f}s", flush=True)
    tok = AutoTokenizer.from_pretrained(merged_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    folders = {"onnx (fp32)": merged_dir / "genai-fp32", "onnx-int8": merged_dir / "genai-int8",
               "onnx-int4": merged_dir / "genai-int4", "onnx-int4 plain": plain_int4(merged_dir, work / "plain", tok)}
    held = [encode_chat(tok, p["prompt"], p["response"], args.max_length) for p in held_pairs]
    text_ids = [tok(p["prompt"] + " " + p["response"])["input_ids"] for p in held_pairs]
    prompt_ids = chat_prompt_ids(tok, PROMPT)
    ggufs = {"F32": merged_dir / "model.F32.gguf", "Q8_0": merged_dir / "model.Q8_0.gguf"}
    rows = genai_rows(ggufs, folders, held, text_ids, prompt_ids, args)
    quick = f"quick LoRA r=8 on q,v, {args.steps} steps on chatterbot English"
    lines = [
        "# Export benchmark: SmolLM2-135M-Instruct as causal-LM ONNX (onnxruntime-genai) vs GGUF (llama.cpp)",
        "",
        f"Generated by `benchmarks/export_bench.py --onnx-genai-only` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({platform.machine()}, {os.cpu_count()} cores shared with other work: timings are indicative, ratios come "
        f"from runs interleaved in one process). Adapter: {'given: ' + str(args.adapter) if args.adapter else quick}. "
        f"Held-out set: {args.eval_n} chatterbot pairs (max {args.max_length} tokens). *Answer ppl* = exp(mean "
        f"per-example answer-token loss, chat template; the project's eval metric); *text ppl* = plain-text "
        f"perplexity of \"prompt response\". Whole run {(time.perf_counter() - t_all) / 60:.1f} min.",
        "",
        *genai_lines(rows, args, len(prompt_ids), build_s),
    ]
    out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("export_onnx_genai.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", type=Path, help="PEFT adapter dir (default: train a quick one)")
    ap.add_argument("--steps", type=int, default=8, help="steps for the quick adapter")
    ap.add_argument("--eval-n", type=int, default=48, help="held-out QA pairs for perplexity")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=32, help="llama.cpp: greedy new tokens per latency run")
    ap.add_argument("--decode-tokens", type=int, default=32, help="torch: greedy new tokens for tokens/s")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="threads for every timed run (torch and llama.cpp)")
    ap.add_argument("--ppl-threads", type=int, default=os.cpu_count() or 1,
                    help="llama.cpp threads for the (untimed) perplexity passes")
    ap.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the torch backend on every file")
    ap.add_argument("--workdir", type=Path, help="where artifacts are written (default: a temp dir)")
    ap.add_argument("--onnx-genai-only", action="store_true",
                    help="only the causal-LM ONNX rows (and llama.cpp F32 / Q8_0 beside them): "
                         "writes benchmarks/results/export_onnx_genai.md unless --out is given")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if args.onnx_genai_only:
        onnx_genai_main(args)
        return
    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedge-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    has_llama = llamacpp.available()
    gguf_types = MODEL_TYPES + (llamacpp.QUANT_TYPES if has_llama else ())
    if not has_llama:
        print("llama_cpp does not import: no K-quants and no llama.cpp measurements "
              "(pip install 'fedge[llamacpp]')", flush=True)

    train_pairs, held_pairs = split_pairs(args.eval_n)
    adapter = args.adapter or quick_adapter(work / "adapter", train_pairs, steps=args.steps,
                                            max_length=args.max_length)
    keys = generate_keypair(work / "keys", overwrite=True)

    has_genai = genai_available()
    if not has_genai:
        print("onnxruntime-genai does not import: no causal-LM ONNX rows (pip install 'fedge[onnx-genai]')", flush=True)
    t0 = time.perf_counter()
    merged_dir = build_artifact(adapter, work / "merged", base_source=MODEL, private_key=keys.private, mode="merged",
                                formats=("fp32", "int8") + gguf_types + (onnx_genai.FORMATS if has_genai else ()),
                                version=1)
    t_merged = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapter_dir = build_artifact(adapter, work / "adapter-art", base_source=MODEL, private_key=keys.private,
                                 version=2)
    t_adapter = time.perf_counter() - t0
    print(f"artifacts built: merged {t_merged:.0f}s, adapter {t_adapter:.0f}s", flush=True)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    held = [encode_chat(tok, p["prompt"], p["response"], args.max_length) for p in held_pairs]
    text_ids = [tok(p["prompt"] + " " + p["response"])["input_ids"] for p in held_pairs]
    prompt_ids = chat_prompt_ids(tok, PROMPT)

    lrows = []
    if has_llama:
        files = {t: merged_dir / f"model.{t}.gguf" for t in ("F32",) + tuple(t for t in gguf_types if t != "F32")}
        files.update(plain_files(merged_dir, work / "plain", tok))
        lrows = llama_cpp_rows(files, held, text_ids, prompt_ids, args)
    grows = []
    if has_genai and has_llama:
        folders = {"onnx (fp32)": merged_dir / "genai-fp32", "onnx-int8": merged_dir / "genai-int8",
                   "onnx-int4": merged_dir / "genai-int4",
                   "onnx-int4 plain": plain_int4(merged_dir, work / "plain-genai", tok)}
        grows = genai_rows({"F32": merged_dir / "model.F32.gguf", "Q8_0": merged_dir / "model.Q8_0.gguf"}, folders,
                           held, text_ids, prompt_ids, args)
    trows = []
    if args.torch:
        probe = encode_chat(tok, held_pairs[0]["prompt"] + " " + held_pairs[1]["prompt"], held_pairs[0]["response"],
                            64)
        probe_ids = torch.tensor([(probe["input_ids"] * 4)[:64]])
        trows = torch_rows(merged_dir, gguf_types, tok, held, text_ids, probe_ids, args)

    sizes = {p.name: p.stat().st_size for p in merged_dir.iterdir() if p.is_file()}
    adapter_bytes = {p.name: p.stat().st_size for p in adapter_dir.iterdir() if p.is_file()}
    write_report(args, lrows, trows, sizes, adapter_bytes, len(prompt_ids), t_merged, t_adapter,
                 time.perf_counter() - t_all, grows)


# -- report -----------------------------------------------------------------------------------


def human(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.2f} %"


def goal_lines(lrows) -> list[str]:
    if not lrows:
        return ["llama_cpp was not importable: the latency and K-quant goals could not be measured."]
    ref = lrows[0]
    lines = ["| format | total latency / F32 (goal ≤ 0.6) | met | answer ppl Δ | text ppl Δ | ppl goal | met |",
             "|---|---:|---|---:|---:|---:|---|"]
    for r in lrows[1:]:
        lat = r["total_s"] / ref["total_s"]
        goal = PPL_GOAL.get(r["type"].split()[0])
        d_ans, d_txt = 100 * (r["ppl"] / ref["ppl"] - 1), 100 * (r["text_ppl"] / ref["text_ppl"] - 1)
        ok = "—" if goal is None else ("yes" if max(d_ans, d_txt) <= goal else "**no**")
        lines.append(f"| {r['type']} | {lat:.2f} | {'yes' if lat <= LATENCY_GOAL else '**no**'} | {d_ans:+.2f} % | "
                     f"{d_txt:+.2f} % | {'—' if goal is None else f'≤ {goal:g} %'} | {ok} |")
    return lines


def write_report(args, lrows, trows, sizes, adapter_bytes, prompt_len, t_merged, t_adapter, t_all,
                 grows=()) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        llama_version = version("llama_cpp_python")
    except PackageNotFoundError:
        llama_version = "not installed"
    quick = f"quick LoRA r=8 on q,v, {args.steps} steps on chatterbot English"
    lines = [
        "# Export benchmark: SmolLM2-135M-Instruct (merged LoRA), per format",
        "",
        f"Generated by `benchmarks/export_bench.py` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({platform.machine()}, {os.cpu_count()} cores shared with other work: timings are indicative, ratios "
        f"come from runs interleaved in one process; torch {torch.__version__}, llama-cpp-python {llama_version}).",
        f"Adapter: {'given: ' + str(args.adapter) if args.adapter else quick}. Held-out set: {args.eval_n} "
        f"chatterbot pairs (max {args.max_length} tokens), the same token ids for every format. "
        f"*Answer ppl* = exp(mean per-example answer-token loss, chat template; the project's eval metric); "
        f"*text ppl* = plain-text perplexity of \"prompt response\" (all tokens).",
        "",
    ]
    if lrows:
        ref = lrows[0]
        lines += [
            "## Goals (issue #5), llama.cpp, quantized vs the merged fp32 model (F32 GGUF)",
            "",
            *goal_lines(lrows),
            "",
            "A format meets the perplexity goal when both answer and text perplexity are within it. "
            "Q5_K_M and Q6_K have no goal of their own (neither 8- nor 4-bit). *plain* rows: the same type "
            "without keeping the adapter-changed tensors (q, v) at Q8_0, i.e. what the exporter wrote before; "
            "they are not shipped, they show why the rule exists.",
            "",
            "## llama.cpp (the device runtime for GGUF)",
            "",
            f"Latency: the chat prompt `{PROMPT}` ({prompt_len} tokens) then {args.new_tokens} greedy new tokens "
            f"(end-of-turn ignored): prefill = the prompt forward (gives token 1), decode = the "
            f"{args.new_tokens - 1} one-token forwards for tokens 2..{args.new_tokens}; median of {args.repeats} "
            f"runs after one warm-up, {args.threads} thread(s), formats interleaved run by run. "
            f"Same tokens = leading greedy tokens identical to F32's.",
            "",
            "| format | size MiB | size / F32 | bits / weight | answer ppl | Δ vs F32 | text ppl | Δ vs F32 "
            "| prefill ms | decode ms | total ms | total / F32 | decode tok/s | same tokens |",
            "|---|" + "---:|" * 13,
        ]
        for r in lrows:
            lines.append(
                f"| {r['type']} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / ref['bytes']:.3f} | {r['bpw']:.2f} | "
                f"{r['ppl']:.3f} | {pct(r['ppl'], ref['ppl'])} | {r['text_ppl']:.2f} | "
                f"{pct(r['text_ppl'], ref['text_ppl'])} | {r['prefill_s'] * 1000:.0f} | {r['decode_s'] * 1000:.0f} | "
                f"{r['total_s'] * 1000:.0f} | {r['total_s'] / ref['total_s']:.2f} | {r['decode_tok_s']:.1f} | "
                f"{r['same_tokens']}/{args.new_tokens} |")
        lines += ["", "Tensor types per file (2-D tensors):", ""]
        lines += [f"- {r['type']}: {r['tensors']}" for r in lrows]
        lines.append("")
    common = sum(v for k, v in sizes.items() if not k.startswith("model.") and k not in ("config.json",
                                                                                             "generation_config.json"))
    lines += [
        "## Download size: adapter mode vs merged mode",
        "",
        "| artifact | what the device receives | size |",
        "|---|---|---:|",
        f"| adapter mode | {', '.join(f'`{k}`' for k in sorted(adapter_bytes))} (the device keeps its base) | "
        f"{human(sum(adapter_bytes.values()))} |",
    ]
    for name in sorted((k for k in sizes if k.startswith("model.") and k.endswith(".gguf")), key=lambda k: -sizes[k]):
        lines.append(f"| merged, `{name}` only | the GGUF + tokenizer files + manifest | "
                     f"{human(sizes[name] + common)} |")
    lines += [
        "",
        f"Build time: merged artifact with every format {t_merged:.0f} s; adapter artifact {t_adapter:.0f} s; "
        f"whole benchmark {t_all / 60:.1f} min.",
        "",
    ]
    if grows:
        lines += genai_lines(grows, args, prompt_len, None)
    if trows:
        tref = trows[0]
        lines += [
            "## torch backend (dequantizes every file to fp32 at load)",
            "",
            f"Δlogit = max |logit − fp32 logit| on one 64-token probe. Forward = median of {args.repeats} runs at "
            f"1×64 tokens; decode = greedy {args.decode_tokens} new tokens; {args.threads} torch thread(s).",
            "",
            "| format | file | size MiB | size / fp32 | answer ppl | / fp32 | text ppl | / fp32 | max Δlogit | load s "
            "| torch forward ms | / fp32 | torch tok/s |",
            "|---|---|" + "---:|" * 11,
        ]
        for r in trows:
            lines.append(
                f"| {r['name']} | `{r['file']}` | {r['bytes'] / 2**20:.1f} | {r['bytes'] / tref['bytes']:.3f} | "
                f"{r['ppl']:.3f} | {r['ppl'] / tref['ppl']:.4f} | {r['text_ppl']:.2f} | "
                f"{r['text_ppl'] / tref['text_ppl']:.4f} | {r['dlogit']:.3f} | {r['load_s']:.1f} | "
                f"{r['forward_s'] * 1000:.0f} | {r['forward_s'] / tref['forward_s']:.2f} | {r['tok_s']:.1f} |")
        lines.append("")
    lines += [
        "Notes:",
        "- The base is the packaged SmolLM2 Q4_1 GGUF expanded to fp32; the LoRA merge changes only q and v. "
        "Q4_1 is that file's own type: re-quantizing gives every untouched tensor back exactly. Q4_0 and the "
        "K-quants' fallback types re-round every tensor onto another grid (a second rounding). "
        "`token_embd` stays Q8_0 in the numpy 4-bit files.",
        "- In every file below 8 bits the tensors the adapter changed (its `target_modules`: q, v here) are "
        "stored Q8_0. The merged LoRA update is far below a 4-bit step (rms ≈ 0.001 against a rounding error "
        "of ≈ 0.001-0.02), so rounding W0 + ΔW to 4 bits erases most of it and the model answers like the base "
        "again: compare the *plain* rows. The cost is ~6 MiB on SmolLM2 (q, v are 10 % of the weights).",
        "- K-quants come from llama.cpp's quantizer (`fedge.export.llamacpp`). Their 256-value super-blocks do not "
        "fit SmolLM2's hidden size 576 (= 2.25 · 256): llama.cpp falls back to 32-value blocks for every tensor "
        "that reads the hidden state (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0; see the tensor types above), so on "
        "this model \"Q4_K_M\" is mostly a 5-bit file; tied embeddings follow llama.cpp's output-tensor rule.",
        "- The torch backend dequantizes GGUF and int8 weights to fp32 at load: its latency cannot improve with "
        "quantization; quantized speed needs llama.cpp (the `llamacpp` extra).",
        "- GGUF F32 stores no `output.weight` (tied embeddings) and reloads bit-exact in torch (Δlogit 0).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
