"""Secure aggregation: what it costs per round, measured side by side with plain FedAvg.

The real protocol (server/secagg.py driving clients/secagg.py's stage handlers) over an
in-process loopback transport (tests/test_secagg.py), on deltas the size of the default
scenario's adapter (SmolLM2-135M, LoRA r=8 on q, v: 30 layers x (8x576 + 576x8 + 8x576 + 192x8)
= 460,800 values), so the figures are the protocol's own cost, without training.

Reports per configuration: client seconds per round (mean over clients: key setup, shares,
masking), server seconds (routing, unmasking), upload bytes per client (masked uint64 vector
+ keys + ciphertexts) against the plain fp32 delta, and the largest error against the plain
weighted mean.

Usage: python benchmarks/secagg_bench.py [--out benchmarks/results/secagg.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {}
for layer in range(30):
    for mod, out in (("q_proj", 576), ("v_proj", 192)):
        SHAPES[f"layers.{layer}.{mod}.lora_A"] = (8, 576)
        SHAPES[f"layers.{layer}.{mod}.lora_B"] = (out, 8)


def one(n: int, k: int, drop: int) -> dict:
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    import tests.test_secagg as T
    from fedge import deltas, protocol as P
    from server.secagg import SecAggParams, secure_train_round
    from strategies import build

    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = 1
    T.SHAPES = SHAPES
    rng = np.random.default_rng(0)
    ds = [{k_: 1e-3 * rng.standard_normal(s) for k_, s in SHAPES.items()} for _ in range(n)]
    w = rng.integers(50, 200, n).astype(float).tolist()
    fail = {(101 + i, P.SA_TRAIN_TYPE) for i in range(drop)}

    class Timed(T.LoopbackGrid):
        client_s = 0.0

        def _handle(self, msg):
            t0 = time.perf_counter()
            try:
                return super()._handle(msg)
            finally:
                self.client_s += time.perf_counter() - t0

    grid = Timed(ds, w, fail)
    strategy = build("fedavg", clients_per_round=n, min_replies=2, base_hash="h")
    current = {k_: np.zeros(s) for k_, s in SHAPES.items()}
    t0 = time.perf_counter()
    arrays, _ = secure_train_round(grid, strategy, 1, deltas.to_record(current), ConfigRecord({}),
                                   params=SecAggParams(neighbours=k, threshold=0.67, fraction_bits=32), timeout=60)
    total = time.perf_counter() - t0
    got = deltas.from_record(arrays)
    keep = range(drop, n)
    wk = np.array([w[i] for i in keep])
    want = {k_: sum(wi * ds[i][k_] for wi, i in zip(wk, keep)) / wk.sum() for k_ in SHAPES}
    err = max(float(np.abs(got[k_] - want[k_]).max()) for k_ in SHAPES)
    rep = strategy.report.secure
    d = sum(int(np.prod(s)) for s in SHAPES.values())
    up = 8 * (d + 4) + (rep["overhead_bytes"]) / max(1, n)
    return {"n": n, "k": rep["neighbours"], "drop": drop, "t": rep["threshold"],
            "client_s": grid.client_s / n, "server_s": total - grid.client_s,
            "up_bytes": up, "plain_bytes": 4 * d, "err": err}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "secagg.md"))
    args = ap.parse_args()
    rows = [one(8, 0, 0), one(8, 0, 1), one(20, 0, 0), one(20, 6, 0), one(20, 6, 2), one(50, 8, 0), one(50, 8, 3)]
    lines = ["# Secure aggregation cost (benchmarks/secagg_bench.py)", "",
             f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
             f"adapter of the default scenario: {sum(int(np.prod(s)) for s in SHAPES.values()):,} values; "
             "fraction bits 32, threshold fraction 0.67. One process plays every client in turn, so client "
             "seconds are per client (mean), server seconds are the rest of the round.", "",
             "| clients n | neighbours k | dropped after sharing | threshold t | client s/round | server s/round "
             "| upload per client (B) | / plain fp32 delta | max abs error vs plain mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['k']} | {r['drop']} | {r['t']} | {r['client_s']:.3f} | {r['server_s']:.3f} | "
                     f"{r['up_bytes']:,.0f} | {r['up_bytes'] / r['plain_bytes']:.2f} | {r['err']:.1e} |")
    lines += ["", "Reading it: the masked vector is 64-bit fixed point, so the upload is ~2x the fp32 delta "
              "(keys and encrypted shares add O(k) small messages). Client cost grows with k (one AES-CTR "
              "stream per neighbour); the server's grows with n and with dropouts (each dropped client's pair "
              "masks are rebuilt for each of its neighbours). SecAgg+ (k < n-1) keeps both bounded as n grows. "
              "A local training round of the default model takes ~30-60 s on this machine "
              "(benchmarks/results/federation.md)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
