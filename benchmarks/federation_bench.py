"""Federation benchmarks for the default scenario, measured side by side in one run.

1. bytes per client per round (up and down, exact serialized payload) vs the full
   model's fp32 bytes, for each wire encoding;
2. the default scenario end to end (`fedge simulate` as a user runs it): wall time,
   per-round seconds, peak memory of the whole process tree (driver + Ray);
3. framework overhead: a simulated round's wall time vs the same local training
   steps (all clients, same seeds), FedAvg and central evaluation run in a plain
   loop in one process on the same machine.

Usage: python benchmarks/federation_bench.py [--out benchmarks/results/federation.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import run_measured  # noqa: E402


def run_default(run_dir: Path) -> dict:
    """`fedge simulate --run-dir X` in a subprocess, sampling the process tree's RSS."""
    rc, out, wall, peak = run_measured([str(Path(sys.executable).parent / "fedge"), "simulate", "--run-dir",
                                        str(run_dir)], cwd=tempfile.gettempdir())
    if rc != 0:
        raise SystemExit(f"fedge simulate failed:\n{out}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall": wall, "peak_rss": peak, "rows": rows, "summary": summary, "stdout": out}


def bytes_table(cfg) -> tuple[list[str], dict]:
    from fedge import deltas, models

    base = models.load_base(cfg.model.source, task=cfg.model.task)
    full_fp32 = sum(t.numel() * 4 for t in base.model.parameters())
    base_params = sum(t.numel() for t in base.model.parameters())  # before LoRA is added
    peft = models.add_lora(base.model, task=cfg.model.task, r=cfg.lora.r, alpha=cfg.lora.alpha,
                           dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules)
    adapter = models.get_adapter_state(peft)
    rng = np.random.default_rng(0)
    delta = {k: rng.standard_normal(v.shape) * 1e-3 for k, v in adapter.items()}
    down = deltas.record_bytes(deltas.to_record(adapter))
    lines = ["| encoding | bytes up / client / round | bytes down / client / round | full model fp32 | up : full |",
             "|---|---:|---:|---:|---:|"]
    ratios = {}
    for enc in deltas.ENCODINGS:
        up = deltas.record_bytes(deltas.to_record(deltas.encode(delta, enc)))
        ratios[enc] = full_fp32 / up
        lines.append(f"| {enc} | {up:,} | {down:,} | {full_fp32:,} | 1/{full_fp32 / up:.0f} |")
    return lines, {"full_fp32": full_fp32, "adapter_params": sum(v.size for v in adapter.values()),
                   "base_params": base_params, "ratios": ratios}


def plain_round(cfg, rnd: int) -> dict:
    """One round's work without Flower: every client trains (same seeds), FedAvg, central eval."""
    import torch

    from fedge import deltas, models
    from fedge.data import data_args, federated_split
    from fedge.data.tokenize import encode_dataset
    from fedge.train import train_local
    from server.federation import Evaluator

    torch.set_num_threads(cfg.simulation.torch_threads)
    t0 = time.perf_counter()
    ev = Evaluator(cfg)  # its model serves as the client model too (one process)
    setup = time.perf_counter() - t0
    fd = federated_split(**data_args(cfg))
    examples = [encode_dataset(ev.base.tokenizer, tr, task=cfg.model.task, max_length=cfg.model.max_length)
                for tr, _ in fd.clients]
    g = ev.initial_adapter()
    t1 = time.perf_counter()
    ds, ns = [], []
    for pid in range(cfg.data.num_clients):
        models.set_adapter_state(ev.model, g)
        seed = int(np.random.SeedSequence([cfg.seed, rnd, pid]).generate_state(1)[0])
        train_local(ev.model, examples[pid], task=cfg.model.task, pad_id=int(ev.base.tokenizer.pad_token_id),
                    steps=cfg.train.local_steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr, seed=seed)
        ds.append(deltas.compute_delta(models.get_adapter_state(ev.model), g))
        ns.append(len(examples[pid]))
    t_train = time.perf_counter() - t1
    w = np.array(ns, float) / sum(ns)
    new = deltas.apply_delta(g, {k: sum(wi * d[k] for wi, d in zip(w, ds)) for k in g})
    torch.set_num_threads(os.cpu_count() or 1)  # as the server does
    t2 = time.perf_counter()
    ev(new)
    t_eval = time.perf_counter() - t2
    return {"setup": setup, "train": t_train, "eval": t_eval, "total": t_train + t_eval}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "federation.md"))
    args = ap.parse_args()
    from fedge import config as fcfg

    cfg = fcfg.load("default")
    lines = ["# Federation benchmarks (default scenario)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.python_version()}; "
             f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             f"Produced by `python benchmarks/federation_bench.py`.", ""]

    print("1/3 bytes ...", flush=True)
    bl, b = bytes_table(cfg)
    lines += ["## Bytes per client per round vs the full model", "",
              f"SmolLM2-135M-Instruct: {b['base_params']:,} parameters; LoRA r={cfg.lora.r} on "
              f"{', '.join(cfg.lora.target_modules)}: {b['adapter_params']:,} parameters "
              f"({b['base_params'] / b['adapter_params']:.0f}× fewer). Exact serialized payloads:", "", *bl, ""]

    print("2/3 default scenario (fedge simulate) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_default(Path(tmp) / "run")
    rows, s = res["rows"], res["summary"]
    lines += ["## `fedge simulate` (default scenario) end to end", "",
              f"- wall time: **{res['wall']:.0f} s** ({res['wall'] / 60:.1f} min; limit 8 min), "
              f"including Ray start-up, model load, {cfg.federation.num_rounds} rounds and the sample answers",
              f"- peak memory (RSS of the driver + Ray processes, summed): **{res['peak_rss'] / 2**30:.2f} GiB**",
              f"- central held-out loss: {s['initial_central_loss']:.4f} → {s['final_central_loss']:.4f}", "",
              "| round | clients | train loss | held-out loss | seconds |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r.get('accepted', '—')} | "
                     f"{'—' if r.get('train_loss') is None else format(r['train_loss'], '.4f')} | "
                     f"{r['central_loss']:.4f} | {r['seconds']:.1f} |")
    lines += ["", f"Prompt: {s['sample_prompt']}", "", f"- base: {s['base_answer']}",
              f"- fine-tuned: {s['finetuned_answer']}", ""]

    print("3/3 plain loop ...", flush=True)
    plain = plain_round(cfg, 1)
    sim_round = float(np.median([r["seconds"] for r in rows[1:]]))
    lines += ["## Framework overhead", "",
              "A simulated round (median over rounds: Flower messages, Ray actors, 2 clients at a time with "
              f"{cfg.simulation.torch_threads} torch thread each, validation, FedAvg, central evaluation) vs the "
              "same local steps of all clients run one after another in a plain loop in one process "
              f"({cfg.simulation.torch_threads} torch thread), then FedAvg and the same central evaluation:", "",
              "| | seconds |", "|---|---:|",
              f"| simulated round (median) | {sim_round:.1f} |",
              f"| plain loop: local training of {cfg.data.num_clients} clients | {plain['train']:.1f} |",
              f"| plain loop: central evaluation | {plain['eval']:.1f} |",
              f"| plain loop: total | {plain['total']:.1f} |",
              f"| **ratio simulated / plain** | **{sim_round / plain['total']:.2f}** |", "",
              "A ratio below 1 means the simulation's two parallel clients more than pay for Flower's and "
              "Ray's overhead on 2 cores.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
