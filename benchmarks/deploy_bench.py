"""Per-round wall time: deployment (SuperLink + 3 SuperNodes on loopback) vs simulation.

Same scenario for both: the tiny seeded Llama of the tests (so the figures are the
orchestration overhead, not training), 3 clients, 3 rounds, local evaluation on 2
clients per round (two message exchanges per round). Round 1 also carries the one-off
identity query. Deployment: insecure loopback SuperLink, 3 SuperNodes each with its own
node config, the app submitted with ``flwr run`` — the processes of ``fedge server`` /
``fedge client`` (fedge.launch). Simulation: ``fedge simulate`` in-process (Ray).

Also: seconds a fresh Python process needs to import the ClientApp module and to load the
default base model (SmolLM2-135M) with its hash — what every ClientApp process pays.

Usage: python benchmarks/deploy_bench.py [--label after] [--out benchmarks/results/deploy.md]
(appends one section per label to the output file)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _fresh_process_seconds(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="current")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deploy.md"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from fedge import config as fcfg
    from fedge import launch as D
    from simulations.runner import simulate
    from tests.conftest import make_tiny_llama, tiny_scenario_overrides

    tmp = Path(tempfile.mkdtemp(prefix="fedge-deploy-bench-"))
    model = make_tiny_llama(tmp / "tiny-llama")
    over = tiny_scenario_overrides(model) + [f"federation.num_rounds={args.rounds}", "export.enabled=false",
                                             "federation.round_timeout_s=120"]
    scenario = D.write_scenario(tmp / "tiny.yaml", "default", over)

    # Simulation
    sim_dir = tmp / "sim"
    simulate(fcfg.load("default", over), sim_dir)
    sim = [r["seconds"] for r in D.read_metrics(sim_dir)[1:]]

    # Deployment
    port = D.free_port()
    procs = [D.start_superlink(port=port, home=tmp / "superlink")]
    try:
        for i in range(3):
            procs.append(D.start_supernode(superlink=f"127.0.0.1:{port}", home=tmp / f"shop-{i}",
                                           node_config={"partition-id": i, "num-partitions": 3,
                                                        "device-id": f"shop-{i}"},
                                           clientappio_port=D.free_port()))
        D.write_connection(tmp / "cli", "fedge", f"127.0.0.1:{port}")
        t0 = time.monotonic()
        D.submit_run(ROOT, connection="fedge", flwr_home=tmp / "cli", scenario=scenario, run_dir=tmp / "dep")
        rows = D.wait_for_rounds(tmp / "dep", args.rounds, timeout=1200, procs=procs)
        total = time.monotonic() - t0
    finally:
        for p in reversed(procs):
            D.stop(p)
    dep = [r["seconds"] for r in rows[1:]]

    imp = statistics.median(_fresh_process_seconds("import clients.app") for _ in range(3))
    load = statistics.median(_fresh_process_seconds(
        "from fedge.models import load_base; load_base('smollm2-135m-instruct')") for _ in range(2))
    later_dep, later_sim = statistics.median(dep[1:]), statistics.median(sim[1:])
    section = [
        f"## {args.label} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
        f"{platform.python_version()})", "",
        "| | round 1 (s) | later rounds, median (s) | per round, each |",
        "|---|---:|---:|---|",
        f"| simulation | {sim[0]:.1f} | {later_sim:.1f} | {', '.join(f'{s:.1f}' for s in sim)} |",
        f"| deployment (3 SuperNodes) | {dep[0]:.1f} | {later_dep:.1f} | {', '.join(f'{s:.1f}' for s in dep)} |",
        "",
        f"Deployment / simulation, later rounds: {later_dep / later_sim:.1f}x; deployment overhead per round "
        f"{later_dep - later_sim:.1f} s. Submit to round {args.rounds}: {total:.0f} s.",
        f"Fresh process: `import clients.app` {imp:.2f} s; load SmolLM2 base + hash {load:.2f} s (median).",
        "",
    ]
    out = Path(args.out)
    if not out.exists():
        out.write_text("# Deployment overhead (benchmarks/deploy_bench.py)\n\n" + (__doc__ or "").split("\n\n")[1]
                       + "\n\n")
    with open(out, "a") as f:
        f.write("\n".join(section) + "\n")
    print("\n".join(section))
    print(json.dumps({"sim": sim, "deploy": dep}))


if __name__ == "__main__":
    main()
