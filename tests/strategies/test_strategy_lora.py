"""LoRA-aware strategies against oracles: FedEx-LoRA, FFA-LoRA, SCAFFOLD, HetLoRA.

Server rules are checked on small float64 matrices against hand computations; the
client halves (``strategies.client_hooks``) on the tiny seeded Llama. ``run_client`` below is
the train handler of clients/app.py with the hooks wired in (rank from
``client_hooks.client_lora``, truncated global view, ``msg.content`` passed on).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedge import deltas, lora_fed, models
from fedge import protocol as P
from fedge.data.tokenize import collate, encode_chat
from fedge.train import per_example_loss, train_local
from strategies import build, client_hooks

PAIRS = [("hello there", "hi"), ("what is the weather like today", "sunny and warm"),
         ("who are you", "a small model"), ("tell me a joke", "no"), ("how do I reset it", "hold the button"),
         ("bye", "see you soon, take care")]
TARGETS = ("q_proj", "v_proj")


class FakeGrid:
    """Node ids 1..n and the identity query: the parts of Flower's Grid a strategy touches."""

    def __init__(self, n: int):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def send_and_receive(self, messages, timeout=None):
        return [Message(RecordDict({P.IDENTITY: ConfigRecord({P.ID_CLIENT: f"c{m.metadata.dst_node_id}"})}),
                        reply_to=m) for m in messages]


def context(pid: int, **node) -> Context:
    return Context(run_id=1, node_id=pid + 1, node_config={P.NODE_PARTITION_ID: pid, **node},
                   state=RecordDict(), run_config={})


def reply(msg: Message, delta: dict, n: float = 10.0, extra: dict | None = None) -> Message:
    return Message(RecordDict({
        P.ARRAYS: deltas.to_record(deltas.encode(delta, "fp32")),
        P.METRICS: MetricRecord({P.M_NUM_EXAMPLES: n, P.M_TRAIN_LOSS: 1.0}),
        P.META: ConfigRecord({P.META_ENCODING: "fp32"}), **(extra or {})}), reply_to=msg)


def tiny_peft(model_dir, r: int = 2, alpha: float = 4.0):
    torch.manual_seed(0)
    base = models.load_base(str(model_dir))
    return base, models.add_lora(base.model, task="causal-lm", r=r, alpha=alpha, dropout=0.0, target_modules=TARGETS)


def randomised(state: dict, seed: int, scale: float = 0.1) -> dict:
    """The adapter with every tensor random (B nonzero), fp32."""
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}


def effective_weights(peft) -> dict[str, np.ndarray]:
    """W0 + s·B A per adapted module, float64, read from the PEFT layers themselves."""
    out = {}
    for _, _, r in lora_fed.lora_pairs(models.get_adapter_state(peft)):
        layer = peft.get_submodule(lora_fed.module_of_residual(r))
        w0 = layer.get_base_layer().weight.detach().double()
        b, a = layer.lora_B["default"].weight.detach().double(), layer.lora_A["default"].weight.detach().double()
        out[r] = (w0 + layer.scaling["default"] * b @ a).numpy()
    return out


def run_client(peft, tokenizer, msg: Message, ctx: Context, examples: list, *, seed: int, seen: list | None = None):
    """clients/app.py's train handler with the LoRA hooks wired in; ``seen`` collects W_i."""
    conf = msg.content[P.CONFIG]
    r, _ = client_hooks.client_lora(conf, ctx)
    global_state = lora_fed.client_view(deltas.from_record(msg.content[P.ARRAYS]), r)
    models.set_adapter_state(peft, global_state)
    with client_hooks.client_round(peft, conf, ctx, msg.content) as hooks:
        train_local(peft, examples, task="causal-lm", pad_id=tokenizer.pad_token_id, steps=int(conf[P.CFG_LOCAL_STEPS]),
                    batch_size=2, lr=float(conf[P.CFG_LR]), seed=seed)
        if seen is not None:
            seen.append(effective_weights(peft))  # the client's model, residual included
        delta, extra = hooks.finish(deltas.compute_delta(models.get_adapter_state(peft), global_state))
    return reply(msg, delta, n=len(examples), extra=extra)


