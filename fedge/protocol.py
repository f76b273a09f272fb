"""Every message key fedge puts on the wire, in one place.

Train message (server -> client), ``RecordDict``:
    ``ARRAYS``  ArrayRecord  the global adapter A_t (fp32 tensors, PEFT names)
    ``CONFIG``  ConfigRecord the round config (keys ``CFG_*`` below)

Train reply (client -> server):
    ``ARRAYS``  ArrayRecord  the encoded adapter delta  Δ = A_local − A_t
                             (``fedge.deltas.encode``; only adapter tensors)
    ``METRICS`` MetricRecord ``M_*`` keys (numbers only)
    ``META``    ConfigRecord ``META_*`` keys (strings: base hash, encoding)

Evaluate message: same ``ARRAYS`` + ``CONFIG``; reply: ``METRICS`` only.

LoRA-aware algorithms (``strategies/{scaffold,ffa_lora,head_only,lora_exact,hetlora}.py``, each with its client half)
add records next to these, only when their strategy runs:

    train message             ``SCAFFOLD_C``     ArrayRecord  server control variate c (fp32, adapter names)
    train / evaluate message  ``LORA_RESIDUAL``  ArrayRecord  FedEx-LoRA residual R per adapted module (fp32)
    train reply               ``SCAFFOLD_DC``    ArrayRecord  Δc_i = c_i⁺ − c_i (fp32, adapter names)
                              ``LORA_META``      ConfigRecord ``META_LORA_RANK``: the rank this client trained at
"""

import os
from pathlib import Path

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
META = "meta"

# -- round config (server -> client) --------------------------------------------
CFG_ROUND = "server-round"
CFG_LOCAL_STEPS = "local-steps"
CFG_BATCH_SIZE = "batch-size"
CFG_LR = "lr"
CFG_HEAD_LR = "head-lr"  # absent: the head trains at CFG_LR
CFG_HEAD_OPTIMIZER = "head-optimizer"  # "adamw" | "sgd"; absent: adamw
CFG_WEIGHT_DECAY = "weight-decay"
CFG_ENCODING = "encoding"
CFG_BASE_HASH = "base-hash"
CFG_SEED = "seed"
CFG_LORA_R = "lora-r"
CFG_LORA_ALPHA = "lora-alpha"
CFG_LORA_DROPOUT = "lora-dropout"
CFG_LORA_TARGETS = "lora-targets"  # list[str]
CFG_EVAL_BATCH_SIZE = "eval-batch-size"
CFG_MAX_EVAL_EXAMPLES = "max-eval-examples"
CFG_PROXIMAL_MU = "proximal-mu"  # FedProx μ: clients add (μ/2)‖w − A_t‖² to their loss

CFG_NUM_ROUNDS = "num-rounds"  # planned rounds (DP-SGD calibration plans for all of them)
# record-level DP-SGD (present only when enabled)
CFG_DPSGD_NOISE = "dp-sgd-noise-multiplier"  # σ, or 0 when a target ε is given
CFG_DPSGD_TARGET_EPS = "dp-sgd-target-epsilon"  # 0 when σ is given
CFG_DPSGD_MAX_GRAD_NORM = "dp-sgd-max-grad-norm"
CFG_DPSGD_DELTA = "dp-sgd-delta"
CFG_DPSGD_ACCOUNTANT = "dp-sgd-accountant"
CFG_DPSGD_MAX_PHYSICAL_BATCH = "dp-sgd-max-physical-batch"  # 0 = no split
# user-level DP: clients clip their delta to this norm before sending
CFG_DP_CLIP_NORM = "dp-clip-norm"

# LoRA-aware algorithms (present only when the strategy asks; see fedge.lora_fed)
CFG_SCAFFOLD = "scaffold-session"  # SCAFFOLD: int id of the server's c; clients keep c_i per id
CFG_FREEZE_A = "lora-freeze-a"  # FFA-LoRA: bool, keep lora_A frozen and send only the other tensors
CFG_FREEZE_ADAPTER = "lora-freeze-adapter"  # head only: bool, keep lora_A and lora_B frozen, send the head
CFG_LORA_EXACT = "lora-exact"  # FedEx-LoRA: bool, add scale·R (record LORA_RESIDUAL) to the frozen weights
CFG_HETLORA = "hetlora"  # HetLoRA: bool, train at this client's own rank (truncated global adapter)
CFG_HETLORA_RANKS = "hetlora-ranks"  # list[int]: rank of partition p = ranks[p % len] (no node lora-rank)

