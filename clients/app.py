"""Flower ClientApp: local LoRA training that returns only the adapter delta.

train:    A_t (global adapter) + round config  ->  encoded Δ = A_local − A_t, metrics, base hash
evaluate: A_t  ->  loss (and accuracy) on this client's local held-out set

The scenario comes from the run config (``flwr run --run-config scenario=...``)
or, in ``fedge simulate``, from the resolved config file the runner wrote.
The partition comes from the node config (``partition-id``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import secagg
from fedge import deltas, lora_fed
from fedge import protocol as P
from strategies.client_hooks import client_lora, client_round

# torch, transformers and opacus are imported inside the handlers that train or evaluate:
# Flower starts a fresh process per message on a device, and the identity and secure
# aggregation queries should not pay for them.


def get_runtime(cfg):
    from clients.cache import get_runtime as _get

    return _get(cfg)


def scenario(name_or_path, overrides=()):
    from clients.cache import scenario as _scenario

    return _scenario(name_or_path, tuple(overrides))


class BaseMismatch(RuntimeError):
    """This node's base model differs from the server's: it refuses to train."""


def _scenario_for(context: Context, config_path: str | None):
    if config_path:
        return scenario(config_path)
    rc = context.run_config
    overrides = tuple(s for s in str(rc.get(P.RUN_OVERRIDES, "")).split(";") if s.strip())
    return scenario(str(rc.get(P.RUN_SCENARIO, "default")), overrides)


def _prepare(msg: Message, context: Context, config_path: str | None):
    cfg = _scenario_for(context, config_path)
    rt = get_runtime(cfg)
    conf = msg.content[P.CONFIG]
    server_hash = str(conf.get(P.CFG_BASE_HASH, ""))
    if server_hash != rt.base.hash:
        raise BaseMismatch(f"base model hash {rt.base.hash[:12]} differs from the server's {server_hash[:12]}: "
                           "refusing to train on a different base model")
    r, alpha = client_lora(conf, context)  # HetLoRA: this client's rank; else lora-r, lora-alpha
    peft = rt.peft_model(r=r, alpha=alpha, dropout=float(conf[P.CFG_LORA_DROPOUT]),
                         targets=tuple(conf[P.CFG_LORA_TARGETS]))
    global_state = lora_fed.client_view(deltas.from_record(msg.content[P.ARRAYS]), r)  # HetLoRA: truncated
    from fedge import models

    models.set_adapter_state(peft, global_state)
    pid = int(context.node_config.get(P.NODE_PARTITION_ID, 0))
    return rt, device_config(conf, context), peft, global_state, pid


def device_config(conf: ConfigRecord, context: Context) -> ConfigRecord:
    """The round config with this device's own capabilities applied (node config
    ``local-steps`` / ``batch-size``: e.g. a slow till trains fewer steps). DP-SGD's
    accountant then uses the steps and sampling rate actually taken (reported per client)."""
    own = {}
    for key, cfg_key in ((P.NODE_LOCAL_STEPS, P.CFG_LOCAL_STEPS), (P.NODE_BATCH_SIZE, P.CFG_BATCH_SIZE)):
        if key in context.node_config:
            value = int(context.node_config[key])
            if value < 1:
                raise ValueError(f"node config {key} must be a positive integer, got {value}")
            own[cfg_key] = value
    return ConfigRecord({**dict(conf), **own}) if own else conf


def _data_path(context: Context) -> str | None:
    """Deployment: this device's own data file (node config ``data-path``), else None (a partition)."""
    path = context.node_config.get(P.NODE_DATA_PATH)
    return str(path) if path else None


DP_HISTORY = "dp-sgd-history"  # key in the node's Context state: the accountant's history


def _state_dir(context: Context) -> Path | None:
    """This client's persistent state directory (node config, or the simulation runner's env)."""
    return P.client_state_dir(context.node_config)


PINNED_KEY_FILE = "trusted-key.pub"  # in the state root: the simulation runner's enrolment of its virtual devices


def pinned_key(context: Context) -> str | None:
    """The server signing key this device pinned at enrolment, or None.

    Node config ``trusted-key`` (``fedge client --trusted-key``), else ``trusted-key.pub``
    in the device state root (node config ``state-dir``, or the simulation runner's
    environment, which writes it when it creates the virtual devices' state). Never the
    run config: whoever submits a run would choose the key its models are checked against.
    """
    nc = context.node_config
    if nc.get(P.NODE_TRUSTED_KEY):
        return str(nc[P.NODE_TRUSTED_KEY])
    root = P.state_root(nc)
    pin = root / PINNED_KEY_FILE if root is not None else None
    return str(pin) if pin is not None and pin.is_file() else None


