"""Signed hot-swap: ``fedge serve`` follows its store without a restart.

:class:`ModelSlot` holds the model the server answers with. A request holds the slot
(shared) for its whole run and keeps the model object it started with; a swap either
replaces the object (a new model loaded beside the old one: requests in flight finish on
the old one) or changes the loaded model in place (an adapter on the same base), which
takes the slot exclusively: it waits for the requests in flight, and new requests wait the
few milliseconds the switch takes.

:class:`StoreWatcher` polls the store's ``current`` pointer every ``interval`` s (one small
JSON read). A version other than the one served, and not refused before, is loaded in the
watcher's thread while the old model keeps serving:

* **adapter → adapter on the same base** (the manifest's ``base_model.sha256`` /
  ``gguf_sha256`` and classifier ``pooling`` equal the served one's; same LoRA layers):
  only the adapter is read. torch: the merged weights of the adapted layers are rebuilt from
  the base weights W0 (kept once, from the base the server verified) as PEFT merges them,
  ``W = W0 + transpose(B @ A) * scaling`` with ``scaling = alpha / r``
  (``alpha / sqrt(r)`` with rsLoRA), so the result equals a fresh load bit for bit;
  trained heads (``modules_to_save``) are copied. llama.cpp: ``llama_adapter_lora_init``
  on the loaded base, ``llama_set_adapters_lora`` on the context, the old adapter freed,
  the KV cache dropped (it was computed with the old adapter).
* **anything else** (merged artifacts, another base, another backend): a full
  ``load_artifact``, then the object is replaced.

Both paths first re-hash every file of the installed version against its manifest, as a
load at start does (the signature was verified by ``fedge.runtime.store`` at install). A
version that is refused or fails to load is logged and remembered; the old model keeps
serving and that version is not tried again (a newer install, or ``fedge rollback``,
moves the pointer on). The switch is atomic between requests: every answer comes from
exactly one version, and ``LocalModel.version`` / ``name`` say which.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.export.manifest import ManifestError, pooling_of, read_manifest
from fedge.runtime.infer import LocalModel, check_hashes, load_artifact
from fedge.runtime.store import VERSIONS, ArtifactRefused, current

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class _SharedLock:
    """Many holders, or one exclusive holder; a waiting exclusive holder goes before new shared ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class ModelSlot:
    """The model a server answers with; ``use()`` for a request, ``replace`` / ``change`` to swap."""

    def __init__(self, model: LocalModel):
        self.model = model
        self._lock = _SharedLock()

    @contextmanager
    def use(self) -> Iterator[LocalModel]:
        """The current model, held for one request (an in-place change waits until it is done)."""
        with self._lock.shared():
            yield self.model

    def replace(self, model: LocalModel) -> None:
        """Answer with ``model`` from the next request on (requests in flight keep the old object)."""
        self.model = model

    def change(self, apply: Callable[[LocalModel], None]) -> None:
        """Run ``apply(model)`` on the loaded model with no request using it."""
        with self._lock.exclusive():
            apply(self.model)


# -- adapter swaps on a loaded base ---------------------------------------------------------------


def _adapter_config(artifact_dir: Path) -> dict[str, Any]:
    return json.loads((artifact_dir / "adapter_config.json").read_text())


def _lora_keys(keys) -> tuple[set[str], set[str]]:
    """PEFT adapter tensor names → (paths of LoRA-adapted modules, other tensors: trained heads)."""
    lora, other = set(), set()
    for k in keys:
        name = k.removeprefix(PEFT_PREFIX)
        if ".lora_A." in name or ".lora_B." in name:
            lora.add(name.split(".lora_")[0])
        else:
            other.add(name)
    return lora, other


def _scaling(config: dict[str, Any]) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _plain_lora(config: dict[str, Any]) -> bool:
    return (str(config.get("peft_type", "")).upper() == "LORA" and not config.get("use_dora")
            and not config.get("rank_pattern") and not config.get("alpha_pattern"))


