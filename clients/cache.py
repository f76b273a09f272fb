"""What a client process keeps between messages: base model, adapter, local data.

Flower calls the ClientApp once per message; in simulation the same Ray actor
process serves many virtual clients and rounds, so the frozen base model and
the tokenized partitions are loaded once per process and reused (the base is
never modified; only LoRA tensors are overwritten from the global adapter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from fedge import config as fcfg
from fedge import models
from fedge.data import data_args, federated_split, num_labels
from fedge.data.tokenize import encode_dataset


@dataclass
class ClientRuntime:
    base: models.Base
    task: str
    max_length: int
    seed: int
    data_args: dict
    _peft: dict = field(default_factory=dict)
    _examples: dict = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return int(self.base.tokenizer.pad_token_id)

    def peft_model(self, *, r: int, alpha: float, dropout: float, targets: tuple[str, ...]):
        """The LoRA-wrapped model for this adapter shape (one per process)."""
        key = (r, alpha, dropout, tuple(targets))
        if key not in self._peft:
            if self._peft:  # a new shape: unwrap the previous adapter first
                (old,) = self._peft.values()
                old.unload()
                self._peft.clear()
            self._peft[key] = models.add_lora(self.base.model, task=self.task, r=r, alpha=alpha,
                                              dropout=dropout, target_modules=targets, seed=self.seed)
        return self._peft[key]

    def examples(self, partition_id: int, data_path: str | None = None) -> tuple[list[dict], list[dict]]:
        """Tokenized (train, held-out) examples: the device's own file (``data_path``), else one partition."""
        key = f"file:{data_path}" if data_path else partition_id
        if key not in self._examples:
            if data_path:
                train, held = local_split(data_path, task=self.task,
                                          holdout_fraction=self.data_args["holdout_fraction"], seed=self.seed)
            else:
                fd = federated_split(**self.data_args)
                if not 0 <= partition_id < len(fd.clients):
                    raise ValueError(f"partition-id {partition_id} outside 0..{len(fd.clients) - 1}")
                train, held = fd.clients[partition_id]
            tok = self.base.tokenizer
            self._examples[key] = (
                encode_dataset(tok, train, task=self.task, max_length=self.max_length),
                encode_dataset(tok, held, task=self.task, max_length=self.max_length),
            )
        return self._examples[key]


def local_split(path: str, *, task: str, holdout_fraction: float, seed: int):
    """(train, held-out) of one device's own file (deployment: node config ``data-path``)."""
    from fedge.data.corpora import load_records
    from fedge.data.partition import split_holdout

    ds, _ = load_records(str(path), task=task)
    if len(ds) == 0:
        raise ValueError(f"data-path {path} holds no records")
    return split_holdout(ds, holdout_fraction, seed + 1)


@lru_cache(maxsize=2)
def scenario(path: str, overrides: tuple[str, ...] = ()) -> fcfg.RunConfig:
    return fcfg.load(path, list(overrides))


_RUNTIMES: dict[str, ClientRuntime] = {}


def get_runtime(cfg: fcfg.RunConfig) -> ClientRuntime:
    """The process-wide runtime for a scenario (built on first use)."""
    key = cfg.digest()
    if key not in _RUNTIMES:
        torch.set_num_threads(int(os.environ.get("FEDGE_TORCH_THREADS", cfg.simulation.torch_threads)))
        base = models.load_base(cfg.model.source, task=cfg.model.task, num_labels=num_labels(cfg),
                                pooling=cfg.model.pooling, device=cfg.model.device, dtype=cfg.model.dtype,
                                quantize=cfg.model.quantize, seed=cfg.seed,
                                cache_dir=Path(cfg.model.cache_dir) if cfg.model.cache_dir else None)
        _RUNTIMES.clear()  # one scenario per process: free the previous model
        _RUNTIMES[key] = ClientRuntime(base=base, task=cfg.model.task, max_length=cfg.model.max_length,
                                       seed=cfg.seed, data_args=data_args(cfg))
    return _RUNTIMES[key]