def train_config(**kw) -> ConfigRecord:
    return ConfigRecord({P.CFG_LOCAL_STEPS: 2, P.CFG_LR: 0.05, P.CFG_LORA_R: 2, P.CFG_LORA_ALPHA: 4.0, **kw})


# -- names, truncation, padding ---------------------------------------------------------------


def test_lora_pairs_name_modules_and_residuals():
    names = ["m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight", "m.v_proj.lora_A.weight", "score.weight",
             "lora_A", "lora_B"]
    assert lora_fed.lora_pairs(names) == [
        ("lora_A", "lora_B", "lora_residual"),
        ("m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight", "m.q_proj.lora_residual.weight")]
    assert lora_fed.module_of_residual("m.q_proj.lora_residual.weight") == "m.q_proj"
    assert not lora_fed.is_lora_a("m.lora_embedding_A") and lora_fed.is_lora_b("x.lora_B.weight")


def test_truncation_and_padding_round_trip():
    # Prepare: a rank-3 adapter and a head
    rng = np.random.default_rng(0)
    full = {"m.lora_A.weight": rng.standard_normal((3, 4)), "m.lora_B.weight": rng.standard_normal((5, 3)),
            "head": rng.standard_normal(2)}
    shapes = {k: v.shape for k, v in full.items()}
    # Execute
    low = lora_fed.truncate_rank(full, 2)
    back = lora_fed.pad_rank(low, shapes)
    # Assert: the first 2 components kept, the third zero; truncating the padded gives the same
    assert low["m.lora_A.weight"].shape == (2, 4) and low["m.lora_B.weight"].shape == (5, 2)
    np.testing.assert_array_equal(back["m.lora_A.weight"][:2], full["m.lora_A.weight"][:2])
    np.testing.assert_array_equal(back["m.lora_A.weight"][2], 0)
    np.testing.assert_array_equal(back["m.lora_B.weight"][:, 2], 0)
    np.testing.assert_array_equal(back["head"], full["head"])
    for k, v in lora_fed.truncate_rank(back, 2).items():
        np.testing.assert_array_equal(v, low[k])
    # B[:, :2] A[:2] is the sum of the first two rank-1 terms of B A
    terms = [np.outer(full["m.lora_B.weight"][:, j], full["m.lora_A.weight"][j]) for j in range(3)]
    np.testing.assert_allclose(low["m.lora_B.weight"] @ low["m.lora_A.weight"], terms[0] + terms[1], rtol=1e-12)
    with pytest.raises(ValueError):
        lora_fed.truncate_rank(full, 4)


# -- FedEx-LoRA ---------------------------------------------------------------------------------


def test_fedex_served_model_is_the_mean_of_client_models():
    # Prepare: two modules, a head, 4 clients with unequal weights, 3 rounds; s = alpha / r
    rng = np.random.default_rng(1)
    s, shapes = 2.0, {"m.q.lora_A.weight": (2, 5), "m.q.lora_B.weight": (4, 2),
                      "m.v.lora_A.weight": (2, 5), "m.v.lora_B.weight": (3, 2), "score.weight": (3,)}
    w0 = {"m.q.lora_residual.weight": rng.standard_normal((4, 5)),
          "m.v.lora_residual.weight": rng.standard_normal((3, 5))}  # W0 of each module, (out, in)
    current = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    strategy, fedavg = build("fedex-lora", clients_per_round=4), build("fedavg", clients_per_round=4)
    gap = 0.0
    for _ in range(3):
        # Execute: each client i holds W_i = W0 + s(R_t + B_i A_i); the server aggregates their deltas
        ds = [{k: (0.3 * rng.standard_normal(v)).astype(np.float32).astype(np.float64) for k, v in shapes.items()}
              for _ in range(4)]
        r_t = strategy.residual or {r: 0.0 for r in w0}
        clients = [{r: w0[r] + s * (r_t[r] + (current[b] + d[b]) @ (current[a] + d[a]))
                    for a, b, r in lora_fed.lora_pairs(shapes)} for d in ds]
        new = strategy.server_update(current, strategy.aggregate(ds, weights))
        naive = fedavg.server_update(current, fedavg.aggregate(ds, weights))
        # Assert: served W0 + s(B A + R) is the weighted mean of the clients' W_i
        for a, b, r in lora_fed.lora_pairs(shapes):
            mean_w = sum(wi * c[r] for wi, c in zip(weights, clients))
            served = w0[r] + s * (new[b].astype(np.float64) @ new[a].astype(np.float64) + strategy.residual[r])
            np.testing.assert_allclose(served, mean_w, rtol=0, atol=1e-6)
            assert strategy.residual[r].shape == (shapes[b][0], shapes[a][1])
            gap = max(gap, np.abs(w0[r] + s * (r_t[r] + naive[b] @ naive[a]) - mean_w).max())
        for k in shapes:  # A, B and the head are FedAvg's
            np.testing.assert_array_equal(new[k], naive[k])
        current = new
    assert gap > 1e-2  # averaging A and B separately is far from the mean model


