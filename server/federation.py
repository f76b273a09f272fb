"""The server's round loop over a Flower ``Grid``.

    A_0 = fresh LoRA adapter (B = 0: the served model starts as the base model)
    for t = 1..T:
        replies  = send train(A_{t-1}, round config) to m sampled clients
        A_t      = strategy.aggregate_train(replies)      (validated deltas only)
        local    = evaluate(A_t) on sampled clients' held-out sets
        central  = evaluate(A_t) on the global held-out set
        append one line to metrics.jsonl; report it

Run directory ``<run_root>/<run-id>/``: ``config.yaml`` (resolved), ``metrics.jsonl``,
``adapter/`` (final adapter, PEFT format: ``PeftModel.from_pretrained`` loads it),
``summary.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

import strategies
from fedge import config as fcfg
from fedge import deltas, lora_fed, models, progress
from fedge import protocol as P
from fedge.data import data_args, federated_split, num_labels
from fedge.data.tokenize import encode_dataset
from fedge.messaging import send_and_receive
from fedge.privacy.ledger import BudgetExceeded, ClientDPSGD, PrivacyLedger
from fedge.reporting import write_run_report
from fedge.tracking import Tracker
from fedge.train import evaluate, generate
from server import checkpoint
from server.deploy import catch_up, linger
from server.samples import answer_samples
from server.secagg import SecAggParams, secure_train_round
from strategies.base import SPREAD_NAMES

log = logging.getLogger("fedge.server")

COMMON_STRATEGY_ARGS = ("clients_per_round", "evaluate_clients_per_round", "min_replies", "encoding",
                        "base_hash", "max_delta_norm", "seed", "wait_nodes_s")


def build_strategy(cfg: fcfg.RunConfig, *, base_hash: str) -> strategies.DeltaStrategy:
    """The configured strategy; wrapped for user-level DP when that is enabled."""
    clash = sorted(set(cfg.strategy.params) & set(COMMON_STRATEGY_ARGS))
    if clash:
        raise strategies.StrategyError(f"strategy.params: {clash} are set in the federation section, not here")
    fed = cfg.federation
    inner = strategies.build(cfg.strategy.name, clients_per_round=fed.clients_per_round,
                             evaluate_clients_per_round=fed.evaluate_clients_per_round, min_replies=fed.min_replies,
                             encoding=fed.encoding, base_hash=base_hash, max_delta_norm=fed.max_delta_norm,
                             seed=cfg.seed, **cfg.strategy.params)
    if cfg.secure_aggregation.enabled:
        _require_secure_rule(inner, cfg.strategy.name)
    ul = cfg.privacy.user_level
    if not ul.enabled:
        return inner
    if not inner.user_level_dp:
        raise strategies.StrategyError(f"privacy.user_level cannot wrap strategy {cfg.strategy.name!r}: "
                                       "its extra records / rank-dependent shapes bypass the clipped, noised mean")
    from fedge.privacy.accounting import user_level_noise_for_epsilon
    from strategies.dp_user_level import UserLevelDP

    if cfg.secure_aggregation.enabled and ul.sampling == "poisson":
        # A Poisson cohort can be too small to mask (fewer than 2 or than the threshold); skipping or
        # zeroing such a round depends on who joined, which breaks the add/remove sensitivity S.
        raise strategies.StrategyError("privacy.user_level.sampling: poisson cannot be combined with "
                                       "secure_aggregation.enabled (a small Poisson cohort cannot be masked); "
                                       "set privacy.user_level.sampling: fixed (accounted replace-one)")

    z = ul.noise_multiplier or user_level_noise_for_epsilon(
        target_epsilon=ul.target_epsilon, clients_per_round=fed.clients_per_round,
        num_clients=cfg.data.num_clients, rounds=fed.num_rounds, delta=ul.delta, sampling=ul.sampling)
    try:
        return UserLevelDP(inner, noise_multiplier=z, clip_norm=ul.clip_norm, adaptive=ul.adaptive,
                           target_quantile=ul.target_quantile, clip_lr=ul.clip_lr, count_noise_std=ul.count_noise_std,
                           sampling=ul.sampling, num_clients=cfg.data.num_clients)
    except ValueError as err:
        raise strategies.StrategyError(f"privacy.user_level with strategy {cfg.strategy.name!r}: {err}") from None


def _require_secure_rule(inner: strategies.DeltaStrategy, name: str) -> None:
    """Secure aggregation reveals only Σ w_i Δ_i: refuse rules that need each Δ_i."""
    why = None
    if not inner.secure_aggregation:
        why = "it needs each client's update (or per-client records), which secure aggregation hides"
    elif inner.aggregation != "mean":
        why = f"its aggregate is not declared a weighted mean of the deltas (aggregation = {inner.aggregation!r})"
    if why:
        allowed = sorted(n for n, cls in strategies.available().items() if cls.secure_aggregation)
        raise strategies.StrategyError(f"secure_aggregation.enabled with strategy {name!r}: {why}; "
                                       f"strategies that work with it: {allowed}")


def round_config(cfg: fcfg.RunConfig, *, base_hash: str, targets: tuple[str, ...] | None = None) -> ConfigRecord:
    """Everything a client needs to train one round (the server is the authority).

    ``targets``: the LoRA target modules resolved for the base (:attr:`Evaluator.targets`); needed
    when the scenario leaves ``lora.target_modules`` to the architecture's default."""
    t, lo, dp = cfg.train, cfg.lora, cfg.privacy.dp_sgd
    targets = targets if targets is not None else lo.target_modules
    if targets is None:
        raise ValueError("round_config needs the resolved LoRA targets (Evaluator.targets) when "
                         "lora.target_modules is not given")
    extra: dict = {P.CFG_HEAD_LR: t.head_lr, P.CFG_HEAD_OPTIMIZER: t.head_optimizer} if t.head_lr is not None else {}
    if dp.enabled:
        extra |= {P.CFG_DPSGD_NOISE: dp.noise_multiplier or 0.0, P.CFG_DPSGD_TARGET_EPS: dp.target_epsilon or 0.0,
                 P.CFG_DPSGD_MAX_GRAD_NORM: dp.max_grad_norm, P.CFG_DPSGD_DELTA: dp.delta,
                 P.CFG_DPSGD_ACCOUNTANT: dp.accountant, P.CFG_DPSGD_MAX_PHYSICAL_BATCH: dp.max_physical_batch or 0}
    return ConfigRecord({**extra, P.CFG_NUM_ROUNDS: cfg.federation.num_rounds,
        P.CFG_LOCAL_STEPS: t.local_steps, P.CFG_BATCH_SIZE: t.batch_size, P.CFG_LR: t.lr,
        P.CFG_WEIGHT_DECAY: t.weight_decay, P.CFG_ENCODING: cfg.federation.encoding, P.CFG_BASE_HASH: base_hash,
        P.CFG_SEED: cfg.seed, P.CFG_LORA_R: lo.r, P.CFG_LORA_ALPHA: lo.alpha, P.CFG_LORA_DROPOUT: lo.dropout,
        P.CFG_LORA_TARGETS: list(targets), P.CFG_EVAL_BATCH_SIZE: t.eval_batch_size,
        P.CFG_MAX_EVAL_EXAMPLES: cfg.data.max_eval_examples,
    })


