"""Where a node's model lives and in which precision: ``model.device`` / ``model.dtype``.

Rules (:func:`resolve_device`), applied on each node to its own hardware, so one scenario
serves a federation of CPU and GPU nodes:

* device ``auto``: ``cuda`` when a CUDA device is visible, else ``cpu``. ``cpu``, ``cuda`` and
  ``cuda:N`` are taken as given; a CUDA device that is not there is an error, never a fallback.
* dtype ``auto``: bfloat16 on a CUDA device that supports it, else float32 (CPU, older GPUs:
  fp16 is never chosen for you, it needs loss scaling to train reliably). ``float32`` anywhere.
  ``bfloat16`` / ``float16`` only on CUDA: on CPU they are refused, not emulated (slower on most
  CPUs, and results would then differ from every other CPU node's).

Only the frozen base weights take the dtype: PEFT keeps LoRA A/B in fp32, adapter state leaves
the node as fp32 numpy on CPU (``fedge.models.get_adapter_state``), and the base hash is taken
over the fp32 weights before the cast, so nodes of any device and dtype agree on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A device or dtype this node cannot provide; the message names the scenario key."""


def check_device_name(device: str) -> str:
    """``device`` if it is 'auto', 'cpu', 'cuda' or 'cuda:N'; else :class:`DeviceError`."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise DeviceError(f"model.device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {device!r}")
    return device


def resolve_device(
    device: str = "auto",
    dtype: str = "auto",
    *,
    cuda_available: bool | None = None,
    bf16_supported: bool | None = None,
    device_count: int | None = None,
) -> tuple[torch.device, torch.dtype]:
    """(torch device, torch dtype) for ``model.device`` / ``model.dtype`` on this node.

    The keyword-only flags default to torch's answers for this machine (tests pass them).
    """
    check_device_name(device)
    if dtype != "auto" and dtype not in DTYPES:
        raise DeviceError(f"model.dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device_count is None:
        device_count = torch.cuda.device_count() if torch.cuda.is_available() else int(cuda_available)
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not cuda_available:
            raise DeviceError(f"model.device {device!r}: no CUDA device is visible on this node (torch "
                              f"{torch.__version__}); use model.device: auto or cpu")
        if dev.index is not None and dev.index >= device_count:
            raise DeviceError(f"model.device {device!r}: this node sees {device_count} CUDA device(s) "
                              f"(cuda:0..cuda:{device_count - 1})")
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_available() and bool(torch.cuda.is_bf16_supported())
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" and bf16_supported else torch.float32
    if dev.type == "cpu" and dtype != "float32":
        raise DeviceError(f"model.dtype {dtype!r} needs a CUDA device; on CPU fedge trains in float32 "
                          "(set model.dtype: auto or float32)")
    if dtype == "bfloat16" and not bf16_supported:
        raise DeviceError(f"model.dtype 'bfloat16': CUDA device {device!r} does not support it; "
                          "use model.dtype: auto (float32 here) or float16")
    return dev, DTYPES[dtype]


def check_client_gpus(client_gpus: float, *, cuda_available: bool | None = None) -> None:
    """Refuse ``simulation.client_gpus`` > 0 on a machine without a visible CUDA device."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if client_gpus > 0 and not cuda_available:
        raise DeviceError(f"simulation.client_gpus is {client_gpus:g} but no CUDA device is visible here "
                          "(Ray would never schedule a client); set simulation.client_gpus: 0")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (the same tensor objects when already there)."""
    return {k: v.to(device) for k, v in batch.items()}


def trainables_fp32(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Keep every trainable tensor fp32 over a bf16/fp16 base; return ``peft_model``.

    PEFT already keeps LoRA A/B in fp32 (``autocast_adapter_dtype``) and casts their input. A task
    head it copies for training (``modules_to_save``) would inherit the base dtype: it is cast to
    fp32 here, and its input is cast on the way in, so the head trains and is exchanged exactly as
    on CPU. A no-op on an fp32 model.
    """
    from peft.utils.other import ModulesToSaveWrapper

    for wrapper in [m for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)]:
        for head in wrapper.modules_to_save.values():
            if all(p.dtype == torch.float32 for p in head.parameters()):
                continue
            head.float()
            head.register_forward_pre_hook(
                lambda _m, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
    return peft_model