class _TorchBase:
    """W0 of the adapted Linear layers of a merged torch adapter model, read once from the verified base."""

    def __init__(self, model: LocalModel, artifact_dir: Path, cache_dir=None):
        from safetensors import safe_open

        from fedge.models import load_base

        manifest = model.manifest
        num_labels = (len(manifest.get("labels") or []) or 2) if model.task == "sequence-classification" else None
        base = load_base(model.files["base"], task=model.task, num_labels=num_labels, cache_dir=cache_dir,
                         pooling=pooling_of(manifest))
        if base.hash != manifest["base_model"]["sha256"]:
            raise ArtifactRefused("base-hash", "the base on this device changed since the server started")
        with safe_open(str(artifact_dir / ADAPTER_FILE), framework="pt") as f:
            self.modules, _ = _lora_keys(f.keys())
        self.w0 = {m: base.model.get_submodule(m).weight.detach().clone() for m in sorted(self.modules)}
        self.base_hash = base.hash
        del base


def _prepare_torch_adapter(model: LocalModel, base: _TorchBase, artifact_dir: Path,
                           manifest: dict[str, Any]) -> Callable[[LocalModel], None] | None:
    """The in-place switch to the adapter in ``artifact_dir`` (weights computed now), or None when
    the adapter does not fit the loaded layers (then the caller loads the artifact fully)."""
    import torch
    from safetensors.torch import load_file

    config = _adapter_config(artifact_dir)
    tensors = load_file(str(artifact_dir / ADAPTER_FILE))
    modules, heads = _lora_keys(tensors)
    if not _plain_lora(config) or modules != base.modules:
        return None
    scaling, fan_in_fan_out = _scaling(config), bool(config.get("fan_in_fan_out"))
    new: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for m in sorted(modules):
            a, b = tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"]
            delta = b @ a
            w = base.w0[m].clone()
            w += (delta.T if fan_in_fan_out else delta) * scaling  # PEFT's merge, same operations
            new[m + ".weight"] = w
        for name in heads:
            new[name] = tensors[f"{PEFT_PREFIX}{name}"].to(torch.float32)
    params = dict(model.model.named_parameters())
    if any(name not in params or params[name].shape != t.shape for name, t in new.items()):
        return None

    def apply(target: LocalModel) -> None:
        current_params = dict(target.model.named_parameters())
        for name, t in new.items():
            current_params[name].data = t  # O(1): the tensor computed above becomes the weight
        _relabel(target, manifest)

    return apply


def _prepare_llama_adapter(model: LocalModel, artifact_dir: Path,
                           manifest: dict[str, Any]) -> Callable[[LocalModel], None] | None:
    if "adapter.gguf" not in manifest["files"] or "lora" not in model.files:
        return None
    path = artifact_dir / "adapter.gguf"

    def apply(target: LocalModel) -> None:
        import ctypes

        import llama_cpp

        llm = target.model
        adapter = llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode())
        if not adapter:
            raise ArtifactRefused("files", f"llama.cpp could not load {path.name} on the loaded base")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
            llama_cpp.llama_adapter_lora_free(adapter)
            raise ArtifactRefused("files", f"llama.cpp could not set {path.name} on the context")
        old, llm._lora_adapter, llm.lora_path = llm._lora_adapter, adapter, str(path)
        if old:
            llama_cpp.llama_adapter_lora_free(old)
        llm.reset()  # the cached prompt tokens were computed with the old adapter
        _relabel(target, manifest)
        target.files["lora"] = str(path)

    return apply


def _relabel(model: LocalModel, manifest: dict[str, Any]) -> None:
    model.version, model.manifest, model.labels = manifest["version"], manifest, manifest.get("labels")
    model.fallback_from = None