def _store_dir(context: Context) -> Path:
    """This device's model store (deployed artifacts)."""
    return (_state_dir(context) or Path.home() / ".fedge" / P.client_name(context.node_config)) / "models"


def _history_file(context: Context) -> Path | None:
    d = _state_dir(context)
    return d / "dp-sgd-history.json" if d else None


def _load_history(context: Context):
    """The accountant history: from disk if this node keeps state there (it survives restarts), else Context."""
    from fedge.privacy import dpsgd

    f = _history_file(context)
    if f is not None and f.exists():
        return dpsgd.history_from_config(json.loads(f.read_text()))
    return dpsgd.history_from_config(context.state.get(DP_HISTORY))


def _save_history(context: Context, history) -> None:
    from fedge.privacy import dpsgd

    record = dpsgd.history_to_config(history)
    context.state[DP_HISTORY] = ConfigRecord(record)
    f = _history_file(context)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, f)  # atomic: a crash never leaves a shorter history behind


def _head_lr(conf) -> float | None:
    return float(conf[P.CFG_HEAD_LR]) if P.CFG_HEAD_LR in conf else None


def _head_optimizer(conf) -> str:
    return str(conf.get(P.CFG_HEAD_OPTIMIZER, "adamw"))


def _train_dp_sgd(peft, train_ex, rt, conf, context: Context) -> dict:
    """DP-SGD for this round; the accountant history persists across rounds (and restarts)."""
    from fedge.privacy import dpsgd

    history = _load_history(context)
    steps, delta = int(conf[P.CFG_LOCAL_STEPS]), float(conf[P.CFG_DPSGD_DELTA])
    q = min(1.0, int(conf[P.CFG_BATCH_SIZE]) / len(train_ex))  # expected batch = batch-size
    accountant = str(conf[P.CFG_DPSGD_ACCOUNTANT])
    target = float(conf[P.CFG_DPSGD_TARGET_EPS]) or None
    z = float(conf[P.CFG_DPSGD_NOISE]) or dpsgd.calibrate_noise(
        target_epsilon=target, delta=delta, sample_rate=q, steps_per_round=steps,
        rounds=int(conf[P.CFG_NUM_ROUNDS]), accountant=accountant)
    out, history = dpsgd.train_local_dp(
        peft, train_ex, task=rt.task, pad_id=rt.pad_id, steps=steps, sample_rate=q, lr=float(conf[P.CFG_LR]),
        head_lr=_head_lr(conf), head_optimizer=_head_optimizer(conf), noise_multiplier=z, max_grad_norm=float(conf[P.CFG_DPSGD_MAX_GRAD_NORM]), delta=delta, history=history,
        max_epsilon=target, accountant=accountant, weight_decay=float(conf[P.CFG_WEIGHT_DECAY]),
        max_physical_batch=int(conf.get(P.CFG_DPSGD_MAX_PHYSICAL_BATCH, 0)) or None)
    _save_history(context, history)
    return {P.M_DP_EPSILON: out["epsilon"], P.M_DP_NOISE: z, P.M_DP_SAMPLE_RATE: q, P.M_DP_STEPS: steps}


def _train_round(peft, train_ex, rt, conf, context: Context, seed: int, metrics: MetricRecord) -> None:
    """Local training for one round: DP-SGD when the server asks for it, else AdamW (+ FedProx term)."""
    from fedge.train import train_local

    if P.CFG_DPSGD_DELTA in conf:
        # Record-level DP-SGD; the train loss is not privatised, so it is not sent.
        metrics.update(_train_dp_sgd(peft, train_ex, rt, conf, context))
        return
    result = train_local(peft, train_ex, task=rt.task, pad_id=rt.pad_id, steps=int(conf[P.CFG_LOCAL_STEPS]),
                         batch_size=int(conf[P.CFG_BATCH_SIZE]), lr=float(conf[P.CFG_LR]), head_lr=_head_lr(conf),
                         head_optimizer=_head_optimizer(conf),
                         weight_decay=float(conf[P.CFG_WEIGHT_DECAY]), seed=seed,
                         proximal_mu=float(conf.get(P.CFG_PROXIMAL_MU, 0.0)))
    metrics[P.M_TRAIN_LOSS] = result["loss"]


