"""``fedge audit``: measure the privacy of a scenario's mechanisms with canaries (one run).

Bound, exposure, TPR/AUROC: :mod:`fedge.privacy.audit` (Steinke, Nasr, Jagielski 2023;
Carlini et al. 2019). This module makes the canaries and the scores.

User level, white box (:func:`audit_user_level`). m canary clients; canary j owns a fixed
direction u_j (a random signed basis vector of R^m, so the u_j are orthonormal: no
canary's update leaks into another's score; the mechanism's noise is isotropic and its
clipping depends on norms only, so any other orthonormal frame gives the same law).
Every round, the canaries' deltas c·u_j (‖c u_j‖ = 100 S ≫ S: always clipped to S) go
through the *real* server aggregation ``UserLevelDP.aggregate`` (clip to S, sum, 1/m,
N(0, (zS/m)²)) and its ``server_update``, for the planned number of rounds. Inclusion
S_j ~ Bernoulli(½) follows the accountant's adjacency:

    sampling "fixed" (replace-one):  canary j sends +c·u_j if S_j = 1, −c·u_j if not
    sampling "poisson" (add/remove): canary j takes part if S_j = 1, is absent if not

score_j = cos(A_T − A_0, u_j) = ⟨A_T − A_0, u_j⟩ / ‖A_T − A_0‖.
Per round the score moves by S/m (add/remove; 2S/m replace-one) against noise zS/m,
exactly the Gaussian mechanism the accountant charges, so a correct mechanism gives
ε_lb ≤ ε and a missing 1/m, a skipped clip or missing noise gives ε_lb > ε.
By default every canary takes part in every round (q = 1), and the audit's ε is the
accountant's ε for that run (≥ the scenario's ε, which is reported beside it). With a
``population`` N > m (Poisson sampling only) the round's cohort is drawn by the real
``UserLevelDP.sample`` from N clients (the included canaries and N − m background clients
whose updates are 0), each joining with q = k/N from OS entropy: an included canary then
moves its score by S/k only in the rounds it was drawn, K_j ~ Bin(T, q), and the ledger
charges the Poisson-subsampled Gaussian (amplification by client sampling). This tests the
sampler and the accountant's q against each other.

Record level, black box (:func:`audit_record_level`). A tiny seeded BERT classifier
(random weights from a config, LoRA on query/value) and random background records;
m canary records (random tokens with a label no other record has), each in the
client's training data with probability ½, trained by the real
``fedge.privacy.dpsgd.train_local_dp`` (or ``fedge.train.train_local`` without DP);
score_j = logit margin of the canary label on canary j in the final model.

Record level, black box, causal LM (:func:`audit_record_level_lm`; Carlini et al. 2019).
A tiny seeded Llama (the test model's shape: 2 layers, hidden 32, random weights; token ids,
no tokenizer) with LoRA on every linear layer; m canary records "my pin is d₁ … d₆", the
six digits uniform at random, each in the training data with probability ½ among
random-token background records; trained by the real ``train_local_dp`` (or
``train_local``). score_j = log p(d₁ … d₆ | "my pin is") under the final model; exposure
of an included secret = log₂(|R| + 1) − log₂ rank among |R| fresh secrets never trained on.

Record level, white box (:func:`audit_record_level_white`). Gradient canaries ("Dirac
canaries", Nasr et al. 2023, arXiv:2302.07956; the white-box setting of Steinke et al.
2023): m canary records, each in the client's data with probability ½ (add/remove, as the
Poisson-sampling accountant assumes), among background records, trained by the real
``fedge.privacy.dpsgd.train_local_dp`` on a model whose per-example gradient is known
(:func:`dirac_gradient_model`): canary j's gradient is G·u_j, u_j = ±e_{axis[j]} a random
signed basis vector, G = 100 C (clipped to C u_j in every step it is sampled). The auditor
sees every released gradient ḡ_t = (Σ_{i∈B_t} clip_C(g_i) + N(0, z²C² I)) / (qn) (white box)
and scores score_j = Σ_t ⟨ḡ_t, u_j⟩. Included: (K_j C + z C √T N(0, 1)) / (qn),
K_j ~ Bin(T, q); excluded: z C √T N(0, 1) / (qn).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from fedge.privacy import audit as A
from fedge.privacy.ledger import PrivacyLedger

_CANARY_SCALE = 100.0  # canary delta norm in units of S: clipped in every round, even with adaptive S


def load_mechanism(path: str):
    """A UserLevelDP-compatible class from 'pkg.module:Class' (default: the real one)."""
    if ":" not in path:
        raise ValueError(f"--mechanism must be 'pkg.module:Class', got {path!r}")
    mod, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--mechanism {path!r}: {err}") from None


def _check_counts(canaries: int, rounds: int) -> int:
    """m = ``canaries`` (at least 2); ``rounds`` at least 1."""
    if int(canaries) < 2:
        raise ValueError(f"canaries must be >= 2, got {canaries!r}")
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    return int(canaries)


def audit_user_level(
    *, canaries: int, rounds: int, noise_multiplier: float | None, clip_norm: float, delta: float,
    seed: int = 0, inner: str = "fedavg", mechanism=None, adaptive: bool = False, target_quantile: float = 0.5,
    clip_lr: float = 0.2, count_noise_std: float | None = None, sampling: str | None = None,
    accountant: str = "rdp", p: float = A.DEFAULT_P, population: int | None = None,
    clients_per_round: int | None = None,
) -> dict:
    """White-box user-level audit (module docstring). ``noise_multiplier=None``: no DP (the
    inner strategy's own aggregate, nothing clipped or noised), ε is None. ``population`` N and
    ``clients_per_round`` k (expected cohort): client sampling at q = k/N through the real
    sampler; None: every canary in every round, k = m."""
    import strategies

    m = _check_counts(canaries, rounds)
    n_pop = m if population is None else int(population)
    k = m if clients_per_round is None else int(clients_per_round)
    if n_pop < m or not 1 <= k <= n_pop:
        raise ValueError(f"need canaries ({m}) <= population ({n_pop}) and 1 <= clients_per_round ({k}) <= population")
    sampled = n_pop > m or k < m
    if sampled and (noise_multiplier is None or sampling not in (None, "poisson")):
        raise ValueError("client sampling (population > canaries) is audited under user-level DP with "
                         "Poisson sampling only")
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    axis = rng.permutation(m)  # canary j's direction: e_{axis[j]}
    base = strategies.build(inner, clients_per_round=k, min_replies=1, seed=seed)
    if noise_multiplier is None:
        strat, sampling = base, sampling or "fixed"
    else:
        if mechanism is None:
            from strategies.dp_user_level import UserLevelDP as mechanism
        kw = dict(noise_multiplier=noise_multiplier, clip_norm=clip_norm, adaptive=adaptive,
                  target_quantile=target_quantile, clip_lr=clip_lr, count_noise_std=count_noise_std, seed=seed)
        if sampling is not None and "sampling" in inspect.signature(mechanism).parameters:
            kw["sampling"] = sampling
        if sampled:
            kw["num_clients"] = n_pop
        strat = mechanism(base, **kw)
        sampling = getattr(strat, "sampling", "fixed")
    replace_one = sampling == "fixed"
    size = _CANARY_SCALE * clip_norm
    present = np.arange(m) if replace_one else np.flatnonzero(included)
    deltas_ = []
    for j in present:
        v = np.zeros(m)
        v[axis[j]] = size if included[j] else -size
        deltas_.append({"canary": v})
    weights = np.full(len(deltas_), 1.0 / max(len(deltas_), 1))
    start = {"canary": np.zeros(m)}
    current, ledger = start, PrivacyLedger()
    strat.current = dict(start)  # A_0: the shapes an empty Poisson cohort releases noise in
    t0 = time.perf_counter()
    grid, canary_of = None, {}
    if sampled:
        # Node ids 1..N: the included canaries first, then background clients (update 0, left out
        # of the sum they would not change); excluded canaries are not in the population at all.
        present_nodes = [int(j) + 1 for j in np.flatnonzero(included)] + list(range(m + 1, n_pop + 1))
        canary_of = {int(j) + 1: i for i, j in enumerate(np.flatnonzero(included))}  # node -> index in deltas_
        strat.nodes.names.update({n: f"client-{n:07d}" for n in present_nodes})  # known: no identity query
        grid = SimpleNamespace(get_node_ids=lambda: present_nodes)
        strat.wait_nodes_s = strat.inner.wait_nodes_s = 0.0
    cohort_sizes = []
    # The excluded canaries are absent from a population planned with them: the sampler's
    # "fewer connected than planned" warning is expected here, once per round.
    quiet = logging.getLogger("fedge.strategy")
    level = quiet.level
    if sampled:
        quiet.setLevel(logging.ERROR)
    try:
        for t in range(1, int(rounds) + 1):
            if sampled:
                chosen = strat.sample(grid, t, k, purpose=0)  # the real secret Poisson cohort
                cohort_sizes.append(len(chosen))
                round_deltas = [deltas_[canary_of[n]] for n in chosen if n in canary_of]
                agg = strat.aggregate(round_deltas, np.full(len(round_deltas), 1.0 / max(len(round_deltas), 1)))
            else:
                agg = strat.aggregate(deltas_, weights)
            current = strat.server_update(current, agg)
            event = getattr(strat, "last_event", None)
            if event is not None:
                ledger.record(dataclasses.replace(event, round=t))
    finally:
        quiet.setLevel(level)
    moved = current["canary"] - start["canary"]
    norm = float(np.linalg.norm(moved))
    scores = moved[axis] / norm if norm > 0 else np.zeros(m)
    eps = ledger.user_level_epsilon(delta=delta, accountant=accountant) if ledger.releases() else None
    return {"level": "user", "access": "white", "epsilon": eps, "delta": float(delta), "canaries": m,
            "rounds": int(rounds), "noise_multiplier": noise_multiplier, "clip_norm": float(clip_norm),
            "sampling": sampling, "adjacency": "replace-one" if replace_one else "add/remove",
            "population": n_pop, "clients_per_round": k, "sample_rate": k / n_pop if sampled else 1.0,
            "mean_cohort": float(np.mean(cohort_sizes)) if cohort_sizes else float(m),
            "mechanism": f"{type(strat).__module__}:{type(strat).__name__}", "seed": seed,
            "seconds": time.perf_counter() - t0, "score": "cosine of A_T - A_0 with the canary direction",
            "scores": scores.tolist(), "included": included.tolist(),
            **A.summarize(scores, included, delta=delta, p=p)}


# -- record level, black box --------------------------------------------------

_VOCAB, _LEN, _LABELS = 400, 8, 4  # canary label = _LABELS - 1, no background record has it


def _train(model, data: list[dict], *, task: str, steps: int, batch_size: int, sample_rate: float, lr: float,
           target_epsilon: float | None, delta: float, max_grad_norm: float, accountant: str,
           seed: int) -> tuple[float | None, float | None]:
    """Train ``model`` on ``data``: without DP (``train_local``, batches of ``batch_size``) when
    ``target_epsilon`` is None, else real DP-SGD with Poisson rate q = ``sample_rate`` and σ
    calibrated for (ε, δ, q, steps). Returns (ε spent, σ), both None without DP."""
    from fedge.privacy import dpsgd
    from fedge.train import train_local

    if target_epsilon is None:
        train_local(model, data, task=task, pad_id=0, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        return None, None
    q = float(sample_rate)
    z = dpsgd.calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps_per_round=steps,
                              rounds=1, accountant=accountant)
    metrics, _ = dpsgd.train_local_dp(model, data, task=task, pad_id=0, steps=steps, sample_rate=q, lr=lr,
                                      noise_multiplier=z, max_grad_norm=max_grad_norm, delta=delta,
                                      accountant=accountant, seed=seed)
    return float(metrics["epsilon"]), z


def tiny_classifier(*, seed: int, r: int = 8):
    """A seeded tiny BERT classifier (random weights from a config) with LoRA on query/value."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from fedge.models import add_lora

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=_LABELS,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    for prm in model.parameters():
        prm.requires_grad_(False)
    return add_lora(model, task="sequence-classification", r=r, alpha=2 * r, dropout=0.0,
                    target_modules=["query", "value"], seed=seed)


def _records(n: int, rng: np.random.Generator, label: int | None) -> list[dict]:
    return [{"input_ids": [1, *rng.integers(5, _VOCAB, size=_LEN).tolist()],
             "label": int(rng.integers(_LABELS - 1)) if label is None else label} for _ in range(n)]


def _canary_margins(model, canary: list[dict]) -> np.ndarray:
    """Logit of the canary label minus the largest other logit, per canary record (float64, (m,))."""
    import torch

    from fedge.data.tokenize import collate

    batch = collate(canary, task="sequence-classification", pad_id=0)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return (logits[:, _LABELS - 1] - logits[:, :_LABELS - 1].max(dim=1).values).double().numpy()


def audit_record_level(
    *, canaries: int, target_epsilon: float | None, delta: float = 1e-5, background: int = 128, steps: int = 300,
    batch_size: int = 64, lr: float = 1e-2, max_grad_norm: float = 1.0, accountant: str = "rdp", seed: int = 0,
    p: float = A.DEFAULT_P,
) -> dict:
    """Black-box record-level audit of DP-SGD on one client (module docstring).

    ``target_epsilon=None``: trained without DP by ``fedge.train.train_local``, ε is None.
    """


    m = int(canaries)
    if m < 2:
        raise ValueError(f"canaries must be >= 2, got {canaries!r}")
    rng = np.random.default_rng(seed)
    canary = _records(m, rng, label=_LABELS - 1)
    included = rng.random(m) < 0.5
    data = _records(background, rng, label=None) + [c for c, b in zip(canary, included) if b]
    model = tiny_classifier(seed=seed)
    t0 = time.perf_counter()
    task = "sequence-classification"
    eps, z = _train(model, data, task=task, steps=steps, batch_size=batch_size,
                    sample_rate=min(1.0, batch_size / len(data)), lr=lr, target_epsilon=target_epsilon, delta=delta,
                    max_grad_norm=max_grad_norm, accountant=accountant, seed=seed)
    scores = _canary_margins(model, canary)
    return {"level": "record", "access": "black", "epsilon": eps, "delta": float(delta), "canaries": m,
            "noise_multiplier": z, "steps": steps, "batch_size": batch_size, "background": background,
            "model": "tiny BERT (2 layers, hidden 32, random weights), LoRA r=8 on query/value",
            "score": "logit margin of the canary label", "seed": seed, "seconds": time.perf_counter() - t0,
            "scores": scores.tolist(), "included": included.tolist(),
            **A.summarize(scores, included, delta=delta, p=p)}


# -- user level, black box ---------------------------------------------------


def audit_user_level_black(
    *, canaries: int, rounds: int = 50, noise_multiplier: float | None = None, target_epsilon: float | None = None,
    clip_norm: float, delta: float, background_clients: int = 8, local_steps: int = 8, lr: float = 5e-2,
    seed: int = 0, inner: str = "fedavg", mechanism=None, accountant: str = "rdp", p: float = A.DEFAULT_P,
) -> dict:
    """Black-box user-level audit: canary clients holding canary records, through real local training.

    m canary clients, client j holding one canary record (random tokens, the label no background
    record has), each taking part in every round with probability ½ (S_j ~ Bernoulli(½), drawn once:
    present or absent, the add/remove adjacency of Poisson sampling), beside ``background_clients``
    clients holding 4 background records each. Every round each present client trains the global
    tiny BERT classifier's LoRA adapter and head with ``fedge.train.train_local`` (``local_steps``
    full-batch steps) and sends its delta; the deltas go through the real ``UserLevelDP`` (clip to S,
    sum, 1/m, N(0, (zS/m)²), inner strategy's ``server_update``), or without DP (``noise_multiplier``
    None) through the inner strategy's own weighted mean. score_j = logit margin of the canary label on
    canary j's record under the final global model: what anyone holding the released model can compute.
    The ledger charges the rounds actually released (q = 1: every present client every round);
    ``target_epsilon`` instead of ``noise_multiplier``: z calibrated for it over this run's n clients.
    The defaults (50 rounds, 8 background clients, 8 steps at lr 5e-2) are the smallest setting found in
    which the audit detects memorisation without DP (benchmarks/results/audit.md).
    """

    import strategies
    from fedge import models
    from fedge.train import train_local

    m = _check_counts(canaries, rounds)
    rng = np.random.default_rng(seed)
    canary = _records(m, rng, label=_LABELS - 1)
    included = rng.random(m) < 0.5
    clients = [[c] for c, b in zip(canary, included) if b] + \
        [_records(4, rng, label=None) for _ in range(int(background_clients))]
    n = len(clients)
    if target_epsilon is not None:
        if noise_multiplier is not None:
            raise ValueError("give noise_multiplier or target_epsilon, not both")
        from fedge.privacy.accounting import user_level_noise_for_epsilon

        noise_multiplier = user_level_noise_for_epsilon(target_epsilon=target_epsilon, clients_per_round=n,
                                                        num_clients=n, rounds=int(rounds), delta=delta,
                                                        sampling="poisson", accountant=accountant)
    base = strategies.build(inner, clients_per_round=n, min_replies=1, seed=seed)
    if noise_multiplier is None:
        strat = base
    else:
        if mechanism is None:
            from strategies.dp_user_level import UserLevelDP as mechanism
        kw = dict(noise_multiplier=noise_multiplier, clip_norm=clip_norm, seed=seed)
        if "sampling" in inspect.signature(mechanism).parameters:
            kw["sampling"] = "poisson"
        strat = mechanism(base, **kw)
    model = tiny_classifier(seed=seed)
    task = "sequence-classification"
    current, ledger = models.get_adapter_state(model), PrivacyLedger()
    strat.current = dict(current)
    t0 = time.perf_counter()
    for t in range(1, int(rounds) + 1):
        ups, weights = [], []
        for i, data in enumerate(clients):
            models.set_adapter_state(model, current)
            train_local(model, data, task=task, pad_id=0, steps=local_steps, batch_size=len(data), lr=lr,
                        seed=seed * 1_000_003 + t * 10_007 + i)
            after = models.get_adapter_state(model)
            ups.append({k: after[k] - current[k] for k in current})
            weights.append(float(len(data)))
        w = np.asarray(weights) / sum(weights)
        current = strat.server_update(current, strat.aggregate(ups, w))
        event = getattr(strat, "last_event", None)
        if event is not None:
            ledger.record(dataclasses.replace(event, round=t))
    models.set_adapter_state(model, current)
    scores = _canary_margins(model, canary)
    eps = ledger.user_level_epsilon(delta=delta, accountant=accountant) if ledger.releases() else None
    return {"level": "user", "access": "black", "epsilon": eps, "delta": float(delta), "canaries": m,
            "rounds": int(rounds), "noise_multiplier": noise_multiplier, "clip_norm": float(clip_norm),
            "background_clients": int(background_clients), "local_steps": int(local_steps), "lr": float(lr),
            "adjacency": "add/remove", "mechanism": f"{type(strat).__module__}:{type(strat).__name__}",
            "model": "tiny BERT (2 layers, hidden 32, random weights), LoRA r=8 on query/value",
            "score": "logit margin of the canary label on the canary client's record", "seed": seed,
            "seconds": time.perf_counter() - t0, "scores": scores.tolist(), "included": included.tolist(),
            **A.summarize(scores, included, delta=delta, p=p)}


# -- record level, black box, causal LM ---------------------------------------

_BOS, _DIGIT0, _TEMPLATE = 1, 2, (12, 13, 14)  # token ids: BOS, digits 0..9 at 2..11, "my pin is"
_LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(*, seed: int, r: int = 16):
    """A seeded 2-layer Llama (hidden 32, vocabulary _VOCAB, random weights), LoRA r on every linear layer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedge.models import add_lora

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=_BOS, eos_token_id=_BOS, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    for prm in model.parameters():
        prm.requires_grad_(False)
    return add_lora(model, task="causal-lm", r=r, alpha=2 * r, dropout=0.0, target_modules=list(_LM_TARGETS),
                    seed=seed)


def _secret_record(digits) -> dict:
    ids = [_BOS, *_TEMPLATE, *(_DIGIT0 + int(d) for d in digits)]
    return {"input_ids": ids, "labels": ids}


def secret_log_likelihood(model, secrets: np.ndarray, *, batch: int = 512) -> np.ndarray:
    """log p(d₁ … d₆ | BOS "my pin is") = Σ_k log p(d_k | template, d_<k) for each row of ``secrets``."""
    import torch

    from fedge.data.tokenize import collate

    start = 1 + len(_TEMPLATE)  # position of d₁
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(secrets), batch):
            b = collate([_secret_record(s) for s in secrets[i:i + batch]], task="causal-lm", pad_id=0)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, start - 1:-1].double(), dim=-1)
            out.append(logp.gather(-1, b["input_ids"][:, start:, None]).squeeze(-1).sum(dim=1).numpy())
    return np.concatenate(out)


def audit_record_level_lm(
    *, canaries: int, target_epsilon: float | None, delta: float = 1e-5, background: int = 64, steps: int = 600,
    sample_rate: float = 0.25, lr: float = 3e-3, max_grad_norm: float = 1.0, references: int = 2000,
    accountant: str = "rdp", seed: int = 0, p: float = A.DEFAULT_P,
) -> dict:
    """Black-box causal-LM audit with secret canaries (module docstring; Carlini et al. 2019).

    ``target_epsilon=None``: ``train_local`` without DP on batches of q·n, ε is None.
    """

    m = int(canaries)
    if m < 2:
        raise ValueError(f"canaries must be >= 2, got {canaries!r}")
    rng = np.random.default_rng(seed)
    secrets = rng.integers(10, size=(m, 6))
    included = rng.random(m) < 0.5
    data = [{"input_ids": (ids := [_BOS, *rng.integers(15, _VOCAB, size=9).tolist()]), "labels": ids}
            for _ in range(int(background))]
    data += [_secret_record(s) for s in secrets[included]]
    rng.shuffle(data)
    model = tiny_llama(seed=seed)
    n, q, task, t0 = len(data), float(sample_rate), "causal-lm", time.perf_counter()
    eps, z = _train(model, data, task=task, steps=steps, batch_size=max(1, round(q * n)), sample_rate=q, lr=lr,
                    target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_grad_norm, accountant=accountant,
                    seed=seed)
    scores = secret_log_likelihood(model, secrets)
    fresh = secret_log_likelihood(model, rng.integers(10, size=(int(references), 6)))  # never trained on
    exp_in = A.exposure(scores[included], fresh)
    return {"level": "record", "access": "black", "epsilon": eps, "delta": float(delta), "canaries": m,
            "noise_multiplier": z, "steps": int(steps), "sample_rate": q, "background": int(background),
            "model": "tiny Llama (2 layers, hidden 32, random weights), LoRA r=16 on every linear layer",
            "score": "log-likelihood of the secret after 'my pin is'", "seed": seed,
            "seconds": time.perf_counter() - t0, "scores": scores.tolist(), "included": included.tolist(),
            "exposure_references": {"candidates": int(references), "max_bits": float(np.log2(references + 1)),
                                    "mean": float(exp_in.mean()), "median": float(np.median(exp_in)),
                                    "max": float(exp_in.max())},
            **A.summarize(scores, included, delta=delta, p=p)}


# -- record level, white box --------------------------------------------------


def dirac_gradient_model(vocab: int, *, gain: float):
    """θ ∈ R^V (``Embedding(V, 1)``), the only parameter; a record has tokens t_1..t_L (mask μ_l)
    and label y ∈ {0, 1}. Forward: a = G Σ_l μ_l θ[t_l], logits = (a − sg(a), 0), whose value is
    (0, 0) whatever θ (sg: stop-gradient), so ℓ = log 2 and

        ∇_θ ℓ = G (½ − [y = 0]) Σ_l μ_l e_{t_l}        (independent of θ)

    A one-token record (t, y) has gradient ±(G/2) e_t: a Dirac canary. Opacus computes it
    with its own Embedding per-sample-gradient hook like any other layer's.
    """
    import torch
    from torch import nn

    class DiracGradients(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Embedding(vocab, 1)
            nn.init.zeros_(self.theta.weight)

        def forward(self, input_ids, attention_mask, position_ids=None):
            h = (self.theta(input_ids).squeeze(-1) * attention_mask).sum(dim=1) * gain  # (B,)
            a = h - h.detach()
            return SimpleNamespace(logits=torch.stack([a, torch.zeros_like(a)], dim=1))

    return DiracGradients()


def audit_record_level_white(
    *, canaries: int, target_epsilon: float | None, delta: float = 1e-5, background: int = 256, steps: int = 100,
    sample_rate: float = 0.25, max_grad_norm: float = 1.0, accountant: str = "rdp", seed: int = 0,
    max_physical_batch: int = 1024, p: float = A.DEFAULT_P, rounds: int = 1,
) -> dict:
    """White-box record-level audit of DP-SGD with gradient canaries (module docstring).

    ``rounds`` R > 1: the client trains R federated rounds of ``steps`` steps each, σ calibrated
    for all of them, and carries its accountant history from round to round through the record
    it stores between rounds (``dpsgd.history_to_config`` / ``history_from_config``, what
    ``clients/app.py`` keeps in Context state and on disk); ε is the last round's, over the whole
    history, and the auditor sums the released gradients of every round.

    Real: Poisson batches (``poisson_batches``), σ = z from ``calibrate_noise`` for (ε, δ, q, T),
    Opacus' per-sample gradients, clipping, noise and the 1/(qn) of ``DPOptimizer``, the
    accountant's ε, all via ``train_local_dp``. Constructed: the model (its gradients are the
    canary directions) and the observer, an optimizer pre-step hook that adds up ḡ_t as the
    optimizer (AdamW, post-processing) receives it. ``target_epsilon=None``: ``train_local``
    without DP (mean of unclipped gradients over shuffled batches of qn), ε is None.
    """
    import torch
    from opacus.optimizers import DPOptimizer
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fedge.privacy import dpsgd
    from fedge.train import train_local

    m = _check_counts(canaries, rounds)
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    axis = rng.permutation(m)  # canary j's coordinate: token 1 + axis[j] (0 is padding)
    label = rng.integers(2, size=m)  # sign of u_j: +1 for y = 1, −1 for y = 0
    sign = np.where(label == 1, 1.0, -1.0)
    vocab = 1 + m + 64  # padding, one token per canary, 64 background tokens
    data = [{"input_ids": rng.integers(1 + m, vocab, size=4).tolist(), "label": int(rng.integers(2))}
            for _ in range(int(background))]
    data += [{"input_ids": [1 + int(axis[j])], "label": int(label[j])} for j in np.flatnonzero(included)]
    rng.shuffle(data)  # canaries are not identified by position
    torch.manual_seed(seed)
    model = dirac_gradient_model(vocab, gain=2 * _CANARY_SCALE * max_grad_norm)
    theta = model.theta.weight
    released = torch.zeros(vocab, dtype=torch.float64)

    def observe(opt, args, kwargs) -> None:  # ḡ_t as the inner optimizer receives it
        if not isinstance(opt, DPOptimizer) and any(q is theta for g in opt.param_groups for q in g["params"]):
            released.add_(theta.grad.detach().double().squeeze(-1))

    n, q = len(data), float(sample_rate)
    task, t0 = "sequence-classification", time.perf_counter()
    handle = register_optimizer_step_pre_hook(observe)
    try:
        if target_epsilon is None:
            for r in range(int(rounds)):
                train_local(model, data, task=task, pad_id=0, steps=steps, batch_size=max(1, round(q * n)),
                            lr=1e-3, seed=seed + r)
            eps, z = None, None
        else:
            z = dpsgd.calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=q,
                                      steps_per_round=steps, rounds=int(rounds), accountant=accountant)
            stored: dict = {}  # the client's record between rounds
            for r in range(int(rounds)):
                metrics, history = dpsgd.train_local_dp(
                    model, data, task=task, pad_id=0, steps=steps, sample_rate=q, lr=1e-3, noise_multiplier=z,
                    max_grad_norm=max_grad_norm, delta=delta, accountant=accountant,
                    history=dpsgd.history_from_config(stored), max_physical_batch=max_physical_batch, seed=seed + r)
                stored = dpsgd.history_to_config(history)
            eps = float(metrics["epsilon"])
    finally:
        handle.remove()
    scores = sign * released.numpy()[1 + axis]  # Σ_t ⟨ḡ_t, u_j⟩
    return {"level": "record", "access": "white", "epsilon": eps, "delta": float(delta), "canaries": m,
            "noise_multiplier": z, "steps": int(steps), "rounds": int(rounds), "sample_rate": q,
            "background": int(background), "max_grad_norm": float(max_grad_norm),
            "model": "Dirac gradient canaries: θ ∈ R^V, canary gradient ±100C·e_j (clipped to C)",
            "score": "sum over steps of <released gradient, canary direction>", "seed": seed,
            "seconds": time.perf_counter() - t0, "scores": scores.tolist(), "included": included.tolist(),
            **A.summarize(scores, included, delta=delta, p=p)}


# -- outputs -------------------------------------------------------------------


def violated(result: dict) -> bool:
    """ε_lb > ε: the run is measurably less private than its accountant claims."""
    return result.get("epsilon") is not None and result["epsilon_lb"] > result["epsilon"]


def plot_scores(result: dict, path: Path) -> Path:
    """Histogram of included vs excluded canary scores, ε and ε_lb in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, b = np.asarray(result["scores"]), np.asarray(result["included"], bool)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(s, bins=50)
    ax.hist(s[~b], bins=bins, alpha=0.6, label=f"excluded ({(~b).sum()})")
    ax.hist(s[b], bins=bins, alpha=0.6, label=f"included ({b.sum()})")
    eps = "no DP" if result["epsilon"] is None else f"ε = {result['epsilon']:.2f}"
    ax.set_title(f"{result['level']}-level, {result['access']} box: {eps}, ε_lb = {result['epsilon_lb']:.2f} "
                 f"({result['confidence']:.0%})", fontsize=10)
    ax.set_xlabel(result["score"])
    ax.set_ylabel("canaries")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_lines(result: dict) -> list[str]:
    eps = "— (no DP)" if result["epsilon"] is None else f"{result['epsilon']:.3f}"
    verdict = ("**ε_lb > ε: the mechanism leaks more than its accountant claims (privacy bug)**"
               if violated(result) else "ε_lb ≤ ε: no violation found (a lower bound, not a proof)")
    ex = result["exposure"]
    return [
        f"## Privacy audit: {result['level']} level, {result['access']} box", "",
        f"| ε (accountant, δ = {result['delta']:g}) | ε_lb (measured, {result['confidence']:.0%}) | "
        "ε_lb f-DP (ε, δ) / Gaussian μ_lb → ε | canaries | "
        f"guesses r / correct v | AUROC | TPR @ FPR {result['fpr']:g} | exposure mean / max (of {ex['max_bits']:.1f} bits) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {eps} | {result['epsilon_lb']:.3f} | {result['epsilon_lb_approx']:.3f} / {result['mu_lb']:.3f} → "
        f"{result['epsilon_lb_gdp']:.3f} | {result['canaries']} | {result['r']} / {result['v']} | "
        f"{result['auroc']:.3f} | {result['tpr_at_fpr']:.3f} | {ex['mean']:.2f} / {ex['max']:.2f} |", "",
        verdict + f". Score: {result['score']}. Ceiling of this audit (all guesses right): "
        f"ε_lb ≤ {result['ceiling']:.2f}. The f-DP columns (Mahloujifar et al. 2024) read the same guesses "
        "through a trade-off curve: (ε, δ)-DP's, and the Gaussian family's (μ_lb: the run is not μ-GDP for "
        "any smaller μ; its ε holds for Gaussian mechanisms)." + (f" Scenario ε (with client sampling): {result['epsilon_scenario']:.3f}."
                                              if result.get("epsilon_scenario") is not None else "")
        + (f" Exposure of the included secrets among {xr['candidates']} fresh ones: mean {xr['mean']:.2f}, "
           f"max {xr['max']:.2f} of {xr['max_bits']:.2f} bits." if (xr := result.get("exposure_references")) else ""),
        "",
        f"![canary scores]({result['plot']})", "",
    ]