def test_fedex_through_the_client_hook_on_a_tiny_model(tiny_llama_dir, flower_identity, torch_one_thread):
    # Prepare: 3 clients on one tiny PEFT model (r = 2, alpha = 4), different data and weights
    base, peft = tiny_peft(tiny_llama_dir)
    tok = base.tokenizer
    data = [[encode_chat(tok, p, a, 32) for p, a in PAIRS[i:i + n]] for i, n in ((0, 2), (2, 3), (4, 2))]
    w0 = {n: p.detach().clone() for n, p in base.model.named_parameters() if "base_layer" in n}
    strategy = build("fedex-lora", clients_per_round=3, evaluate_clients_per_round=1)
    grid, arrays = FakeGrid(3), deltas.to_record(randomised(models.get_adapter_state(peft), 0))
    for rnd in (1, 2):
        msgs = sorted(strategy.configure_train(rnd, arrays, train_config(), grid), key=lambda m: m.metadata.dst_node_id)
        assert (P.LORA_RESIDUAL in msgs[0].content) == (rnd > 1)  # R_1 = 0 is not sent
        # Execute: each client trains with R_t in its frozen weights; the server aggregates
        seen: list = []
        replies = [run_client(peft, tok, m, context(i), data[i], seed=i, seen=seen) for i, m in enumerate(msgs)]
        arrays, _ = strategy.aggregate_train(rnd, replies)
        # Assert: the served model (adapter + residual through the same hook) is the clients' weighted mean
        n = np.array([len(d) for d in data], np.float64)
        models.set_adapter_state(peft, deltas.from_record(arrays))
        with lora_fed.residual_applied(peft, strategy.residual):
            served = effective_weights(peft)
        for r, w in served.items():
            mean_w = sum(ni * s[r] for ni, s in zip(n / n.sum(), seen))
            np.testing.assert_allclose(w, mean_w, rtol=0, atol=1e-6, err_msg=r)
        assert max(np.abs(v).max() for v in strategy.residual.values()) > 1e-4  # the residual is not trivial
    # The frozen base weights are restored bit for bit; evaluation messages carry R too
    assert all(torch.equal(p, w0[n]) for n, p in base.model.named_parameters() if "base_layer" in n)
    [ev] = strategy.configure_evaluate(2, arrays, ConfigRecord({}), grid)
    assert set(ev.content[P.LORA_RESIDUAL].keys()) == set(strategy.residual)
    # ... and R is checkpoint state
    again = build("fedex-lora", clients_per_round=3)
    again.load_state_dict(strategy.state_dict())
    assert all(np.array_equal(again.residual[k], v) for k, v in strategy.residual.items())


def test_fedex_client_refuses_without_the_message_records(tiny_llama_dir, torch_one_thread):
    _, peft = tiny_peft(tiny_llama_dir)
    with pytest.raises(ValueError, match="msg.content"):
        with client_hooks.client_round(peft, train_config(**{P.CFG_LORA_EXACT: True}), context(0)):
            pass


# -- FFA-LoRA -----------------------------------------------------------------------------------


