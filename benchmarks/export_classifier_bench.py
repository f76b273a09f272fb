"""Export benchmark for the classifier (MiniLM-L6 + LoRA, language ID): torch fp32 / torch int8 / ONNX fp32 /
ONNX int8 merged artifacts, side by side.

Not run by the tests (a few minutes). Usage::

    nice .venv/bin/python benchmarks/export_classifier_bench.py [--steps 300] \
        [--out benchmarks/results/export_classifier.md]

What it does, in one process (so every ratio compares numbers measured side by side):
  1. data: the classify scenario's corpus (``chatterbot-language-id``, all 28 languages); a seeded
     permutation holds out ``--eval-n`` utterances, the rest trains;
  2. a quick LoRA adapter as in ``simulations/scenarios/classify.yaml`` (r=8, alpha=16 on query, value;
     the classification head trained with it), ``--steps`` AdamW steps of ``fedge.train.train_local``
     (batch 16, lr 2e-3, max 48 tokens, seed 0), centrally: not a federated run;
  3. three signed artifacts through ``fedge.export.artifact.build_artifact``: merged ``fp32``
     (``model.safetensors``), merged ``int8`` (``model.int8.safetensors``) and, for the download
     comparison only, adapter mode; each is installed into a device store (signature and hashes
     verified, ``fedge.runtime.store.install``) and loaded by the device runtime
     (``fedge.runtime.infer.load_installed``), as ``fedge infer``/``fedge serve`` do;
  4. quality: ``LocalModel.classify`` on the same held-out utterances, batch 1 and batch 16:
     accuracy of each artifact, its change against the fp32 merged model, predictions that differ
     from fp32's, max |Δ probability|; the unmerged trained PeftModel is checked against fp32;
  5. latency of one ``classify`` call (tokenize + forward + softmax, what the device pays per
     request) at batch 1 and batch 16 on ``--threads`` torch thread(s): median of ``--repeats``
     calls per model after warm-up, the models interleaved call by call on the same inputs;
  6. writes ``--out`` (markdown) with the goals of issue #5 (size ≤ 0.3, latency ≤ 0.6, int8
     accuracy within 1 % of the fp32 merged model).

With the ``onnx`` extra installed, two more artifacts, merged ``onnx`` (``model.onnx``, torch.onnx dynamo
export) and merged ``onnx-int8`` (``model.int8.onnx``, ONNX Runtime dynamic int8), are installed and run by
the device runtime's ``onnxruntime`` backend (``--threads`` intra-op threads), which imports no torch; they
get the same quality and latency measurements and a summary table of all four formats against torch fp32
(issue #17 item 5). ``--no-onnx`` skips them.

A third row, "int8 file, dequantized", loads the same int8 artifact with ``int8_compute=False``
(fp32 compute, the runtime's behaviour before int8 Linear layers): it separates the weight
rounding (stored in the file) from the activation rounding (torch dynamic quantization).
"""

from __future__ import annotations

import argparse
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

from fedge.data.corpora import chatterbot_utterances  # noqa: E402
from fedge.export import onnx_export  # noqa: E402
from fedge.export.artifact import build_artifact  # noqa: E402
from fedge.export.merge import full_range_activations, int8_linear_names, load_peft_model  # noqa: E402
from fedge.export.signing import generate_keypair  # noqa: E402
from fedge.models import add_lora, load_base  # noqa: E402
from fedge.runtime.infer import load_installed  # noqa: E402
from fedge.runtime.store import install  # noqa: E402
from fedge.train import train_local  # noqa: E402

MODEL = "minilm-l6"
TASK = "sequence-classification"
SIZE_GOAL, LATENCY_GOAL, ACCURACY_GOAL = 0.3, 0.6, 1.0  # issue #5; accuracy: % of the fp32 accuracy
BATCHES = (1, 16)
SEVEN_BIT = "int8, 7-bit activations"
ONNX_ROWS = {"onnx fp32": ("onnx", "model.onnx"), "onnx int8": ("onnx-int8", "model.int8.onnx")}


def split(n_eval: int, seed: int = 0):
    rows, names = chatterbot_utterances(("all",))
    order = np.random.default_rng(seed).permutation(len(rows))
    held = [rows[i] for i in order[:n_eval]]
    train = [rows[i] for i in order[n_eval:]]
    return train, held, names


