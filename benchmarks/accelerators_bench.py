"""Accelerator benchmark: seconds per local step and per round on CPU and (when present) a CUDA GPU,
and clients trained per minute when several virtual clients share one GPU.

1. For the packaged SmolLM2-135M-Instruct, and a ~0.5B model when ``--model-dir`` names a local
   Hugging Face directory (nothing is downloaded), on each device (``model.device`` cpu; cuda with
   ``model.dtype`` auto, i.e. bf16 where supported): seconds per local step (``fedge.train.train_local``,
   LoRA r=8 on q_proj/v_proj, after one warm-up step), and seconds per round, measured in process:
   ``--clients`` clients one after another (global adapter in, ``--steps`` local steps, delta out as
   CPU fp32 numpy, exactly as a client sends it), FedAvg, central evaluation. No Flower or Ray here:
   the round is the work a round does, not the messaging (benchmarks/federation_bench.py has that).
2. With CUDA: a real ``fedge simulate`` (Flower + Ray) of one warm-up and one measured round with
   ``simulation.client_gpus`` = 1/k for k = 1, 2, 4, 8 clients per GPU (2k clients per round); clients
   trained per minute = clients in the measured round / its seconds x 60.

Without a CUDA device the GPU rows print "not measured: no CUDA device"; without ``--model-dir`` the
~0.5B rows print "not measured: no local ~0.5B model directory".

Usage: python benchmarks/accelerators_bench.py [--model-dir DIR] [--steps 2] [--clients 3]
       [--batch-size 4] [--max-length 64] [--out benchmarks/results/accelerators.md] [--note TEXT]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
os.environ.setdefault("TQDM_DISABLE", "1")

SMOLLM2 = "smollm2-135m-instruct"
NO_CUDA = "not measured: no CUDA device"
NO_BIG = "not measured: no local ~0.5B model directory"
GPU_SHARES = (1, 2, 4, 8)  # clients per GPU


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available()
           else "no CUDA device")
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; GPU: {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def measure(source: str, device: str, *, steps: int, clients: int, batch_size: int, max_length: int) -> dict:
    """Seconds per local step and per in-process round for one model on one device (dtype auto)."""
    from fedge import config as fcfg
    from fedge import deltas, models
    from fedge.data import data_args, federated_split
    from fedge.data.tokenize import encode_dataset
    from fedge.train import evaluate, train_local

    cfg = fcfg.load("default", [f"data.num_clients={clients}", f"federation.clients_per_round={clients}",
                                "federation.min_replies=1"])
    t0 = time.perf_counter()
    base = models.load_base(source, device=device, dtype="auto")
    load_s = time.perf_counter() - t0
    peft = models.add_lora(base.model, task="causal-lm", r=8, alpha=16.0, dropout=0.0,
                           target_modules=("q_proj", "v_proj"), seed=0)
    dev = next(peft.parameters()).device
    dtype = next(p for p in peft.parameters() if not p.requires_grad).dtype
    tok, pad = base.tokenizer, int(base.tokenizer.pad_token_id)
    fd = federated_split(**data_args(cfg))
    examples = [encode_dataset(tok, tr, task="causal-lm", max_length=max_length) for tr, _ in fd.clients]
    held = encode_dataset(tok, fd.global_holdout, task="causal-lm", max_length=max_length)[:16]
    kw = {"task": "causal-lm", "pad_id": pad, "batch_size": batch_size, "lr": 1e-3}
    g = models.get_adapter_state(peft)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    train_local(peft, examples[0], steps=1, seed=0, **kw)  # warm-up (kernels, allocator, caches)
    models.set_adapter_state(peft, g)
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    train_local(peft, examples[0], steps=steps, seed=1, **kw)
    _sync(dev)
    step_s = (time.perf_counter() - t0) / steps
    step_cpu_s = (time.process_time() - c0) / steps  # CPU seconds of this process: robust to other load

    _sync(dev)
    t0 = time.perf_counter()
    ds, ns = [], []
    for pid in range(clients):
        models.set_adapter_state(peft, g)
        train_local(peft, examples[pid], steps=steps, seed=100 + pid, **kw)
        ds.append(deltas.compute_delta(models.get_adapter_state(peft), g))  # CPU fp32 numpy, as on the wire
        ns.append(len(examples[pid]))
    w = np.asarray(ns, float) / sum(ns)
    new = deltas.apply_delta(g, {k: sum(wi * d[k] for wi, d in zip(w, ds)) for k in g})
    models.set_adapter_state(peft, new)
    central = evaluate(peft, held, task="causal-lm", pad_id=pad, batch_size=16)
    _sync(dev)
    round_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    params = sum(p.numel() for p in base.model.parameters() if not p.requires_grad)
    del peft, base
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"device": str(dev), "dtype": str(dtype).removeprefix("torch."), "step_s": step_s,
            "step_cpu_s": step_cpu_s, "round_s": round_s,
            "load_s": load_s, "peak_gib": peak, "params": params, "central_loss": central["loss"]}


def fractional_gpus(source: str, *, steps: int, batch_size: int, max_length: int) -> list[dict]:
    """``fedge simulate``, client_gpus = 1/k: clients trained per minute in the second (warm) round."""
    from fedge import config as fcfg
    from simulations.runner import simulate

    out = []
    for k in GPU_SHARES:
        n = 2 * k
        cfg = fcfg.load("default", [
            f"model.source={source}", "model.device=auto", "model.dtype=auto", f"model.max_length={max_length}",
            f"simulation.client_gpus={1 / k}", "simulation.client_cpus=1", f"data.num_clients={n}",
            f"federation.clients_per_round={n}", f"federation.min_replies={n}", "federation.num_rounds=2",
            "federation.evaluate_clients_per_round=0", "data.max_eval_examples=8", f"train.local_steps={steps}",
            f"train.batch_size={batch_size}", "export.enabled=false", "sample.num_prompts=0"])
        rows: list[dict] = []
        with tempfile.TemporaryDirectory() as tmp:
            simulate(cfg, Path(tmp) / "run", on_round=rows.append)
        last = rows[-1]
        out.append({"k": k, "client_gpus": 1 / k, "clients": last.get("accepted", n), "seconds": last["seconds"],
                    "per_minute": 60.0 * last.get("accepted", n) / last["seconds"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=None, help="a local ~0.5B Hugging Face model directory (e.g. Qwen2.5-0.5B)")
    ap.add_argument("--steps", type=int, default=2, help="local steps per client")
    ap.add_argument("--clients", type=int, default=3, help="clients per in-process round")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accelerators.md"))
    ap.add_argument("--note", default="", help="a line about the conditions (e.g. other load on the machine)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cuda = torch.cuda.is_available()
    size = {"steps": args.steps, "clients": args.clients, "batch_size": args.batch_size,
            "max_length": args.max_length}

    models_ = [("SmolLM2-135M-Instruct (packaged)", SMOLLM2)]
    if args.model_dir:
        models_.append((f"{Path(args.model_dir).name} (--model-dir)", args.model_dir))
    lines = ["# Accelerators: seconds per local step and per round, CPU vs GPU", "",
             f"Machine: {machine()}; {torch.get_num_threads()} torch threads on CPU. "
             f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Produced by "
             f"`python benchmarks/accelerators_bench.py` (LoRA r=8 on q_proj, v_proj; batch {args.batch_size}, "
             f"max_length {args.max_length}, {args.steps} local steps per client).", ""]
    if args.note:
        lines += [args.note, ""]
    lines += [f"A round is measured in process: {args.clients} clients one after another (global adapter in, "
              f"{args.steps} local steps, delta out as CPU fp32 numpy), FedAvg, central evaluation of 16 "
              "examples; no Flower/Ray messaging (see federation.md for that overhead). dtype is `model.dtype: "
              "auto` (bf16 on a GPU that supports it, fp32 on CPU).", "",
              "| model | device | dtype | s / local step | CPU s / local step | s / round | load s | peak GPU GiB "
              "| round held-out loss |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, source in models_:
        for device in ("cpu", "cuda"):
            if device == "cuda" and not cuda:
                lines.append(f"| {name} | cuda | — | {NO_CUDA} | | | | | |")
                continue
            print(f"{name} on {device} ...", flush=True)
            r = measure(source, device, **size)
            peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            lines.append(f"| {name} ({r['params'] / 1e6:.0f}M) | {r['device']} | {r['dtype']} | {r['step_s']:.2f} | "
                         f"{r['step_cpu_s']:.2f} | {r['round_s']:.1f} | {r['load_s']:.1f} | {peak} | "
                         f"{r['central_loss']:.4f} |")
    if not args.model_dir:
        lines.append(f"| ~0.5B (e.g. Qwen2.5-0.5B) | cpu, cuda | — | {NO_BIG} | | | | | |")

    lines += ["", "## Clients trained per minute with fractional GPUs", ""]
    if not cuda:
        lines += [f"{NO_CUDA}: `simulation.client_gpus` = 1/k lets k virtual clients share one GPU "
                  "(Ray's num_gpus); rerun this script on a machine with one to fill this table.", ""]
    else:
        print("fractional GPUs (fedge simulate) ...", flush=True)
        frac = fractional_gpus(models_[-1][1], steps=args.steps, batch_size=args.batch_size,
                               max_length=args.max_length)
        lines += [f"`fedge simulate` (Flower + Ray), {models_[-1][0]}, one warm-up round then one measured round "
                  f"of 2k clients, {args.steps} local steps each, central evaluation of 8 examples:", "",
                  "| clients per GPU (k) | simulation.client_gpus | clients in round | round s | clients / min |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {f['k']} | {f['client_gpus']:.3g} | {f['clients']} | {f['seconds']:.1f} | "
                  f"{f['per_minute']:.1f} |" for f in frac]
        lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
