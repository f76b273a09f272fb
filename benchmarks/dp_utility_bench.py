"""The privacy–utility curve: accuracy against ε on Reuters R8, record and user level.

Every row is a whole federation run with `fedge simulate` (Flower's simulation
engine, real Opacus, real PEFT), on the official R8 test split (2,189 documents):

* ``central``  one client holding all training data, the same examples per round as
               the federation (scenario ``reuters`` with 1 client × 10× the local steps);
* ``none``     the federation without DP (scenario ``reuters``: 10 branches, FedAvg);
* ``record``   DP-SGD on every branch at ε ∈ {1, 2, 4, 8} (scenario ``dp-record``);
* ``user``     user-level DP at ε ∈ {1, 2, 4, 8} (scenario ``dp-user``: ≥ 500 clients).

ε in the CSV is the target; ``epsilon_spent`` is what the run's privacy ledger
reports (max over clients for record level). ``plateau_round`` is the first round
after which held-out accuracy never rises by more than 0.5 points (empty for a row evaluated
after its last round only, ``--set federation.evaluate_every=<rounds>``: half a record row's time is evaluation).

Usage:
    python benchmarks/dp_utility_bench.py run --rows none,central,record:8 --seeds 0
    python benchmarks/dp_utility_bench.py report      # table + PNG from the CSV
Rows are appended to benchmarks/results/dp_utility.csv as they finish (a long
sweep can be stopped and resumed; ``run`` skips rows already in the CSV).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CSV = RESULTS / "dp_utility.csv"
COLUMNS = ["dataset", "level", "epsilon", "seed", "accuracy", "best_accuracy", "plateau_round", "rounds",
           "epsilon_spent", "delta", "noise_multiplier", "seconds", "scenario", "overrides", "curve"]

# level -> (scenario, overrides); the ε of DP rows is set per row.
SETTINGS = {
    "none": ("reuters", []),
    "central": ("reuters", ["data.num_clients=1", "data.partition=iid", "federation.clients_per_round=1",
                            "federation.min_replies=1", "train.local_steps=320",
                            # one client would leave a core idle: it gets both (speed, not the result)
                            "simulation.client_cpus=2", "simulation.torch_threads=2"]),
    "record": ("dp-record", []),
    "user": ("dp-user", []),
}

# Item 0's other datasets: federated (``none``) against centralized (``central``) only, no DP.
# dataset -> (scenario, overrides for every row, local steps of the central row = steps × clients per round)
DATASETS = {
    "reuters-r8": (None, [], None),
    "reuters-r52": ("reuters", ["data.source=reuters-r52", "data.max_eval_examples=2568"], 320),
    "language-id": ("classify", [], 100),  # 20 clients, 10 per round × 10 steps
}


def level_settings(dataset: str, level: str) -> tuple[str, list[str]]:
    """(scenario, overrides) of one row; reuters-r8 keeps the level's own settings (and its CSV keys)."""
    scenario, sets, central_steps = DATASETS[dataset]
    if scenario is None:
        return SETTINGS[level]
    if level not in ("none", "central"):
        raise SystemExit(f"--dataset {dataset}: only the rows none and central (the DP curve is on reuters-r8)")
    if level == "none":
        return scenario, list(sets)
    central = [o if not o.startswith("train.local_steps=") else f"train.local_steps={central_steps}"
               for o in SETTINGS["central"][1]]
    return scenario, [*sets, *central]


