"""``fedge simulate``: one scenario on Flower's simulation engine (Ray backend).

The ServerApp runs in this process (so the live view sees every round); each
virtual client is a ClientApp executed by Flower's Ray actors, which keep the
base model loaded across messages. Ray is started and shut down by Flower's
simulation engine within this call: no process outlives it, nothing is
installed or downloaded at run time. With ``simulation.ray_address`` the run
attaches to an existing Ray cluster instead and leaves it running
(:func:`ray_cluster`, docs/scale-out.md).

Why ``run_simulation`` rather than ``flwr run``: the latter starts a local
SuperLink that outlives the run and runs the app from a copy unpacked in
``$FLWR_HOME`` (see docs/design.md). Both execute the same ServerApp/ClientApp
code; ``flwr run .`` keeps working with ``--run-config "scenario='...'"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from fedge import config as fcfg
from fedge import flower_patches
from fedge import protocol as P


def backend_config(cfg: fcfg.RunConfig) -> dict:
    """Flower's Ray backend: each virtual client reserves ``client_cpus`` CPUs and ``client_gpus`` GPUs
    (a fraction: 1/k lets k clients share one GPU; Ray gives each its share through CUDA_VISIBLE_DEVICES)."""
    return {
        "client_resources": {"num_cpus": cfg.simulation.client_cpus, "num_gpus": cfg.simulation.client_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                      "logging_level": "error", "log_to_driver": True},
    }


def model_sizes(cfg: fcfg.RunConfig) -> tuple[int, int]:
    """(base parameters, adapter parameters) from the model's config alone (meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedge.models import lora_targets, resolve_source

    where = resolve_source(cfg.model.source, Path(cfg.model.cache_dir) if cfg.model.cache_dir else None)
    mcfg = AutoConfig.from_pretrained(where)
    with torch.device("meta"):
        if cfg.model.task == "causal-lm":
            model = AutoModelForCausalLM.from_config(mcfg)
        else:
            mcfg.num_labels = cfg.model.num_labels or 2
            model = AutoModelForSequenceClassification.from_config(mcfg)
    targets = set(lora_targets(model, cfg.lora.target_modules))
    lora = sum(cfg.lora.r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets)
    return sum(p.numel() for p in model.parameters()), lora


def disk_needed(cfg: fcfg.RunConfig) -> tuple[int, str]:
    """Bytes a run writes (with a 1.5x margin), and how that was counted.

    Checkpoints: the adapter plus up to two optimiser moments, ``checkpoint.KEEP`` + 1 at a
    time; the final adapter; the artifact (adapter: safetensors + GGUF; merged: the fp32
    merge plus each format) once on the server and once per simulated device's store.
    """
    from server.checkpoint import KEEP

    base, lora = model_sizes(cfg)
    adapter = 4 * lora
    if cfg.export.enabled and cfg.export.mode == "merged":
        bits = {"F32": 32, "fp32": 32, "F16": 16, "int8": 8, "Q8_0": 8.5, "Q6_K": 8.2, "Q5_K_M": 6.8,
                "Q4_K_M": 6.5, "Q4_1": 6.1, "Q4_0": 5.8}
        artifact = int(base * sum(bits.get(f, 32) for f in (cfg.export.formats or ("Q8_0",))) / 8) + 4 * base
    elif cfg.export.enabled:
        artifact = 2 * adapter
    else:
        artifact = 0
    devices = cfg.data.num_clients if cfg.export.enabled and cfg.export.deploy else 0
    need = 3 * adapter * (KEEP + 1) + adapter + artifact * (1 + devices)
    how = (f"adapter {adapter / 2**20:.1f} MiB x {3 * (KEEP + 1) + 1} (checkpoints with optimiser state, final), "
           f"artifact {artifact / 2**20:.1f} MiB x {1 + devices} (server + {devices} simulated devices)")
    return int(1.5 * need), how


