"""A 2-round federation with a tiny model through Flower's real simulation engine (Ray)."""

import json
import time

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from fedge import config as fcfg
from fedge import models
from simulations.runner import simulate
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow


def _ray_processes():
    names = ("raylet", "gcs_server", "ray::", "ClientAppActor", "default_worker")
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            text = " ".join([p.info["name"] or ""] + (p.info["cmdline"] or []))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(n in text for n in names):
            out.append(p.pid)
    return out


def test_two_rounds_on_the_simulation_engine(tmp_path, tiny_llama_dir):
    # Prepare
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + ["train.lr=0.01", "train.local_steps=4"])
    before = set(_ray_processes())
    rows = []
    # Execute
    summary = simulate(cfg, tmp_path / "run", on_round=rows.append)
    # Assert: every round ran with every sampled client, the model improved on held-out data
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2] and rows == lines
    for r in lines[1:]:
        assert r["accepted"] == 3 and r["rejected"] == 0 and r["updated"]
        assert np.isfinite(r["central_loss"]) and np.isfinite(r["local_eval_loss"])
        assert r["bytes_up_per_client"] > 0 and r["bytes_down_per_client"] > 0
    assert summary["final_central_loss"] < summary["initial_central_loss"]
    # The final adapter is a PEFT directory that PeftModel.from_pretrained loads
    from peft import PeftModel

    base = models.load_base(str(tiny_llama_dir))
    peft = PeftModel.from_pretrained(base.model, tmp_path / "run" / "adapter")
    loaded = models.get_adapter_state(peft)
    assert sum(v.size for v in loaded.values()) == summary["adapter_parameters"]
    assert any(np.any(v != 0) for k, v in loaded.items() if "lora_B" in k)
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "report.md").exists()
    # The signed artifact was redeployed through Flower and installed on every device
    dep = json.loads((tmp_path / "run" / "deployment.json").read_text())
    assert dep["installed"] == 3 and sorted(dep["devices"]) == [f"partition-{i:06d}" for i in range(3)]
    from fedge.runtime.store import current

    for name in dep["devices"]:
        assert current(tmp_path / "run" / "client-state" / name / "models") == dep["version"]
    # No Ray process outlives the call (actors get a few seconds to exit after shutdown)
    deadline = time.monotonic() + 30
    while (left := set(_ray_processes()) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [psutil.Process(p).cmdline()[:3] for p in left if psutil.pid_exists(p)]


def test_central_evaluation_every_k_rounds_leaves_training_bitwise_unchanged(tmp_path, tiny_llama_dir):
    # Prepare: the same seeded run, evaluated after every round and only after the last. Without DP the run is
    # bitwise reproducible (with DP the noise comes from OS entropy, so no two runs match): if evaluation drew
    # from a training RNG, the adapters would differ. The privacy–utility benchmark thins evaluation on this
    # (benchmarks/dp_utility_bench.py: evaluation cadence is not part of a row's variant).
    over = ["federation.evaluate_clients_per_round=0"]
    runs = {k: tmp_path / f"every-{k}" for k in (1, 2)}
    # Execute
    for k, run in runs.items():
        simulate(fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + over + [f"federation.evaluate_every={k}"]), run)
    # Assert: the same adapter bits and final evaluation; only the skipped round lacks one
    a, b = (load_file(str(runs[k] / "adapter" / "adapter_model.safetensors")) for k in (1, 2))
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    every, last = ([json.loads(x) for x in (runs[k] / "metrics.jsonl").read_text().splitlines()][1:] for k in (1, 2))
    assert every[-1]["central_loss"] == last[-1]["central_loss"]
    assert [r["central_loss"] is None for r in last] == [True, False]
    assert all(r["central_loss"] is not None for r in every)
