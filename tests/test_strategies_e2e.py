"""Every algorithm with a client-side part runs through the real simulation engine."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedge import config as fcfg
from simulations.runner import simulate
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, extra", [
    ("ffa-lora", []), ("fedex-lora", ["export.enabled=false"]), ("scaffold", []),
    ("hetlora", ["strategy.params={ranks: [1, 2]}"]), ("fedprox", ["strategy.params={mu: 0.1}"]),
])
def test_client_side_algorithms_complete_two_rounds(tmp_path, tiny_llama_dir, name, extra):
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + [f"strategy.name={name}", *extra])
    simulate(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert all(r["accepted"] == 3 and r["updated"] for r in rows), [r["rejected_reasons"] for r in rows]
    final = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(np.all(np.isfinite(v)) for v in final.values())
    if name == "ffa-lora":  # only B travels up: about half of the adapter that comes down
        assert rows[0]["bytes_up_per_client"] < 0.6 * rows[0]["bytes_down_per_client"]
