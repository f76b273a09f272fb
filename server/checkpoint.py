"""Atomic per-round checkpoints of the server state (no pickle).

``<run-dir>/checkpoints/round-NNNN/``:

* ``adapter.safetensors``   the global adapter A_t
* ``strategy.safetensors``  the strategy's state (momentum, moments, clip norm...)
* ``state.json``            round, config digest, extra JSON state (privacy ledger,
                            the round's training row, secret cohorts under user-level
                            DP), and the sha256 of both tensor files

Files are 0600 and the directory 0700: the checkpoint is the only place the
secret training cohorts of a user-level DP run are kept.

Written into a temporary directory, every file fsynced, then renamed into
place (a rename is atomic on POSIX), then ``LATEST`` is replaced atomically.
A checkpoint whose files do not match their recorded hashes (a crash mid-copy,
a truncated disk) is skipped and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fedge.files import sha256_file

log = logging.getLogger("fedge.checkpoint")
KEEP = 3  # checkpoints kept (older ones are removed)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one made with another config."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    adapter: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    config_digest: str
    extra: dict


from fedge.runtime.store import _fsync_dir as _fsync  # noqa: E402 - one fsync helper for files and dirs


def save(run_dir: Path, *, round: int, adapter: dict, strategy_state: dict, config_digest: str,
         extra: dict | None = None) -> Path:
    """Write the checkpoint of ``round`` atomically; return its directory."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round:04d}"
    tmp = root / f".tmp-round-{round:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)  # the server's own state (under user-level DP: the secret cohorts)
    save_file({k: np.ascontiguousarray(v) for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in strategy_state.items()}, str(tmp / "strategy.safetensors"))
    state = {"round": round, "config_digest": config_digest, "extra": extra or {},
             "sha256": {f: sha256_file(tmp / f) for f in ("adapter.safetensors", "strategy.safetensors")}}
    (tmp / "state.json").write_text(json.dumps(state, sort_keys=True))
    for f in tmp.iterdir():
        os.chmod(f, 0o600)  # owner only, whatever the umask
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    latest_tmp = root / ".LATEST.tmp"
    latest_tmp.write_text(final.name)
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / "LATEST")
    for old in sorted(root.glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read(d: Path) -> Checkpoint:
    state = json.loads((d / "state.json").read_text())
    for f, digest in state["sha256"].items():
        if sha256_file(d / f) != digest:
            raise CheckpointError(f"{d / f}: content does not match its recorded sha256")
    return Checkpoint(round=int(state["round"]), adapter=load_file(str(d / "adapter.safetensors")),
                      strategy_state=load_file(str(d / "strategy.safetensors")),
                      config_digest=state["config_digest"], extra=state.get("extra", {}))


def load_latest(run_dir: Path) -> Checkpoint:
    """The newest checkpoint that verifies; older ones are tried if the newest is corrupt."""
    root = run_dir / "checkpoints"
    candidates = sorted(root.glob("round-*"), reverse=True) if root.exists() else []
    for d in candidates:
        try:
            return _read(d)
        except Exception as err:  # noqa: BLE001 - OSError, JSON, hash, or safetensors' own header errors
            log.warning("checkpoint %s is unusable (%s): trying the previous one", d.name, err)
    raise CheckpointError(f"no usable checkpoint in {root}")