def test_ffa_lora_average_of_b_is_exact():
    # Prepare: shared A_0, three clients' B_i
    rng = np.random.default_rng(2)
    current = {"m.lora_A.weight": rng.standard_normal((2, 4)), "m.lora_B.weight": np.zeros((3, 2))}
    ds = [{"m.lora_B.weight": rng.standard_normal((3, 2))} for _ in range(3)]
    w = np.array([0.5, 0.3, 0.2])
    s = build("ffa-lora", clients_per_round=3)
    # Execute
    new = s.server_update(current, s.aggregate(ds, w))
    # Assert: A untouched; (mean B_i) A_0 == mean(B_i A_0)
    np.testing.assert_array_equal(new["m.lora_A.weight"], current["m.lora_A.weight"])
    a0 = current["m.lora_A.weight"]
    np.testing.assert_allclose(new["m.lora_B.weight"] @ a0, sum(wi * d["m.lora_B.weight"] @ a0 for wi, d in zip(w, ds)),
                               rtol=1e-12)


def real_client_app(tmp_path, model_dir):
    """The real client app on the tiny scenario: (config, its scenario file, evaluator, app, A_0)."""
    import clients.app
    from fedge import config as fcfg
    from server.federation import Evaluator
    from tests.conftest import tiny_scenario_overrides

    cfg = fcfg.load("default", tiny_scenario_overrides(model_dir))
    path = tmp_path / "scenario.yaml"
    path.write_text(fcfg.dump_yaml(cfg))
    ev = Evaluator(cfg)
    return cfg, path, ev, clients.app.make_app(str(path)), ev.initial_adapter()


def test_ffa_lora_through_the_client_app(tmp_path, tiny_llama_dir, flower_identity, torch_one_thread):
    import clients.app
    from fedge import config as fcfg
    from server.federation import round_config

    # Prepare: the real client app on the tiny scenario, three partitions
    cfg, path, ev, app, a0 = real_client_app(tmp_path, tiny_llama_dir)
    strategy = build("ffa-lora", clients_per_round=3, base_hash=ev.base.hash)
    arrays, b_keys = deltas.to_record(a0), {k for k in a0 if not lora_fed.is_lora_a(k)}
    for rnd in (1, 2):
        # Execute
        msgs = strategy.configure_train(rnd, arrays, round_config(cfg, base_hash=ev.base.hash), FakeGrid(3))
        replies = [app(m, context(int(m.metadata.dst_node_id) - 1)) for m in msgs]
        # Assert: replies carry B only, at B's bytes
        for r in replies:
            assert not r.has_error(), r.error.reason if r.has_error() else ""
            assert set(r.content[P.ARRAYS].keys()) == b_keys
        arrays, _ = strategy.aggregate_train(rnd, replies)
        assert strategy.report.accepted == 3
    final = deltas.from_record(arrays)
    for k, v in a0.items():  # A is bit for bit its initialisation; B has learnt
        assert np.array_equal(final[k], v) if lora_fed.is_lora_a(k) else not np.array_equal(final[k], v)
    full = deltas.record_bytes(deltas.to_record(a0))
    b_only = deltas.record_bytes(deltas.to_record({k: a0[k] for k in b_keys}))
    # q_proj: B (32, 2) vs A (2, 32), half; v_proj: B (16, 2) vs A (2, 32)
    assert strategy.report.bytes_up == 3 * b_only and 0.35 < b_only / full < 0.55
    peft = next(iter(clients.app.get_runtime(fcfg.load(path))._peft.values()))
    assert all(p.requires_grad for k, p in lora_fed.adapter_parameters(peft).items())  # A unfrozen again


# -- SCAFFOLD -----------------------------------------------------------------------------------