class Evaluator:
    """Central evaluation of an adapter on the global held-out set (server side)."""

    def __init__(self, cfg: fcfg.RunConfig):
        self.task = cfg.model.task
        self.base = models.load_base(cfg.model.source, task=cfg.model.task, num_labels=num_labels(cfg),
                                     pooling=cfg.model.pooling, device=cfg.model.device, dtype=cfg.model.dtype,
                                     quantize=cfg.model.quantize, cache_dir=cfg.model.cache_dir, seed=cfg.seed)
        self.base_parameters = sum(p.numel() for p in self.base.model.parameters())
        lo = cfg.lora
        self.targets = models.lora_targets(self.base.model, lo.target_modules)  # sent to every client
        self.model = models.add_lora(self.base.model, task=cfg.model.task, r=lo.r, alpha=lo.alpha,
                                     dropout=lo.dropout, target_modules=self.targets, seed=cfg.seed)
        holdout = federated_split(**data_args(cfg)).global_holdout
        self.holdout = holdout  # the end-of-run sample draws its prompts from here
        self.examples = encode_dataset(self.base.tokenizer, holdout, task=self.task,
                                       max_length=cfg.model.max_length)[: cfg.data.max_eval_examples]
        self.batch_size = cfg.train.eval_batch_size
        self.label_names = federated_split(**data_args(cfg)).label_names

    def initial_adapter(self) -> dict:
        return models.get_adapter_state(self.model)

    def __call__(self, adapter: dict, residual: dict | None = None) -> dict[str, float]:
        """Held-out loss of W0 + s·B A (+ s·R, FedEx-LoRA's residual, when given)."""
        models.set_adapter_state(self.model, adapter)
        with lora_fed.residual_applied(self.model, residual):
            return evaluate(self.model, self.examples, task=self.task, pad_id=int(self.base.tokenizer.pad_token_id),
                            batch_size=self.batch_size)

    def answer(self, prompt: str, adapter: dict | None, residual: dict | None = None) -> str:
        if adapter is None:
            with self.model.disable_adapter():
                return generate(self.model, self.base.tokenizer, prompt)
        models.set_adapter_state(self.model, adapter)
        with lora_fed.residual_applied(self.model, residual):
            return generate(self.model, self.base.tokenizer, prompt)