def quick_adapter(out: Path, train_rows, num_labels: int, *, steps: int, max_length: int) -> tuple[Path, dict]:
    base = load_base(MODEL, task=TASK, num_labels=num_labels)
    model = add_lora(base.model, task=TASK, r=8, alpha=16, dropout=0.0, target_modules=["query", "value"])
    enc = base.tokenizer([r["text"] for r in train_rows], truncation=True, max_length=max_length)
    examples = [{"input_ids": ids, "label": r["label"]} for ids, r in zip(enc["input_ids"], train_rows)]
    stats = train_local(model, examples, task=TASK, pad_id=base.tokenizer.pad_token_id, steps=steps,
                        batch_size=16, lr=2e-3, seed=0)
    print(f"quick adapter: {steps} steps, train loss {stats['loss']:.3f}, {stats['seconds']:.0f}s", flush=True)
    model.save_pretrained(out, safe_serialization=True)
    return out, stats


def dir_bytes(d: Path) -> dict[str, int]:
    return {p.relative_to(d).as_posix(): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def human(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def predict(model, texts: list[str], batch: int) -> np.ndarray:
    """Class probabilities from ``LocalModel.classify`` in batches of ``batch``."""
    out = []
    for s in range(0, len(texts), batch):
        out += [r["probs"] for r in model.classify(texts[s:s + batch])]
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def peft_probs(adapter: Path, texts: list[str], num_labels: int, batch: int) -> np.ndarray:
    """The trained, unmerged model (fp32 oracle for the merged fp32 artifact), tokenized as classify does."""
    base = load_base(MODEL, task=TASK, num_labels=num_labels)
    model = load_peft_model(base.model, adapter)
    out = []
    for s in range(0, len(texts), batch):
        enc = base.tokenizer(texts[s:s + batch], padding=True, truncation=True, max_length=512, return_tensors="pt")
        out.append(torch.softmax(model(**enc).logits.float(), -1).numpy())
    return np.concatenate(out).astype(np.float64)


def latency(models: dict, texts: list[str], *, batch: int, repeats: int, forward_only: bool = False
            ) -> dict[str, float]:
    """Median seconds per classify call (or per model forward on pre-tokenized input).

    Models interleaved call by call on the same inputs, rotating who goes first.
    """
    inputs = [texts[(i * batch) % len(texts):][:batch] for i in range(repeats)]
    inputs = [x if len(x) == batch else texts[:batch] for x in inputs]
    names = list(models)
    feeds = {}
    if forward_only:  # each backend's own tokenized inputs, built before timing
        tok = next(m for m in models.values() if m.backend == "torch").tokenizer
        torch_in = [tok(x, padding=True, truncation=True, max_length=512, return_tensors="pt") for x in inputs]
        feeds = {n: [models[n].model.feed(x) for x in inputs] if models[n].backend == "onnxruntime" else torch_in
                 for n in names}
        inputs = list(range(len(inputs)))

    def call(name, x):
        if forward_only and models[name].backend == "onnxruntime":
            models[name].model.run(feeds[name][x])
        elif forward_only:
            with torch.no_grad():
                models[name].model(**feeds[name][x])
        else:
            models[name].classify(x)

    for name in names:  # warm-up
        for x in inputs[:3]:
            call(name, x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, x in enumerate(inputs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            call(name, x)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="AdamW steps for the quick adapter")
    ap.add_argument("--eval-n", type=int, default=500, help="held-out utterances")
    ap.add_argument("--max-length", type=int, default=48, help="training truncation (classify.yaml)")
    ap.add_argument("--repeats", type=int, default=200, help="timed classify calls per model and batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every timed call")
    ap.add_argument("--train-threads", type=int, default=os.cpu_count() or 1, help="torch threads for training")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX artifacts")
    ap.add_argument("--workdir", type=Path, help="where artifacts are written (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_classifier.md")
    args = ap.parse_args()
    t_all = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedge-export-cls-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(args.train_threads)

    train_rows, held_rows, names = split(args.eval_n)
    texts = [r["text"] for r in held_rows]
    gold = np.array([r["label"] for r in held_rows])
    print(f"data: {len(train_rows)} train / {len(held_rows)} held-out utterances, {len(names)} languages", flush=True)
    adapter, train_stats = quick_adapter(work / "adapter", train_rows, len(names), steps=args.steps,
                                         max_length=args.max_length)
    keys = generate_keypair(work / "keys", overwrite=True)

    arts, build_s = {}, {}
    onnx = not args.no_onnx and not onnx_export.missing_modules()
    builds = [("fp32", dict(mode="merged", formats=("fp32",))), ("int8", dict(mode="merged", formats=("int8",))),
              ("adapter", dict(mode="adapter"))]
    builds += [(label, dict(mode="merged", formats=(fmt,))) for label, (fmt, _) in ONNX_ROWS.items() if onnx]
    for i, (label, kw) in enumerate(builds, start=1):
        t0 = time.perf_counter()
        arts[label] = build_artifact(adapter, work / f"art-{label.replace(' ', '-')}", base_source=MODEL, private_key=keys.private,
                                     task=TASK, labels=names, version=i, **kw)
        build_s[label] = time.perf_counter() - t0
    sizes = {k: dir_bytes(v) for k, v in arts.items()}
    print("artifacts: " + ", ".join(f"{k} {human(sum(v.values()))}" for k, v in sizes.items()), flush=True)

    torch.set_num_threads(args.threads)
    models, load_s = {}, {}
    for label, kw in (("fp32", {}), ("int8", {}), ("int8 file, dequantized", {"int8_compute": False})):
        store = work / f"store-{label.split()[0]}"
        if not store.exists():
            install(arts[label.split()[0]], store_dir=store, trusted_public_key=keys.public_pem)
        t0 = time.perf_counter()
        models[label] = load_installed(store, backend="torch", **kw)
        load_s[label] = time.perf_counter() - t0
    if full_range_activations():  # what a CPU without AVX512-VNNI gets: torch's default 7-bit activations
        t0 = time.perf_counter()
        models[SEVEN_BIT] = load_installed(work / "store-int8", backend="torch")
        load_s[SEVEN_BIT] = time.perf_counter() - t0
        modules = dict(models[SEVEN_BIT].model.named_modules())
        for name in int8_linear_names(models[SEVEN_BIT].model):
            modules[name].reduce_range = True
    for label in ONNX_ROWS if onnx else ():
        store = work / f"store-{label.replace(' ', '-')}"
        install(arts[label], store_dir=store, trusted_public_key=keys.public_pem)
        t0 = time.perf_counter()
        models[label] = load_installed(store, backend="onnxruntime", threads=args.threads)
        load_s[label] = time.perf_counter() - t0
        assert models[label].files == {"model": ONNX_ROWS[label][1]}
    int8_layers = len(int8_linear_names(models["int8"].model))
    assert models["int8"].compute == "int8-dynamic" and int8_layers > 0, "int8 artifact did not load as int8"
    assert models["fp32"].compute == "fp32" and models["int8 file, dequantized"].compute == "fp32"
    print(f"loaded: {', '.join(f'{k} {v:.1f}s ({models[k].compute})' for k, v in load_s.items())}; "
          f"{int8_layers} int8 Linear layers", flush=True)

    quality = {}
    for b in BATCHES:
        probs = {k: predict(m, texts, b) for k, m in models.items()}
        quality[b] = probs
        print(f"batch {b}: " + ", ".join(f"{k} acc {(p.argmax(1) == gold).mean():.4f}" for k, p in probs.items()),
              flush=True)
    oracle = peft_probs(adapter, texts, len(names), 16)

    lat, fwd = {}, {}
    for b in BATCHES:
        reps = args.repeats if b == 1 else max(args.repeats // 4, 20)
        lat[b] = latency(models, texts, batch=b, repeats=reps)
        fwd[b] = latency(models, texts, batch=b, repeats=reps, forward_only=True)
        print(f"latency batch {b}: " + ", ".join(f"{k} {v * 1000:.2f} ms (forward {fwd[b][k] * 1000:.2f})"
                                                 for k, v in lat[b].items()), flush=True)
    write_report(args, names=names, n_train=len(train_rows), gold=gold, train_stats=train_stats, sizes=sizes,
                 build_s=build_s, load_s=load_s, models=models, int8_layers=int8_layers, quality=quality,
                 oracle=oracle, lat=lat, fwd=fwd, t_all=time.perf_counter() - t_all)


def ort_version() -> str:
    import onnxruntime

    return f"(onnxruntime {onnxruntime.__version__}, {onnxruntime.get_device()})"


def four_formats(onnx, *, sizes, acc, quality, lat, fwd, models, n) -> list[str]:
    """The issue #17 summary: each format against torch fp32, all measured in this run."""
    if not onnx:
        return []
    rows = {"torch fp32": ("fp32", "model.safetensors"), "torch int8": ("int8", "model.int8.safetensors"),
            **{k: (k, ONNX_ROWS[k][1]) for k in onnx}}
    ref_size = sizes["fp32"]["model.safetensors"]
    lines = [
        "## Four formats side by side (issue #17 item 5): ratios against torch fp32, measured in this run",
        "",
        "| format | runtime, compute | model file | / fp32 | accuracy b1 / b16 | Δ points b1 / b16 "
        "| predictions ≠ fp32 b1 / b16 | classify b1 ms | / fp32 | classify b16 ms | / fp32 "
        "| forward b1 / b16, / fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, (key, file) in rows.items():
        m = models[key]
        size = sizes[key][file]
        diff = [int((quality[b][key].argmax(1) != quality[b]["fp32"].argmax(1)).sum()) for b in BATCHES]
        lines.append(
            f"| {label} (`{file}`) | {m.backend}, {m.compute} | {human(size)} | {size / ref_size:.3f} | "
            f"{acc[1][key]:.4f} / {acc[16][key]:.4f} | "
            f"{100 * (acc[1][key] - acc[1]['fp32']):+.2f} / {100 * (acc[16][key] - acc[16]['fp32']):+.2f} | "
            f"{diff[0]}/{n} / {diff[1]}/{n} | {lat[1][key] * 1000:.2f} | {lat[1][key] / lat[1]['fp32']:.2f} | "
            f"{lat[16][key] * 1000:.2f} | {lat[16][key] / lat[16]['fp32']:.2f} | "
            f"{fwd[1][key] / fwd[1]['fp32']:.2f} / {fwd[16][key] / fwd[16]['fp32']:.2f} |")
    lines += [
        "",
        "ONNX rows: the device runtime's `onnxruntime` backend (`fedge.runtime.ort`; no torch, no transformers: "
        "`tokenizers` from the artifact's tokenizer.json, one intra-op thread like torch's one thread). "
        "`model.onnx` is the merged model exported by `torch.onnx.export(dynamo=True)`; `model.int8.onnx` is "
        "ONNX Runtime's `quantize_dynamic` of it (QInt8 weights per tensor, uint8 activations quantized per call; "
        "embeddings stay fp32). Torch int8 is the int8-rowwise safetensors file run as torch dynamic-quantized "
        "Linear (per-row weight scales).",
        "",
    ]
    return lines


def write_report(args, *, names, n_train, gold, train_stats, sizes, build_s, load_s, models, int8_layers, quality,
                 oracle, lat, fwd, t_all) -> None:
    fp_file, q_file = sizes["fp32"]["model.safetensors"], sizes["int8"]["model.int8.safetensors"]
    fp_all, q_all, ad_all = (sum(sizes[k].values()) for k in ("fp32", "int8", "adapter"))
    size_ratio = q_file / fp_file
    acc = {b: {k: float((p.argmax(1) == gold).mean()) for k, p in quality[b].items()} for b in BATCHES}
    ref16 = quality[16]["fp32"]
    oracle_agree = int((oracle.argmax(1) == ref16.argmax(1)).sum())
    oracle_dp = float(np.abs(oracle - ref16).max())
    n = len(gold)

    def acc_change(b, k):
        d = acc[b][k] - acc[b]["fp32"]
        return d, 100 * d / acc[b]["fp32"]

    worst_rel = max((acc_change(b, "int8")[1] for b in BATCHES), key=abs)
    lat_ratio = {b: lat[b]["int8"] / lat[b]["fp32"] for b in BATCHES}

    bits = 8 if full_range_activations() else 7

    def ok(good: bool) -> str:
        return "yes" if good else "**no**"

    onnx = [k for k in ONNX_ROWS if k in models]
    title = "torch fp32 / torch int8 / ONNX fp32 / ONNX int8" if onnx else "int8 vs fp32"
    lines = [
        f"# Export benchmark: MiniLM-L6 classifier (merged LoRA), {title}",
        "",
        f"Generated by `benchmarks/export_classifier_bench.py` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({platform.machine()}, {os.cpu_count()} cores shared with other work: timings are indicative, ratios "
        f"come from calls interleaved in one process; torch {torch.__version__}, quantized engine "
        f"`{torch.backends.quantized.engine}`).",
        f"Model: `{MODEL}` (all-MiniLM-L6-v2) + LoRA r=8, alpha=16 on query, value and the {len(names)}-way head, "
        f"trained centrally for {args.steps} steps (batch 16, lr 2e-3, max {args.max_length} tokens, seed 0; "
        f"train loss {train_stats['loss']:.3f}) on {n_train} utterances of the classify scenario's corpus "
        f"(`chatterbot-language-id`, {len(names)} languages). Held-out: {n} other utterances (seeded permutation), "
        f"the same for every artifact. Every artifact is built by `build_artifact`, installed with signature "
        f"and hash checks, and loaded by `fedge.runtime.infer.load_installed` (backend torch"
        f"{'; the ONNX files with backend onnxruntime ' + ort_version() if onnx else ''}); quality and "
        f"latency go through `LocalModel.classify`.",
        "",
        *four_formats(onnx, sizes=sizes, acc=acc, quality=quality, lat=lat, fwd=fwd, models=models, n=n),
        "## Goals (issue #5): int8 merged artifact vs the fp32 merged artifact",
        "",
        "| measure | fp32 | int8 | int8 / fp32 or change | goal | met |",
        "|---|---:|---:|---:|---:|---|",
        f"| model file size | {human(fp_file)} | {human(q_file)} | {size_ratio:.3f} | ≤ {SIZE_GOAL} | "
        f"{ok(size_ratio <= SIZE_GOAL)} |",
    ]
    for b in BATCHES:
        d, rel = acc_change(b, "int8")
        lines.append(f"| held-out accuracy, batch {b} | {acc[b]['fp32']:.4f} | {acc[b]['int8']:.4f} | "
                     f"{100 * d:+.2f} points ({rel:+.2f} %) | within {ACCURACY_GOAL:g} % | "
                     f"{ok(abs(rel) <= ACCURACY_GOAL)} |")
    if SEVEN_BIT in models:
        for b in BATCHES:
            d, rel = acc_change(b, SEVEN_BIT)
            lines.append(f"| held-out accuracy, batch {b}, 7-bit activations (CPUs without AVX512-VNNI) | "
                         f"{acc[b]['fp32']:.4f} | {acc[b][SEVEN_BIT]:.4f} | {100 * d:+.2f} points ({rel:+.2f} %) | "
                         f"within {ACCURACY_GOAL:g} % | {ok(abs(rel) <= ACCURACY_GOAL)} |")
    for b in BATCHES:
        lines.append(f"| classify latency, batch {b} | {lat[b]['fp32'] * 1000:.2f} ms | {lat[b]['int8'] * 1000:.2f} ms "
                     f"| {lat_ratio[b]:.2f} | ≤ {LATENCY_GOAL} | {ok(lat_ratio[b] <= LATENCY_GOAL)} |")
    lines += [
        "",
        f"Accuracy change: int8 accuracy − fp32 accuracy in points, and relative to the fp32 accuracy (the goal "
        f"reads it relative; {n} examples, one example = {100 / n:.2f} points). Worst relative change over the "
        f"two batch sizes: {worst_rel:+.2f} % ({bits}-bit activations on this CPU; the 7-bit rows, if any, show what "
        f"a CPU without AVX512-VNNI gets).",
        "",
        "## Quality (held-out, `LocalModel.classify`)",
        "",
        "| loaded as | compute | batch | accuracy | Δ vs fp32 (points) | predictions ≠ fp32 "
        "| max \\|Δ prob\\| vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for b in BATCHES:
        ref = quality[b]["fp32"]
        for k, p in quality[b].items():
            diff = int((p.argmax(1) != ref.argmax(1)).sum())
            lines.append(f"| {k} | {models[k].compute} | {b} | {acc[b][k]:.4f} | "
                         f"{100 * (acc[b][k] - acc[b]['fp32']):+.2f} | {diff}/{n} | {np.abs(p - ref).max():.4f} |")
    base_acc = 1 / len(names)
    lines += [
        "",
        f"Oracle check: the unmerged trained PeftModel (fp32) agrees with the fp32 merged artifact on "
        f"{oracle_agree}/{n} predictions (max |Δ prob| {oracle_dp:.1e}). Chance level: {base_acc:.3f}.",
        "",
        "## Size and download",
        "",
        "| artifact | payload | file | whole artifact (tokenizer, config, manifest, signature) | / fp32 merged |",
        "|---|---|---:|---:|---:|",
        f"| merged fp32 | `model.safetensors` | {human(fp_file)} | {human(fp_all)} | 1.000 |",
        f"| merged int8 | `model.int8.safetensors` (int8-rowwise) | {human(q_file)} | {human(q_all)} | "
        f"{q_all / fp_all:.3f} |",
        *[f"| merged {k} | `{ONNX_ROWS[k][1]}` | {human(sizes[k][ONNX_ROWS[k][1]])} | "
          f"{human(sum(sizes[k].values()))} | {sum(sizes[k].values()) / fp_all:.3f} |" for k in onnx],
        f"| adapter (device keeps its MiniLM base) | `adapter_model.safetensors` | "
        f"{human(sizes['adapter']['adapter_model.safetensors'])} | {human(ad_all)} | {ad_all / fp_all:.3f} |",
        "",
        "Build time: " + ", ".join(f"{k} {v:.1f} s" for k, v in build_s.items()) + ".",
        "",
        "## Latency (`LocalModel.classify`, one call)",
        "",
        f"Median of {args.repeats} calls at batch 1 and {max(args.repeats // 4, 20)} at batch 16 per model, after "
        f"3 warm-up calls, {args.threads} torch thread(s); the models take turns call by call on the same held-out "
        f"texts (batch 16: 16 consecutive texts, padded to the longest). A call = tokenize + forward + softmax + "
        f"result dicts. *Forward*: the model call alone on the same inputs tokenized beforehand (timed in a "
        f"separate interleaved pass).",
        "",
        "| loaded as | compute | load s | batch 1 ms | / fp32 | forward ms | / fp32 | batch 16 ms | / fp32 "
        "| forward ms | / fp32 |",
        "|---|---|" + "---:|" * 9,
    ]
    for k in models:
        cells = [f"{load_s[k]:.1f}"]
        for b in BATCHES:
            cells += [f"{lat[b][k] * 1000:.2f}", f"{lat[b][k] / lat[b]['fp32']:.2f}",
                      f"{fwd[b][k] * 1000:.2f}", f"{fwd[b][k] / fwd[b]['fp32']:.2f}"]
        lines.append(f"| {k} | {models[k].compute} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Notes:",
        f"- int8 compute: the runtime turns the {int8_layers} `nn.Linear` layers stored int8 (query/key/value, "
        "attention output, intermediate, output, pooler) into torch dynamic-quantized Linear "
        "(`torch.ao.nn.quantized.dynamic.Linear`, qint8) whose int8 weights and per-row scales are the file's own, "
        f"bit for bit. Each call quantizes the layer input per tensor (uint8; {bits}-bit range on this CPU: "
        "8 bits where the CPU has AVX512-VNNI, else torch's default 7, see "
        "`fedge.export.merge.full_range_activations`) "
        "and multiplies in int8 (fbgemm). The word embeddings are stored int8 but dequantized to fp32 at load "
        "(a lookup, not a matmul); LayerNorms, biases and the 28×384 head stay fp32.",
        "- The *int8 file, dequantized* row (`int8_compute=False`) isolates the weight rounding; the difference "
        "between it and the *int8* row is the activation rounding. Because the activation scale is taken over "
        "the whole input tensor, an int8 prediction can depend slightly on its batch mates and padding "
        "(so the batch 1 and batch 16 rows can differ); fp32 results change only at rounding level.",
        *([f"- The *{SEVEN_BIT}* row is the int8 artifact as loaded by the runtime with its layers switched to "
           "torch's default 7-bit activation range (`reduce_range=True`), i.e. what a CPU without AVX512-VNNI "
           "runs (there fbgemm's int16 pair sums would saturate at 8 bits): same speed, twice the activation "
           "step. It is measured here, on a VNNI CPU, to show the quality such devices get."]
          if SEVEN_BIT in models else []),
        "- The goal ratios are for one whole classify call, including tokenization and Python overhead that "
        f"int8 does not speed up; the forward alone: {fwd[1]['int8'] / fwd[1]['fp32']:.2f} (batch 1), "
        f"{fwd[16]['int8'] / fwd[16]['fp32']:.2f} (batch 16).",
        "- torch marks its quantized-tensor API (used to pack the int8 weights) as deprecated "
        "(pytorch/pytorch#184982); torch 2.4-2.13 (the project's range) ship it. If a torch without the "
        "quantized kernels loads the artifact, the runtime logs a warning and runs it dequantized in fp32 "
        "(`LocalModel.compute == \"fp32\"`).",
        f"- Whole benchmark {t_all / 60:.1f} min.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