def test_scaffold_server_control_variate_by_hand(flower_identity):
    # Prepare: N = 10 clients in all, 3 per round; deltas and Δc_i by hand
    current = {"w": np.array([1.0, -1.0], np.float32)}
    s = build("scaffold", clients_per_round=3, num_clients=10)
    grid, arrays = FakeGrid(3), deltas.to_record(current)
    dcs = [[np.array([0.5, 1.0]), np.array([-1.5, 2.0]), np.array([4.0, 0.0])],
           [np.array([1.0, 1.0]), np.array([1.0, -3.0]), np.array([0.0, 2.0])]]
    expected_c = np.zeros(2)
    for rnd, dc in enumerate(dcs, start=1):
        msgs = sorted(s.configure_train(rnd, arrays, ConfigRecord({}), grid), key=lambda m: m.metadata.dst_node_id)
        # Assert (send): c of the previous round goes out, with the session id
        np.testing.assert_array_equal(msgs[0].content[P.SCAFFOLD_C]["w"].numpy(), expected_c.astype(np.float32))
        assert msgs[0].content[P.CONFIG][P.CFG_SCAFFOLD] == s.session
        # Execute
        replies = [reply(m, {"w": np.array([0.1, 0.2]) * (i + 1)}, n=1.0 + i,
                         extra={P.SCAFFOLD_DC: deltas.to_record({"w": d.astype(np.float32)})})
                   for i, (m, d) in enumerate(zip(msgs, dc))]
        new_arrays, _ = s.aggregate_train(rnd, replies)
        # Assert: c ← c + (1/N) Σ Δc_i ; x ← x + Σ w_i Δ_i (w = 1/6, 2/6, 3/6)
        expected_c = expected_c + sum(dc) / 10
        np.testing.assert_allclose(s.c["w"], expected_c, rtol=1e-12)
        step = (1 * 0.1 + 2 * 0.2 + 3 * 0.3) / 6 * np.array([1.0, 2.0])
        moved = deltas.from_record(new_arrays)["w"] - deltas.from_record(arrays)["w"]
        np.testing.assert_allclose(moved, step, rtol=1e-6)
        arrays = new_arrays
    np.testing.assert_allclose(s.c["w"], [0.5, 0.3])  # (0.5 − 1.5 + 4 + 1 + 1 + 0)/10, (1 + 2 + 1 − 3 + 2)/10
    # The state (c and the session id) survives a checkpoint
    again = build("scaffold", clients_per_round=3, num_clients=10)
    again.load_state_dict(s.state_dict())
    assert again.session == s.session and np.array_equal(again.c["w"], s.c["w"])


def test_scaffold_reply_without_control_variate_is_refused(flower_identity):
    s = build("scaffold", clients_per_round=2, num_clients=4)
    msgs = list(s.configure_train(1, deltas.to_record({"w": np.zeros(2, np.float32)}), ConfigRecord({}), FakeGrid(2)))
    good = reply(msgs[0], {"w": np.ones(2)}, extra={P.SCAFFOLD_DC: deltas.to_record({"w": np.ones(2, np.float32)})})
    bad = reply(msgs[1], {"w": np.ones(2)})
    s.aggregate_train(1, [good, bad])
    [(_, reason)] = s.report.rejected
    assert P.SCAFFOLD_DC in reason and s.report.accepted == 1
    np.testing.assert_allclose(s.c["w"], [0.25, 0.25])  # only the accepted Δc_i, / N


