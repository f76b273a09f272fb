"""Config validation: a bad scenario fails before anything starts, naming the field."""

import subprocess
import sys

import pytest

from fedge import config as fcfg


def test_default_scenario_loads():
    cfg = fcfg.load("default")
    assert cfg.model.source == "smollm2-135m-instruct"
    assert cfg.data.num_clients == 8 and cfg.strategy.name == "fedavg"


@pytest.mark.parametrize(
    "override, field, hint",
    [
        ("lora.r=0", "lora.r", "greater than or equal to 1"),
        ("train.lr=abc", "train.lr", "valid number"),
        ("federation.clients_per_round=9", "clients_per_round", "<= data.num_clients (8)"),
        ("federation.encoding=fp8", "federation.encoding", "'fp32', 'fp16' or 'int8'"),
        ("model.task=translation", "model.task", "causal-lm"),
        ("train.learning_rate=0.1", "train.learning_rate", "allowed keys here"),
        ("data.partition=random", "data.partition", "'natural', 'iid' or 'dirichlet'"),
    ],
)
def test_bad_values_name_field_and_allowed(override, field, hint):
    with pytest.raises(fcfg.ConfigError) as err:
        fcfg.load("default", [override])
    assert field in str(err.value) and hint in str(err.value)


def test_unknown_top_level_key_lists_sections(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nmodle: {source: y}\n")
    with pytest.raises(fcfg.ConfigError) as err:
        fcfg.load(p)
    assert "modle" in str(err.value) and "'model'" in str(err.value)


def test_unknown_scenario_lists_packaged():
    with pytest.raises(fcfg.ConfigError, match="packaged scenarios: .*default"):
        fcfg.load("nope")


def test_overrides_parse_yaml_values():
    cfg = fcfg.load("default", ["lora.target_modules=[q_proj, k_proj]", "train.lr=1e-4", "seed=3"])
    assert cfg.lora.target_modules == ("q_proj", "k_proj") and cfg.train.lr == 1e-4 and cfg.seed == 3


def test_cli_exits_nonzero_with_message_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", "--set", "lora.r=0",
                           "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "lora.r" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_unknown_strategy_fails_before_runtime(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", "--set", "strategy.name=fedsgd",
                           "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "available: [" in proc.stderr and "fedavg" in proc.stderr


def test_digest_changes_with_config():
    assert fcfg.load("default").digest() != fcfg.load("default", ["seed=1"]).digest()


@pytest.mark.parametrize("overrides, needle", [
    (["privacy.dp_sgd.enabled=true"], "exactly one of noise_multiplier or target_epsilon"),
    (["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.noise_multiplier=0"], "0 gives no privacy"),
    (["privacy.user_level.enabled=true", "privacy.user_level.noise_multiplier=1", "privacy.user_level.delta=0.2"],
     "must be < 1/data.num_clients"),
    (["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.noise_multiplier=1", "privacy.dp_sgd.max_grad_norm=0"],
     "privacy.dp_sgd.max_grad_norm"),
    (["strategy.name=fedex-lora"], "export.enabled: false"),
])
def test_privacy_and_export_settings_refused_at_config_time(overrides, needle):
    with pytest.raises(fcfg.ConfigError, match=None) as err:
        fcfg.load("default", overrides)
    assert needle in str(err.value)


def test_cli_docstring_names_every_command():
    # The module docstring is the command overview: a new subcommand must be added there too.
    import re

    from fedge import cli

    commands = set(re.search(r"\{([a-z,]+)\}", cli.build_parser().format_usage()).group(1).split(","))
    usage = [line.strip().split("  ")[0] for line in cli.__doc__.splitlines() if line.startswith("    fedge ")]
    listed = set(re.findall(r"[a-z]+", " ".join(usage)))
    assert len(commands) > 10 and commands <= listed, commands - listed


def test_privacy_planning_command_is_scriptable():
    proc = subprocess.run([sys.executable, "-m", "fedge.cli", "privacy", "epsilon", "--noise-multiplier", "1.0",
                           "--sample-rate", "0.03125", "--steps", "12", "--delta", "1e-5", "--json"],
                          capture_output=True, text=True, timeout=120)
    import json

    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["epsilon"] == pytest.approx(1.685, abs=1e-3)  # Opacus RDP reference