def _rss_mb() -> float:
    """Resident memory of this (server) process, MiB: watched for growth across rounds."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def record_privacy(ledger: PrivacyLedger, strategy: strategies.DeltaStrategy, rnd: int,
                   report: strategies.RoundReport) -> None:
    """Charge this round: the server's release (if it noised one) and each client's DP-SGD steps."""
    if strategy.last_event is not None:
        ledger.record(strategy.last_event)
    for name, m in sorted(report.client_metrics.items()):
        if P.M_DP_NOISE in m:
            ledger.record(ClientDPSGD(client=name, round=rnd, noise_multiplier=m[P.M_DP_NOISE],
                                      sample_rate=m[P.M_DP_SAMPLE_RATE], steps=int(m[P.M_DP_STEPS])))


def privacy_columns(ledger: PrivacyLedger, cfg: fcfg.RunConfig) -> dict:
    """ε so far, from the ledger's accountants (None where that mechanism is off)."""
    ul, dp = cfg.privacy.user_level, cfg.privacy.dp_sgd
    out = {"epsilon_user": None, "epsilon_record_max": None}
    if ul.enabled and ledger.releases():
        out["epsilon_user"] = ledger.user_level_epsilon(delta=ul.delta)
    if dp.enabled and ledger.clients():
        out["epsilon_record_max"] = max(ledger.record_level_epsilon(c, delta=dp.delta, accountant=dp.accountant)
                                        for c in ledger.clients())
    return out


# Under user-level DP these row fields are functions of the clients' data or of the secret cohort
# (who replied, who was rejected and why, unnoised losses and norms): withheld, not published.
# (bytes per client stay: the size of one encoded adapter or delta, fixed by shapes and encoding.)
PRIVATE_ROW_FIELDS = ("sampled", "accepted", "rejected", "failed", "updated", "train_loss", "local_eval_loss",
                      "local_eval_accuracy", "bytes_up", "bytes_down", "delta_norm_mean",
                      *(f"local_eval_{w}_{q}" for w in ("loss", "accuracy") for q in SPREAD_NAMES))


def publishable_row(row: dict, cfg: fcfg.RunConfig) -> dict:
    """The metrics row as published: under user-level DP only noised, accounted or public values
    (central held-out metrics on the server's data, ε, bytes sent per client, timings)."""
    if not cfg.privacy.user_level.enabled:
        return row
    out = {**row, **{k: None for k in PRIVATE_ROW_FIELDS if k in row}}
    if "rejected_reasons" in row:
        out["rejected_reasons"] = []
    out.pop("secure_aggregation", None)  # survivors and dropouts: the realized cohort
    return out


def cohort_mode(cfg: fcfg.RunConfig) -> str:
    if cfg.privacy.user_level.enabled:
        return ("secret: training cohorts drawn from OS entropy (secrets.SystemRandom), recorded only in the "
                "server's checkpoints (files 0600); evaluation cohorts seeded")
    return f"seeded: cohorts reproducible from seed {cfg.seed} (no subsampling amplification is claimed)"