def parse_rows(spec: str) -> list[tuple[str, float | None]]:
    """'none,central,record:8,user:2' -> [(level, ε or None), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        level, _, eps = item.partition(":")
        if level not in SETTINGS:
            raise SystemExit(f"unknown level {level!r}; choose from {sorted(SETTINGS)}")
        if (level in ("record", "user")) != bool(eps):
            raise SystemExit(f"{item!r}: DP levels need an ε (record:8), others none")
        out.append((level, float(eps) if eps else None))
    return out


def plateau_round(acc: list[float], tol: float = 0.005) -> int:
    """First round r (1-based) after which accuracy never exceeds acc[r] + tol."""
    for r in range(len(acc)):
        if all(a <= acc[r] + tol for a in acc[r + 1:]):
            return r + 1
    return len(acc)


def run_row(level: str, eps: float | None, seed: int, extra: list[str], dataset: str = "reuters-r8") -> dict:
    scenario, overrides = level_settings(dataset, level)
    sets = [*overrides, f"seed={seed}", *extra]
    if level == "record":
        sets.append(f"privacy.dp_sgd.target_epsilon={eps}")
    if level == "user":
        sets.append(f"privacy.user_level.target_epsilon={eps}")
    with tempfile.TemporaryDirectory(prefix="fedge-dpu-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedge.cli", "simulate", scenario, "--run-dir", str(run_dir), "--quiet",
               *[a for s in sets for a in ("--set", s)]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{level} ε={eps} seed={seed} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        privacy = json.loads((run_dir / "privacy.json").read_text())
        # σ each device calibrated for itself (its own sample rate), from its accountant history
        zs = [v for f in sorted((run_dir / "client-state").glob("*/dp-sgd-history.json"))
              for v in json.loads(f.read_text())["dp-history-noise"]]
    evaluated = [r for r in rows[1:] if r.get("central_accuracy") is not None]  # every k-th round (evaluate_every)
    acc, at = [r["central_accuracy"] for r in evaluated], [int(r["round"]) for r in evaluated]
    spent, delta, z = "", "", ""
    if "record_level" in privacy:
        spent = max(privacy["record_level"]["epsilon"].values())
        delta = privacy["record_level"]["delta"]
        z = f"{min(zs):.3f}-{max(zs):.3f}" if zs else ""
    if "user_level" in privacy:
        spent, delta = privacy["user_level"]["epsilon"], privacy["user_level"]["delta"]
    return {"dataset": dataset, "level": level, "epsilon": "" if eps is None else eps, "seed": seed,
            "accuracy": round(acc[-1], 4), "best_accuracy": round(max(acc), 4),
            "plateau_round": at[plateau_round(acc) - 1] if len(acc) > 1 else "", "rounds": at[-1],
            "epsilon_spent": "" if spent == "" else round(float(spent), 4), "delta": delta,
            "noise_multiplier": z, "seconds": round(seconds, 1), "scenario": scenario, "overrides": ";".join(sets),
            "curve": json.dumps([round(rows[0].get("central_accuracy") or 0.0, 4), *[round(a, 4) for a in acc]])}


_EPS = (1.0, 2.0, 4.0, 8.0)
# The curves the PNG draws: (label, level, {ε: variant}) with '' = today's scenario default. The probe's head lr
# falls with ε (dp-record.yaml; benchmarks/results/dp_head_replay_b192.md), so its curve takes lr 0.25 at ε ≤ 2.
PLOT = [
    ("record level, dp-record: private probe, B = 192 (head lr 1.0; 0.25 at ε ≤ 2)", "record",
     {1.0: "train.head_lr=0.25", 2.0: "train.head_lr=0.25", 4.0: "", 8.0: ""}),
    ("record level: FFA-LoRA r = 2, B = 48, head lr 0.5", "record",
     dict.fromkeys(_EPS, "strategy.name=ffa-lora;train.batch_size=48;train.head_lr=0.5")),
    ("user level, dp-user: FFA-LoRA r = 2 (500 devices)", "user", dict.fromkeys(_EPS, "")),
    ("user level: private probe (strategy.name=head-only)", "user", dict.fromkeys(_EPS, "strategy.name=head-only")),
]


def read_csv() -> list[dict]:
    if not CSV.exists():
        return []
    with open(CSV, newline="") as f:
        return list(csv.DictReader(f))


def append_csv(row: dict) -> None:
    new = not CSV.exists()
    with open(CSV, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def cmd_run(args) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = {(r["dataset"], r["level"], r["epsilon"], r["seed"], r["overrides"]) for r in read_csv()}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for level, eps in parse_rows(args.rows):
            row_key_sets = [*level_settings(args.dataset, level)[1], f"seed={seed}", *args.set]
            if level == "record":
                row_key_sets.append(f"privacy.dp_sgd.target_epsilon={eps}")
            if level == "user":
                row_key_sets.append(f"privacy.user_level.target_epsilon={eps}")
            key = (args.dataset, level, "" if eps is None else str(eps), str(seed), ";".join(row_key_sets))
            if key in done:
                print(f"skip {key[:4]} (in the CSV)", flush=True)
                continue
            row = run_row(level, eps, seed, args.set, args.dataset)
            append_csv(row)
            print(f"{args.dataset} {level:>8} ε={row['epsilon'] or '—':>4} seed {seed}: acc {row['accuracy']:.4f} "
                  f"(best {row['best_accuracy']:.4f}, plateau round {row['plateau_round'] or '—'}/{row['rounds']}) "
                  f"ε spent {row['epsilon_spent'] or '—'}  {row['seconds']:.0f} s", flush=True)
    return 0


@functools.cache
def _is_scenario_default(scenario: str, override: str) -> bool:
    """Whether ``override`` leaves the scenario as it is today (so older rows join the default's group)."""
    from fedge import config as fcfg

    try:
        return fcfg.load(scenario, [override]).digest() == fcfg.load(scenario, []).digest()
    except fcfg.ConfigError:  # valid only with the row's other overrides (e.g. pooling=mean without export)
        return False


# Overrides that change when the model is measured, not how it trains (tests/test_simulation.py::
# test_central_evaluation_every_k_rounds_leaves_training_bitwise_unchanged): rows differing only in them share a
# variant. A row evaluated after the last round alone has no plateau round.
CADENCE = ("federation.evaluate_every=",)


def variant(row: dict) -> str:
    """The row's overrides beyond the level's own, the seed, the ε and today's scenario values
    (e.g. 'model.pooling=cls'). Rows keep every override they ran with, so a row run before a
    scenario default changed stays apart from the rows run with the new default."""
    own = set(level_settings(row.get("dataset") or "reuters-r8", row["level"])[1])
    return ";".join(o for o in row["overrides"].split(";")
                    if o and o not in own and not o.startswith(("seed=", *CADENCE)) and "target_epsilon=" not in o
                    and not _is_scenario_default(row["scenario"], o))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def federated_vs_central(rows: list[dict]) -> list[str]:
    """Item 0's table: per dataset and settings, the federation without DP against one client holding
    all the training data and taking the same examples per round (scenario defaults first)."""
    out = ["## Federated vs centralized, no DP (every dataset)", "",
           "Each line compares the two levels under the same settings (*variant*: what differs from today's "
           "scenario). *plateau*: the first round after which test accuracy never rises by more than 0.5 points, "
           "of the rounds run.", "",
           "| dataset | scenario | variant | federated: final acc | best | plateau round | centralized: final acc | "
           "best | plateau round | Δ final (fed − central) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(c: tuple | None) -> str:
        return f"{c[0]:.4f} ({c[3]} seed{'s' * (c[3] > 1)}) | {c[1]:.4f} | {c[2]}" if c else "— | — | —"

    for dataset in DATASETS:
        mine = [r for r in rows if r["dataset"] == dataset and r["level"] in ("none", "central")]
        for var in sorted({variant(r) for r in mine}, key=lambda v: (v != "", v)):
            cells = {}
            for level in ("none", "central"):
                rs = [r for r in mine if r["level"] == level and variant(r) == var]
                if rs:
                    cells[level] = (_mean_std([float(r["accuracy"]) for r in rs])[0],
                                    _mean_std([float(r["best_accuracy"]) for r in rs])[0],
                                    ", ".join(r["plateau_round"] + "/" + r["rounds"] for r in rs), len(rs),
                                    rs[0]["scenario"])
            if len(cells) < 2 and var:
                continue  # a variant measured at one level only compares with nothing
            gap = f"{100 * (cells['none'][0] - cells['central'][0]):+.1f} pts" if len(cells) == 2 else "—"
            scen = next(iter(cells.values()))[4]
            out.append(f"| {dataset} | {scen} | {var or 'scenario default'} | {fmt(cells.get('none'))} | "
                       f"{fmt(cells.get('central'))} | {gap} |")
    return out


def cmd_report(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = read_csv()
    rows = [r for r in everything if r["dataset"] == "reuters-r8"]
    groups: dict[tuple[str, str, str], list[dict]] = {}  # (level, ε, variant) -> seeds
    for r in rows:
        groups.setdefault((r["level"], r["epsilon"], variant(r)), []).append(r)
    # The gap is measured against the best non-DP federation measured (any variant): a DP recipe
    # must not look closer than it is because its baseline used a weaker head or optimizer.
    nones = {var: _mean_std([float(r["accuracy"]) for r in rs])[0] for (lv, _, var), rs in groups.items()
             if lv == "none"}
    base_var = max(nones, key=lambda v: nones[v]) if nones else None
    base_acc = nones[base_var] if nones else None
    # The seed also draws the Dirichlet split: a DP row is compared with the non-DP run of its own seed too,
    # with the scenario's own settings (same input length: every DP row uses them).
    none_by_seed = {r["seed"]: float(r["accuracy"]) for r in groups.get(("none", "", ""), [])}
    lines = ["# Privacy–utility curve: Reuters R8 (MiniLM-L6 + LoRA, official test split)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU. Each row is a whole "
             "`fedge simulate` run; accuracy is the final round's central accuracy on the 2,189 test documents; "
             "ε spent comes from the run's privacy ledger (record level: the largest over clients). "
             "Raw rows: `dp_utility.csv`. Produced by `benchmarks/dp_utility_bench.py`. Δ is measured against the "
             f"best federated non-DP row ({base_var or 'scenario default'}: {base_acc or 0:.4f}); the paired Δ against the "
             "non-DP run of the same seed (same split) with the scenario's own settings, over the seeds that have one. "
             "The PNG draws the curves named in `PLOT`; every row is in this table.", "",
             "| level | target ε | variant | seeds | accuracy (mean ± sd) | Δ vs federated non-DP | paired Δ (seeds) | "
             "best round acc | plateau round | ε spent | σ | s/run |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    order = {"central": 0, "none": 1, "record": 2, "user": 3}
    for (level, eps, var), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], float(kv[0][1] or 0),
                                                                        kv[0][2])):
        m, s = _mean_std([float(r["accuracy"]) for r in rs])
        best = _mean_std([float(r["best_accuracy"]) for r in rs])[0]
        gap = "—" if base_acc is None or level == "none" else f"{100 * (m - base_acc):+.1f} pts"
        pairs = [float(r["accuracy"]) - none_by_seed[r["seed"]] for r in rs if r["seed"] in none_by_seed]
        paired = ("—" if level == "none" or not pairs else
                  f"{100 * sum(pairs) / len(pairs):+.1f} pts ({','.join(r['seed'] for r in rs if r['seed'] in none_by_seed)})")
        spent = ", ".join(sorted({r["epsilon_spent"] for r in rs if r["epsilon_spent"]})) or "—"
        z = ", ".join(sorted({r["noise_multiplier"] for r in rs if r["noise_multiplier"]})) or "—"
        pl = ", ".join((r["plateau_round"] or "—") + "/" + r["rounds"] for r in rs)
        secs = _mean_std([float(r["seconds"]) for r in rs])[0]
        lines.append(f"| {level} | {eps or '—'} | {var or 'scenario default'} | {len(rs)} | {m:.4f} ± {s:.4f} | "
                     f"{gap} | {paired} | {best:.4f} | {pl} | "
                     f"{spent} | {z} | {secs:.0f} |")
    lines += ["", *federated_vs_central(everything)]
    (RESULTS / "dp_utility.md").write_text("\n".join(lines) + "\n" + args.notes_text())

    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    for label, lv, var_of in PLOT:
        pts = sorted((float(e), [float(r["accuracy"]) for r in rs]) for (lv2, e, v), rs in groups.items()
                     if lv2 == lv and e and var_of.get(float(e)) == v)
        if not pts:
            continue
        ms = [_mean_std(p[1]) for p in pts]
        ax.errorbar([p[0] for p in pts], [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                    label=label)
    for level, style in (("none", "--"), ("central", ":")):
        rs = groups.get((level, "", (base_var or "") if level == "none" else ""), [])
        if rs:
            m, s = _mean_std([float(r["accuracy"]) for r in rs])
            ax.axhline(m, linestyle=style, color="k", label=f"{'federated' if level == 'none' else 'centralized'} "
                       f"non-DP ({m:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ε (δ = 1e-5 record level)")
    ax.set_ylabel("test accuracy (Reuters R8)")
    ax.set_title("fedge privacy–utility, Reuters R8, MiniLM-L6 (mean ± sd over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "dp_utility.png", dpi=120)
    print((RESULTS / "dp_utility.md").read_text())
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--rows", default="central,none,record:1,record:2,record:4,record:8")
    r.add_argument("--seeds", default="0")
    r.add_argument("--set", action="append", default=[], help="extra override for every row")
    r.add_argument("--dataset", default="reuters-r8", choices=sorted(DATASETS),
                   help="reuters-r8: every level; the others: none and central (item 0)")
    r.set_defaults(fn=cmd_run)
    rep = sub.add_parser("report")
    rep.add_argument("--notes", default=str(RESULTS / "dp_utility.notes.md"),
                     help="markdown appended under the table (findings, what was cut)")
    rep.set_defaults(fn=cmd_report)
    args = p.parse_args()
    args.notes_text = lambda: Path(args.notes).read_text() if Path(args.notes).exists() else ""
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