def write(result: dict, run_dir: Path) -> Path:
    """audit.json (one entry per level/access), a PNG, and a section in report.md (replaced if present)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = f"{result['level']}-{result['access']}"
    result["plot"] = plot_scores(result, run_dir / f"audit-{key}.png").name
    path = run_dir / "audit.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc[key] = {**result, "violated": violated(result)}
    path.write_text(json.dumps(doc, indent=1))
    report = run_dir / "report.md"
    old = report.read_text().splitlines() if report.exists() else [f"# Run {run_dir.name}", ""]
    head = f"## Privacy audit: {result['level']} level, {result['access']} box"
    if head in old:  # replace the section up to the next "## "
        i = old.index(head)
        j = next((k for k in range(i + 1, len(old)) if old[k].startswith("## ")), len(old))
        old = old[:i] + old[j:]
    sep = [""] if old and old[-1].strip() else []
    report.write_text("\n".join([*old, *sep, *report_lines(result)]).rstrip("\n") + "\n")
    return path


def audit_scenario(cfg, *, level: str, access: str, canaries: int, seed: int = 0, mechanism: str | None = None,
                   p: float = A.DEFAULT_P, client_sampling: bool = False) -> dict:
    """The audit a scenario's privacy settings call for (library form of ``fedge audit``).

    ``client_sampling`` (user level, Poisson): the canaries among max(N, 2m) clients, the cohort
    drawn by the real sampler at the scenario's q = k/N, so the ledger charges the scenario's ε."""
    if level == "user" and access == "black":
        if client_sampling:
            raise ValueError("--client-sampling is audited white-box (--access white)")
        from server.federation import build_strategy

        ul = cfg.privacy.user_level
        strat = build_strategy(cfg, base_hash="")
        out = audit_user_level_black(canaries=canaries, rounds=cfg.federation.num_rounds,
                                     noise_multiplier=getattr(strat, "noise_multiplier", None) if ul.enabled else None,
                                     clip_norm=ul.clip_norm, delta=ul.delta, seed=seed, inner=cfg.strategy.name,
                                     mechanism=load_mechanism(mechanism) if mechanism else None, p=p)
        return out
    if level == "user":
        from server.federation import build_strategy

        ul = cfg.privacy.user_level
        fed = cfg.federation
        strat = build_strategy(cfg, base_hash="")
        z = getattr(strat, "noise_multiplier", None) if ul.enabled else None
        population = per_round = None
        if client_sampling:
            if not ul.enabled or getattr(strat, "sampling", None) != "poisson":
                raise ValueError("--client-sampling audits user-level DP with privacy.user_level.sampling: poisson")
            q = fed.clients_per_round / cfg.data.num_clients
            population = max(cfg.data.num_clients, 2 * canaries)
            per_round = max(1, round(q * population))
        out = audit_user_level(canaries=canaries, rounds=fed.num_rounds, noise_multiplier=z, clip_norm=ul.clip_norm,
                               delta=ul.delta, seed=seed, inner=cfg.strategy.name,
                               mechanism=load_mechanism(mechanism) if mechanism else None, adaptive=ul.adaptive,
                               target_quantile=ul.target_quantile, clip_lr=ul.clip_lr,
                               count_noise_std=ul.count_noise_std, sampling=getattr(strat, "sampling", None), p=p,
                               population=population, clients_per_round=per_round)
        if ul.enabled:
            from fedge.privacy.accounting import user_level_epsilon

            out["epsilon_scenario"] = user_level_epsilon(
                noise_multiplier=z, clients_per_round=fed.clients_per_round, num_clients=cfg.data.num_clients,
                rounds=fed.num_rounds, delta=ul.delta, sampling=getattr(strat, "sampling", "fixed"))
        return out
    dp = cfg.privacy.dp_sgd
    if dp.enabled and dp.target_epsilon is None:
        raise ValueError("privacy.dp_sgd: the record-level audit calibrates its own noise; give target_epsilon")
    if access == "white":
        run = audit_record_level_white
    else:  # secrets in a template for a language model, a rare label for a classifier
        run = audit_record_level_lm if cfg.model.task == "causal-lm" else audit_record_level
    return run(canaries=canaries, target_epsilon=dp.target_epsilon if dp.enabled else None,
               delta=dp.delta, max_grad_norm=dp.max_grad_norm, accountant=dp.accountant, seed=seed, p=p)


def summary_line(result: dict) -> str:
    eps = "no DP" if result["epsilon"] is None else f"ε = {result['epsilon']:.3f}"
    return (f"{result['level']}-level {result['access']}-box audit, {result['canaries']} canaries: {eps}, "
            f"ε_lb = {result['epsilon_lb']:.3f} at {result['confidence']:.0%} confidence (δ = {result['delta']:g}); "
            f"f-DP: ε_lb {result['epsilon_lb_approx']:.3f}, Gaussian μ_lb {result['mu_lb']:.3f} "
            f"(ε {result['epsilon_lb_gdp']:.3f}); AUROC {result['auroc']:.3f}" + ("  ** ε_lb > ε: PRIVACY BUG **" if violated(result) else "")
            + ("" if result["epsilon"] is None or result["ceiling"] > result["epsilon"] else
               f"\n  note: with {result['canaries']} canaries ε_lb cannot exceed {result['ceiling']:.2f} < ε: "
               "violations above that go unseen; use more --canaries"))