def privacy_report(ledger: PrivacyLedger, cfg: fcfg.RunConfig) -> dict:
    ul, dp = cfg.privacy.user_level, cfg.privacy.dp_sgd
    if not (ul.enabled or dp.enabled):
        return {"differential_privacy": "none: no DP mechanism was enabled; no ε is claimed",
                "cohort": cohort_mode(cfg)}
    rep = ledger.report(user_delta=ul.delta if ul.enabled else None, record_delta=dp.delta if dp.enabled else None,
                        accountant=dp.accountant)
    rep["mechanisms"] = {"dp_sgd": dp.model_dump() if dp.enabled else None,
                         "user_level": ul.model_dump() if ul.enabled else None}
    rep["cohort"] = cohort_mode(cfg)
    if ul.enabled:
        rep["client_sampling"] = ul.sampling
        rep["not_covered"] = ("central evaluation on the server's own test set and the sizes of the messages "
                              "are published; client counts, losses, rejections and local evaluation are withheld "
                              "(docs/privacy.md lists every released quantity)")
    else:
        rep["not_covered"] = ("num-examples, evaluation metrics and which replies were rejected are released "
                              "outside the guarantee; train loss is withheld under DP-SGD")
    return rep


def _wire_bytes(arrays, encoding: str) -> int:
    """Bytes of one encoded delta with the adapter's shapes."""
    zero = {k: np.zeros(v.shape, np.float32) for k, v in deltas.from_record(arrays).items()}
    return deltas.record_bytes(deltas.to_record(deltas.encode(zero, encoding)))


def history_round(rows: list[dict]) -> int:
    return rows[-1]["round"] if rows else 0


def _checkpoint(run_dir: Path, rnd: int, adapter: dict, strategy: strategies.DeltaStrategy, digest: str, ledger: PrivacyLedger, *,
                trained: dict) -> None:
    """Round ``rnd``'s server state, written once the round is released (before anything leaves);
    ``trained`` is the round's training row, reported after a crash. Secret cohorts (user-level
    DP) travel only in here (files 0600)."""
    extra = {"ledger": ledger.to_json(), "trained": trained}
    if strategy.cohorts:
        extra["cohorts"] = {str(r): c for r, c in strategy.cohorts.items()}
    try:
        checkpoint.save(run_dir, round=rnd, adapter=adapter, strategy_state=strategy.state_dict(),
                        config_digest=digest, extra=extra)
    except OSError as err:  # disk full, say: rounds so far are safe (checkpoints are atomic)
        raise checkpoint.CheckpointError(
            f"cannot write the round {rnd} checkpoint in {run_dir}: {err.strerror or err}; rounds up to "
            f"{rnd - 1} are checkpointed: free space, then resume (fedge simulate --resume {run_dir})") from None


@dataclass(frozen=True)
class RoundRecord:
    """What one round produced: its metrics row as published (``row["seconds"]`` is its wall
    time) and the new global adapter A_t (None: too few valid replies, A_{t-1} kept)."""

    row: dict
    arrays: ArrayRecord | None


