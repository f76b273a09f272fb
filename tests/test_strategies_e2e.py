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
    run = tmp_path / "run"
    if name == "ffa-lora":  # only B travels up: about half of the adapter that comes down
        assert rows[0]["bytes_up_per_client"] < 0.6 * rows[0]["bytes_down_per_client"]
        # Oracle: A is bit for bit its shared initialisation (the client half froze it), B has learnt
        from server.federation import Evaluator

        a0 = Evaluator(cfg).initial_adapter()
        for k, v in a0.items():
            assert np.array_equal(final[k], v) == ("lora_A" in k), k
    if name == "scaffold":  # each device kept its own c_i, on disk, keyed by the run's session
        ci = sorted((run / "client-state").glob("*/scaffold-ci.npz"))
        assert [p.parent.name for p in ci] == [f"partition-{i:06d}" for i in range(3)]
        with np.load(ci[0]) as z:
            assert set(z.files) == set(final) | {"#session"} and any(np.any(z[k] != 0) for k in final)
    if name == "fedex-lora":  # the residual R ships beside the adapter and is not zero after two rounds
        residual = load_file(str(run / "adapter" / "lora_residual.safetensors"))
        assert residual and all(np.all(np.isfinite(v)) for v in residual.values())
        assert any(np.any(v != 0) for v in residual.values())
    if name == "hetlora":  # rank-1 and rank-2 clients (all accepted, above) update a global adapter of r_max = 2
        assert {v.shape[0] for k, v in final.items() if "lora_A" in k} == {2}
