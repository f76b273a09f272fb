"""Checkpoint and resume: a run killed mid-round ends bitwise identical to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedge import config as fcfg
from server import checkpoint
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow
MEASURED = ("seconds", "server_rss_mb")  # properties of the machine, not of the run


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fedge.cli", "simulate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]


def _overrides(model_dir, run_root):
    # 20 local steps: a round lasts long enough (seconds) to be killed inside it
    return [x for o in tiny_scenario_overrides(model_dir) + ["federation.num_rounds=3", "strategy.name=fedadam",
                                                             "train.local_steps=20", f"run_root={run_root}"]
            for x in ("--set", o)]


def test_sigkill_mid_round_then_resume_is_bitwise_identical(tmp_path, tiny_llama_dir):
    # Prepare: an uninterrupted reference run (FedAdam: the strategy carries state across rounds)
    ref, broken = tmp_path / "ref", tmp_path / "broken"
    p = _cli(*_overrides(tiny_llama_dir, tmp_path / "ref-root"), "--run-dir", str(ref))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    # Execute: the same run, SIGKILLed once round 2 has started, then resumed
    p = _cli(*_overrides(tiny_llama_dir, tmp_path / "broken-root"), "--run-dir", str(broken),
             start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (broken / "checkpoints" / "round-0001").exists():
        time.sleep(0.02)
    time.sleep(0.2)  # inside round 2
    os.killpg(p.pid, signal.SIGKILL)  # the driver and its Ray processes, as a crash would
    p.wait()
    assert not (broken / "checkpoints" / "round-0002").exists(), "round 2 ended before the kill: test too slow"
    r = _cli("--resume", str(broken))
    out, _ = r.communicate(timeout=600)
    assert r.returncode == 0, out
    # Assert: same final adapter bits, same checkpointed strategy state, same metrics (timings aside)
    a, b = load_file(str(ref / "adapter" / "adapter_model.safetensors")), load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    sa, sb = (load_file(str(d / "checkpoints" / "round-0003" / "strategy.safetensors")) for d in (ref, broken))
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert _metrics(ref) == _metrics(broken)


def test_resume_with_another_config_is_refused(tmp_path, tiny_llama_dir):
    run = tmp_path / "run"
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir))
    run.mkdir()
    (run / "config.yaml").write_text(fcfg.dump_yaml(cfg))
    checkpoint.save(run, round=1, adapter={"w": np.ones(2, np.float32)}, strategy_state={}, config_digest=cfg.digest())
    p = _cli("--resume", str(run), "--set", "train.lr=0.5")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2 and "made with another config" in out


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    for rnd in (1, 2):
        checkpoint.save(tmp_path, round=rnd, adapter={"w": np.full(3, rnd, np.float32)}, strategy_state={},
                        config_digest="x")
    f = tmp_path / "checkpoints" / "round-0002" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-5])  # truncated
    ck = checkpoint.load_latest(tmp_path)
    assert ck.round == 1 and np.array_equal(ck.adapter["w"], np.ones(3, np.float32))