class Federation:
    """One run of the round loop: :meth:`start` or :meth:`resume`, :meth:`run_round` per round,
    then :meth:`finish` (final adapter, export, summary, report).

    Every round is charged to the privacy ledger and checkpointed before its adapter leaves the
    server (evaluation clients): a crash resumes after that round and never releases it twice.
    """

    def __init__(self, grid: Grid, cfg: fcfg.RunConfig, run_dir: Path, tracker: Tracker, *,
                 on_round: Callable[[dict], None] | None = None) -> None:
        self.grid, self.cfg, self.run_dir, self.tracker, self.on_round = grid, cfg, run_dir, tracker, on_round
        (run_dir / "config.yaml").write_text(fcfg.dump_yaml(cfg))
        torch.set_num_threads(max(1, os.cpu_count() or 1))  # clients are idle while the server evaluates
        self.t_start = time.perf_counter()
        self.ev = Evaluator(cfg)
        self.strategy = build_strategy(cfg, base_hash=self.ev.base.hash)
        self.strategy.message_ttl = cfg.federation.round_timeout_s
        self.strategy.summary()
        self.train_cfg = round_config(cfg, base_hash=self.ev.base.hash, targets=self.ev.targets)
        self.adapter = self.ev.initial_adapter()  # A_t as a dict (checkpoints, final export)
        self.metrics_path = run_dir / "metrics.jsonl"
        progress.write_to(run_dir / "progress.json")  # replies so far, for `fedge server`'s live view
        progress.withhold_counts(cfg.privacy.user_level.enabled)  # the realized cohort size is not released
        self.digest = cfg.digest()
        self.ledger = PrivacyLedger()
        self.initial: dict = {}
        self.central: dict = {}  # the last central evaluation
        self.history: list[dict] = []  # published rows of rounds 1.. (the report's input)
        ul = cfg.privacy.user_level
        if ul.enabled and ul.target_epsilon:
            # Refuse (before any message) a round that would pass the target ε, e.g. when fewer
            # clients are connected than data.num_clients planned (fixed sampling: q = m/N grows).
            self.strategy.release_guard = lambda event: self.ledger.check_release(
                event, delta=ul.delta, target_epsilon=ul.target_epsilon)
        sa = cfg.secure_aggregation
        self.secure = SecAggParams(neighbours=sa.neighbours, threshold=sa.threshold,
                                   fraction_bits=sa.fraction_bits) if sa.enabled else None
        self.caught_up: set[int] = set()  # nodes already sent the published artifact in this run
        self.arrays = deltas.to_record(self.adapter)

    def start(self) -> int:
        """Round 0: evaluate and checkpoint the fresh adapter; return the first round to run."""
        self.metrics_path.write_text("")
        self.central = self.initial = self.ev(self.adapter)
        self._emit({"round": 0, "central_loss": self.central["loss"], "central_accuracy": self.central.get("accuracy"),
                    "seconds": time.perf_counter() - self.t_start})
        checkpoint.save(self.run_dir, round=0, adapter=self.adapter, strategy_state=self.strategy.state_dict(),
                        config_digest=self.digest, extra={"ledger": self.ledger.to_json()})
        return 1

    def resume(self, *, force: bool = False) -> int:
        """Continue after the last complete checkpointed round; return the first round to run.

        Refused if the checkpoint was made with another config, unless ``force``."""
        run_dir, strategy = self.run_dir, self.strategy
        ck = checkpoint.load_latest(run_dir)
        if ck.config_digest != self.digest and not force:
            raise checkpoint.CheckpointError(
                f"checkpoint round {ck.round} in {run_dir} was made with another config "
                f"(digest {ck.config_digest[:12]} != {self.digest[:12]}); resume with the run's own "
                "config.yaml, or force it")
        self.adapter = ck.adapter
        strategy.load_state_dict(ck.strategy_state)
        self.ledger = PrivacyLedger.from_json(ck.extra["ledger"]) if "ledger" in ck.extra else PrivacyLedger()
        strategy.cohorts.update({int(r): list(c) for r, c in ck.extra.get("cohorts", {}).items()})
        rows = [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]
        rows = [r for r in rows if r["round"] <= ck.round]  # drop a half-finished round
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.initial = {"loss": rows[0]["central_loss"], "accuracy": rows[0].get("central_accuracy")}
        self.history = rows[1:]
        last = next((r for r in reversed(rows) if r.get("central_loss") is not None), rows[0])
        self.central = {"loss": last["central_loss"], "accuracy": last.get("central_accuracy")}
        log.info("resuming %s after round %d", run_dir, ck.round)
        self.arrays = deltas.to_record(self.adapter)
        if history_round(self.history) < ck.round and "trained" in ck.extra:
            # Killed after round ck.round was released and checkpointed, before its row: report it now.
            self._report(ck.round, ck.extra["trained"], time.perf_counter())
        return ck.round + 1

    def run_round(self, server_round: int) -> RoundRecord:
        """Train, charge and checkpoint the release, then evaluate and report it.

        Raises BudgetExceeded, before any message leaves, when the round would pass the target ε."""
        t0 = time.perf_counter()
        new_arrays, report = self._train(server_round)
        if new_arrays is not None:
            self.arrays = new_arrays
        trained = self._trained_row(server_round, report)
        # Charge the release and checkpoint it before the new adapter leaves the server (evaluation
        # clients): a crash after this point resumes after this round and never releases it twice.
        record_privacy(self.ledger, self.strategy, server_round, report)
        self.adapter = deltas.from_record(self.arrays)
        _checkpoint(self.run_dir, server_round, self.adapter, self.strategy, self.digest, self.ledger,
                    trained=trained)
        return RoundRecord(row=self._report(server_round, trained, t0), arrays=new_arrays)

    def _train(self, rnd: int) -> tuple[ArrayRecord | None, strategies.RoundReport]:
        """One training round (secure or plain): the aggregated adapter (None to keep A_{t-1})
        and the round's immutable report."""
        grid, strategy, timeout = self.grid, self.strategy, self.cfg.federation.round_timeout_s
        if self.secure is not None:
            new_arrays, _ = secure_train_round(grid, strategy, rnd, self.arrays, self.train_cfg, params=self.secure,
                                               timeout=timeout)
        else:
            replies = send_and_receive(grid, strategy.configure_train(rnd, self.arrays, self.train_cfg, grid),
                                       timeout=timeout)
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
        return new_arrays, strategy.report

    def _trained_row(self, rnd: int, rep: strategies.RoundReport) -> dict:
        """The training half of round ``rnd``'s row, from the round's report (checkpointed with it)."""
        fed, arrays = self.cfg.federation, self.arrays
        return {
            "round": rnd, "sampled": rep.sampled, "accepted": rep.accepted, "rejected": len(rep.rejected),
            "rejected_reasons": [r for _, r in rep.rejected], "updated": rep.updated,
            "train_loss": rep.train_loss, "bytes_up": rep.bytes_up, "bytes_down": rep.bytes_down,
            # Under user-level DP the size one delta takes on the wire (public: shapes and encoding),
            # never the measured total over a cohort whose size is secret.
            "bytes_up_per_client": (_wire_bytes(arrays, fed.encoding) if self.cfg.privacy.user_level.enabled
                                    else rep.bytes_up / max(rep.accepted, 1)),
            "bytes_down_per_client": (deltas.record_bytes(arrays) if self.cfg.privacy.user_level.enabled
                                      else rep.bytes_down / max(rep.sampled, 1)),
            "delta_norm_mean": sum(rep.delta_norms) / len(rep.delta_norms) if rep.delta_norms else None,
            "failed": rep.sampled - rep.accepted,
            **({"secure_aggregation": dict(rep.secure)} if rep.secure is not None else {}),
        }

    def _report(self, rnd: int, trained: dict, t0: float) -> dict:
        """Everything after the release (charged and checkpointed): evaluation, where the adapter
        leaves the server, catch-up of devices that missed the artifact, then the metrics row.
        Returns the row as published."""
        cfg, fed, strategy, grid, arrays = self.cfg, self.cfg.federation, self.strategy, self.grid, self.arrays
        eval_msgs = strategy.configure_evaluate(rnd, arrays, self.train_cfg, grid)
        local = strategy.aggregate_evaluate(rnd, send_and_receive(grid, eval_msgs, timeout=fed.round_timeout_s)) if eval_msgs else None
        adapter = deltas.from_record(arrays)
        evaluated = rnd % fed.evaluate_every == 0 or rnd == fed.num_rounds
        if evaluated:  # central evaluation every k rounds (and always after the last): it can cost a round
            self.central = self.ev(adapter, residual=strategy.residual)
        central = self.central
        row = {
            **trained,
            "local_eval_loss": local.get(P.M_EVAL_LOSS) if local else None,
            "local_eval_accuracy": local.get(P.M_EVAL_ACC) if local else None,
            **{f"local_eval_{what}_{q}": local.get(f"{key}-{q}") if local else None
               for what, key in (("loss", P.M_EVAL_LOSS), ("accuracy", P.M_EVAL_ACC)) for q in SPREAD_NAMES},
            "central_loss": central["loss"] if evaluated else None,
            "central_accuracy": central.get("accuracy") if evaluated else None,
            **privacy_columns(self.ledger, cfg),
            "server_rss_mb": _rss_mb(),
            "seconds": time.perf_counter() - t0,
        }
        if cfg.export.enabled and cfg.export.deploy and cfg.export.catch_up is not False:
            # Devices that missed an earlier deployment (offline then) get the published artifact now.
            caught = catch_up(grid, strategy, cfg, attempted=self.caught_up, timeout=fed.round_timeout_s)
            if caught:
                row["caught_up"] = caught
        self.history.append(publishable_row(row, cfg))
        self._emit(row)
        return self.history[-1]

    def _emit(self, row: dict) -> None:
        """Publish one row: metrics.jsonl, the trackers, the ``on_round`` callback."""
        row = publishable_row(row, self.cfg)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log(row)
        if self.on_round:
            self.on_round(row)

    def _export(self, privacy: dict) -> dict:
        """Device artifacts of the final adapter, pushed to the fleet when ``export.deploy``; then
        linger for devices that connect late."""
        from server.deploy import export_and_deploy

        cfg, central = self.cfg, self.central
        deployment = export_and_deploy(
            self.grid, cfg, self.run_dir, privacy=privacy, client_name=self.strategy.client_name,
            metrics={"central_loss": central["loss"], "central_accuracy": central.get("accuracy")},
            labels=self.ev.label_names)
        if cfg.export.deploy and cfg.export.linger_s > 0:
            deployment["late"] = linger(self.grid, self.strategy, cfg, seconds=cfg.export.linger_s,
                                        timeout=cfg.federation.round_timeout_s)
        return deployment

    def finish(self) -> dict:
        """Write the final adapter (PEFT format), privacy.json, export and deploy, samples,
        summary.json and report.md; return the summary."""
        cfg, ev, run_dir, strategy, adapter = self.cfg, self.ev, self.run_dir, self.strategy, self.adapter
        fed, central = cfg.federation, self.central
        # Final adapter in PEFT format (adapter_config.json + adapter_model.safetensors).
        models.set_adapter_state(ev.model, adapter)
        ev.model.save_pretrained(run_dir / "adapter")
        residual = strategy.residual
        if residual:  # FedEx-LoRA: the served model is W0 + s·(R + B A); R ships next to the adapter
            from safetensors.numpy import save_file

            save_file({k: v.astype("float32") for k, v in residual.items()},
                      str(run_dir / "adapter" / "lora_residual.safetensors"))
        summary = {
            "run_dir": str(run_dir), "scenario": cfg.name, "strategy": cfg.strategy.name,
            "rounds": fed.num_rounds, "base_model": cfg.model.source, "base_hash": ev.base.hash,
            "adapter_parameters": int(sum(v.size for v in adapter.values())),
            "base_parameters": int(ev.base_parameters),
            "initial_central_loss": self.initial["loss"], "initial_central_accuracy": self.initial.get("accuracy"),
            "final_central_loss": central["loss"], "final_central_accuracy": central.get("accuracy"),
            "wall_seconds": time.perf_counter() - self.t_start,
            "privacy": privacy_report(self.ledger, cfg),
        }
        (run_dir / "privacy.json").write_text(json.dumps(summary["privacy"], indent=2))
        if cfg.export.enabled:
            summary["deployment"] = self._export(summary["privacy"])
        if cfg.model.task == "causal-lm":
            summary["samples"] = answer_samples(ev, cfg, ev.holdout, adapter, residual)
            if summary["samples"]:  # the first one under the keys older readers know
                first = summary["samples"][0]
                summary.update(sample_prompt=first["prompt"], base_answer=first["base"],
                               finetuned_answer=first["finetuned"])
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_run_report(run_dir, summary, self.history)  # report.md + plots/*.png
        return summary


def run_federation(
    grid: Grid,
    cfg: fcfg.RunConfig,
    run_dir: Path,
    *,
    on_round: Callable[[dict], None] | None = None,
    resume: bool = False,
    force: bool = False,
) -> dict:
    """Run all rounds; write the run directory; return the summary.

    ``resume``: continue after the last complete round checkpointed in ``run_dir``
    (refused if the checkpoint was made with another config, unless ``force``).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg, run_dir)  # TensorBoard / MLflow when tracking.* asks for them
    try:
        federation = Federation(grid, cfg, run_dir, tracker, on_round=on_round)
        first = federation.resume(force=force) if resume else federation.start()
        for rnd in range(first, cfg.federation.num_rounds + 1):
            try:
                federation.run_round(rnd)
            except BudgetExceeded as err:
                log.warning("stopping before round %d: %s", rnd, err)
                break
        summary = federation.finish()
    except BaseException:
        tracker.close(failed=True)  # a tracker never shows a crashed run as still RUNNING
        raise
    finally:
        progress.write_to(None)
        progress.withhold_counts(False)
    tracker.close()
    return summary
