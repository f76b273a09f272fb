"""Offline replay of the dp-record federation, head only: what limits DP accuracy, in seconds per run.

A whole `fedge simulate dp-record` run costs 12-13 min on 2 CPU cores (25-50 min with FFA-LoRA's
per-example gradients through the encoder). This replays the same federation for the classifier
head alone, on frozen mean-pooled MiniLM-L6 features (the encoder and its LoRA left out), so that
learning rates, batch sizes and privacy budgets can be swept side by side in one run:

* the scenario's own split (``fedge.data.federated_split``: 10 Dirichlet branches, R8 test set);
* per branch and step (AdamW, or SGD with momentum: ``--head-optimizer``): Poisson sampling with q = B/n_i, per-example gradients of the linear
  head (closed form: x ⊗ (softmax - onehot), bias: softmax - onehot), clipping to C, the sum
  plus N(0, σ²C²I), divided by the expected batch B;
* σ calibrated per branch by Opacus' RDP accountant for (ε, δ, q_i, steps × rounds), as the
  fedge client does (``fedge.privacy.dpsgd.calibrate_noise``);
* FedAvg weighted by examples, the head starting where the fedge head starts (torch's
  Linear init under the scenario seed).

What it is not: the fedge run. It leaves out the adapter (FFA-LoRA B on query/value), so it
answers one question: how far the head alone gets under the same noise. Today's `dp-record`
(strategy head-only) trains exactly that head, on features computed the same way, so the replay
models it closely; they differ in their randomness (the run draws Poisson batches and noise
from OS entropy). With the old FFA-LoRA recipe's lr 3e-3 for the head it reproduces the
measured fedge curve (dp_utility.md, 0.72 at round 8), so that curve was limited by the head's step size, not by the noise.

Usage: python benchmarks/dp_head_replay.py [--lrs 3e-3,3e-2,1e-1] [--eps none,1,2,4,8] [--head-optimizer sgd]
                                            [--set federation.num_rounds=12 ...]
                                            [--out benchmarks/results/dp_head_replay.md]
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def features(model, tok, texts: list[str], max_length: int) -> torch.Tensor:
    """Masked mean of MiniLM's last hidden states, (N, 384)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), 128):
            b = tok(texts[s:s + 128], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            h, m = model.bert(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


@functools.cache
def sigma(eps: float, delta: float, q: float, steps: int) -> float:
    from fedge.privacy.dpsgd import calibrate_noise

    return calibrate_noise(target_epsilon=eps, delta=delta, sample_rate=q, steps_per_round=steps, rounds=1,
                           accountant="rdp")


def replay(clients, xte, yte, *, classes: int, lr: float, eps: float | None, batch: int, steps: int, rounds: int,
           clip: float, delta: float, seed: int, schedule: str = "constant",
           optimizer: str = "adamw", ema: float = 0.0) -> tuple[list[float], list[float]]:
    """Accuracy on the test set after each round, and the σ of each branch.

    ``optimizer``: the branch's local optimizer, fresh each round as in fedge: "adamw", or
    "sgd" (momentum ``fedge.train.HEAD_MOMENTUM``, what ``train.head_optimizer: sgd`` runs).
    ``ema``: β of a server-side average of the global model across rounds, u_r = β u_{r-1} + (1-β) w_r
    (u_1 = w_1), which the curve then evaluates (post-processing: no privacy cost); 0 = off."""
    from fedge.train import HEAD_MOMENTUM

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(xte.shape[1], classes)
    w, b = head.weight.detach().T.clone(), head.bias.detach().clone()  # (D, K), (K,)
    n = torch.tensor([float(len(y)) for _, y in clients])
    zs = [0.0 if eps is None else sigma(eps, delta, min(1.0, batch / len(y)), steps * rounds) for _, y in clients]
    curve = []
    uw, ub = None, None
    for rnd in range(rounds):
        dw, db = torch.zeros_like(w), torch.zeros_like(b)
        lr_r = lr if schedule == "constant" else lr * 0.5 * (1 + math.cos(math.pi * rnd / rounds))
        for (x, y), z, ni in zip(clients, zs, n):
            q = min(1.0, batch / len(y))
            lw, lb = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            opt = (torch.optim.SGD([lw, lb], lr=lr_r, momentum=HEAD_MOMENTUM) if optimizer == "sgd"
                   else torch.optim.AdamW([lw, lb], lr=lr_r, weight_decay=0.0))
            for _ in range(steps):
                take = torch.rand(len(y), generator=g) < q
                xs, ys = x[take], y[take]
                p = torch.softmax(xs @ lw.detach() + lb.detach(), 1)
                p[torch.arange(len(ys)), ys] -= 1  # d loss / d logits, per example
                gw, gb = xs[:, :, None] * p[:, None, :], p
                if eps is None:
                    gw_sum, gb_sum, denom = gw.sum(0), gb.sum(0), max(len(ys), 1)
                else:
                    norm = (gw.flatten(1).pow(2).sum(1) + gb.pow(2).sum(1)).sqrt()
                    f = (clip / (norm + 1e-6)).clamp(max=1.0)
                    gw_sum = (gw * f[:, None, None]).sum(0) + torch.randn(w.shape, generator=g) * z * clip
                    gb_sum = (gb * f[:, None]).sum(0) + torch.randn(b.shape, generator=g) * z * clip
                    denom = batch  # Opacus divides by the expected batch size (Poisson sampling)
                lw.grad, lb.grad = gw_sum / denom, gb_sum / denom
                opt.step()
            dw += (ni / n.sum()) * (lw.detach() - w)
            db += (ni / n.sum()) * (lb.detach() - b)
        w, b = w + dw, b + db
        uw, ub = (w, b) if uw is None else (ema * uw + (1 - ema) * w, ema * ub + (1 - ema) * b)
        curve.append(float(((xte @ uw + ub).argmax(1) == yte).float().mean()))
    return curve, zs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="dp-record")
    p.add_argument("--lrs", default="3e-3,3e-2,1e-1")
    p.add_argument("--eps", default="none,1,2,4,8")
    p.add_argument("--seeds", default="0")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate across rounds: constant, or cosine from lr down to 0 over the rounds")
    p.add_argument("--ema", default="0", help="comma list of β for a server-side average across rounds (0 = off)")
    p.add_argument("--head-optimizer", choices=["adamw", "sgd"], default=None,
                   help="the head's local optimizer (default: the scenario's train.head_optimizer)")
    p.add_argument("--center", choices=["none", "public"], default="none",
                   help="public: subtract from every feature the mean feature of public text (the packaged "
                   "chatterbot corpus, not the private records), so that clipping spends its budget on what "
                   "tells documents apart rather than on the direction all embeddings share")
    p.add_argument("--set", action="append", default=[], help="scenario override, e.g. federation.num_rounds=12")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dp_head_replay.md"))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from fedge import config as fcfg
    from fedge import models
    from fedge.data.partition import data_args, federated_split

    cfg = fcfg.load(args.scenario, args.set)
    t, dp = cfg.train, cfg.privacy.dp_sgd
    head_opt = args.head_optimizer or t.head_optimizer
    fd = federated_split(**data_args(cfg))
    classes = len(fd.label_names or ())
    base = models.load_base(cfg.model.source, task="sequence-classification", num_labels=classes, pooling="mean")
    t0 = time.perf_counter()
    clients = []
    for i in range(len(fd.clients)):
        tr, _ = fd.clients[i]
        clients.append((features(base.model, base.tokenizer, list(tr["text"]), cfg.model.max_length),
                        torch.tensor(tr["label"])))
    te = fd.global_holdout
    xte, yte = features(base.model, base.tokenizer, list(te["text"]), cfg.model.max_length), torch.tensor(te["label"])
    if args.center == "public":
        pub = federated_split(**data_args(fcfg.load("default", [])))
        texts = [f"{a} {b}" for tr, _ in pub.clients for a, b in zip(tr["prompt"], tr["response"])]
        mu = features(base.model, base.tokenizer, texts, cfg.model.max_length).mean(0)
        clients, xte = [(x - mu, y) for x, y in clients], xte - mu
    t_feat = time.perf_counter() - t0
    lines = [
        f"# DP-SGD on the classifier head alone: offline replay of `{args.scenario}`"
        + (f" with {', '.join(args.set)}" if args.set else "")
        + (f", {args.schedule} learning rate across rounds" if args.schedule != "constant" else "")
        + (", features centred by the mean of public text" if args.center == "public" else ""), "",
        f"Head optimizer: {'SGD, momentum 0.9' if head_opt == 'sgd' else 'AdamW'}.", "",
        f"Produced by `benchmarks/dp_head_replay.py` on {platform.machine()}, {torch.get_num_threads()} threads. "
        f"Same split ({len(clients)} branches, {sum(len(y) for _, y in clients)} training documents, "
        f"{len(yte)} test documents), batch {t.batch_size} (Poisson, q = B/n per branch), {t.local_steps} "
        f"steps × {cfg.federation.num_rounds} rounds, C = {dp.max_grad_norm}, δ = {dp.delta}, "
        "FedAvg by examples. Linear head on frozen mean-pooled MiniLM-L6 features "
        f"({cfg.model.max_length} tokens; features in {t_feat:.0f} s). The adapter is left out: this is a model of "
        "the fedge run, not the run (`dp_utility.md` has the runs).", "",
        "| lr | EMA β | ε | seed | accuracy after each round | final | σ (per branch) | s |",
        "|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for lr, beta in [(float(x), float(m)) for x in args.lrs.split(",") for m in args.ema.split(",")]:
        for e in args.eps.split(","):
            eps = None if e.strip() == "none" else float(e)
            for seed in [int(s) for s in args.seeds.split(",")]:
                t1 = time.perf_counter()
                curve, zs = replay(clients, xte, yte, classes=classes, lr=lr, eps=eps, batch=t.batch_size,
                                   steps=t.local_steps, rounds=cfg.federation.num_rounds, clip=dp.max_grad_norm,
                                   delta=dp.delta, seed=seed, schedule=args.schedule,
                                   optimizer=head_opt, ema=beta)
                row = (f"| {lr:g} | {beta:g} | {'∞' if eps is None else f'{eps:g}'} | {seed} | "
                       f"{' '.join(f'{a:.3f}' for a in curve)} | **{curve[-1]:.4f}** | "
                       f"{min(zs):.2f}–{max(zs):.2f} | {time.perf_counter() - t1:.0f} |")
                print(row, flush=True)
                lines.append(row)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
