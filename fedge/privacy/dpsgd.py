"""Record-level DP-SGD for a PEFT model with Opacus (Abadi et al. 2016, arXiv:1607.00133).

One step, examples drawn by Poisson sampling (each independently with rate q,
which is what the accountant assumes), n examples, expected batch B = q·n:

    g_i = ∇ℓ_i                                 ℓ_i = per-example mean loss (fedge.train)
    ḡ   = (1/B) [ Σ_i g_i · min(1, C/‖g_i‖₂) + N(0, z²C² I) ]
    θ  <- AdamW(θ, ḡ)                          (any optimizer: post-processing)

Per-example gradients come from Opacus' ``GradSampleHooks`` (``grad_sample_mode
"hooks"``, attached *without* wrapping the model, so ``get_peft_model_state_dict``
keeps working on the PeftModel); clipping, noise and the 1/B come from Opacus'
``DPOptimizer`` with ``loss_reduction="mean"``. Batches larger than
``max_physical_batch`` are split and accumulated (Opacus' skip-step protocol)
without changing the result.

Accounting persists across rounds: a client keeps its history
[(z, q, steps), ...] (an Opacus accountant's ``history``) in Flower's Context
state (:func:`history_to_config` / :func:`history_from_config`); each round
appends one entry, so a fresh optimizer per round never forgets earlier steps.
Before training, a client whose ε would pass its budget refuses
(:class:`BudgetExceeded`).

Randomness: the Poisson sampling and the noise must be unknown to whoever sees
the update. ``seed=None`` (the default) draws both from OS entropy; a fixed seed
is for tests only — never derive it from the server's round config.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedge.data.tokenize import collate
from fedge.devices import model_device, to_device
from fedge.privacy import accounting
from fedge.train import frozen_head, head_features, make_optimizer, per_example_loss

# Context-state keys of the accountant history (one ConfigRecord, three parallel lists).
HISTORY_NOISE = "dp-history-noise"
HISTORY_RATE = "dp-history-rate"
HISTORY_STEPS = "dp-history-steps"


class BudgetExceeded(RuntimeError):
    """Training this round would take the client past its privacy budget: it refuses."""


# -- pieces -------------------------------------------------------------------


def poisson_batches(n: int, *, sample_rate: float, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """For each step, the indices i < n with U_i < q (independent; batches may be empty)."""
    q = float(sample_rate)
    return [np.flatnonzero(rng.random(n) < q) for _ in range(steps)]


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps_per_round: int, rounds: int,
    accountant: str = "rdp",
) -> float:
    """z such that training in every one of ``rounds`` rounds stays within (ε, δ).

    Plans for rounds × steps_per_round steps: an upper bound, since a client that
    is not sampled in a round spends nothing that round.
    """
    steps = accounting._check_count("rounds", rounds, low=1) * accounting._check_count(
        "steps_per_round", steps_per_round, low=1)
    return accounting.noise_for_epsilon(target_epsilon=target_epsilon, sample_rate=sample_rate, steps=steps,
                                        delta=delta, accountant=accountant)


def history_to_config(history: Iterable[Sequence[float]]) -> dict[str, list[float] | list[int]]:
    """History -> three parallel lists, storable as a Flower ``ConfigRecord``."""
    h = accounting._check_history(history)
    return {HISTORY_NOISE: [float(z) for z, _, _ in h], HISTORY_RATE: [float(q) for _, q, _ in h],
            HISTORY_STEPS: [int(s) for _, _, s in h]}


def history_from_config(record: Mapping[str, Any] | None) -> accounting.History:
    """Inverse of :func:`history_to_config`; None or an empty record -> []."""
    if not record or HISTORY_NOISE not in record:
        return []
    z, q, s = (list(record[k]) for k in (HISTORY_NOISE, HISTORY_RATE, HISTORY_STEPS))
    if not len(z) == len(q) == len(s):
        raise ValueError("corrupt DP-SGD history: lists of different lengths")
    return accounting._check_history(zip(z, q, s))


def check_budget(
    history: Iterable[Sequence[float]], *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
    max_epsilon: float, accountant: str = "rdp",
) -> float:
    """ε after history + this round; raise :class:`BudgetExceeded` if it passes ``max_epsilon``."""
    projected = accounting.record_level_epsilon([*history, (noise_multiplier, sample_rate, steps)], delta=delta,
                                                accountant=accountant)
    if projected > max_epsilon:
        spent = accounting.record_level_epsilon(history, delta=delta, accountant=accountant)
        raise BudgetExceeded(f"privacy budget exhausted: ε spent {spent:.3f}, this round would reach "
                             f"{projected:.3f} > budget {max_epsilon:g} (δ = {delta:g}); refusing to train")
    return projected


# -- the training loop ---------------------------------------------------------


def dp_sgd_steps(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    batches: Sequence[np.ndarray],
    *,
    task: str,
    pad_id: int,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator | None,
    max_physical_batch: int | None = None,
    losses_of: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Run one DP-SGD step per index batch; no accounting, no checks (use :func:`train_local_dp`).

    ``noise_multiplier`` may be 0 here only so that tests can compare the clipping
    against a slow per-example loop. Batches go to the model's device; ``generator``
    must live there too (Opacus draws the noise on the parameters' device).
    ``losses_of(indices)`` -> ℓ_i of those examples, shape (len(indices),), computed through
    ``model`` (default: collate the examples and run :func:`fedge.train.per_example_loss`).
    """
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    dp_opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator,
                         secure_mode=True)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    device = model_device(model)
    loss_sum, loss_n = 0.0, 0
    if losses_of is None:
        def losses_of(chunk: np.ndarray) -> torch.Tensor:
            batch = to_device(collate([examples[i] for i in chunk], task=task, pad_id=pad_id), device)
            return per_example_loss(model, batch, task=task)

    def step(idx: np.ndarray) -> None:
        nonlocal loss_sum, loss_n
        dp_opt.zero_grad(set_to_none=True)
        if len(idx) == 0:  # an empty Poisson batch still takes a (pure-noise) step
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            dp_opt.step()
            return
        size = max_physical_batch or len(idx)
        chunks = [idx[s:s + size] for s in range(0, len(idx), size)]
        for j, chunk in enumerate(chunks):
            losses = losses_of(chunk)
            # Hooks rescale by the chunk size: grad_sample = ∇ℓ_i. (torch leaves backward untyped.)
            losses.mean().backward()  # type: ignore[no-untyped-call]
            loss_sum, loss_n = loss_sum + float(losses.detach().sum()), loss_n + len(chunk)
            if j < len(chunks) - 1:  # clip and accumulate this chunk, no noise yet
                dp_opt.signal_skip_step(do_skip=True)
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
        dp_opt.step()  # clip, sum, add N(0, z²C²), divide by the expected batch size, update

    # Hooks on the PeftModel's own modules (no wrapper): removed again in ``finally``.
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
    model.train()
    try:
        with warnings.catch_warnings():
            # Opacus' module hooks fire where inputs are frozen (after embeddings): expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for idx in batches:
                step(idx)
        dp_opt.zero_grad(set_to_none=True)
    finally:
        hooks.cleanup()
        model.eval()
    empty = sum(1 for b in batches if len(b) == 0)
    return {"loss": loss_sum / loss_n if loss_n else math.nan, "empty_batches": empty}


