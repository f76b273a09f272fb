"""Federation benchmarks for the default scenario, measured side by side in one run.

1. bytes per client per round (up and down, exact serialized payload) vs the full
   model's fp32 bytes, for each wire encoding;
2. the default scenario end to end, as a new user's first run after `make install` (an empty
   fedge cache, then `fedge prepare` as the install step runs it, then `fedge simulate`): wall
   time split into start-up / rounds / finish, per-round seconds, peak memory of the whole
   process tree (driver + Ray); with ``--ref REV`` the same first run of an older commit (a git
   worktree, its own empty cache, no prepare step if it has none) is measured beside it;
3. framework overhead: a simulated round's wall time vs the same local training
   steps (all clients, same seeds), FedAvg and central evaluation run in a plain
   loop in one process on the same machine.

Usage: python benchmarks/federation_bench.py [--out benchmarks/results/federation.md] [--ref REV]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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


def first_run(tree: Path, run_dir: Path) -> dict:
    """A first run from ``tree`` on an empty fedge cache: `fedge prepare` (when the tree has it), then
    `fedge simulate --run-dir X` in a subprocess, sampling the process tree's RSS; phases from file times."""
    cache = Path(tempfile.mkdtemp(prefix="fedge-cache-"))
    env = os.environ | {"FEDGE_CACHE": str(cache), "PYTHONPATH": str(tree)}  # `-m fedge.cli` from ``tree``
    cli = [sys.executable, "-m", "fedge.cli"]
    prepare = None
    if "cmd_prepare" in (tree / "fedge" / "cli.py").read_text():
        rc, out, prepare, _ = run_measured([*cli, "prepare"], cwd=tree, env=env)
        if rc != 0:
            raise SystemExit(f"fedge prepare failed:\n{out}")
    t_start = time.time()
    rc, out, wall, peak = run_measured([*cli, "simulate", "--run-dir", str(run_dir)], cwd=tree, env=env)
    t_end = t_start + wall
    if rc != 0:
        raise SystemExit(f"fedge simulate failed:\n{out}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    t_config = (run_dir / "config.yaml").stat().st_mtime  # written just before Ray starts
    t_last = max(p.stat().st_mtime for p in (run_dir / "checkpoints").glob("round-*/state.json"))
    t_summary = (run_dir / "summary.json").stat().st_mtime
    phases = {"start-up (imports, config, model conversion if not prepared)": t_config - t_start,
              "Ray start, round 0 evaluation, rounds (to the last checkpoint)": t_last - t_config,
              "last evaluation, export, deploy, sample answers, report": t_summary - t_last,
              "exit (Ray shutdown)": t_end - t_summary}
    return {"wall": wall, "prepare": prepare, "peak_rss": peak, "rows": rows, "summary": summary,
            "phases": phases, "stdout": out}


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True,
                   capture_output=True)
    return where


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
    ap.add_argument("--ref", help="also measure the first run of this git revision, side by side")
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

    print("2/3 default scenario, first run after install (fedge prepare; fedge simulate) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = first_run(ROOT, Path(tmp) / "run")
        old = None
        if args.ref:
            print(f"    ... and the first run of {args.ref}", flush=True)
            tree = worktree(args.ref, Path(tmp) / "ref")
            try:
                old = first_run(tree, Path(tmp) / "run-ref")
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    rows, s = res["rows"], res["summary"]
    head = "| | this tree |" + (f" {args.ref} |" if old else "")
    rule = "|---|---:|" + ("---:|" if old else "")

    def cells(f):
        return f" {f(res)} |" + (f" {f(old)} |" if old else "")

    lines += ["## `fedge simulate` (default scenario): a first run after install", "",
              "An empty fedge cache (a fresh machine), `fedge prepare` as `make install` runs it, then "
              "`fedge simulate` as `make simulate` runs it" + (f"; beside it the same first run of `{args.ref}` "
              "(a git worktree of that commit; it has no prepare step, so its run converts the packaged model)"
              if old else "") + ".", "", head, rule,
              "| `fedge prepare` (install step, s) |" + cells(lambda r: "—" if r["prepare"] is None
                                                             else f"{r['prepare']:.0f}"),
              "| **`fedge simulate` wall time (s)** |" + cells(lambda r: f"**{r['wall']:.0f}**")]
    for name in res["phases"]:
        lines.append(f"| {name} (s) |" + cells(lambda r, n=name: f"{r['phases'][n]:.0f}"))
    for r0 in rows:
        lines.append(f"| round {r0['round']} (s) |" + cells(lambda r, k=r0["round"]: f"{r['rows'][k]['seconds']:.1f}"))
    lines += ["| peak memory, driver + Ray (GiB) |" + cells(lambda r: f"{r['peak_rss'] / 2**30:.2f}"),
              "| held-out loss, base → final |" + cells(lambda r: f"{r['summary']['initial_central_loss']:.4f} → "
                                                        f"{r['summary']['final_central_loss']:.4f}"), ""]
    if old:
        lines += [f"Ratio of wall times, this tree / {args.ref}: **{res['wall'] / old['wall']:.2f}**.", ""]
    for smp in s.get("samples") or []:
        lines += [f"Prompt ({smp.get('source', '')}): {smp['prompt']}", "",
                  f"- reference: {smp.get('reference')}",
                  f"- base: {smp['base']}", f"- fine-tuned: {smp['finetuned']}", ""]

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
