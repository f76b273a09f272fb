"""Nothing starts on a run that cannot finish writing: disk space and checkpoint failures."""

import errno
import shutil
from collections import namedtuple

import pytest

from fedge import config as fcfg
from simulations import runner
from tests.conftest import tiny_scenario_overrides

Usage = namedtuple("Usage", "total used free")


def test_too_little_free_disk_space_stops_the_run_before_anything_starts(tmp_path, tiny_llama_dir, monkeypatch):
    # Prepare: the disk reports 1,000 bytes free (the tiny run needs more)
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir))
    need, how = runner.disk_needed(cfg)
    real = shutil.disk_usage
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda p: Usage(real(p).total, real(p).used, 1000))
    started = []
    monkeypatch.setattr("flwr.simulation.run_simulation", lambda **kw: started.append(kw))
    # Execute / Assert: a clear error naming the directory and the sizes; the engine never started
    with pytest.raises(fcfg.ConfigError, match="not enough free disk space") as err:
        runner.simulate(cfg, tmp_path / "run")
    assert str(tmp_path / "run") in str(err.value) and "MiB needed" in str(err.value) and "MiB free" in str(err.value)
    assert not started and need > 1000 and "checkpoints" in how


def test_merged_export_for_many_devices_needs_more_space_than_the_adapter():
    small, _ = runner.disk_needed(fcfg.load("default"))
    big, how = runner.disk_needed(fcfg.load("default", ["export.mode=merged", "export.formats=[Q8_0]"]))
    assert big > 50 * small and "8 simulated devices" in how


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_how_to_resume(tmp_path, tiny_llama_dir, monkeypatch):
    # Prepare: the disk fills up when round 2's checkpoint is written
    from server import checkpoint

    real_save = checkpoint.save

    def save(run_dir, *, round, **kw):
        if round == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(run_dir, round=round, **kw)

    monkeypatch.setattr(checkpoint, "save", save)
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + ["export.enabled=false"])
    # Execute
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device") as err:
        runner.simulate(cfg, tmp_path / "run")
    # Assert: the message says what is safe and how to go on; round 1 is checkpointed
    assert "rounds up to 1 are checkpointed" in str(err.value) and "--resume" in str(err.value)
    assert checkpoint.load_latest(tmp_path / "run").round == 1