def test_scaffold_client_corrects_every_gradient(tmp_path, tiny_llama_dir, flower_identity, torch_one_thread):
    # Prepare: a tiny PEFT model with a nonzero adapter, one batch, the server's c
    base, peft = tiny_peft(tiny_llama_dir)
    models.set_adapter_state(peft, randomised(models.get_adapter_state(peft), 0))
    batch = collate([encode_chat(base.tokenizer, p, a, 32) for p, a in PAIRS[:2]], task="causal-lm",
                    pad_id=base.tokenizer.pad_token_id)
    params = lora_fed.adapter_parameters(peft)

    def grads():
        peft.zero_grad(set_to_none=True)
        per_example_loss(peft, batch, task="causal-lm").mean().backward()
        return {k: p.grad.double().numpy().copy() for k, p in params.items()}

    plain = grads()
    shapes = {k: tuple(p.shape) for k, p in params.items()}
    rng = np.random.default_rng(3)
    c1, c2 = ({k: 1e-2 * rng.standard_normal(s) for k, s in shapes.items()} for _ in range(2))
    conf = train_config(**{P.CFG_SCAFFOLD: 7})

    def content(c):  # the train message's records
        return RecordDict({P.SCAFFOLD_C: deltas.to_record({k: v.astype(np.float32) for k, v in c.items()})})

    k_steps, lr = conf[P.CFG_LOCAL_STEPS], conf[P.CFG_LR]
    delta = {k: 1e-3 * rng.standard_normal(s) for k, s in shapes.items()}

    # Round 1: c_i = 0, so the gradient is g + c
    ctx = context(0, **{"state-dir": str(tmp_path)})
    with client_hooks.client_round(peft, conf, ctx, content(c1)) as hooks:
        corrected = grads()
        _, extra = hooks.finish(delta)
    for k in shapes:
        np.testing.assert_allclose(corrected[k] - plain[k], c1[k], rtol=0, atol=1e-6, err_msg=k)
    # Option II: Δc_i = −c − Δ_i/(Kη), sent fp32; c_i⁺ = c_i + Δc_i kept by the client
    dc = deltas.from_record(extra[P.SCAFFOLD_DC])
    for k in shapes:
        np.testing.assert_allclose(dc[k], -c1[k] - delta[k] / (k_steps * lr), rtol=1e-6, atol=1e-9)
    ci = {k: -c1[k] - delta[k] / (k_steps * lr) for k in shapes}
    # Hooks are gone after the round
    for k, g in grads().items():
        np.testing.assert_array_equal(g, plain[k])

    # Round 2, after a restart (fresh Context, same state dir): the gradient is g + c − c_i
    with client_hooks.client_round(peft, conf, context(0, **{"state-dir": str(tmp_path)}), content(c2)) as hooks:
        corrected = grads()
    for k in shapes:
        np.testing.assert_allclose(corrected[k] - plain[k], c2[k] - ci[k], rtol=0, atol=1e-6, err_msg=k)
    # Another SCAFFOLD session (another run) starts from c_i = 0
    with client_hooks.client_round(peft, train_config(**{P.CFG_SCAFFOLD: 8}), ctx, content(c2)) as hooks:
        corrected = grads()
    for k in shapes:
        np.testing.assert_allclose(corrected[k] - plain[k], c2[k], rtol=0, atol=1e-6, err_msg=k)
    # Refused with DP (Δc_i would leave unprotected) and without the message records
    with pytest.raises(ValueError, match="DP"):
        dp_conf = train_config(**{P.CFG_SCAFFOLD: 7, P.CFG_DP_CLIP_NORM: 1.0})
        with client_hooks.client_round(peft, dp_conf, ctx, content(c1)):
            pass
    with pytest.raises(ValueError, match="msg.content"):
        with client_hooks.client_round(peft, conf, ctx):
            pass


# -- HetLoRA ------------------------------------------------------------------------------------


def test_hetlora_rank_aware_average_by_hand():
    # Prepare: r_max = 3; clients of rank 1, 2, 3 with weights 0.5, 0.3, 0.2
    a = [np.array([[1.0, 2.0]]), np.array([[10.0, 0.0], [4.0, 4.0]]), np.array([[0.0, 5.0], [-6.0, 1.0], [7.0, 7.0]])]
    ds = [{"m.lora_A.weight": x, "m.lora_B.weight": x.T.copy(), "head": np.array([float(i)])} for i, x in enumerate(a)]
    w = np.array([0.5, 0.3, 0.2])
    current = {"m.lora_A.weight": np.zeros((3, 2)), "m.lora_B.weight": np.zeros((2, 3)), "head": np.zeros(1)}
    s = build("hetlora", clients_per_round=3)
    # Execute
    new = s.server_update(current, s.aggregate(ds, w))
    # Assert: slice 0 over all three, slice 1 over the rank-2 and rank-3 clients, slice 2 the rank-3 one
    expected_a = np.array([[0.5 * 1 + 0.3 * 10 + 0.2 * 0, 0.5 * 2 + 0.3 * 0 + 0.2 * 5],   # / 1.0
                           [(0.3 * 4 + 0.2 * -6) / 0.5, (0.3 * 4 + 0.2 * 1) / 0.5],
                           [7.0, 7.0]])
    np.testing.assert_allclose(new["m.lora_A.weight"], expected_a, rtol=1e-12)
    np.testing.assert_allclose(new["m.lora_B.weight"], expected_a.T, rtol=1e-12)
    np.testing.assert_allclose(new["head"], [0.3 * 1 + 0.2 * 2], rtol=1e-12)  # heads: plain weighted mean
    # A slice no client holds does not move
    low = s.server_update(current, s.aggregate(ds[:2], np.array([0.5, 0.5])))
    np.testing.assert_array_equal(low["m.lora_A.weight"][2], 0.0)


