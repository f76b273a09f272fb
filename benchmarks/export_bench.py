"""Export benchmark on the default model (SmolLM2-135M-Instruct): size, speed, quality per format.

Not run by the tests (minutes). Usage::

    nice .venv/bin/python benchmarks/export_bench.py [--adapter runs/<id>/adapter] [--out benchmarks/results/export.md]

What it does:
  1. adapter: the given PEFT adapter, or a quick one (LoRA r=8 on q,v; ``--steps`` AdamW steps on
     the packaged chatterbot English QA pairs, held-out pairs excluded);
  2. one signed "merged" artifact with every format (fp32 safetensors, GGUF F32/F16/Q8_0/Q4_0,
     int8-rowwise safetensors) and one "adapter" artifact, through ``build_artifact``;
  3. per format, loaded the way the device runtime loads it: file size and ratio to fp32,
     held-out perplexity exp(mean per-example answer loss) against the fp32 merged model,
     max |Δlogit|, load time, forward latency (1×64 tokens) and greedy decode tokens/s with the
     torch backend; with llama.cpp too when ``llama_cpp`` imports.

The torch backend dequantizes GGUF/int8 to fp32 at load, so its latency cannot improve:
quantized speed needs llama.cpp (or another runtime that executes quantized kernels).
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
from fedge.data.tokenize import encode_chat  # noqa: E402
from fedge.export.artifact import build_artifact  # noqa: E402
from fedge.export.gguf import load_gguf_causal_lm  # noqa: E402
from fedge.export.merge import load_int8_model  # noqa: E402
from fedge.export.signing import generate_keypair  # noqa: E402
from fedge.models import add_lora, load_base  # noqa: E402
from fedge.runtime.infer import llama_cpp_available  # noqa: E402
from fedge.train import evaluate, train_local  # noqa: E402

MODEL = "smollm2-135m-instruct"
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0")


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


@torch.no_grad()
def text_ppl(model, tok, texts: list[str]) -> float:
    """Plain-text perplexity: exp(total next-token loss / total predicted tokens), no chat template."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def torch_metrics(model, tok, held_examples, held_texts, probe_ids, *, decode_tokens: int, repeats: int) -> dict:
    model.eval()
    ev = evaluate(model, held_examples, task="causal-lm", pad_id=tok.pad_token_id, batch_size=8)
    tppl = text_ppl(model, tok, held_texts)
    logits = model(input_ids=probe_ids).logits.float().numpy()
    fwd = median_time(lambda: model(input_ids=probe_ids), repeats)
    prompt = probe_ids[:, :16]

    def decode():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=decode_tokens,
                       min_new_tokens=decode_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    dec = median_time(decode, max(1, repeats // 2))
    return {"ppl": math.exp(ev["loss"]), "text_ppl": tppl, "logits": logits, "forward_s": fwd,
            "tok_s": decode_tokens / dec}


def llama_cpp_metrics(path: Path, probe: list[int], *, decode_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False, logits_all=False)
    t0 = time.perf_counter()
    llm.reset()
    llm.eval(probe[:16])
    for _ in range(decode_tokens):
        llm.eval([llm.sample(temp=0.0)])
    return {"tok_s": decode_tokens / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", type=Path, help="PEFT adapter dir (default: train a quick one)")
    ap.add_argument("--steps", type=int, default=8, help="steps for the quick adapter")
    ap.add_argument("--eval-n", type=int, default=48, help="held-out QA pairs for perplexity")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, help="where artifacts are written (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedge-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    train_pairs, held_pairs = split_pairs(args.eval_n)
    adapter = args.adapter or quick_adapter(work / "adapter", train_pairs, steps=args.steps,
                                            max_length=args.max_length)
    keys = generate_keypair(work / "keys", overwrite=True)

    t0 = time.perf_counter()
    merged_dir = build_artifact(adapter, work / "merged", base_source=MODEL, private_key=keys.private, mode="merged",
                                formats=("fp32", "int8") + GGUF_TYPES, version=1)
    t_merged = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapter_dir = build_artifact(adapter, work / "adapter-art", base_source=MODEL, private_key=keys.private,
                                 version=2)
    t_adapter = time.perf_counter() - t0
    print(f"artifacts built: merged {t_merged:.0f}s, adapter {t_adapter:.0f}s", flush=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    held = [encode_chat(tok, p["prompt"], p["response"], args.max_length) for p in held_pairs]
    held_texts = [p["prompt"] + " " + p["response"] for p in held_pairs]
    probe = encode_chat(tok, held_pairs[0]["prompt"] + " " + held_pairs[1]["prompt"], held_pairs[0]["response"], 64)
    probe_ids = torch.tensor([(probe["input_ids"] * 4)[:64]])

    loaders = {
        "fp32 safetensors": ("model.safetensors",
                             lambda: AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)),
        "int8-rowwise safetensors": ("model.int8.safetensors", lambda: load_int8_model(merged_dir, task="causal-lm")),
        **{f"GGUF {t}": (f"model.{t}.gguf", (lambda t=t: load_gguf_causal_lm(merged_dir / f"model.{t}.gguf")))
           for t in GGUF_TYPES},
    }
    rows, ref = [], None
    for name, (fname, load) in loaders.items():
        t0 = time.perf_counter()
        model = load()
        t_load = time.perf_counter() - t0
        m = torch_metrics(model, tok, held, held_texts, probe_ids, decode_tokens=args.decode_tokens,
                          repeats=args.repeats)
        if ref is None:
            ref = m
        row = {"name": name, "file": fname, "bytes": (merged_dir / fname).stat().st_size, "load_s": t_load, **m,
               "dlogit": float(np.abs(m["logits"] - ref["logits"]).max())}
        if llama_cpp_available() and fname.endswith(".gguf"):
            row["llama_tok_s"] = llama_cpp_metrics(merged_dir / fname, probe["input_ids"],
                                                   decode_tokens=args.decode_tokens, threads=args.threads)["tok_s"]
        rows.append(row)
        print(f"{name:26s} {row['bytes'] / 2**20:7.1f} MiB  ppl {row['ppl']:.3f}  text ppl {row['text_ppl']:.2f}  "
              f"dlogit {row['dlogit']:.3f}  "
              f"fwd {row['forward_s'] * 1000:.0f} ms  {row['tok_s']:.1f} tok/s  load {t_load:.1f}s", flush=True)
        del model

    adapter_bytes = {p.name: p.stat().st_size for p in adapter_dir.iterdir() if p.is_file()}
    write_report(args, rows, adapter_bytes, t_merged, t_adapter, time.perf_counter() - t_all)


def human(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def write_report(args, rows, adapter_bytes, t_merged, t_adapter, t_all) -> None:
    ref = rows[0]
    quick = f"quick LoRA r=8 on q,v, {args.steps} steps on chatterbot English"
    llama = any("llama_tok_s" in r for r in rows)
    lines = [
        "# Export benchmark: SmolLM2-135M-Instruct (merged LoRA), per format",
        "",
        f"Generated by `benchmarks/export_bench.py` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} torch thread(s), shared machine: timings are indicative).",
        f"Adapter: {'given: ' + str(args.adapter) if args.adapter else quick}; "
        f"answer ppl = exp(mean per-example answer loss, chat template; the project's eval metric) over "
        f"{args.eval_n} held-out chatterbot pairs (max {args.max_length} tokens); text ppl = plain-text perplexity "
        f"of the same pairs as \"prompt response\" (all tokens). "
        f"Δlogit = max |logit − fp32 logit| on one 64-token probe. "
        f"Forward = median of {args.repeats} runs at 1×64 tokens; decode = greedy {args.decode_tokens} new tokens.",
        "",
        "| format | file | size MiB | size / fp32 | answer ppl | / fp32 | text ppl | / fp32 | max Δlogit | load s "
        "| torch forward ms | / fp32 | torch tok/s |" + (" llama.cpp tok/s |" if llama else ""),
        "|---|---|" + "---:|" * (11 + llama),
    ]
    for r in rows:
        line = (f"| {r['name']} | `{r['file']}` | {r['bytes'] / 2**20:.1f} | {r['bytes'] / ref['bytes']:.3f} | "
                f"{r['ppl']:.3f} | {r['ppl'] / ref['ppl']:.4f} | "
                f"{r['text_ppl']:.2f} | {r['text_ppl'] / ref['text_ppl']:.4f} | "
                f"{r['dlogit']:.3f} | {r['load_s']:.1f} | "
                f"{r['forward_s'] * 1000:.0f} | {r['forward_s'] / ref['forward_s']:.2f} | {r['tok_s']:.1f} |")
        if "llama_tok_s" in r:
            line += f" {r['llama_tok_s']:.1f} |"
        lines.append(line)
    lines += [
        "",
        "Adapter-mode artifact (the device keeps its base model): "
        + ", ".join(f"`{k}` {human(v)}" for k, v in sorted(adapter_bytes.items())) + ".",
        f"Build time: merged artifact with all six formats {t_merged:.0f} s; adapter artifact {t_adapter:.0f} s; "
        f"whole benchmark {t_all / 60:.1f} min.",
        "",
        "Notes:",
        "- The torch backend dequantizes GGUF and int8 weights to fp32 at load, so its forward latency and tokens/s "
        "do not improve with quantization (ratios ≈ 1 are expected): the gains here are size (download, storage). "
        "Quantized execution speed needs llama.cpp (`llama-cpp-python`, optional; "
        + ("measured above)." if llama else
           "not installed on this machine: a ~15 min source build). STACK.md reports 22 (F32) / 39 (F16) / "
           "52 (Q8_0) / 67 (Q4_0) tok/s for SmolLM2 in llama.cpp on 2 cores."),
        "- The base is the packaged Q4_1 GGUF expanded to fp32, so Q4_0 is a second 4-bit rounding; "
        "`token_embd` stays Q8_0 in the Q4_0 file.",
        "- Q4_0 is the one format with a visible quality cost here (short chatterbot answers are sensitive to it); "
        "STACK.md measured +10 % on its own 20 sentences. Prefer Q8_0 unless size dominates.",
        "- GGUF F32 stores no `output.weight` (tied embeddings) and reloads bit-exact (Δlogit 0).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