def _head_losses(head: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor
                 ) -> Callable[[np.ndarray], torch.Tensor]:
    """indices -> ℓ_i = CE(head(x_i), y_i) on precomputed head inputs x (n, d), labels y (n,)."""
    def losses_of(chunk: np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(chunk, device=feats.device)
        return F.cross_entropy(head(feats[idx]).float(), labels[idx], reduction="none")

    return losses_of


def train_local_dp(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    *,
    task: str,
    pad_id: int,
    steps: int,
    sample_rate: float,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    head_lr: float | None = None,
    head_optimizer: str = "adamw",
    history: Iterable[Sequence[float]] = (),
    max_epsilon: float | None = None,
    accountant: str = "rdp",
    weight_decay: float = 0.0,
    max_physical_batch: int | None = None,
    seed: int | None = None,
    frozen_features: bool = True,
) -> tuple[dict[str, float], accounting.History]:
    """``steps`` DP-SGD steps on the trainable (LoRA, head) parameters (AdamW; the head optionally SGD).

    When only a classifier's head trains (head-only, :func:`fedge.train.frozen_head`) and
    ``frozen_features``, the head's input is computed once for every local example in eval
    mode (:func:`fedge.train.head_features`) and the steps run on the head alone: the same
    per-example gradients as full forward passes without dropout, at one encoder pass per
    example per round instead of one per sampled example per step. Privacy is unchanged:
    example i's feature depends on example i alone, and q, σ and the steps are the same.

    Returns (metrics, new_history). ``metrics["epsilon"]`` is the record-level ε
    after this round (history + this round) at ``delta``. ``metrics["loss"]`` is
    the mean per-example loss of the sampled examples: it is *not* privatised,
    keep it local (or accept that it is outside the guarantee) when DP matters.
    """
    n = len(examples)
    if n == 0:
        raise ValueError("no local training examples")
    z = accounting._check_noise(noise_multiplier)
    q = accounting._check_rate(sample_rate)
    c = float(max_grad_norm)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    d = accounting._check_delta(delta, population=n, what="examples")
    steps = accounting._check_count("steps", steps, low=1)
    if max_physical_batch is not None and max_physical_batch < 1:
        raise ValueError("max_physical_batch must be >= 1 (or None)")
    past = accounting._check_history(history)
    if max_epsilon is not None:
        check_budget(past, noise_multiplier=z, sample_rate=q, steps=steps, delta=d, max_epsilon=max_epsilon,
                     accountant=accountant)

    entropy = secrets.randbits(63) if seed is None else int(seed)
    rng = np.random.default_rng(entropy)
    gen = torch.Generator(device=model_device(model)).manual_seed(int(rng.integers(2**62)))
    # Separate head step (post-processing: the noise is added before the optimizer).
    opt = make_optimizer(model, lr=lr, head_lr=head_lr, head_optimizer=head_optimizer, weight_decay=weight_decay)
    batches = poisson_batches(n, sample_rate=q, steps=steps, rng=rng)
    t0 = time.perf_counter()
    head = frozen_head(model) if frozen_features and task != "causal-lm" else None
    feats = head_features(model, head, list(examples), task=task, pad_id=pad_id) if head is not None else None
    losses_of = None
    if head is not None and feats is not None:
        losses_of = _head_losses(head, feats, torch.tensor([int(e["label"]) for e in examples], device=feats.device))
    else:
        head = None
    out = dp_sgd_steps(head if head is not None else model, examples, batches, task=task, pad_id=pad_id,
                       optimizer=opt, noise_multiplier=z, max_grad_norm=c, expected_batch_size=q * n,
                       generator=gen, max_physical_batch=max_physical_batch, losses_of=losses_of)
    new_history = [*past, (z, q, steps)]
    metrics = {
        "loss": out["loss"],
        "epsilon": accounting.record_level_epsilon(new_history, delta=d, accountant=accountant),
        "delta": d,
        "noise_multiplier": z,
        "sample_rate": q,
        "steps": steps,
        "mean_batch": float(np.mean([len(b) for b in batches])),
        "empty_batches": out["empty_batches"],
        "frozen_features": head is not None,
        "seconds": time.perf_counter() - t0,
    }
    return metrics, new_history
