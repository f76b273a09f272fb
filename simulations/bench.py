"""``fedge bench strategies``: every strategy on one scenario, several seeds, one table.

    fedge bench strategies --config classify --strategies fedavg,fedprox,fedadam --seeds 3 \
        [--set a.b=value ...] [--param fedprox.mu=0.01 ...] [--out DIR] [--report-dir DIR]

For each strategy s and seed k in 0..N-1 the scenario runs through
:func:`simulations.runner.simulate` with ``strategy.name=s`` and ``seed=k`` into
``DIR/<s>/seed-<k>/``, one run after another (one Ray runtime at a time).

Why runs with the same seed are comparable across strategies: ``seed`` fixes
the data split (global held-out set, Dirichlet/IID partitions, local held-out
sets: ``fedge.data.partition.federated_split``), the initial adapter
(``models.add_lora(seed=...)``), the clients sampled in round t
(``DeltaStrategy.sample``: ``default_rng([seed, t, purpose])`` over nodes sorted
by client name) and each client's local batches
(``SeedSequence([seed, t, partition])``). Only the aggregation rule differs, so
round 0 is identical across strategies, and FedProx with μ = 0 reproduces FedAvg.

Outputs in ``--report-dir`` (default: ``DIR``): ``strategies.md``, ``strategies.csv``
and ``strategies.png``. Per strategy: the final central metric (accuracy for
sequence classification, else held-out loss) as mean ± sample std (n − 1) over
seeds; the round whose seed-mean metric is best; bytes up/down per client per
round; wall time per run (mean, Ray start-up included). A strategy that cannot
run (bad parameters, too few clients for Krum/Bulyan, a crash) is reported as
``failed: reason`` and the others go on. Exit status: 0 when every strategy ran
all seeds, 1 when any failed or diverged (the reports are still written), 2 for
bad arguments. ``--reuse`` skips runs already finished in ``DIR`` with the same
config (to resume an interrupted benchmark or rebuild the reports).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedge import config as fcfg

DEFAULT_STRATEGIES = "fedavg,fedprox,fedadam,fedavgm,median,trimmed-mean"
REPORT_NAME = "strategies"


# -- one run and its outcome ------------------------------------------------------


@dataclass
class SeedRun:
    """One (strategy, seed) run: its per-round metrics, or why it failed."""

    seed: int
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl, round 0..T
    wall_seconds: float | None = None
    error: str | None = None


@dataclass
class StrategyResult:
    name: str
    params: dict
    planned: int = 0  # number of seeds asked for
    runs: list[SeedRun] = field(default_factory=list)
    error: str | None = None  # set when the strategy could not be built at all

    @property
    def ok(self) -> list[SeedRun]:
        return [r for r in self.runs if r.error is None]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _dir_name(strategy: str) -> str:
    """A strategy name or import path as a directory name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", strategy)


def _clear_run_dir(path: Path) -> None:
    """Remove a previous run in ``path``; refuse to delete anything that is not a run."""
    if not path.exists():
        return
    if any(path.iterdir()) and not (path / "config.yaml").exists():
        raise fcfg.ConfigError(f"{path} exists and is not a fedge run directory; choose another --out")
    shutil.rmtree(path)


def run_one(cfg: fcfg.RunConfig, run_dir: Path, *, reuse: bool, on_round=None) -> SeedRun:
    """Simulate ``cfg`` into ``run_dir``; with ``reuse``, read a finished run of the same config instead."""
    from simulations.runner import simulate

    marker = run_dir / "bench.json"
    if reuse and marker.exists():
        done = json.loads(marker.read_text())
        if done.get("config_digest") == cfg.digest() and (run_dir / "metrics.jsonl").exists():
            return SeedRun(seed=cfg.seed, rows=read_metrics(run_dir), wall_seconds=done["wall_seconds"])
    _clear_run_dir(run_dir)
    t0 = time.perf_counter()
    try:
        simulate(cfg, run_dir, on_round=on_round)
    except Exception as err:  # one failed run must not stop the benchmark
        return SeedRun(seed=cfg.seed, rows=read_metrics(run_dir), wall_seconds=time.perf_counter() - t0,
                       error=_one_line(err))
    wall = time.perf_counter() - t0
    marker.write_text(json.dumps({"config_digest": cfg.digest(), "wall_seconds": wall}))
    return SeedRun(seed=cfg.seed, rows=read_metrics(run_dir), wall_seconds=wall)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# -- statistics (pure: lists of metric rows in, numbers out) ----------------------------


