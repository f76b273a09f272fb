"""Plan record-level DP-SGD for a federation: batch size, σ and steps that can learn.

Pure math over the accountant (:mod:`fedge.privacy.accounting`); no training.

Setting. Each of m clients per round holds n records and runs K local DP-SGD
steps per round for R rounds, Poisson batches of expected size B (rate q = B/n),
per-example clip C, Gaussian noise σC on the clipped sum; the server averages
the m client updates. The total data budget is fixed in epochs E (passes over a
client's records over the whole run), so the run takes T = R·K ≈ E·n/B steps.

Noise against signal. One step's update direction on the server is

    ḡ = (1/m) Σ_clients (1/B) [Σ_i clip(g_i) + N(0, σ²C² I_d)]

whose noise has per-coordinate std σC/(B√m) and norm ≈ σC√d/(B√m), while the
signal (a mean of clipped gradients) has norm ≤ C. Per step:

    NSR_step = σ √d / (B √m)

Over the run the signal adds up linearly in T and the noise as √T, so

    NSR_run = NSR_step / √T = σ √d / (√m · √(B · E · n))        (T = E·n/B)

σ(q, T) at fixed ε grows more slowly than √B for small q, so larger batches
lower NSR_run until σ grows linearly in q (the large-batch regime of
Li et al. 2022, "Large Language Models Can Be Strong Differentially Private
Learners", arXiv:2110.05679, and Ponomareva et al. 2023, "How to DP-fy ML",
arXiv:2303.00654). Larger batches also mean fewer optimizer steps, so the
planner picks the *smallest* batch whose NSR_run is within ``slack`` (10 %) of
the best one over the candidates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fedge.privacy import accounting


@dataclass(frozen=True)
class Plan:
    """One candidate configuration and its noise figures."""

    batch_size: int  # expected Poisson batch B (logical: split into physical micro-batches in memory)
    sample_rate: float  # q = B / n
    steps_per_round: int  # K
    rounds: int  # R
    epochs: float  # R·K·B / n
    noise_multiplier: float  # σ
    epsilon: float  # ε of the plan at δ (≤ target)
    delta: float
    noise_std_per_coordinate: float  # σ / (B √m), in units of C
    nsr_step: float | None  # σ √d / (B √m)  (None without d)
    nsr_run: float  # σ / √(m·B·E·n), times √d when d is known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidates(n: int, max_batch: int | None) -> list[int]:
    top = min(n // 2, max_batch or n)
    out, b = [], 8
    while b <= top:
        out.append(b)
        b *= 2
    if not out:
        raise ValueError(f"records_per_client = {n} is too small for DP-SGD batches (need at least 16 records)")
    return out


def evaluate_plan(
    *, records_per_client: int, batch_size: int, rounds: int, steps_per_round: int, clients_per_round: int,
    target_epsilon: float, delta: float, trainable_params: int | None = None, accountant: str = "rdp",
) -> Plan:
    """The σ that reaches ``target_epsilon`` for this plan, and its noise-to-signal figures."""
    n = accounting._check_count("records_per_client", records_per_client, low=1)
    b = accounting._check_count("batch_size", batch_size, low=1)
    m = accounting._check_count("clients_per_round", clients_per_round, low=1)
    r = accounting._check_count("rounds", rounds, low=1)
    k = accounting._check_count("steps_per_round", steps_per_round, low=1)
    if b > n:
        raise ValueError(f"batch_size ({b}) must be <= records_per_client ({n})")
    q = b / n
    # 2 % in ε is plenty for planning; clients calibrate σ exactly for what they run.
    sigma = accounting.noise_for_epsilon(target_epsilon=target_epsilon, sample_rate=q, steps=r * k, delta=delta,
                                         accountant=accountant, tolerance=0.02 * target_epsilon)
    eps = accounting.epsilon(noise_multiplier=sigma, sample_rate=q, steps=r * k, delta=delta, accountant=accountant)
    epochs = r * k * b / n
    root_d = math.sqrt(trainable_params) if trainable_params else 1.0
    return Plan(batch_size=b, sample_rate=q, steps_per_round=k, rounds=r, epochs=epochs, noise_multiplier=sigma,
                epsilon=eps, delta=delta, noise_std_per_coordinate=sigma / (b * math.sqrt(m)),
                nsr_step=sigma * root_d / (b * math.sqrt(m)) if trainable_params else None,
                nsr_run=sigma * root_d / math.sqrt(m * b * epochs * n))


def plan_record_level(
    *, records_per_client: int, rounds: int, clients_per_round: int, target_epsilon: float, delta: float,
    epochs: float = 4.0, trainable_params: int | None = None, max_batch: int | None = None,
    accountant: str = "rdp", slack: float = 0.10, min_steps: int = 20,
) -> tuple[Plan, list[Plan]]:
    """(recommended plan, every candidate) for ``epochs`` passes over each client's data.

    Candidates: B = 8, 16, 32, ... ≤ min(n/2, ``max_batch``); K = ceil(E·n / (B·R)) ≥ 1.
    Recommended: among candidates with at least ``min_steps`` optimizer steps in total
    (an optimizer needs steps, not only clean ones), the smallest B whose ``nsr_run`` is
    within ``slack`` of the lowest.
    """
    n = accounting._check_count("records_per_client", records_per_client, low=1)
    r = accounting._check_count("rounds", rounds, low=1)
    e = float(epochs)
    if not math.isfinite(e) or e <= 0:
        raise ValueError(f"epochs must be a number > 0, got {epochs!r}")
    table = []
    for b in _candidates(n, max_batch):
        k = max(1, math.ceil(e * n / (b * r)))
        table.append(evaluate_plan(records_per_client=n, batch_size=b, rounds=r, steps_per_round=k,
                                   clients_per_round=clients_per_round, target_epsilon=target_epsilon, delta=delta,
                                   trainable_params=trainable_params, accountant=accountant))
    usable = [p for p in table if p.rounds * p.steps_per_round >= min_steps] or table[:1]
    best = min(p.nsr_run for p in usable)
    chosen = next(p for p in usable if p.nsr_run <= (1.0 + slack) * best)
    return chosen, table
