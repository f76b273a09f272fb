"""Scale on one machine: registered virtual clients vs peak memory and round time.

A tiny seeded Llama (2 layers, hidden 32) classifies the packaged chatterbot
utterances by language; N virtual clients (IID partitions), 20 sampled per
round, 3 rounds, on Flower's simulation engine. Round 1 includes the one-off
identity query of every registered node (see strategies/base.py `discover`).

Usage: python benchmarks/scale_bench.py [--sizes 100,1000,10000] [--out benchmarks/results/scale.md]
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

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import run_measured  # noqa: E402


def run(n: int, model_dir: Path, work: Path, per_round: int) -> dict:
    run_dir = work / f"n{n}"
    sets = [f"model.source={model_dir}", "model.task=sequence-classification", "model.max_length=32",
            "lora.r=2", "lora.alpha=4", "data.source=chatterbot-language-id", "data.languages=[all]",
            "data.partition=iid", f"data.num_clients={n}", "data.global_holdout_fraction=0.02",
            "data.max_eval_examples=64", "train.local_steps=2", "train.batch_size=2",
            "federation.num_rounds=3", f"federation.clients_per_round={per_round}",
            "federation.evaluate_clients_per_round=0", f"federation.min_replies={per_round // 2}",
            "export.enabled=false", "simulation.client_cpus=1"]
    cmd = [str(Path(sys.executable).parent / "fedge"), "simulate", "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    rc, out, wall, peak = run_measured(cmd, cwd=work)
    if rc != 0:
        return {"n": n, "error": out[-2000:]}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return {"n": n, "wall": wall, "peak_rss": peak, "rounds": [r["seconds"] for r in rows],
            "accepted": [r["accepted"] for r in rows], "server_rss_mb": [r["server_rss_mb"] for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.md"))
    args = ap.parse_args()
    from tests.conftest import make_tiny_llama

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_llama(work / "tiny-llama")
        for n in (int(x) for x in args.sizes.split(",")):
            print(f"N = {n} ...", flush=True)
            results.append(run(n, model, work, args.per_round))
            print(results[-1], flush=True)
    lines = ["# Scale on one machine (virtual clients registered vs memory and round time)", "",
             f"Machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
             f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             f"`python benchmarks/scale_bench.py --sizes {args.sizes}`. Tiny Llama (hidden 32) "
             f"classifying chatterbot utterances by language, IID partitions, {args.per_round} clients "
             "sampled per round, 2 local steps, 3 rounds, 2 Ray actors. Run at nice 19 while the test suite ran: timings are upper bounds.", "",
             "| registered clients | wall time (s) | round 1 (s, incl. identity query of all nodes) | "
             "rounds 2-3 (s) | accepted per round | peak RSS, all processes (GiB) | server RSS per round (MiB) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['n']:,} | failed: {r['error'].splitlines()[-1][:120]} | | | | | |")
            continue
        lines.append(f"| {r['n']:,} | {r['wall']:.0f} | {r['rounds'][0]:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in r['rounds'][1:])} | {', '.join(map(str, r['accepted']))} | "
                     f"{r['peak_rss'] / 2**30:.2f} | {', '.join(f'{x:.0f}' for x in r['server_rss_mb'])} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