# -- reply metrics (client -> server) ------------------------------------------
M_NUM_EXAMPLES = "num-examples"  # examples the client holds for training (FedAvg weight)
M_TRAIN_LOSS = "train-loss"  # mean per-example loss over the local steps
M_EVAL_LOSS = "eval-loss"  # mean per-example loss on the local held-out set
M_EVAL_ACC = "eval-accuracy"  # classification only
M_BYTES_UP = "bytes-up"  # exact payload bytes of the encoded delta
M_BYTES_DOWN = "bytes-down"  # exact payload bytes of the global adapter received
M_TRAIN_SECONDS = "train-seconds"
M_LOCAL_STEPS = "local-steps"  # steps this client actually took (its node config may lower the server's)
M_DP_UNCLIPPED = "dp-unclipped"  # 1.0 if ‖Δ‖ ≤ S before clipping (adaptive clipping's bit)
M_DP_EPSILON = "dp-epsilon"  # client's record-level ε so far (its own accountant)
M_DP_NOISE = "dp-noise-multiplier"  # σ used this round
M_DP_SAMPLE_RATE = "dp-sample-rate"  # Poisson rate q used this round
M_DP_STEPS = "dp-steps"  # DP-SGD steps this round

# -- reply metadata (client -> server) -----------------------------------------
META_BASE_HASH = "base-hash"
META_ENCODING = "encoding"

# -- extra records of LoRA-aware algorithms (RecordDict keys next to ARRAYS/CONFIG/...)
SCAFFOLD_C = "scaffold-c"  # server -> client: c, ArrayRecord, fp32
SCAFFOLD_DC = "scaffold-dc"  # client -> server: Δc_i, ArrayRecord, fp32
LORA_RESIDUAL = "lora-residual"  # server -> client: R per module, ArrayRecord, fp32, (out, in)
LORA_META = "lora-meta"  # client -> server: ConfigRecord
META_LORA_RANK = "lora-rank"  # int, rank of the client's lora_A / lora_B (HetLoRA)

# -- identity query (server -> every new node, once): reply ConfigRecord ``IDENTITY``
IDENTITY = "identity"
ID_CLIENT = "client-id"  # stable name of the client: device-id, else "partition-<id>"
ID_INSTALLED = "installed-version"  # int: artifact version installed on the device (0 = none)

# -- deploy (server -> every connected node after training), message type ``DEPLOY_TYPE``
DEPLOY_TYPE = "query.deploy"
ARTIFACT = "artifact"  # ArrayRecord: every artifact file as uint8, keyed by relative path
DEPLOY_RESULT = "deploy"  # reply ConfigRecord
DEPLOY_VERSION = "installed-version"  # int, the version now current on the device
DEPLOY_REFUSED = "refused"  # short reason code (absent when installed)
DEPLOY_MESSAGE = "message"

# -- node config (deployment: set per SuperNode; simulation: set by Flower) -----
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DEVICE_ID = "device-id"  # deployment: the operator's name for the device
NODE_DATA_PATH = "data-path"  # deployment: this device's own JSONL/CSV/Parquet file
NODE_STATE_DIR = "state-dir"  # persistent device state (model store, DP accountant history)
NODE_TRUSTED_KEY = "trusted-key"  # the server's public key pinned at enrolment
NODE_LORA_RANK = "lora-rank"  # HetLoRA: the largest LoRA rank this device trains (optional)
NODE_LOCAL_STEPS = "local-steps"  # this device's local steps per round (optional; else the server's)
NODE_BATCH_SIZE = "batch-size"  # this device's batch size (optional; else the server's)
NODE_WORKER_SOCKET = "worker-socket"  # Unix socket of the device's warm worker (clients/worker.py)


def client_name(node_config) -> str:
    """A client's stable name: the operator's device-id, else ``partition-<id>`` (simulation).

    A node without a partition-id trains on partition 0 (clients/app.py), so it is named after it.
    """
    if NODE_DEVICE_ID in node_config:
        return str(node_config[NODE_DEVICE_ID])
    return f"partition-{int(node_config.get(NODE_PARTITION_ID, 0)):06d}"


STATE_DIR_ENV = "FEDGE_CLIENT_STATE"  # simulation: the runner's directory for its virtual devices' state


def state_root(node_config) -> Path | None:
    """Root of persistent device state: node config ``state-dir``, else the simulation runner's env, else None."""
    root = node_config.get(NODE_STATE_DIR) or os.environ.get(STATE_DIR_ENV)
    return Path(str(root)) if root else None


def client_state_dir(node_config) -> Path | None:
    """This client's own state directory (DP accountant history, SCAFFOLD c_i, model store), or None."""
    root = state_root(node_config)
    return root / client_name(node_config) if root is not None else None