def test_hetlora_validates_the_declared_rank(flower_identity):
    # Prepare: a rank-2 global adapter; replies of rank 1 (declared), rank 2 (undeclared), and liars
    rng = np.random.default_rng(5)
    current = {"m.lora_A.weight": rng.standard_normal((2, 3)).astype(np.float32),
               "m.lora_B.weight": rng.standard_normal((4, 2)).astype(np.float32)}
    s = build("hetlora", clients_per_round=4, ranks=[1, 2])
    msgs = sorted(s.configure_train(1, deltas.to_record(current), ConfigRecord({}), FakeGrid(4)),
                  key=lambda m: m.metadata.dst_node_id)
    assert list(msgs[0].content[P.CONFIG][P.CFG_HETLORA_RANKS]) == [1, 2]
    rank = lambda r: {P.LORA_META: ConfigRecord({P.META_LORA_RANK: r})}  # noqa: E731
    d1 = {"m.lora_A.weight": np.ones((1, 3)), "m.lora_B.weight": np.ones((4, 1))}
    d2 = {"m.lora_A.weight": 3 * np.ones((2, 3)), "m.lora_B.weight": 3 * np.ones((4, 2))}
    replies = [reply(msgs[0], d1, extra=rank(1)), reply(msgs[1], d2),
               reply(msgs[2], d2, extra=rank(1)),  # declares 1, sends rank 2
               reply(msgs[3], d1, extra=rank(3))]  # above r_max
    # Execute
    out, _ = s.aggregate_train(1, replies)
    # Assert: the two liars are refused with their reasons; slice 0 averages both, slice 1 only the rank-2 one
    reasons = dict(s.report.rejected)
    assert sorted(reasons) == [3, 4] and "shape" in reasons[3] and "rank 3" in reasons[4]
    new = deltas.from_record(out)
    np.testing.assert_allclose(new["m.lora_A.weight"] - current["m.lora_A.weight"], [[2.0] * 3, [3.0] * 3], rtol=1e-6)
    np.testing.assert_allclose(new["m.lora_B.weight"] - current["m.lora_B.weight"], [[2.0, 3.0]] * 4, rtol=1e-6)
    with pytest.raises(ValueError, match="exceed"):
        build("hetlora", clients_per_round=1, ranks=[4]).configure_train(
            1, deltas.to_record(current), ConfigRecord({}), FakeGrid(1))