def _same_base(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("id", "sha256", "gguf_sha256")
    return (a["mode"] == b["mode"] == "adapter" and a["task"] == b["task"] and pooling_of(a) == pooling_of(b)
            and all(a["base_model"].get(k) == b["base_model"].get(k) for k in keys))


# -- the watcher ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Swap:
    """One switch (or refusal): which version, how (``adapter`` in place, ``full`` load, ``refused``), seconds."""

    version: int
    how: str
    seconds: float
    reason: str = ""


class StoreWatcher:
    """Polls ``store_dir`` and swaps the slot's model to the store's current version (module docstring).

    ``load_kwargs`` are the server's :func:`~fedge.runtime.infer.load_artifact` arguments.
    ``poll()`` checks once, synchronously (tests, benchmarks); ``start()`` polls in a thread.
    """

    def __init__(self, slot: ModelSlot, store_dir: str | Path, *, interval: float = 1.0, **load_kwargs: Any):
        self.slot, self.store_dir, self.interval, self.load_kwargs = slot, Path(store_dir), interval, load_kwargs
        self.refused: set[int] = set()
        if slot.model.fallback_from:
            self.refused.add(int(slot.model.fallback_from["version"]))
        self.history: list[Swap] = []
        self._base: _TorchBase | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()

    def start(self) -> StoreWatcher:
        self._thread = threading.Thread(target=self._run, name="fedge-store-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        self._keep_base()
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad poll
                log.exception("store watch: poll failed; still serving version %d", self.slot.model.version)

    def _keep_base(self) -> None:
        """torch adapter model: keep W0 of its adapted layers now, so that the first swap is fast too."""
        model = self.slot.model
        if model.backend != "torch" or model.manifest["mode"] != "adapter" or self._base is not None:
            return
        try:
            self._base = _TorchBase(model, self.store_dir / VERSIONS / str(model.version),
                                    cache_dir=self.load_kwargs.get("cache_dir"))
        except Exception as err:  # noqa: BLE001 - swaps then load fully
            log.warning("store watch: cannot keep the base weights (%s); adapter swaps will load fully", err)

    def poll(self) -> Swap | None:
        """Swap to the store's current version if it differs from the served one; what happened, or None."""
        with self._poll_lock:
            version = current(self.store_dir)
            served = self.slot.model
            if version is None or version == served.version or version in self.refused:
                return None
            t0 = time.perf_counter()
            artifact_dir = self.store_dir / VERSIONS / str(version)
            try:
                how = self._swap(served, artifact_dir)
            except Exception as err:  # noqa: BLE001 - refused or unloadable: the old model keeps serving
                self.refused.add(version)
                swap = Swap(version, "refused", time.perf_counter() - t0, str(err))
                log.warning("store watch: version %d not served (%s); still serving version %d", version, err,
                            served.version)
            else:
                swap = Swap(version, how, time.perf_counter() - t0)
                log.info("store watch: now serving version %d (%s swap from version %d, %.3f s)", version, how,
                         served.version, swap.seconds)
            self.history.append(swap)
            return swap

    def _swap(self, served: LocalModel, artifact_dir: Path) -> str:
        try:
            manifest = read_manifest(artifact_dir)
        except (ManifestError, FileNotFoundError) as err:
            raise ArtifactRefused("manifest", str(err)) from None
        apply = None
        if _same_base(served.manifest, manifest):
            check_hashes(artifact_dir, manifest)
            if served.backend == "llama.cpp":
                apply = _prepare_llama_adapter(served, artifact_dir, manifest)
            elif served.backend == "torch":
                self._keep_base()
                if self._base is not None:
                    apply = _prepare_torch_adapter(served, self._base, artifact_dir, manifest)
        if apply is not None:
            self.slot.change(apply)
            return "adapter"
        model = load_artifact(artifact_dir, **self.load_kwargs)
        self.slot.replace(model)
        if model.backend == "torch" and manifest["mode"] == "adapter":
            self._base = None  # the kept W0 belonged to the old model's base
            self._keep_base()
        return "full"
