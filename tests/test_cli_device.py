"""The operator/device commands end to end: keys, export, install, infer, rollback, refusal."""

import shutil
import subprocess
import sys

import pytest

from fedge import config as fcfg
from server.federation import Evaluator
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow


def fedge(*args):
    return subprocess.run([sys.executable, "-m", "fedge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_keys_export_install_infer_rollback(tmp_path, tiny_llama_dir, torch_one_thread):
    # Prepare: a finished run (config + final adapter) and a signing key
    keys = tmp_path / "keys"
    r = fedge("keys", "generate", "--dir", keys)
    assert r.returncode == 0 and (keys / "fedge.pub").exists(), r.stderr
    run = tmp_path / "run"
    run.mkdir()
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + [f"export.private_key={keys / 'fedge.key'}"])
    (run / "config.yaml").write_text(fcfg.dump_yaml(cfg))
    Evaluator(cfg).model.save_pretrained(run / "adapter")
    store = tmp_path / "device"
    # Execute + Assert: two exports, each installed and usable
    for expected in (1, 2):
        r = fedge("export", run)
        assert r.returncode == 0, r.stderr
        art = run / "artifacts" / f"v{expected}"
        r = fedge("install", art, "--store", store, "--trusted-key", keys / "fedge.pub")
        assert r.returncode == 0 and f"installed version {expected}" in r.stdout, r.stderr
    r = fedge("infer", "--store", store, "--prompt", "hello there", "--max-new-tokens", 5)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr  # a random tiny model may answer nothing
    # A copy signed by another key is refused with exit 3, and v2 stays current
    other = tmp_path / "other"
    assert fedge("keys", "generate", "--dir", other).returncode == 0
    forged = tmp_path / "forged"
    shutil.copytree(run / "artifacts" / "v2", forged)
    r = fedge("install", forged, "--store", store, "--trusted-key", other / "fedge.pub")
    assert r.returncode == 3 and "refused" in r.stderr
    r = fedge("rollback", "--store", store)
    assert r.returncode == 0 and "version 1 is current again" in r.stdout