def preflight(cfg: fcfg.RunConfig, run_dir: Path, *, resume: bool = False, force: bool = False) -> None:
    """Fail before any runtime starts: unwritable run dir, bad data or strategy settings."""
    from fedge.data import data_args, federated_split
    from server.federation import build_strategy

    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / ".write-test"
    try:
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise fcfg.ConfigError(f"run directory {run_dir} is not writable: {err}") from None
    need, how = disk_needed(cfg)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise fcfg.ConfigError(f"not enough free disk space for this run in {run_dir}: about "
                               f"{need / 2**20:,.0f} MiB needed ({how}, 1.5x margin), {free / 2**20:,.0f} MiB free")
    check_devices(cfg)
    build_strategy(cfg, base_hash="")
    if resume:
        from server import checkpoint

        ck = checkpoint.load_latest(run_dir)
        if ck.config_digest != cfg.digest() and not force:
            raise checkpoint.CheckpointError(
                f"checkpoint round {ck.round} in {run_dir} was made with another config; "
                "resume with the run's own config.yaml, or pass --force")
    # Builds the split (bad data settings fail here); partitions are non-empty by construction
    # (natural groups exist, IID needs records >= clients, Dirichlet enforces min_partition_size).
    federated_split(**data_args(cfg))


def check_devices(cfg: fcfg.RunConfig, *, cuda_available: bool | None = None) -> None:
    """Refuse device settings this machine cannot honour before Ray starts (names the scenario key).

    ``simulation.client_gpus`` > 0 needs a CUDA device here (unless ``simulation.ray_address`` names a
    cluster, whose workers Ray checks); an explicit CUDA ``model.device``
    needs ``client_gpus`` > 0, since Ray hides the GPUs from clients that reserve none."""
    from fedge.devices import DeviceError, check_client_gpus, resolve_device

    try:
        if not cfg.simulation.ray_address:  # on a cluster the workers' GPUs count, not this machine's
            check_client_gpus(cfg.simulation.client_gpus, cuda_available=cuda_available)
        resolve_device(cfg.model.device, cfg.model.dtype, cuda_available=cuda_available)  # the server's evaluator
    except DeviceError as err:
        raise fcfg.ConfigError(str(err)) from None
    if cfg.model.device.startswith("cuda") and cfg.simulation.client_gpus == 0:
        raise fcfg.ConfigError(f"model.device {cfg.model.device!r} with simulation.client_gpus 0: Ray hides the "
                               "GPUs from clients that reserve none; set simulation.client_gpus (e.g. 0.25)")


def _mods(cfg: fcfg.RunConfig) -> list:
    sim = cfg.simulation
    if sim.fault_rate <= 0:
        return []
    from simulations.faults import make_fault_mod

    return [make_fault_mod(rate=sim.fault_rate, kinds=tuple(sim.fault_kinds), seed=cfg.seed, hang_s=sim.fault_hang_s)]


def pin_trusted_key(cfg: fcfg.RunConfig, state_root: Path) -> Path:
    """Enrol the virtual devices: pin the server's signing public key in their state root.

    The devices' deploy handler reads it from there (``clients.app.pinned_key``), never
    from the run config. The key pair is created here if the server has none yet (the
    server would create it at the first export anyway).
    """
    from clients.app import PINNED_KEY_FILE
    from fedge.export import generate_keypair

    key = cfg.signing_key()
    if not key.exists():
        generate_keypair(key.parent, name=key.stem)
    state_root.mkdir(parents=True, exist_ok=True)
    pin = state_root / PINNED_KEY_FILE
    pin.write_bytes(key.with_suffix(".pub").read_bytes())
    return pin


