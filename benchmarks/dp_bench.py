"""Differential privacy: cost and utility, measured side by side in one run.

1. DP-SGD step time / plain step time on the default model (SmolLM2-135M, LoRA
   r=8 on q, v), both with the sampling the accountant assumes (Poisson, expected
   batch 4, answers of the packaged corpus), same examples, interleaved repeats.
2. Utility on the classification scenario (MiniLM language ID, 20 clients):
   no DP, record-level DP-SGD at ε = 8 and ε = 2 (δ = 1e-5), and user-level DP,
   with the ε actually spent as reported by the run's privacy ledger.

Usage: python benchmarks/dp_bench.py [--out benchmarks/results/dp.md] [--skip-utility]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def step_times(repeats: int = 6) -> dict:
    import torch

    from fedge import config as fcfg
    from fedge import models
    from fedge.data import data_args, federated_split
    from fedge.data.tokenize import encode_dataset
    from fedge.privacy import dpsgd
    from fedge.train import train_local

    torch.set_num_threads(1)
    cfg = fcfg.load("default", ["model.max_length=64"])
    base = models.load_base(cfg.model.source)
    peft = models.add_lora(base.model, task="causal-lm", r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    train, _ = federated_split(**data_args(cfg)).clients[0]
    ex = encode_dataset(base.tokenizer, train, task="causal-lm", max_length=64)
    q = 4 / len(ex)
    start = models.get_adapter_state(peft)
    plain, dp = [], []
    for r in range(repeats):  # interleaved, so drift in machine load hits both alike
        models.set_adapter_state(peft, start)
        rng = np.random.default_rng(r)
        batches = dpsgd.poisson_batches(len(ex), sample_rate=q, steps=2, rng=rng)
        sizes = [len(b) for b in batches]
        # plain step on exactly the same Poisson batches: AdamW, no clipping, no noise
        t0 = time.perf_counter()
        opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
        from fedge.data.tokenize import collate
        from fedge.train import per_example_loss

        for b in batches:
            if len(b) == 0:
                continue
            loss = per_example_loss(peft, collate([ex[i] for i in b], task="causal-lm", pad_id=base.tokenizer.pad_token_id), task="causal-lm").mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        plain.append((time.perf_counter() - t0) / max(1, sum(1 for s in sizes if s)))
        models.set_adapter_state(peft, start)
        opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
        t0 = time.perf_counter()
        dpsgd.dp_sgd_steps(peft, ex, [b for b in batches if len(b)], task="causal-lm", pad_id=base.tokenizer.pad_token_id,
                           optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                           generator=torch.Generator().manual_seed(r))
        dp.append((time.perf_counter() - t0) / max(1, sum(1 for s in sizes if s)))
    del train_local
    return {"plain": statistics.median(plain), "dp": statistics.median(dp), "n_examples": len(ex)}


def utility(work: Path, *, scenario: str = "classify", common: tuple[str, ...] = ("federation.num_rounds=4",),
            user_delta: str = "1e-3") -> list[dict]:
    from fedge import config as fcfg
    from simulations.runner import simulate

    common = [*common, "export.enabled=false"]
    variants = [
        ("no DP", []),
        ("DP-SGD ε=8", ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.target_epsilon=8", "privacy.dp_sgd.delta=1e-5"]),
        ("DP-SGD ε=2", ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.target_epsilon=2", "privacy.dp_sgd.delta=1e-5"]),
        ("user-level z=0.8, S=0.5", ["privacy.user_level.enabled=true", "privacy.user_level.noise_multiplier=0.8",
                                      "privacy.user_level.clip_norm=0.5", f"privacy.user_level.delta={user_delta}"]),
    ]
    rows = []
    for name, extra in variants:
        cfg = fcfg.load(scenario, common + extra)
        t0 = time.perf_counter()
        s = simulate(cfg, work / name.replace(" ", "_").replace("=", ""))
        p = s["privacy"]
        eps = "—"
        if "user_level" in p:
            eps = f"user-level ε = {p['user_level']['epsilon']:.2f} (δ = {p['user_level']['delta']:g})"
        elif "record_level" in p:
            e = p["record_level"]["epsilon"]
            eps = f"record-level ε ≤ {max(e.values()):.2f} (δ = {p['record_level']['delta']:g}, {len(e)} clients)"
        rows.append({"name": name, "acc": s["final_central_accuracy"] or float("nan"), "loss": s["final_central_loss"],
                     "eps": eps, "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dp.md"))
    ap.add_argument("--skip-utility", action="store_true")
    ap.add_argument("--causal-only", action="store_true",
                    help="only the utility of the default (causal LM) scenario, appended to --out")
    args = ap.parse_args()
    if args.causal_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = utility(Path(tmp), scenario="default", common=(), user_delta="1e-2")
        lines = ["", "## Utility (default scenario: SmolLM2 chat, 8 branches, 3 rounds; central held-out loss)", "",
                 f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
                 "`python benchmarks/dp_bench.py --causal-only` (at nice 19 beside the test suite: wall times are upper "
                 "bounds). Round 0 (base model + empty adapter) is in each run's metrics.jsonl.", "",
                 "| setting | held-out loss | privacy spent (from the run's ledger) | wall (s) |", "|---|---:|---|---:|"]
        lines += [f"| {r['name']} | {r['loss']:.3f} | {r['eps']} | {r['seconds']:.0f} |" for r in rows]
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    st = step_times()
    lines = ["# Differential privacy: cost and utility", "",
             f"Machine: {os.cpu_count()} cores (shared), Python {platform.python_version()}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. `python benchmarks/dp_bench.py`.", "",
             "## DP-SGD step / plain step (SmolLM2-135M, LoRA r=8 q,v, 1 thread)", "",
             "Same Poisson batches (expected size 4, ≤ 64 tokens) for both; median over interleaved repeats.", "",
             "| | seconds / step |", "|---|---:|",
             f"| plain (AdamW) | {st['plain']:.2f} |", f"| DP-SGD (Opacus hooks, clip + noise) | {st['dp']:.2f} |",
             f"| **ratio DP / plain** | **{st['dp'] / st['plain']:.2f}** |", ""]
    if not args.skip_utility:
        with tempfile.TemporaryDirectory() as tmp:
            rows = utility(Path(tmp))
        lines += ["## Utility (classification scenario: MiniLM language ID, 20 clients, 10 per round, 4 rounds)", "",
                  "| setting | held-out accuracy | held-out loss | privacy spent (from the run's ledger) | wall (s) |",
                  "|---|---:|---:|---|---:|"]
        lines += [f"| {r['name']} | {r['acc']:.3f} | {r['loss']:.3f} | {r['eps']} | {r['seconds']:.0f} |" for r in rows]
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
