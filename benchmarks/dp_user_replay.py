"""Offline replay of the dp-user federation, head only: user-level DP settings in seconds per run.

A whole `fedge simulate dp-user` run (500 devices, 20 rounds) costs ~40 min on 2 CPU cores.
This replays the federation for the classifier head alone, on frozen mean-pooled MiniLM-L6
features (the encoder and its LoRA left out), so that the head's optimizer and step and the
clip norm can be compared side by side:

* the scenario's own split (``fedge.data.federated_split``: 500 IID devices, R8 test set);
* per round: each device joins with probability q = m/N (Poisson, as ``sampling: poisson``);
  a device trains the head from the global one for ``local_steps`` steps of ``batch_size``
  (shuffled epochs over its ~11 records, as ``fedge.train.batch_indices``) with AdamW or SGD
  with momentum (``train.head_optimizer``), fresh each round;
* the server as ``strategies.dp_user_level.UserLevelDP`` releases it, with the same functions
  (``fedge.privacy.mechanisms``): each delta clipped to S, Σ/m + N(0, (z_Δ S/m)²),
  z from ``user_level_noise_for_epsilon`` (Poisson, add/remove) and z_Δ after the adaptive
  clipping's count (σ_b = max(m/20, z√10/2)), S ← S·exp(−η(b̄ − γ)) from the noised count of
  unclipped deltas.

What it is not: the fedge run (no adapter; the adapter shares the clip with the head there).

Usage: python benchmarks/dp_user_replay.py [--lrs 1.0] [--eps none,8] [--clips 3] [--head-optimizer sgd]
                                            [--out benchmarks/results/dp_user_replay.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def replay(clients, xte, yte, *, classes: int, optimizer: str, lr: float, eps: float | None, clip: float,
           adaptive: bool, m: int, rounds: int, steps: int, batch: int, delta: float, seed: int,
           quantile: float = 0.5, clip_lr: float = 0.2) -> tuple[list[float], float, list[float]]:
    """Test accuracy after each round, z, and S per round."""
    from fedge.privacy import mechanisms as M
    from fedge.privacy.accounting import user_level_noise_for_epsilon
    from fedge.train import HEAD_MOMENTUM, batch_indices

    n = len(clients)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(xte.shape[1], classes)
    state = {"w": head.weight.detach().T.double().numpy().copy(), "b": head.bias.detach().double().numpy().copy()}
    z = zd = 0.0
    if eps is not None:
        z = user_level_noise_for_epsilon(target_epsilon=eps, clients_per_round=m, num_clients=n, rounds=rounds,
                                         delta=delta, sampling="poisson")
        sb = max(m / 20.0, z * 10 ** 0.5 / 2)
        zd = M.delta_noise_multiplier(noise_multiplier=z, count_noise_std=sb) if adaptive else z
    curve, clips = [], []
    for _ in range(rounds):
        cohort = np.flatnonzero(rng.random(n) < m / n)
        total = {k: np.zeros_like(v) for k, v in state.items()}
        bits = []
        for c in cohort:
            x, y = clients[c]
            lw = torch.tensor(state["w"], dtype=torch.float32, requires_grad=True)
            lb = torch.tensor(state["b"], dtype=torch.float32, requires_grad=True)
            opt = (torch.optim.SGD([lw, lb], lr=lr, momentum=HEAD_MOMENTUM) if optimizer == "sgd"
                   else torch.optim.AdamW([lw, lb], lr=lr, weight_decay=0.0))
            for idx in batch_indices(len(y), steps=steps, batch_size=batch, seed=int(rng.integers(2**31))):
                loss = torch.nn.functional.cross_entropy(x[idx] @ lw + lb, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            d = {"w": lw.detach().double().numpy() - state["w"], "b": lb.detach().double().numpy() - state["b"]}
            if eps is not None:
                d, norm = M.clip_update(d, clip_norm=clip)
                bits.append(float(norm <= clip))
            for k in total:
                total[k] += d[k]
        if eps is None:  # FedAvg over the realized cohort
            state = {k: state[k] + total[k] / max(len(cohort), 1) for k in state}
        else:
            std = M.gaussian_noise_std(noise_multiplier=zd, clip_norm=clip, num_clients=m)
            noised = M.add_gaussian_noise({k: v / m for k, v in total.items()}, std=std, rng=rng)
            state = {k: state[k] + noised[k] for k in state}
            if adaptive:
                noised_count = sum(bits) - len(bits) / 2 + float(rng.normal(0.0, sb))
                clip = M.adaptive_clip_update(clip, unclipped_fraction_noised=noised_count / m + 0.5,
                                              target_quantile=quantile, lr=clip_lr)
        clips.append(clip)
        logits = xte.double().numpy() @ state["w"] + state["b"]
        curve.append(float((logits.argmax(1) == yte.numpy()).mean()))
    return curve, z, clips


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="dp-user")
    p.add_argument("--lrs", default=None, help="head learning rates (default: the scenario's train.head_lr)")
    p.add_argument("--head-optimizer", choices=["adamw", "sgd"], default=None)
    p.add_argument("--eps", default="none,8")
    p.add_argument("--clips", default=None, help="initial clip norms S (default: the scenario's)")
    p.add_argument("--fixed-clip", action="store_true", help="no adaptive clipping")
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[], help="scenario override")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dp_user_replay.md"))
    args = p.parse_args()
    torch.set_num_threads(1)  # ~1e4 tiny steps: threads only add overhead
    from dp_head_replay import features

    from fedge import config as fcfg
    from fedge import models
    from fedge.data.partition import data_args, federated_split

    cfg = fcfg.load(args.scenario, args.set)
    t, ul, fed = cfg.train, cfg.privacy.user_level, cfg.federation
    opt = args.head_optimizer or t.head_optimizer
    lrs = [float(x) for x in (args.lrs or str(t.head_lr or t.lr)).split(",")]
    clips = [float(x) for x in (args.clips or str(ul.clip_norm)).split(",")]
    adaptive = ul.adaptive and not args.fixed_clip
    fd = federated_split(**data_args(cfg))
    classes = len(fd.label_names or ())
    base = models.load_base(cfg.model.source, task="sequence-classification", num_labels=classes, pooling="mean")
    t0 = time.perf_counter()
    parts = [fd.clients[i][0] for i in range(len(fd.clients))]
    texts = [s for tr in parts for s in tr["text"]]
    feats = features(base.model, base.tokenizer, texts, cfg.model.max_length)
    clients, at = [], 0
    for tr in parts:
        clients.append((feats[at:at + len(tr)], torch.tensor(tr["label"])))
        at += len(tr)
    te = fd.global_holdout
    xte, yte = features(base.model, base.tokenizer, list(te["text"]), cfg.model.max_length), torch.tensor(te["label"])
    t_feat = time.perf_counter() - t0
    lines = [
        f"# User-level DP on the classifier head alone: offline replay of `{args.scenario}`"
        + (f" with {', '.join(args.set)}" if args.set else ""), "",
        f"Produced by `benchmarks/dp_user_replay.py` on {platform.machine()}. Same split ({len(clients)} devices, "
        f"{len(texts)} training documents, {len(yte)} test documents); each round every device joins with "
        f"q = {fed.clients_per_round}/{len(clients)} and trains the head for {t.local_steps} steps of "
        f"{t.batch_size} ({'SGD, momentum 0.9' if opt == 'sgd' else 'AdamW'}); the server clips each delta to S, "
        f"adds N(0, (z_Δ·S/m)²) to Σ/m ({'adaptive S, γ = 0.5' if adaptive else 'fixed S'}), "
        f"{fed.num_rounds} rounds, δ = {ul.delta}. Linear head on frozen mean-pooled MiniLM-L6 features "
        f"({cfg.model.max_length} tokens; features in {t_feat:.0f} s). The adapter is left out: `dp_utility.md` "
        "has the fedge runs.", "",
        "| head lr | ε | S (start → end) | seed | accuracy every 2 rounds | final | z | s |",
        "|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for lr in lrs:
        for e in args.eps.split(","):
            eps = None if e.strip() == "none" else float(e)
            for clip in clips if eps is not None else [0.0]:
                for seed in [int(s) for s in args.seeds.split(",")]:
                    t1 = time.perf_counter()
                    curve, z, cl = replay(clients, xte, yte, classes=classes, optimizer=opt, lr=lr, eps=eps,
                                          clip=clip if eps is not None else 1.0, adaptive=adaptive,
                                          m=fed.clients_per_round, rounds=fed.num_rounds, steps=t.local_steps,
                                          batch=t.batch_size, delta=ul.delta, seed=seed)
                    s_col = "—" if eps is None else f"{clip:g} → {cl[-1]:.2f}"
                    row = (f"| {lr:g} | {'∞' if eps is None else f'{eps:g}'} | {s_col} | {seed} | "
                           f"{' '.join(f'{a:.3f}' for a in curve[1::2])} | **{curve[-1]:.4f}** | "
                           f"{z:.3f} | {time.perf_counter() - t1:.0f} |")
                    print(row, flush=True)
                    lines.append(row)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
