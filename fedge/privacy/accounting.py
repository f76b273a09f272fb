"""Privacy accounting: ε from noise, noise from ε, record level and user level.

Record level (DP-SGD on one client, Poisson sampling of examples with rate q):
    the Poisson-subsampled Gaussian mechanism, composed over steps, accounted by
    Opacus (``RDPAccountant``: Mironov et al. 2019, arXiv:1908.10530;
    ``PRVAccountant``: Gopi et al. 2021, arXiv:2106.02848). Add/remove adjacency.

User level (one client's whole data, m of N clients per round, noise std z·S/m):
    ``sampling="fixed"`` — ``privacy.user_level.sampling: fixed``: a uniformly random
      subset of exactly m of N clients, without replacement. Poisson-subsampled
      RDP does not cover this. We use the bound for sampling without replacement
      under *replace-one* adjacency (Wang, Balle, Kasiviswanathan 2019,
      arXiv:1808.00087, Thm 27) from Google's ``dp-accounting``. Replacing one
      client moves the clipped sum by up to 2S, so the Gaussian base mechanism
      has std/sensitivity = z·S/(2S) = z/2: we account with z/2.
    ``sampling="poisson"`` — each client joins independently with q = m/N; the
      aggregate is divided by the expected count m = q·N. Add/remove adjacency,
      sensitivity S, Opacus' accountant with (z, q). fedge's default: the
      server samples clients exactly this way (``strategies/dp_user_level.py``).

Every privacy parameter is keyword-only and checked; a bad value raises
``ValueError`` with a plain message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

ACCOUNTANTS = ("rdp", "prv")
SAMPLINGS = ("fixed", "poisson")
History = list[tuple[float, float, int]]  # Opacus accountant history: (z, q, steps)

_MAX_NOISE = 1e4  # beyond this, no useful training happens: call the target unreachable


# -- checks -------------------------------------------------------------------


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {list(ACCOUNTANTS)}")
    return name


def _check_delta(delta: float, *, population: int | None = None, what: str = "records") -> float:
    d = float(delta)
    if not (0.0 < d < 1.0) or not math.isfinite(d):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if population is not None and d >= 1.0 / population:
        raise ValueError(f"delta {d:g} must be < 1/{population} (1/number of {what}); "
                         f"larger δ allows releasing one {what[:-1]}'s data outright")
    return d


def _check_noise(z: float) -> float:
    v = float(z)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {z!r}")
    return v


def _check_rate(q: float) -> float:
    v = float(q)
    if not (0.0 < v <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
    return v


def _check_count(name: str, n: float, *, low: int = 0) -> int:  # float: history entries are Sequence[float]
    if isinstance(n, bool) or int(n) != n or n < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {n!r}")
    return int(n)


def _check_history(history: Iterable[Sequence[float]]) -> History:
    out: History = []
    for item in history:
        z, q, steps = item
        out.append((_check_noise(z), _check_rate(q), _check_count("steps", steps)))
    return out


# -- record level (Opacus) ----------------------------------------------------


def record_level_epsilon(history: Iterable[Sequence[float]], *, delta: float, accountant: str = "rdp") -> float:
    """ε after the Poisson-subsampled Gaussian steps in ``history`` [(z, q, steps), ...]."""
    from opacus.accountants import create_accountant

    # Composition is commutative: merge entries with the same (z, q) into one (z, q, Σ steps).
    merged: dict[tuple[float, float], int] = {}
    for z, q, steps in _check_history(history):
        merged[(z, q)] = merged.get((z, q), 0) + steps
    hist = [(z, q, steps) for (z, q), steps in merged.items() if steps > 0]
    d = _check_delta(delta)
    acc = create_accountant(mechanism=_check_accountant(accountant))
    if not hist:
        return 0.0
    acc.history = hist
    return float(acc.get_epsilon(delta=d))


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (noise z, rate q) at δ."""
    return record_level_epsilon([(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant)


def noise_for_epsilon(
    *, target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
    tolerance: float = 0.01,
) -> float:
    """Smallest z (within ``tolerance`` in ε) with ε(z, q, steps, δ) ≤ target (Opacus' search)."""
    from opacus.accountants.utils import get_noise_multiplier

    eps = _positive_epsilon(target_epsilon)
    q, d = _check_rate(sample_rate), _check_delta(delta)
    n = _check_count("steps", steps, low=1)
    plan = f"{n} steps at sample rate {q:g}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # search probes
            if epsilon(noise_multiplier=_MAX_NOISE, sample_rate=q, steps=n, delta=d, accountant=accountant) > eps:
                raise ValueError(f"even z = {_MAX_NOISE:g} is not enough for the {accountant} accountant")
            z = get_noise_multiplier(target_epsilon=eps, target_delta=d, sample_rate=q, steps=n,
                                     accountant=_check_accountant(accountant), epsilon_tolerance=tolerance)
    except (ValueError, OverflowError, FloatingPointError) as err:
        raise ValueError(_unreachable(eps, d, plan, err)) from None
    return float(z)


def _positive_epsilon(target: float) -> float:
    v = float(target)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target!r}")
    return v


def _unreachable(eps: float, delta: float, plan: str, why: object) -> str:
    return (f"target ε = {eps:g} at δ = {delta:g} is unreachable for {plan} ({why}): "
            "allow a larger ε, fewer steps/rounds, or a smaller sampling rate")


# -- user level ---------------------------------------------------------------


def compose_user_level(
    releases: Iterable[tuple[float, int, int, int]], *, delta: float, sampling: str = "fixed", accountant: str = "rdp"
) -> float:
    """ε after released rounds [(z, m, N, count), ...] (count = rounds with those values).

    ``fixed``: dp-accounting RDP, sampling without replacement, replace-one, noise z/2.
    ``poisson``: Opacus accountant with (z, q = m/N), add/remove.
    δ must be below 1/N for every N seen.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown client sampling {sampling!r}; choose one of {list(SAMPLINGS)}")
    rel = []
    for z, m, n, count in releases:
        n = _check_count("num_clients", n, low=1)
        m = _check_count("clients_per_round", m, low=1)
        if m > n:
            raise ValueError(f"clients_per_round ({m}) must be <= num_clients ({n})")
        rel.append((_check_noise(z), m, n, _check_count("rounds", count)))
    rel = [r for r in rel if r[3] > 0]
    d = _check_delta(delta, population=min((r[2] for r in rel), default=None), what="clients")
    if not rel:
        return 0.0
    if sampling == "poisson":
        return record_level_epsilon([(z, m / n, c) for z, m, n, c in rel], delta=d, accountant=accountant)
    if accountant != "rdp":
        raise ValueError("fixed-size client sampling is accounted with RDP only (dp-accounting); "
                         "use accountant='rdp' or configure Poisson client sampling")
    try:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant
    except ImportError:  # pragma: no cover - dependency declared in pyproject
        raise ImportError("user-level accounting for fixed-size client sampling needs the 'dp-accounting' "
                          "package (pip install dp-accounting)") from None
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for z, m, n, count in rel:
        # Replace-one: the clipped sum moves by ≤ 2S, noise std is z·S -> multiplier z/2.
        event = dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2.0))
        acc.compose(event, count)
    return float(acc.get_epsilon(d))


def user_level_epsilon(
    *, noise_multiplier: float, clients_per_round: int, num_clients: int, rounds: int, delta: float,
    sampling: str = "fixed", accountant: str = "rdp",
) -> float:
    """User-level ε after ``rounds`` released rounds with the same (z, m, N)."""
    return compose_user_level([(noise_multiplier, clients_per_round, num_clients, rounds)], delta=delta,
                              sampling=sampling, accountant=accountant)


def user_level_noise_for_epsilon(
    *, target_epsilon: float, clients_per_round: int, num_clients: int, rounds: int, delta: float,
    sampling: str = "fixed", accountant: str = "rdp", rtol: float = 1e-3,
) -> float:
    """Smallest z (to relative ``rtol``, rounded up) with user-level ε ≤ target (bisection)."""
    eps = _positive_epsilon(target_epsilon)
    _check_count("rounds", rounds, low=1)

    def eps_of(z: float) -> float:
        return user_level_epsilon(noise_multiplier=z, clients_per_round=clients_per_round, num_clients=num_clients,
                                  rounds=rounds, delta=delta, sampling=sampling, accountant=accountant)

    lo, hi = 0.0, 1.0
    while eps_of(hi) > eps:
        lo, hi = hi, hi * 2.0
        if hi > _MAX_NOISE:
            plan = f"{rounds} rounds of {clients_per_round} of {num_clients} clients ({sampling} sampling)"
            raise ValueError(_unreachable(eps, delta, plan, f"z > {_MAX_NOISE:g} would be needed"))
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if eps_of(mid) > eps else (lo, mid)
    return hi


# -- planning CLI (`fedge privacy ...`) -----------------------------------------


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The planning answer for parsed CLI arguments, as a JSON-ready dict."""
    if args.privacy_command == "epsilon":
        eps = epsilon(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate, steps=args.steps,
                      delta=args.delta, accountant=args.accountant)
        return {"level": "record", "accountant": args.accountant, "noise_multiplier": args.noise_multiplier,
                "sample_rate": args.sample_rate, "steps": args.steps, "delta": args.delta, "epsilon": eps}
    if args.privacy_command == "plan":
        from fedge.privacy.planner import plan_record_level

        chosen, table = plan_record_level(
            records_per_client=args.records_per_client, rounds=args.rounds, clients_per_round=args.clients_per_round,
            target_epsilon=args.target_epsilon, delta=args.delta, epochs=args.epochs,
            trainable_params=args.trainable_params, max_batch=args.max_batch, accountant=args.accountant)
        return {"level": "record", "recommended": chosen.to_dict(), "candidates": [p.to_dict() for p in table]}
    if args.privacy_command == "noise":
        z = noise_for_epsilon(target_epsilon=args.target_epsilon, sample_rate=args.sample_rate, steps=args.steps,
                              delta=args.delta, accountant=args.accountant)
        eps = epsilon(noise_multiplier=z, sample_rate=args.sample_rate, steps=args.steps, delta=args.delta,
                      accountant=args.accountant)
        return {"level": "record", "accountant": args.accountant, "target_epsilon": args.target_epsilon,
                "sample_rate": args.sample_rate, "steps": args.steps, "delta": args.delta,
                "noise_multiplier": z, "epsilon": eps}
    common = dict(clients_per_round=args.clients_per_round, num_clients=args.num_clients, rounds=args.rounds,
                  delta=args.delta, sampling=args.sampling, accountant=args.accountant)
    out = {"level": "user", **common}
    if args.noise_multiplier is not None:
        z = args.noise_multiplier
    else:
        z = user_level_noise_for_epsilon(target_epsilon=args.target_epsilon, **common)
        out["target_epsilon"] = args.target_epsilon
    out.update(noise_multiplier=z, epsilon=user_level_epsilon(noise_multiplier=z, **common))
    return out


def add_commands(sub: Any) -> None:
    """``epsilon``, ``noise``, ``plan``, ``user-level`` under ``sub`` (the subparsers of ``fedge privacy``,
    whose ``dest`` must be ``privacy_command``)."""

    def common(sp: argparse.ArgumentParser, accountants: Sequence[str]) -> None:
        sp.add_argument("--delta", type=float, required=True, help="target δ (below 1/population)")
        sp.add_argument("--accountant", choices=accountants, default="rdp", help="privacy accountant (default rdp)")
        sp.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("epsilon", help="record-level ε of DP-SGD (Poisson sampling)")
    e.add_argument("--noise-multiplier", type=float, required=True, help="z = noise std / clip norm")
    e.add_argument("--sample-rate", type=float, required=True, help="q = expected batch size / examples")
    e.add_argument("--steps", type=int, required=True, help="optimizer steps in total (rounds × local steps)")
    common(e, ACCOUNTANTS)
    n = sub.add_parser("noise", help="noise multiplier that reaches a target record-level ε")
    n.add_argument("--target-epsilon", type=float, required=True)
    n.add_argument("--sample-rate", type=float, required=True)
    n.add_argument("--steps", type=int, required=True)
    common(n, ACCOUNTANTS)
    pl = sub.add_parser("plan", help="record-level DP-SGD in a federation: recommend batch size, σ and local "
                        "steps for a target ε (prints the noise-to-signal ratio of each candidate)")
    pl.add_argument("--records-per-client", type=int, required=True, help="n, training records on a typical client")
    pl.add_argument("--rounds", type=int, required=True, help="R, federated rounds planned")
    pl.add_argument("--clients-per-round", type=int, required=True, help="m, clients averaged per round")
    pl.add_argument("--target-epsilon", type=float, required=True, help="ε per record over the whole run")
    pl.add_argument("--epochs", type=float, default=4.0, help="passes over a client's data over the run (default 4; "
                    "a head-only probe computes its features once per round, so ~40 epochs cost little: "
                    "dp-record runs 39)")
    pl.add_argument("--trainable-params", type=int, help="d, trainable (exchanged) parameters: gives the "
                    "noise-to-signal ratio per step, σ√d/(B√m)")
    pl.add_argument("--max-batch", type=int, help="largest logical batch to consider")
    common(pl, ACCOUNTANTS)
    u = sub.add_parser("user-level", help="user-level ε of noisy federated averaging (or the z for a target)")
    g = u.add_mutually_exclusive_group(required=True)
    g.add_argument("--noise-multiplier", type=float, help="z = noise std on the sum / clip norm S")
    g.add_argument("--target-epsilon", type=float, help="find the smallest z that reaches this ε")
    u.add_argument("--clients-per-round", type=int, required=True, help="m, clients sampled per round")
    u.add_argument("--num-clients", type=int, required=True, help="N, clients in the federation")
    u.add_argument("--rounds", type=int, required=True, help="rounds that release an aggregate")
    u.add_argument("--sampling", choices=SAMPLINGS, default="poisson",
                   help="poisson (fedge's default, privacy.user_level.sampling): each client joins with q = m/N; "
                   "fixed: exactly m of N without replacement (replace-one, ~9x more ε at the same noise)")
    common(u, ACCOUNTANTS)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedge privacy", description="Plan a differential-privacy budget.")
    add_commands(p.add_subparsers(dest="privacy_command", required=True))
    return p


def _plan_table(out: dict[str, Any]) -> str:
    rec = out["recommended"]
    lines = ["  batch B  steps/round K  epochs   sigma  noise/coord  NSR/step  NSR/run",
             *(f"{'*' if p == rec else ' '} {p['batch_size']:>7}  {p['steps_per_round']:>13}  {p['epochs']:>6.2f}  "
               f"{p['noise_multiplier']:>6.3f}  {p['noise_std_per_coordinate']:>11.2e}  "
               f"{'—' if p['nsr_step'] is None else format(p['nsr_step'], '8.3f'):>8}  {p['nsr_run']:>7.4f}"
               for p in out["candidates"]),
             "",
             f"recommended: train.batch_size: {rec['batch_size']}, train.local_steps: {rec['steps_per_round']}, "
             f"federation.num_rounds: {rec['rounds']}, privacy.dp_sgd.target_epsilon: {rec['epsilon']:.3g} "
             f"(σ ≈ {rec['noise_multiplier']:.3f} at q = {rec['sample_rate']:.3g}, δ = {rec['delta']:g}); "
             "set privacy.dp_sgd.max_physical_batch to what fits in memory",
             "NSR = noise norm / signal norm of the averaged update (per step, and accumulated over the run); "
             "the smallest batch within 10 % of the lowest NSR/run with ≥ 20 steps is recommended"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``fedge privacy {epsilon,noise,plan,user-level} ...``: plain text, or JSON with ``--json``."""
    return run(_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The parsed ``fedge privacy`` command (``add_commands``)."""
    try:
        out = plan(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        if args.privacy_command == "plan":
            print(_plan_table(out))
            return 0
        for k, v in out.items():
            print(f"{k:>18}: {v:.6g}" if isinstance(v, float) else f"{k:>18}: {v}")
    return 0