# -- run config (``flwr run --run-config``) --------------------------------------
RUN_SCENARIO = "scenario"  # path or packaged name of the scenario YAML
RUN_OVERRIDES = "overrides"  # ';'-separated ``a.b=value`` overrides
RUN_DIR = "run-dir"  # where the ServerApp writes its outputs
RUN_RESUME = "resume"  # continue the run in run-dir from its last checkpoint

# -- secure aggregation (``secure_aggregation.enabled``; fedge/secagg.py, server/secagg.py) --
# Five messages per round, each with a ConfigRecord ``SECAGG``:
#   SA_SETUP_TYPE   server -> sampled:  SA_ROUND_ID, SA_INDEX
#                                        reply: SA_C_PK, SA_S_PK, SA_ID_KEY, SA_KEY_SIG
#   SA_SHARE_TYPE   server -> U2:       SA_NEIGHBOURS, SA_NAMES, SA_C_PKS, SA_S_PKS, SA_ID_KEYS,
#                                        SA_KEY_SIGS, SA_THRESHOLD
#                                        reply: SA_DST, SA_CIPHERTEXTS (one per neighbour)
#   SA_TRAIN_TYPE   server -> U3:       ARRAYS + CONFIG as for train, and SA_SRC, SA_CIPHERTEXTS
#                                        (the shares addressed to this client), SA_FRACTION_BITS,
#                                        SA_NUM, SA_WEIGHTED
#                                        reply: ARRAYS {SA_MASKED: uint64 vector}, METRICS, META
#   SA_CHECK_TYPE   server -> U4:       SA_SURVIVORS (all of U4)        reply: SA_SIGNATURE over U4
#   SA_UNMASK_TYPE  server -> U5:       SA_SURVIVORS, SA_DROPPED (restricted to the client's
#                                        neighbours), SA_SIGNERS, SA_SIGNATURES (U4 signed by them)
#                                        reply: SA_SHARE_OF, SA_SHARE_KIND, SA_SHARES
# The masked vector is the fixed-point encoding of [w·Δ (tensors in sorted name order,
# flattened), w, w·train_loss, w·has_loss, unclipped bit] (``SA_SCALARS`` slots).
SECAGG = "secagg"
SA_SETUP_TYPE = "query.secagg_setup"
SA_SHARE_TYPE = "query.secagg_share"
SA_TRAIN_TYPE = "train.secagg"
SA_CHECK_TYPE = "query.secagg_check"
SA_UNMASK_TYPE = "query.secagg_unmask"
SA_ROUND_ID = "round-id"  # bytes: fresh per round, binds keys and ciphertexts to it
SA_INDEX = "index"  # int: this client's index 1..n in the round
SA_C_PK = "c-pk"  # bytes: X25519 public key for share encryption
SA_S_PK = "s-pk"  # bytes: X25519 public key for pair masks
SA_ID_KEY = "id-key"  # bytes: the client's Ed25519 identity key (pinned by its peers at first contact)
SA_KEY_SIG = "key-sig"  # bytes: Ed25519 signature over (round id, index, c-pk, s-pk)
SA_NAMES = "names"  # list[str]: stable client names, aligned with SA_NEIGHBOURS (the pinning key)
SA_ID_KEYS = "id-keys"  # list[bytes], aligned with SA_NEIGHBOURS
SA_KEY_SIGS = "key-sigs"  # list[bytes], aligned with SA_NEIGHBOURS
SA_SIGNATURE = "signature"  # bytes: Ed25519 signature over (round id, sorted U4)
SA_SIGNERS = "signers"  # list[int]: indices whose U4 signatures follow
SA_SIGNATURES = "signatures"  # list[bytes], aligned with SA_SIGNERS
SA_NEIGHBOURS = "neighbours"  # list[int]
SA_C_PKS = "c-pks"  # list[bytes], aligned with SA_NEIGHBOURS
SA_S_PKS = "s-pks"
SA_THRESHOLD = "threshold"  # int: Shamir threshold t
SA_DST = "dst"  # list[int]
SA_SRC = "src"  # list[int]
SA_CIPHERTEXTS = "ciphertexts"  # list[bytes]
SA_FRACTION_BITS = "fraction-bits"  # int f: fixed point x·2^f
SA_NUM = "num-clients"  # int n: sampled this round (bounds |x| so that the sum cannot wrap)
SA_WEIGHTED = "weighted"  # bool: weight w = num-examples (else 1)
SA_MASKED = "masked"
SA_SCALARS = ("weight", "weighted-loss", "loss-weight", "unclipped")
SA_SURVIVORS = "survivors"  # list[int]
SA_DROPPED = "dropped"  # list[int]
SA_SHARE_OF = "share-of"  # list[int]: whose secret each share is
SA_SHARE_KIND = "share-kind"  # list[int]: 0 = self-mask seed b, 1 = mask private key s_sk
SA_SHARES = "shares"  # list[bytes]