# What the clients read from the environment (set in :func:`simulate`). A local Ray's workers inherit
# this process's environment; on an existing cluster they are started by its raylets, so it travels
# as the job's runtime_env instead.
CLIENT_ENV = ("FEDGE_TORCH_THREADS", "OMP_NUM_THREADS", P.STATE_DIR_ENV, "FEDGE_CACHE", "PYTHONWARNINGS",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")


@contextlib.contextmanager
def ray_cluster(address: str | None, *, verbose: bool = False) -> Iterator[None]:
    """Within the block, this process is a driver of the Ray cluster at ``address`` (None: do nothing).

    Flower's Ray backend calls ``ray.init`` only when Ray is not initialised yet, and passes its
    own ``runtime_env`` (PYTHONPATH only), so its ``init_args`` cannot carry the clients'
    environment; connecting here first gives the job both. Disconnecting leaves the cluster up.
    """
    if not address:
        yield
        return
    import ray

    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:
        # ray.init retries an unreachable GCS for minutes, without saying so: ask once, briefly.
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as err:
            raise fcfg.ConfigError(f"simulation.ray_address {address!r}: no Ray head answers there ({err}); "
                                   "start one with `ray start --head` (docs/scale-out.md)") from None

    pythonpath = os.pathsep.join(sys.path + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {k: os.environ[k] for k in CLIENT_ENV if k in os.environ} | {"PYTHONPATH": pythonpath}
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level="info" if verbose else "error",
                 log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise fcfg.ConfigError(f"simulation.ray_address {address!r}: cannot attach to a Ray cluster there "
                               f"({type(err).__name__}: {err})") from None
    try:
        yield
    finally:
        ray.shutdown()  # the driver disconnects; Flower may have done so already


def simulate(cfg: fcfg.RunConfig, run_dir: Path, *, on_round: Callable[[dict], None] | None = None,
             verbose: bool = False, resume: bool = False, force: bool = False) -> dict:
    """Run the scenario; return the run summary (also written to ``run_dir``)."""
    from flwr.simulation import run_simulation

    import clients.app
    import server.app

    if cfg.export.enabled and not cfg.export.private_key:
        # Ray workers may run elsewhere: pin the signing key (and so the devices' trusted key) absolutely.
        key = str(cfg.signing_key().resolve())
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"private_key": key})})
    if cfg.export.catch_up is None and not resume:
        # Virtual devices start empty in every run: pushing the last run's artifact to them is
        # work without a purpose (and couples runs); ask for it with export.catch_up: true.
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"catch_up": False})})
    preflight(cfg, run_dir, resume=resume, force=force)
    config_file = run_dir / "config.yaml"  # the clients read the scenario from here
    config_file.write_text(fcfg.dump_yaml(cfg))
    # Ray workers inherit this environment: pin client threads, stay offline-safe.
    os.environ["FEDGE_TORCH_THREADS"] = str(cfg.simulation.torch_threads)
    os.environ["OMP_NUM_THREADS"] = str(cfg.simulation.torch_threads)
    # Clients that reserve no GPU see none (model.device auto -> cpu): Ray's default today, pinned
    # because Ray announces it will stop hiding GPUs from num_gpus=0 workers.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
    # Per-client state that must survive a restart (DP-SGD accountant histories).
    os.environ[P.STATE_DIR_ENV] = str((run_dir / "client-state").resolve())
    if cfg.export.enabled:
        pin_trusted_key(cfg, run_dir / "client-state")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    result: dict = {}
    # Flower's per-node delivery stalls with thousands of virtual clients (checked; see fedge/flower_patches.py)
    flower_patches.install_one_sweep_delivery()
    with ray_cluster(cfg.simulation.ray_address, verbose=verbose):
        run_simulation(
            server_app=server.app.make_app(str(config_file), run_dir, on_round, result, resume=resume, force=force),
            client_app=clients.app.make_app(str(config_file.resolve()), mods=_mods(cfg)),
            num_supernodes=cfg.data.num_clients,
            backend_config=backend_config(cfg),
            verbose_logging=verbose,
        )
    if "error" in result:
        raise result["error"]
    if not result:
        raise RuntimeError(f"the simulation ended without a result; see the log above and {run_dir}")
    return result
