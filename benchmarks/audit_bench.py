"""Privacy audit: the measured lower bound ε_lb beside the accountant's ε, in one run.

Rows (δ = 1e-5, 95% confidence, one-run bound of Steinke et al. 2023):

* user level, white box: canary clients through the real ``UserLevelDP`` aggregation
  (Poisson sampling, every canary in every round: q = 1, 8 rounds), no DP and ε ∈ {2, 4, 8}
  (z calibrated by the accountant for that run);
* user level, white box, client sampling: the same canaries among N = 2m clients (the other m
  background clients send 0), each round's cohort drawn by the real ``UserLevelDP.sample``
  with q = 1/4 (k = N/4 expected), 32 rounds, ε ∈ {2, 4, 8} with the amplification charged;
* user level, black box: canary clients holding canary records, trained for real (tiny BERT
  classifier) and aggregated by the real ``UserLevelDP``, 50 rounds, no DP and ε ∈ {2, 4, 8};
* record level, black box: canary records in a tiny BERT classifier's data, trained by the
  real DP-SGD (``fedge.privacy.dpsgd``), no DP and ε ∈ {1, 4, 8};
* record level, white box: gradient (Dirac) canaries through the real ``train_local_dp``
  (Poisson rate q = 1/4, 100 steps), the auditor sums every released noisy gradient,
  no DP and ε ∈ {1, 4, 8};
* record level, black box, causal LM: "my pin is d₁ … d₆" secret canaries in a tiny Llama's
  data (Carlini et al. 2019), trained by the real DP-SGD, no DP and ε 8.

Writes benchmarks/results/audit.md, audit.csv and audit.png.
Usage: nice -n 19 python benchmarks/audit_bench.py [--user-canaries 10000] [--record-canaries 256]
       [--user-black-canaries 64] [--white-record-canaries 10000] [--lm-canaries 256]  (about 15 CPU-minutes)
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROUNDS, DELTA, CLIP = 8, 1e-5, 0.1


def user_rows(m: int) -> list[dict]:
    from fedge.privacy.accounting import user_level_noise_for_epsilon
    from simulations.audit import audit_user_level

    rows = []
    for eps in (None, 2.0, 4.0, 8.0):
        z = None if eps is None else user_level_noise_for_epsilon(
            target_epsilon=eps, clients_per_round=m, num_clients=m, rounds=ROUNDS, delta=DELTA, sampling="poisson")
        t0 = time.perf_counter()
        r = audit_user_level(canaries=m, rounds=ROUNDS, noise_multiplier=z, clip_norm=CLIP, delta=DELTA, seed=0,
                             sampling="poisson")
        r["setting"] = "no DP" if eps is None else f"user-level DP, target ε {eps:g}"
        r["wall_s"] = time.perf_counter() - t0
        if z is not None:
            r["ideal_ratio"], r["ideal_ratio_gdp"] = ideal_ratio(z, m, r["epsilon"])
        rows.append(r)
        print(_line(r), flush=True)
    return rows


SAMPLED_ROUNDS, SAMPLED_Q = 32, 0.25


def sampled_user_rows(m: int) -> list[dict]:
    from fedge.privacy.accounting import user_level_noise_for_epsilon
    from simulations.audit import audit_user_level

    rows, n = [], 2 * m
    k = int(SAMPLED_Q * n)
    for eps in (2.0, 4.0, 8.0):
        z = user_level_noise_for_epsilon(target_epsilon=eps, clients_per_round=k, num_clients=n,
                                         rounds=SAMPLED_ROUNDS, delta=DELTA, sampling="poisson")
        t0 = time.perf_counter()
        r = audit_user_level(canaries=m, rounds=SAMPLED_ROUNDS, noise_multiplier=z, clip_norm=CLIP, delta=DELTA,
                             seed=0, sampling="poisson", population=n, clients_per_round=k)
        r["setting"] = f"user-level DP, target ε {eps:g} (client sampling q = {SAMPLED_Q:g})"
        r["series"] = "user level, white box, client sampling"
        r["wall_s"] = time.perf_counter() - t0
        r["ideal_ratio"], r["ideal_ratio_gdp"] = ideal_ratio(z, m, r["epsilon"], steps=SAMPLED_ROUNDS, q=SAMPLED_Q)
        rows.append(r)
        print(_line(r), flush=True)
    return rows


def ideal_ratio(z: float, m: int, eps: float, *, steps: int = ROUNDS, q: float = 1.0,
                seeds: int = 8) -> tuple[float, float]:
    """Mean ε_lb / ε of the same bounds (Steinke's, the f-DP Gaussian one) on ideal scores: the exact
    (subsampled) Gaussian mechanism of the audited run, as a score that sums the T releases (add/remove):
    included ~ Bin(T, q) + z√T N(0, 1), excluded ~ z√T N(0, 1) (q = 1: N(√T/z, 1) vs N(0, 1) after
    scaling), m canaries."""
    import numpy as np

    from fedge.privacy.audit import one_run_epsilon
    from fedge.privacy.audit_fdp import one_run_fdp

    steinke, gdp = [], []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        inc = rng.random(m) < 0.5
        scores = z * steps ** 0.5 * rng.normal(size=m) + inc * rng.binomial(steps, q, size=m)
        steinke.append(one_run_epsilon(scores, inc, delta=DELTA)["epsilon_lb"] / eps)
        gdp.append(one_run_fdp(scores, inc, delta=DELTA)["epsilon_lb_gdp"] / eps)
    return float(np.mean(steinke)), float(np.mean(gdp))


def _rows(run, epsilons, setting, series: str | None = None) -> list[dict]:
    """One audit per ε (None: no DP), on one torch thread; each row named and timed."""
    import torch

    torch.set_num_threads(1)
    rows = []
    for eps in epsilons:
        t0 = time.perf_counter()
        r = run(eps)
        r["setting"] = setting("no DP" if eps is None else eps)
        if series:
            r["series"] = series
        r["wall_s"] = time.perf_counter() - t0
        rows.append(r)
        print(_line(r), flush=True)
    return rows


def user_black_rows(m: int) -> list[dict]:
    from simulations.audit import audit_user_level_black

    return _rows(lambda eps: audit_user_level_black(canaries=m, target_epsilon=eps, clip_norm=CLIP, delta=DELTA,
                                                    seed=0), (None, 2.0, 4.0, 8.0),
                 lambda e: f"{e if e == 'no DP' else f'user-level DP, target ε {e:g}'} (canary clients' records)",
                 series="user level, black box")


def record_rows(m: int) -> list[dict]:
    from simulations.audit import audit_record_level

    return _rows(lambda eps: audit_record_level(canaries=m, target_epsilon=eps, delta=DELTA, seed=0),
                 (None, 1.0, 4.0, 8.0), lambda e: e if e == "no DP" else f"DP-SGD, target ε {e:g}")


WHITE_SEEDS = (1, 2, 3)  # extra runs of each white-box DP-SGD row: the spread of one run's ε_lb


def white_record_rows(m: int) -> list[dict]:
    import torch

    from simulations.audit import audit_record_level_white

    torch.set_num_threads(1)
    rows = []
    for eps in (None, 1.0, 4.0, 8.0):
        t0 = time.perf_counter()
        r = audit_record_level_white(canaries=m, target_epsilon=eps, delta=DELTA, seed=0)
        r["setting"] = f"{'no DP' if eps is None else f'DP-SGD, target ε {eps:g}'} (gradient canaries)"
        r["wall_s"] = time.perf_counter() - t0
        if r["noise_multiplier"] is not None:
            r["ideal_ratio"], r["ideal_ratio_gdp"] = ideal_ratio(r["noise_multiplier"], m, r["epsilon"], steps=r["steps"],
                                           q=r["sample_rate"])
            more = [audit_record_level_white(canaries=m, target_epsilon=eps, delta=DELTA, seed=s) for s in WHITE_SEEDS]
            r["seed_ratios"] = [r["epsilon_lb"] / r["epsilon"], *(o["epsilon_lb"] / o["epsilon"] for o in more)]
        rows.append(r)
        print(_line(r), flush=True)
    # The same 100 steps as 4 federated rounds of 25: σ calibrated for the 4 rounds, the accountant history
    # carried between rounds in the record the client stores, the released gradients of all rounds summed.
    t0 = time.perf_counter()
    r = audit_record_level_white(canaries=m, target_epsilon=4.0, delta=DELTA, seed=0, steps=25, rounds=4)
    r["setting"] = "DP-SGD, target ε 4 (gradient canaries, 4 rounds × 25 steps)"
    r["series"] = "record level, white box, 4 rounds"
    r["wall_s"] = time.perf_counter() - t0
    r["ideal_ratio"], r["ideal_ratio_gdp"] = ideal_ratio(r["noise_multiplier"], m, r["epsilon"], steps=100, q=r["sample_rate"])
    rows.append(r)
    print(_line(r), flush=True)
    return rows


def lm_rows(m: int) -> list[dict]:
    from simulations.audit import audit_record_level_lm

    return _rows(lambda eps: audit_record_level_lm(canaries=m, target_epsilon=eps, delta=DELTA, seed=0), (None, 8.0),
                 lambda e: f"{e if e == 'no DP' else f'DP-SGD, target ε {e:g}'} (secret canaries, causal LM)",
                 series="record level, black box, causal LM")


def _line(r: dict) -> str:
    eps = "" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
    return f"{r['level']:>6} {r['access']:>5} | {r['setting']:<32} | ε {eps:>6} | ε_lb {r['epsilon_lb']:.3f} | " \
           f"AUROC {r['auroc']:.3f} | {r['wall_s']:.1f} s"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    def series(r: dict) -> str:
        return r.get("series", f"{r['level']} level, {r['access']} box")

    for name, mark in (("user level, white box", "o"), ("user level, white box, client sampling", "v"),
                       ("user level, black box", "X"),
                       ("record level, white box", "^"), ("record level, white box, 4 rounds", "P"),
                       ("record level, black box", "s"), ("record level, black box, causal LM", "D")):
        pts = [(r["epsilon"], r["epsilon_lb"]) for r in rows if series(r) == name and r["epsilon"] is not None]
        ax.plot(*zip(*pts), mark + "-", label=name)
        none = [r for r in rows if series(r) == name and r["epsilon"] is None]
        for r in none:
            ax.axhline(r["epsilon_lb"], ls=":", color=ax.lines[-1].get_color(), lw=1)
            ax.annotate(f"no DP: ε_lb {r['epsilon_lb']:.2f}", (8.9, r["epsilon_lb"]), fontsize=8, va="bottom", ha="right")
    ax.plot([0, 9], [0, 9], "k--", lw=1, label="ε_lb = ε (a correct mechanism stays below)")
    ax.plot([0, 9], [0, 0.45 * 9], color="grey", lw=1, label="ε_lb = 0.45 ε (Steinke et al.'s ratio)")
    ax.set_xlim(0, 9)
    ax.set_ylim(0, 9)
    ax.set_xlabel("ε (accountant, δ = 1e-5)")
    ax.set_ylabel("ε_lb (measured, 95%)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _black_dp_sentence(rows: list[dict]) -> str:
    """What the user-level black-box DP rows showed, from their numbers."""
    dp = [r for r in rows if r.get("series") == "user level, black box" and r["epsilon"] is not None]
    if not dp:
        return ""
    lbs = ", ".join(f"ε {r['epsilon']:.0f}: ε_lb {r['epsilon_lb']:.2f}, AUROC {r['auroc']:.2f}" for r in dp)
    gone = all(r["epsilon_lb"] == 0 for r in dp)
    return (f"With DP ({lbs}) " + ("the signal is gone at every ε, so, like the record-level black-box rows, these "
                                    "rows show that this attack fails, not how tight ε is." if gone else
                                    "some signal remains below ε; the white-box rows are the ones that test how "
                                    "tight ε is."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--user-canaries", type=int, default=10000)
    ap.add_argument("--record-canaries", type=int, default=256)
    ap.add_argument("--user-black-canaries", type=int, default=64)
    ap.add_argument("--white-record-canaries", type=int, default=10000)
    ap.add_argument("--lm-canaries", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "audit.md"))
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    rows = user_rows(args.user_canaries) + sampled_user_rows(args.user_canaries) \
        + user_black_rows(args.user_black_canaries) + record_rows(args.record_canaries) \
        + white_record_rows(args.white_record_canaries) + lm_rows(args.lm_canaries)
    cpu = time.process_time() - t0
    cols = ["setting", "level", "access", "epsilon", "epsilon_lb", "canaries", "delta", "confidence", "r", "v",
            "auroc", "tpr_at_fpr", "exposure_mean", "ceiling", "ideal_ratio", "noise_multiplier", "wall_s",
            "epsilon_lb_fdp", "mu_lb", "epsilon_lb_gdp", "ideal_ratio_gdp"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r["setting"], r["level"] if r["epsilon"] is not None else "none", r["access"],
                        "" if r["epsilon"] is None else f"{r['epsilon']:.4f}", f"{r['epsilon_lb']:.4f}", r["canaries"],
                        r["delta"], r["confidence"], r["r"], r["v"], f"{r['auroc']:.4f}", f"{r['tpr_at_fpr']:.4f}",
                        f"{r['exposure']['mean']:.3f}", f"{r['ceiling']:.3f}",
                        f"{r['ideal_ratio']:.4f}" if "ideal_ratio" in r else "",
                        "" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.4f}", f"{r['wall_s']:.1f}",
                        f"{r['epsilon_lb_approx']:.4f}", f"{r['mu_lb']:.4f}", f"{r['epsilon_lb_gdp']:.4f}",
                        f"{r['ideal_ratio_gdp']:.4f}" if "ideal_ratio_gdp" in r else ""])
    plot(rows, out.with_suffix(".png"))
    lines = ["# Privacy audit: measured ε_lb beside the accountant's ε", "",
             f"`nice -n 19 python benchmarks/audit_bench.py` ({platform.processor() or platform.machine()}, "
             f"{cpu / 60:.1f} CPU-minutes of this process; machine shared). One run per row; δ = {DELTA:g}; ε_lb at 95% confidence "
             "(Steinke, Nasr, Jagielski 2023, one-run bound, best of 7 guess counts, Bonferroni-corrected). "
             "Beside it, from the same guesses, the f-DP one-run bounds (Mahloujifar, Melis, Chaudhuri 2024; "
             "`fedge/privacy/audit_fdp.py`, same grid and correction): *f-DP ε_lb* rejects (ε, δ)-DP through its "
             "trade-off curve; *Gaussian μ_lb* is the largest μ whose μ-GDP the guesses reject, → its ε at δ. The "
             "Gaussian reading is exact for the user-level rows without client sampling (T rounds at noise z are "
             "μ-GDP, μ = √T/z) and a central-limit approximation elsewhere; the verdict (ε_lb > ε) uses Steinke's.", "",
             "| setting | level | access | ε | ε_lb | ε_lb / ε | ideal ε_lb / ε | f-DP ε_lb | Gaussian μ_lb → ε_lb "
             "| its ratio (ideal) | canaries | AUROC | TPR @ 1% FPR | ceiling |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        eps = "—" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        ratio = "—" if r["epsilon"] is None else f"{r['epsilon_lb'] / r['epsilon']:.2f}"
        lines.append(f"| {r['setting']} | {r['level'] if r['epsilon'] is not None else 'none'} | {r['access']} | "
                     f"{eps} | {r['epsilon_lb']:.2f} | {ratio} | "
                     f"{'—' if 'ideal_ratio' not in r else format(r['ideal_ratio'], '.2f')} | "
                     f"{r['epsilon_lb_approx']:.2f} | {r['mu_lb']:.3f} → {r['epsilon_lb_gdp']:.2f} | "
                     + ("—" if r["epsilon"] is None else f"{r['epsilon_lb_gdp'] / r['epsilon']:.2f}"
                        + ("" if "ideal_ratio_gdp" not in r else f" ({r['ideal_ratio_gdp']:.2f})"))
                     + f" | {r['canaries']} | {r['auroc']:.3f} | "
                     f"{r['tpr_at_fpr']:.3f} | {r['ceiling']:.2f} |")
    bad = [r for r in rows if r["epsilon"] is not None and r["epsilon_lb"] > r["epsilon"]]
    lines += ["", f"![ε_lb vs ε]({out.with_suffix('.png').name})", "",
              "ε_lb above ε in any row would be a privacy bug: " + ("**" + ", ".join(r["setting"] for r in bad) + "**"
                                                                    if bad else "none."),
              "", "- *ceiling*: the largest ε_lb this many canaries can show (every guess right, δ = 0); with "
              "δ = 1e-5 the 2mδα term of the bound keeps even a perfect separation of 10,000 canaries at 5.84, "
              "which is why both no-DP white-box rows stop there.",
              "- *ideal ε_lb / ε*: the same bound on ideal scores of the exact mechanism the accountant charges, "
              "seen through the same score (mean of 8 seeds, same m). User level: the Gaussian mechanism over T "
              "rounds, included ~ N(√T/z, 1), excluded ~ N(0, 1). Record level, white box: the Poisson-subsampled "
              "Gaussian summed over T steps, included ~ Bin(T, q) + z√T·N(0, 1), excluded ~ z√T·N(0, 1). "
              "A measured ratio at that level means the audit is as tight as this bound and this score allow; "
              "the remaining gap belongs to the bound (it tests against ε-DP randomized response) and, at record "
              "level, to the summed score (it cannot tell which steps sampled a canary); the audit cannot say how "
              "much of it is slack in the accountant. The f-DP bounds read more of it from the same guesses: at "
              "q = 1 the user-level mechanism is exactly μ-GDP (μ = √T/z), so the Gaussian μ_lb is the audit "
              "that matches it (the ideal ratio in brackets is the same bound on the ideal scores).",
              "- User level: every canary takes part in every round (q = 1); the audit tests the clipping, the "
              "1/m and the noise of `UserLevelDP` and their composition over the rounds.",
              f"- User level, client sampling: the canaries among N = 2m clients, the other m sending 0; each "
              f"round the real `UserLevelDP.sample` draws the cohort from OS entropy, every client joining with "
              f"q = {SAMPLED_Q:g} (k = N/4 expected), {SAMPLED_ROUNDS} rounds, and the ledger charges the "
              "Poisson-subsampled Gaussian. An included canary moves its score only in the rounds it was drawn "
              "(ideal: Bin(T, q) + z√T·N(0, 1)), so this holds the sampler to the q the accountant charges: a "
              "sampler that took every client while charging q breaks the bound "
              "(`tests/test_audit.py::test_client_sampling_audit_holds_the_sampler_to_the_accountants_q`). The "
              "ratios, measured and ideal, are lower than at q = 1 because the summed score cannot tell the "
              "rounds a canary was drawn in (one run here; the ideal ratio is the mean over 8 seeds of the same "
              "score).",
              "- User level, black box (`audit_user_level_black`): canary clients each holding one canary record "
              "(random tokens, a label no background record has), each present with probability ½, beside 8 "
              "background clients of 4 records; every round every present client trains the tiny BERT "
              "classifier's adapter and head for real (`train_local`, 8 steps, lr 5e-2) and the deltas go "
              "through `UserLevelDP` (S = 0.1, z calibrated for ε over the run's clients at q = 1, 50 rounds); "
              "score = the released model's logit margin of the canary label on the canary's record. This is "
              "what anyone holding the deployed model can do. Each canary's record reaches the model only through "
              "its client's delta averaged with the n − 1 others, so the signal shrinks with n: at this size "
              "(64 canaries, ~40 clients a round) the audit sees the canaries without DP; with 128 canaries "
              "(~72 clients a round) it measured ε_lb 0.00, AUROC 0.58, and fewer rounds or more background "
              "clients lose it too. " + _black_dp_sentence(rows),
              "- Record level, white box (gradient canaries, `audit_record_level_white`): one-token canary records "
              "whose per-example gradient is ±100 C on a coordinate of their own (a constructed model, θ ∈ R^V), "
              "each in the data with probability ½ beside 256 background records, trained by the real "
              "`train_local_dp`: Poisson rate q = 1/4, 100 steps, z from `calibrate_noise`, Opacus' clipping, "
              "noise and 1/(qn) in physical batches of 1024, ε from the rdp accountant. The auditor adds up every "
              "released noisy gradient along each canary's direction. This tests the sampling, the clipping, the "
              "noise, the 1/(qn) and the accountant (amplification by sampling included) against each other; it "
              "does not test Opacus' per-sample gradients of the real model's layers (only its Embedding hook "
              "runs; `tests/privacy/test_dpsgd.py` checks the LoRA layers against a per-example loop) nor the "
              "accounting across federated rounds (one round; the 4-round row below does). One run's spread, ε_lb / ε "
              "for seeds 0, "
              + ", ".join(str(s) for s in WHITE_SEEDS) + ": " + "; ".join(
                  f"ε {r['epsilon']:.0f}: " + ", ".join(f"{x:.2f}" for x in r["seed_ratios"])
                  for r in rows if "seed_ratios" in r) + ".",
              "- Record level, white box, 4 rounds: the same 100 steps as 4 federated rounds of 25, σ calibrated for "
              "the 4 rounds, and the client's accountant history carried between rounds through the record "
              "`clients/app.py` stores (`dpsgd.history_to_config` / `history_from_config`); ε is the last round's, "
              "over the whole history, and the auditor sums the released gradients of every round. A client that "
              "lost its history between rounds would report a per-round ε well below the one charged here.",
              "- Record level, black box: a tiny BERT (random weights, LoRA r = 8) memorises random canary records "
              "only weakly in 300 steps, so the black-box bounds are far from ε.",
              "- Record level, black box, causal LM (`audit_record_level_lm`, Carlini et al. 2019): secret "
              "canaries \"my pin is d₁ … d₆\" (six uniform digits, one template) among 64 random-token records, a "
              "tiny Llama (the test model's shape: 2 layers, hidden 32, random weights) with LoRA r = 16 on every "
              "linear layer, 600 steps at q = 1/4 (AdamW, lr 3e-3); score = log p(secret | template). Exposure "
              "of the included secrets among 2000 fresh ones (log₂ 2001 = 11.0 bits at most; ≈ 1.4 is what no "
              "memorisation gives): " + "; ".join(
                  f"{r['setting'].split(' (')[0]}: mean {r['exposure_references']['mean']:.1f}, median "
                  f"{r['exposure_references']['median']:.1f} bits" for r in rows if "exposure_references" in r)
              + ". Without DP the secrets are memorised and ε_lb reaches the most 256 canaries allow; DP-SGD "
              "at ε 8 erases the signal, so this black-box attack shows nothing about how tight ε is (only the "
              "white-box rows do)."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}, {out.with_suffix('.csv')}, {out.with_suffix('.png')} ({cpu / 60:.1f} CPU-min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