def test_hetlora_client_trains_the_truncated_global_model(tiny_llama_dir, flower_identity, torch_one_thread):
    # Prepare: a rank-4 global adapter (alpha 8, s = 2) with every component nonzero
    base4, peft4 = tiny_peft(tiny_llama_dir, r=4, alpha=8.0)
    g = randomised(models.get_adapter_state(peft4), 1)
    conf = train_config(**{P.CFG_LORA_R: 4, P.CFG_LORA_ALPHA: 8.0, P.CFG_HETLORA: True, P.CFG_HETLORA_RANKS: [1, 2, 4],
                           P.CFG_LOCAL_STEPS: 1})
    # Ranks: by partition from the list; a node's own lora-rank wins (capped at r_max); alpha keeps s
    assert [client_hooks.client_lora(conf, context(p)) for p in range(4)] == [(1, 2.0), (2, 4.0), (4, 8.0), (1, 2.0)]
    assert client_hooks.client_lora(conf, context(0, **{P.NODE_LORA_RANK: 16})) == (4, 8.0)
    assert client_hooks.client_lora(train_config(), context(0, **{P.NODE_LORA_RANK: 1})) == (2, 4.0)  # not HetLoRA
    r, alpha = client_hooks.client_lora(conf, context(1))
    base2, peft2 = tiny_peft(tiny_llama_dir, r=r, alpha=alpha)
    # Execute: the client's model = the global model with rank components ≥ 2 zeroed
    models.set_adapter_state(peft2, lora_fed.client_view(g, r))
    models.set_adapter_state(peft4, lora_fed.pad_rank(lora_fed.truncate_rank(g, r), {k: v.shape for k, v in g.items()}))
    ids = torch.tensor([encode_chat(base2.tokenizer, *PAIRS[1], 32)["input_ids"]])
    with torch.no_grad():
        np.testing.assert_allclose(peft2(input_ids=ids).logits.numpy(), peft4(input_ids=ids).logits.numpy(),
                                   rtol=1e-5, atol=1e-5)
    # ... and a round through the hooks: a rank-2 reply, declared, accepted, moving slices 0-1 only
    s = build("hetlora", clients_per_round=1, ranks=[1, 2, 4])
    [msg] = s.configure_train(1, deltas.to_record(g), conf, FakeGrid(1))
    ex = [encode_chat(base2.tokenizer, p, a, 32) for p, a in PAIRS[:3]]
    rep = run_client(peft2, base2.tokenizer, msg, context(1), ex, seed=0)
    assert rep.content[P.LORA_META][P.META_LORA_RANK] == 2
    assert all(v.shape[0 if lora_fed.is_lora_a(k) else 1] == 2 for k, v in rep.content[P.ARRAYS].items())
    out, _ = s.aggregate_train(1, [rep])
    new, local = deltas.from_record(out), models.get_adapter_state(peft2)
    for k, v in g.items():
        kept = (slice(0, 2), slice(None)) if lora_fed.is_lora_a(k) else (slice(None), slice(0, 2))
        rest = (slice(2, None), slice(None)) if lora_fed.is_lora_a(k) else (slice(None), slice(2, None))
        np.testing.assert_allclose(new[k][kept], local[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(new[k][rest], v[rest])


# -- client halves: one registry, one key per algorithm ---------------------------------------


def test_every_client_half_is_registered_once_under_its_strategys_key():
    from strategies.client_hooks import ClientHook, client_hook
    from strategies.dp_user_level import CFG_CLIP_NORM

    # Execute
    keys = client_hooks.registered()

    # Assert: the six algorithms with a client half, each under the key its strategy sends
    assert set(keys) == {P.CFG_LORA_EXACT, P.CFG_FREEZE_A, P.CFG_FREEZE_ADAPTER, P.CFG_SCAFFOLD, P.CFG_HETLORA,
                         CFG_CLIP_NORM}
    for name, key in (("fedex-lora", P.CFG_LORA_EXACT), ("ffa-lora", P.CFG_FREEZE_A),
                      ("head-only", P.CFG_FREEZE_ADAPTER), ("scaffold", P.CFG_SCAFFOLD), ("hetlora", P.CFG_HETLORA)):
        assert key in build(name, clients_per_round=2).round_config(1), name
    assert [h.key for h in client_hooks.active({CFG_CLIP_NORM: 1.0, P.CFG_FREEZE_A: True})] == [P.CFG_FREEZE_A,
                                                                                               CFG_CLIP_NORM]
    assert client_hooks.active({P.CFG_FREEZE_A: False}) == []

    class Again(ClientHook):
        key = P.CFG_SCAFFOLD

    with pytest.raises(ValueError, match="already registered"):
        client_hook(Again)


def test_user_level_dp_clips_what_ffa_lora_clients_send(tmp_path, tiny_llama_dir, flower_identity, torch_one_thread):
    from fedge.privacy import mechanisms as M
    from server.federation import round_config
    from strategies.dp_user_level import UserLevelDP

    # Prepare: the real client app; user-level DP around FFA-LoRA with a clip norm every update exceeds
    cfg, _, ev, app, a0 = real_client_app(tmp_path, tiny_llama_dir)
    s = 1e-4
    strategy = UserLevelDP(build("ffa-lora", clients_per_round=2, base_hash=ev.base.hash), noise_multiplier=1.0,
                           clip_norm=s, seed=0, sampling="fixed")

    # Execute
    msgs = strategy.configure_train(1, deltas.to_record(a0), round_config(cfg, base_hash=ev.base.hash), FakeGrid(2))
    replies = [app(m, context(int(m.metadata.dst_node_id) - 1)) for m in msgs]

    # Assert: B (and no A) leaves each device, clipped to S after A was left out; the bit says "clipped"
    for r in replies:
        assert not r.has_error(), r.error.reason if r.has_error() else ""
        sent = deltas.decode(deltas.from_record(r.content[P.ARRAYS]), "fp32")
        assert sent and not any(lora_fed.is_lora_a(k) for k in sent)
        assert M.stable_norm(sent) == pytest.approx(s, rel=1e-3)
        assert r.content[P.METRICS][P.M_DP_UNCLIPPED] == 0.0