def metric_name(task: str) -> str:
    """The headline metric: accuracy for classification, held-out loss otherwise."""
    return "central_accuracy" if task == "sequence-classification" else "central_loss"


def higher_is_better(metric: str) -> bool:
    return metric.endswith("accuracy")


def curves(runs: list[SeedRun], metric: str) -> np.ndarray:
    """(seeds, rounds + 1) array of ``metric``; NaN where a run has no such round or value."""
    n = max((row["round"] + 1 for r in runs for row in r.rows), default=0)
    out = np.full((len(runs), n), np.nan)
    for i, r in enumerate(runs):
        for row in r.rows:
            v = row.get(metric)
            if v is not None:
                out[i, row["round"]] = float(v)
    return out


def mean_std(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (ddof = 1; NaN for a single seed)."""
    x = np.asarray(x, np.float64)
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    std = x.std(axis=axis, ddof=1) if n > 1 else np.full_like(mean, np.nan)
    return mean, std


def summarize(res: StrategyResult, metric: str) -> dict:
    """One table row: final metric mean ± std, best round, bytes and wall time per run."""
    row = {"strategy": res.name, "params": json.dumps(res.params, sort_keys=True) if res.params else "",
           "seeds_ok": len(res.ok), "seeds_total": max(res.planned, len(res.runs)), "metric": metric,
           "final_mean": None, "final_std": None, "final_loss_mean": None, "final_loss_std": None,
           "best_round": None, "best_mean": None,
           "initial_mean": None, "bytes_up_per_client_round": None, "bytes_down_per_client_round": None,
           "wall_s_mean": None, "final_values": "", "status": "ok", "error": ""}
    failed = [r for r in res.runs if r.error]
    if res.error is None and not res.runs:
        row["status"] = "pending"  # reports are rewritten while the benchmark runs
        return row
    if res.error or not res.ok:
        reason = res.error or failed[0].error
        row.update(status="failed", error=reason)
        return row
    if failed:
        row.update(status="partial", error="; ".join(f"seed {r.seed}: {r.error}" for r in failed))
    c = curves(res.ok, metric)
    final = c[:, -1]
    mean, std = mean_std(c)
    row["final_mean"], row["final_std"] = float(mean[-1]), float(std[-1])
    loss_mean, loss_std = mean_std(curves(res.ok, "central_loss")[:, -1])  # the loss too, for classification
    row["final_loss_mean"], row["final_loss_std"] = float(loss_mean), float(loss_std)
    row["initial_mean"] = float(mean[0])
    row["final_values"] = ";".join(f"{v:.6g}" for v in final)
    if np.all(np.isnan(mean)):
        row.update(status="failed", error="no finite metric")
        return row
    best = np.nanargmax(mean) if higher_is_better(metric) else np.nanargmin(mean)
    row["best_round"], row["best_mean"] = int(best), float(mean[best])
    trained = [x for r in res.ok for x in r.rows if x["round"] > 0]
    for key in ("bytes_up_per_client", "bytes_down_per_client"):
        values = [x[key] for x in trained if x.get(key) is not None]
        row[f"{key}_round"] = float(np.mean(values)) if values else None
    walls = [r.wall_seconds for r in res.ok if r.wall_seconds is not None]
    row["wall_s_mean"] = float(np.mean(walls)) if walls else None
    if not np.all(np.isfinite(final)):
        row.update(status="diverged", error="non-finite final metric in some seed")
    return row


def paired_difference(res: StrategyResult, ref: StrategyResult, metric: str) -> tuple[float | None, float | None]:
    """Mean and sample std over seeds of final(res, seed) − final(ref, seed), seeds where both ran.

    Runs with the same seed share data split, initial adapter, sampled clients
    and local batches, so this paired difference is far less noisy than
    comparing the two seed means (whose std includes the seed-to-seed change
    of held-out set and partitions).
    """
    def finals(r: StrategyResult) -> dict[int, float]:
        return {run.seed: float(run.rows[-1][metric]) for run in r.ok
                if run.rows and run.rows[-1].get(metric) is not None}

    a, b = finals(res), finals(ref)
    common = sorted(set(a) & set(b))
    if not common:
        return None, None
    mean, std = mean_std(np.array([a[k] - b[k] for k in common]))
    return float(mean), float(std)


# -- outputs ------------------------------------------------------------------------------

CSV_FIELDS = ["strategy", "status", "params", "seeds_ok", "seeds_total", "metric", "initial_mean",
              "final_mean", "final_std", "final_values", "final_loss_mean", "final_loss_std", "best_round", "best_mean",
              "paired_vs", "paired_diff_mean", "paired_diff_std",
              "bytes_up_per_client_round", "bytes_down_per_client_round", "wall_s_mean", "error"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS})


def _num(v, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _kib(v) -> str:
    return "—" if v is None else f"{v / 1024:,.1f}"


def markdown(rows: list[dict], *, cfg: fcfg.RunConfig, seeds: list[int], command: str, note: str,
             png_name: str) -> str:
    metric = metric_name(cfg.model.task)
    ref = next((r["paired_vs"] for r in rows if r.get("paired_vs")), "—")
    label = "accuracy" if higher_is_better(metric) else "held-out loss"
    spec = ".3f" if higher_is_better(metric) else ".4f"
    loss_head = " final held-out loss |" if metric != "central_loss" else ""
    fed, tr, data = cfg.federation, cfg.train, cfg.data
    lines = [
        "# Strategy comparison", "",
        f"Scenario `{cfg.name}`: model `{cfg.model.source}` ({cfg.model.task}), LoRA r={cfg.lora.r}, "
        f"{data.num_clients} clients ({data.partition}"
        + (f", α={data.alpha:g}" if data.partition == "dirichlet" else "")
        + f"), {fed.clients_per_round} per round, {fed.num_rounds} rounds, {tr.local_steps} local steps × "
        f"batch {tr.batch_size}, local lr {tr.lr:g}, encoding {fed.encoding}. Seeds {seeds}: a seed fixes the "
        "data split, the initial adapter, the clients sampled each round and their local batches, so "
        "strategies differ only in aggregation.", "",
        f"Command: `{command}`", "",
        f"Machine: {machine_note()}" + (f". {note}" if note else ""), "",
        f"Final central {label} (global held-out set, {data.max_eval_examples} examples max) after round "
        f"{fed.num_rounds}: mean ± sample std (n − 1) over seeds. Best round: the round whose seed-mean "
        "is best (0 = the untrained adapter). Δ (paired): mean ± std over seeds of this strategy's final value "
        f"minus {ref}'s at the same seed (same split, sampling and batches, so less noisy). "
        "Bytes: mean per client per round, fp32 payload. "
        "Wall time: one whole run including Ray start-up, mean over seeds.", "",
        f"| strategy | params | final {label} | Δ vs {ref} (paired) |{loss_head} best round ({label}) | "
        "up KiB/client/round | down KiB/client/round | wall s/run | seeds |",
        "|---|---|---:|---:|" + ("---:|" if loss_head else "") + "---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        params = f"`{r['params']}`" if r["params"] else ""
        if r["status"] in ("failed", "pending"):
            what = f"failed: {r['error']}" if r["status"] == "failed" else "pending"
            lines.append(f"| {r['strategy']} | {params} | {what} | — |" + (" — |" if loss_head else "")
                         + f" — | — | — | — | {r['seeds_ok']}/{r['seeds_total']} |")
            continue
        final = f"{_num(r['final_mean'], spec)} ± {_num(r['final_std'], spec)}"
        if r["status"] != "ok":
            final += f" ({r['status']}: {r['error']})"
        paired = f"{_num(r.get('paired_diff_mean'), '+' + spec)} ± {_num(r.get('paired_diff_std'), spec)}"
        if r["strategy"] == ref:
            paired = "(reference)"
        loss = f" {_num(r['final_loss_mean'], '.4f')} ± {_num(r['final_loss_std'], '.4f')} |" if loss_head else ""
        best = f"{r['best_round']} ({_num(r['best_mean'], spec)})"
        lines.append(f"| {r['strategy']} | {params} | {final} | {paired} |{loss} {best} | "
                     f"{_kib(r['bytes_up_per_client_round'])} | {_kib(r['bytes_down_per_client_round'])} | "
                     f"{_num(r['wall_s_mean'], '.0f')} | {r['seeds_ok']}/{r['seeds_total']} |")
    walls = [r["wall_s_mean"] * r["seeds_ok"] for r in rows if r["wall_s_mean"] is not None]
    if walls:
        lines += ["", f"Total wall time of the runs: {sum(walls) / 60:.1f} min (successful runs)."]
    init = [r["initial_mean"] for r in rows if r["initial_mean"] is not None]
    if init:
        lines += ["", f"Round 0 (untrained adapter, same for every strategy at a seed): {label} "
                  f"{_num(init[0], spec)} (seed mean)."]
    lines += ["", f"![{label} per round]({png_name})", ""]
    return "\n".join(lines)


def machine_note() -> str:
    import flwr
    import torch

    return (f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, flwr {flwr.__version__}")


def plot(results: list[StrategyResult], *, task: str, path: Path, title: str) -> None:
    """Metric per round per strategy: seed mean (line) and ± sample std (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["central_accuracy", "central_loss"] if task == "sequence-classification" else ["central_loss"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, metric in zip(axes[0], metrics):
        for i, res in enumerate(results):
            if not res.ok:
                continue
            c = curves(res.ok, metric)
            mean, std = mean_std(c)
            x = np.arange(c.shape[1])
            ax.plot(x, mean, marker="o", ms=3, color=colors(i % 10), label=res.name)
            if c.shape[0] > 1:
                ax.fill_between(x, mean - std, mean + std, color=colors(i % 10), alpha=0.15, linewidth=0)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy" if metric == "central_accuracy" else "held-out loss")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the command --------------------------------------------------------------------------


def parse_params(items: list[str], names: list[str]) -> dict[str, list[str]]:
    """``fedprox.mu=0.01`` -> {"fedprox": ["strategy.params.mu=0.01"]}; the strategy must be benchmarked."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, param = key.rpartition(".")
        if not (eq and dot and name and param):
            raise fcfg.ConfigError(f"--param {item!r} must look like <strategy>.<param>=<value>")
        if name not in out:
            raise fcfg.ConfigError(f"--param {item!r}: strategy {name!r} is not in --strategies {names}")
        out[name].append(f"strategy.params.{param}={value}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedge bench", description="Benchmarks that run whole federations.")
    add_commands(p.add_subparsers(dest="bench", required=True))
    return p


def add_commands(sub) -> None:
    """The benchmarks under ``sub`` (the subparsers of ``fedge bench``); each sets ``bench_fn``."""
    sp = sub.add_parser("strategies", help="compare aggregation strategies on one scenario over several seeds")
    sp.add_argument("--config", default="classify",
                    help="packaged scenario name or path to a YAML file (default: %(default)s)")
    sp.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                    help="comma-separated strategy names or import paths (default: %(default)s)")
    sp.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (default: %(default)s)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field for every run, e.g. --set federation.num_rounds=5")
    sp.add_argument("--param", action="append", default=[], metavar="STRATEGY.PARAM=VALUE",
                    help="a parameter for one strategy only, e.g. --param fedprox.mu=0.01 (repeatable)")
    sp.add_argument("--out", default=None,
                    help="run directories go to OUT/<strategy>/seed-<k>/ (default: runs/bench-strategies-<time>)")
    sp.add_argument("--report-dir", default=None,
                    help=f"where {REPORT_NAME}.md/.csv/.png are written (default: OUT)")
    sp.add_argument("--reuse", action="store_true",
                    help="reuse finished runs in OUT whose config is unchanged instead of running them again")
    sp.add_argument("--note", default="", help="free text for the report's machine line")
    sp.add_argument("--quiet", action="store_true", help="no live view (one line per finished run only)")
    sp.set_defaults(bench_fn=bench_strategies)


def effective_params(name: str, given: dict) -> dict:
    """The strategy's own keyword defaults, overridden by ``given`` (shown in the report)."""
    from server.federation import COMMON_STRATEGY_ARGS
    from strategies.registry import parameters, resolve

    defaults = {k: p.default for k, p in parameters(resolve(name)).items()
                if k not in COMMON_STRATEGY_ARGS and p.default is not p.empty}
    return {**defaults, **given}


def bench_strategies(args, command: str) -> int:
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not names or len(set(names)) != len(names):
        raise fcfg.ConfigError(f"--strategies: give distinct names, got {args.strategies!r}")
    if args.seeds < 1:
        raise fcfg.ConfigError("--seeds must be >= 1")
    params = parse_params(args.param, names)
    seeds = list(range(args.seeds))
    base = fcfg.load(args.config, args.set)  # a bad scenario or --set fails here, before any run
    out = Path(args.out) if args.out else Path(base.run_root) / time.strftime("bench-strategies-%Y%m%d-%H%M%S")
    report_dir = Path(args.report_dir) if args.report_dir else out
    out.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    metric = metric_name(base.model.task)

    # 1. Check every strategy's parameters up front: a typo costs seconds, not a run.
    from fedge.cli import _round_line
    from fedge.progress import LiveView
    from server.federation import build_strategy

    results, configs = [], {}
    for name in names:
        res = StrategyResult(name=name, params={}, planned=len(seeds))
        try:
            cfg = fcfg.load(args.config, [*args.set, f"strategy.name={name}", *params[name]])
            res.params = dict(cfg.strategy.params)
            build_strategy(cfg, base_hash="")
            res.params = effective_params(name, dict(cfg.strategy.params))
            configs[name] = cfg
        except Exception as err:
            res.error = _one_line(err)
            print(f"fedge bench: {name}: failed: {res.error}", file=sys.stderr, flush=True)
        results.append(res)

    # 2. Run strategy x seed, one after another (one Ray runtime at a time).
    todo = [(res, s) for res in results if res.error is None for s in seeds]
    print(f"fedge bench strategies: scenario '{base.name}', {len(todo)} runs "
          f"({len(configs)} strategies x {len(seeds)} seeds), runs in {out}/", flush=True)
    for i, (res, seed) in enumerate(todo, 1):
        cfg = fcfg.load(args.config, [*args.set, f"strategy.name={res.name}", *params[res.name], f"seed={seed}"])
        run_dir = out / _dir_name(res.name) / f"seed-{seed}"
        with LiveView(cfg.federation.num_rounds, format_row=lambda r: "  " + _round_line(r), quiet=args.quiet,
                      title=f"[{i}/{len(todo)}] {res.name} seed {seed}", print_rows=sys.stdout.isatty()) as view:
            run = run_one(cfg, run_dir, reuse=args.reuse, on_round=view.round_done)
        res.runs.append(run)
        last = run.rows[-1] if run.rows else {}
        what = f"failed: {run.error}" if run.error else f"{metric} {_num(last.get(metric), '.4f')}"
        print(f"[{i}/{len(todo)}] {res.name} seed {seed}: {what} ({_num(run.wall_seconds, '.0f')} s)", flush=True)
        # Rewrite the reports after every run: a long benchmark shows progress and survives an interrupt.
        write_reports(results, base=base, seeds=seeds, command=command, note=args.note, report_dir=report_dir)
    rows = write_reports(results, base=base, seeds=seeds, command=command, note=args.note, report_dir=report_dir)
    print((report_dir / f"{REPORT_NAME}.md").read_text())
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def write_reports(results: list[StrategyResult], *, base: fcfg.RunConfig, seeds: list[int], command: str,
                  note: str, report_dir: Path) -> list[dict]:
    metric = metric_name(base.model.task)
    rows = [summarize(r, metric) for r in results]
    ref = next((r for r in results if r.ok), None)  # the first strategy that ran is the reference
    for row, res in zip(rows, results):
        row["paired_vs"] = ref.name if ref else ""
        row["paired_diff_mean"], row["paired_diff_std"] = (
            paired_difference(res, ref, metric) if ref and res.ok else (None, None))
    write_csv(rows, report_dir / f"{REPORT_NAME}.csv")
    png = report_dir / f"{REPORT_NAME}.png"
    (report_dir / f"{REPORT_NAME}.md").write_text(
        markdown(rows, cfg=base, seeds=seeds, command=command, note=note, png_name=png.name))
    plot(results, task=base.model.task, path=png,
         title=f"{base.name}: central evaluation per round, mean ± std over {len(seeds)} seeds")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``fedge bench ...`` (argv without the leading 'bench')."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(build_parser().parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The parsed ``fedge bench`` command; ``argv`` (after 'bench') is recorded as the command that reproduces it."""
    try:
        # The command as it reproduces the results (--reuse only skips finished runs).
        return args.bench_fn(args, command="fedge bench " + shlex.join(a for a in argv if a != "--reuse"))
    except fcfg.ConfigError as err:
        print(f"fedge bench: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
