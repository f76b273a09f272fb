"""The operator/device commands end to end: keys, export, install, infer, rollback, refusal."""

import shutil
import subprocess
import sys

import pytest
import torch

from fedge import config as fcfg
from server.federation import Evaluator
from tests.conftest import tiny_scenario_overrides

pytestmark = pytest.mark.slow


def fedge(*args):
    return subprocess.run([sys.executable, "-m", "fedge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _adapter(cfg, seed: int):
    """The run's LoRA model with B drawn at random (a fresh B = 0 would answer exactly as the base)."""
    model = Evaluator(cfg).model
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 2.0)
    return model


def _oracle_answer(adapter_dir, base_dir, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding with transformers and PEFT alone: the prompt as a chat turn (this tokenizer has no
    chat template: the text and a newline), stopping at its end-of-sequence token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    ids = torch.tensor([tok(prompt + "\n", add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_keys_export_install_infer_rollback(tmp_path, tiny_llama_dir, torch_one_thread):
    # Prepare: a finished run (config + final adapter) and a signing key
    keys = tmp_path / "keys"
    r = fedge("keys", "generate", "--dir", keys)
    assert r.returncode == 0 and (keys / "fedge.pub").exists(), r.stderr
    run = tmp_path / "run"
    run.mkdir()
    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + [f"export.private_key={keys / 'fedge.key'}"])
    (run / "config.yaml").write_text(fcfg.dump_yaml(cfg))
    store, prompt = tmp_path / "device", "hello there"
    # Execute + Assert: two exports of two different adapters, each installed; the device answers as
    # transformers + PEFT answer with the current adapter (the oracle), and the two adapters answer differently
    expected = {}
    for version, seed in ((1, 1), (2, 2)):
        _adapter(cfg, seed).save_pretrained(run / "adapter")
        shutil.copytree(run / "adapter", tmp_path / f"adapter-v{version}")
        expected[version] = _oracle_answer(tmp_path / f"adapter-v{version}", tiny_llama_dir, prompt, 5)
        r = fedge("export", run)
        assert r.returncode == 0, r.stderr
        art = run / "artifacts" / f"v{version}"
        r = fedge("install", art, "--store", store, "--trusted-key", keys / "fedge.pub")
        assert r.returncode == 0 and f"installed version {version}" in r.stdout, r.stderr
    assert expected[1] != expected[2]
    r = fedge("infer", "--store", store, "--prompt", prompt, "--max-new-tokens", 5)
    assert r.returncode == 0 and r.stdout.strip() == expected[2], r.stderr
    # A copy signed by another key is refused with exit 3, and v2 stays current
    other = tmp_path / "other"
    assert fedge("keys", "generate", "--dir", other).returncode == 0
    forged = tmp_path / "forged"
    shutil.copytree(run / "artifacts" / "v2", forged)
    r = fedge("install", forged, "--store", store, "--trusted-key", other / "fedge.pub")
    assert r.returncode == 3 and "refused" in r.stderr
    # Rollback: version 1 answers again
    r = fedge("rollback", "--store", store)
    assert r.returncode == 0 and "version 1 is current again" in r.stdout
    r = fedge("infer", "--store", store, "--prompt", prompt, "--max-new-tokens", 5)
    assert r.returncode == 0 and r.stdout.strip() == expected[1], r.stderr