class Expired(RuntimeError):
    """The message outlived its round before this client got to it: the server has moved on."""


def skip_expired(msg: Message, context: Context, call_next) -> Message:
    """Client mod: refuse work on a message whose round is already over (its TTL has passed).

    Flower's simulation engine queues every message and runs it even after the server
    stopped waiting; without this, one hanging client delays every later round.
    """
    md = msg.metadata
    if md.ttl and md.created_at and md.created_at + md.ttl < time.time():
        raise Expired(f"message of round {msg.content[P.CONFIG].get(P.CFG_ROUND) if P.CONFIG in msg.content else '?'} "
                      f"expired {time.time() - md.created_at - md.ttl:.0f} s before this client started it")
    return call_next(msg, context)


def make_app(config_path: str | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp; ``config_path`` pins the scenario (simulation), else the run config decides."""
    from clients.worker import worker_mod

    # skip_expired first (an expired message is not forwarded), then the device's warm worker
    # when it has one (deployment), then any test/simulation mods.
    app = ClientApp(mods=[skip_expired, worker_mod, *(mods or [])])

    def local_update(msg: Message, context: Context):
        """Train on A_t; return (Δ after the algorithm's client hooks and user-level clipping,
        its extra records, metrics, runtime, round config)."""
        from fedge import models

        t0 = time.perf_counter()
        rt, conf, peft, global_state, pid = _prepare(msg, context, config_path)
        train_ex, _ = rt.examples(pid, _data_path(context))
        rnd = int(conf[P.CFG_ROUND])
        entropy = [int(conf[P.CFG_SEED]), rnd, pid]
        if _data_path(context):  # devices with their own files all have partition-id 0: add their name
            name = P.client_name(context.node_config).encode()
            entropy.append(int.from_bytes(hashlib.sha256(name).digest()[:4], "little"))
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        metrics = MetricRecord({P.M_NUM_EXAMPLES: len(train_ex), P.M_LOCAL_STEPS: int(conf[P.CFG_LOCAL_STEPS])})
        with client_round(peft, conf, context, msg.content) as hooks:  # the algorithms' client halves
            _train_round(peft, train_ex, rt, conf, context, seed, metrics)
            # (user-level DP's hook clips last, so the delta that leaves the device is clipped)
            delta, extra_records = hooks.finish(deltas.compute_delta(models.get_adapter_state(peft), global_state),
                                                metrics)
        metrics[P.M_BYTES_DOWN] = sum(deltas.record_bytes(r) for r in msg.content.array_records.values())
        metrics[P.M_TRAIN_SECONDS] = time.perf_counter() - t0
        return delta, extra_records, metrics, rt, conf

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        delta, extra_records, metrics, rt, conf = local_update(msg, context)
        encoding = str(conf[P.CFG_ENCODING])
        wire = deltas.to_record(deltas.encode(delta, encoding))
        metrics[P.M_BYTES_UP] = deltas.record_bytes(wire) + sum(
            deltas.record_bytes(r) for r in extra_records.values() if isinstance(r, ArrayRecord))
        meta = ConfigRecord({P.META_BASE_HASH: rt.base.hash, P.META_ENCODING: encoding})
        return Message(RecordDict({P.ARRAYS: wire, P.METRICS: metrics, P.META: meta, **extra_records}), reply_to=msg)

    @app.train("secagg")
    def train_secure(msg: Message, context: Context) -> Message:
        """Secure aggregation's stage 3: train, then send only the masked vector (clients/secagg.py).

        Plain metrics carry what the server needs for accounting (DP-SGD σ, q, steps) and
        timing; the example count, train loss and clipping bit travel inside the masked sum.
        """
        delta, extra_records, metrics, rt, conf = local_update(msg, context)
        if extra_records:
            raise secagg.SecAggRefused(f"secure aggregation cannot carry {sorted(extra_records)}")
        sa = msg.content[P.SECAGG]
        weight = float(metrics[P.M_NUM_EXAMPLES]) if bool(sa[P.SA_WEIGHTED]) else 1.0
        wire = secagg.masked_vector(msg, context, delta=delta, weight=weight, loss=metrics.get(P.M_TRAIN_LOSS),
                                    unclipped=float(metrics.get(P.M_DP_UNCLIPPED, 1.0)))
        public = MetricRecord({k: v for k, v in metrics.items()
                               if k in (P.M_DP_NOISE, P.M_DP_SAMPLE_RATE, P.M_DP_STEPS, P.M_DP_EPSILON,
                                        P.M_BYTES_DOWN, P.M_TRAIN_SECONDS)})
        public[P.M_BYTES_UP] = deltas.record_bytes(wire)
        meta = ConfigRecord({P.META_BASE_HASH: rt.base.hash, P.META_ENCODING: "secagg"})
        return Message(RecordDict({P.ARRAYS: wire, P.METRICS: public, P.META: meta}), reply_to=msg)

    # A device (node config ``state-dir``) keeps its secure-aggregation identity key and the
    # keys it pinned for its peers on disk: they outlast a run. A simulated client keeps
    # them in Context.state (one run).
    def key_dir(context: Context) -> Path | None:
        root = context.node_config.get(P.NODE_STATE_DIR)
        return Path(str(root)) / P.client_name(context.node_config) if root else None

    @app.query("secagg_setup")
    def secagg_setup(msg: Message, context: Context) -> Message:
        return secagg.setup(msg, context, key_dir=key_dir(context))

    @app.query("secagg_share")
    def secagg_share(msg: Message, context: Context) -> Message:
        return secagg.share_keys(msg, context, key_dir=key_dir(context))

    @app.query("secagg_check")
    def secagg_check(msg: Message, context: Context) -> Message:
        return secagg.consistency_check(msg, context, key_dir=key_dir(context))

    app.query("secagg_unmask")(secagg.unmask)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fedge.train import evaluate as evaluate_model

        rt, conf, peft, _, pid = _prepare(msg, context, config_path)
        _, held = rt.examples(pid, _data_path(context))
        with lora_fed.residual_applied(peft, lora_fed.message_residual(msg.content)):  # FedEx-LoRA's R
            res = evaluate_model(peft, held, task=rt.task, pad_id=rt.pad_id,
                                 batch_size=int(conf[P.CFG_EVAL_BATCH_SIZE]),
                                 max_examples=int(conf[P.CFG_MAX_EVAL_EXAMPLES]))
        metrics = MetricRecord({P.M_NUM_EXAMPLES: res["n"], P.M_EVAL_LOSS: res["loss"]})
        if "accuracy" in res:
            metrics[P.M_EVAL_ACC] = res["accuracy"]
        return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)

    @app.query("deploy")
    def deploy(msg: Message, context: Context) -> Message:
        """Verify and install a signed artifact; reply with the installed version or why it was refused."""
        from fedge.export import arrays_to_artifact
        from fedge.runtime.store import ArtifactRefused, current, install

        cfg = _scenario_for(context, config_path)
        rt = get_runtime(cfg)
        store = _store_dir(context)
        key = pinned_key(context)
        if key is None:  # never fall back to a key named by the run config: its submitter is not trusted
            result = {P.DEPLOY_REFUSED: "no-trusted-key", P.DEPLOY_VERSION: current(store) or 0,
                      P.DEPLOY_MESSAGE: "this device pinned no signing key at enrolment (fedge client "
                                        "--trusted-key): deployed models are refused"}
            return Message(RecordDict({P.DEPLOY_RESULT: ConfigRecord(result)}), reply_to=msg)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                arrays_to_artifact(deltas.from_record(msg.content[P.ARTIFACT]), tmp)
                result = {P.DEPLOY_VERSION: install(tmp, store_dir=store, trusted_public_key=str(key),
                                                    local_base_hash=rt.base.hash)}
            except (ArtifactRefused, ValueError, OSError) as err:  # the previous model stays installed
                result = {P.DEPLOY_REFUSED: getattr(err, "reason", type(err).__name__), P.DEPLOY_MESSAGE: str(err),
                          P.DEPLOY_VERSION: current(store) or 0}
        return Message(RecordDict({P.DEPLOY_RESULT: ConfigRecord(result)}), reply_to=msg)

    @app.query()
    def identity(msg: Message, context: Context) -> Message:
        """The stable name the server samples and orders clients by (node ids change per run),
        and the artifact version installed here (a device that missed a deployment catches up)."""
        from fedge.runtime.store import current

        try:
            installed = current(_store_dir(context)) or 0
        except (OSError, ValueError):
            installed = 0
        return Message(RecordDict({P.IDENTITY: ConfigRecord({P.ID_CLIENT: P.client_name(context.node_config),
                                                             P.ID_INSTALLED: int(installed)})}), reply_to=msg)

    return app


# For `flwr run` / SuperNodes: the scenario comes from the run config.
app = make_app()
