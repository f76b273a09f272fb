"""UserLevelDP: the noise really emitted, equal 1/m weights, server-side clipping, adaptive S, events."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge import deltas
from fedge import protocol as P
from fedge.privacy import mechanisms as M
from strategies import DeltaStrategy, available, build
from strategies.dp_user_level import CFG_CLIP_NORM, M_NOISE_STD, M_UNCLIPPED, UserLevelDP

SHAPES = {"lora_A": (3, 4), "scalar": ()}
NODES = 10


class FakeGrid:
    """The parts of Flower's Grid that sampling touches: node ids and the identity query."""

    def get_node_ids(self):
        return list(range(1, NODES + 1))

    def send_and_receive(self, msgs, timeout=None):
        key, field = getattr(P, "IDENTITY", "identity"), getattr(P, "ID_CLIENT", "client-id")
        return [Message(RecordDict({key: ConfigRecord({field: f"client-{m.metadata.dst_node_id:02d}"})}), reply_to=m)
                for m in msgs]


@pytest.fixture
def task_identity(monkeypatch):
    """Instruction messages need a run id, as inside a running ServerApp."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def wrap(m: int = 4, **kw) -> UserLevelDP:
    """Fixed-size sampling unless asked: these tests need exactly m messages (Poisson: tests/privacy/test_poisson_clients.py)."""
    return UserLevelDP(build("fedavg", clients_per_round=m), **{"noise_multiplier": 1.0, "clip_norm": 1.0,
                                                                 "seed": 0, "sampling": "fixed", **kw})


def const_delta(value: float) -> dict[str, np.ndarray]:
    return {"lora_A": np.full(SHAPES["lora_A"], value), "scalar": np.array(value)}


def reply(msg: Message, delta: dict, *, num_examples: float = 10.0, metrics: dict | None = None,
          nan: bool = False) -> Message:
    wire = deltas.encode(delta, "fp32")
    if nan:  # a broken client: NaN on the wire
        wire["lora_A"][0, 0] = np.nan
    content = RecordDict({
        P.ARRAYS: deltas.to_record(wire),
        P.METRICS: MetricRecord({P.M_NUM_EXAMPLES: num_examples, P.M_TRAIN_LOSS: 1.0, **(metrics or {})}),
        P.META: ConfigRecord({P.META_ENCODING: "fp32"}),
    })
    return Message(content, reply_to=msg)


def zeros_record():
    return deltas.to_record({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})


# -- the noise that is actually released -------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_released_noise_has_std_z_s_over_m_and_mean_the_clipped_mean(adaptive):
    # Prepare: 4 constant deltas, two above S (clipped), z = 1.2, S = 0.5, m = 4
    m, z, s = 4, 1.2, 0.5
    strat = wrap(m, noise_multiplier=z, clip_norm=s, adaptive=adaptive, count_noise_std=2.0)
    ds = [const_delta(v) for v in (0.01, -0.02, 1.0, 3.0)]
    clipped_mean = {k: sum(M.clip_update(d, clip_norm=s)[0][k] for d in ds) / m for k in SHAPES}
    z_delta = (z ** -2 - 4.0 ** -2) ** -0.5 if adaptive else z
    # Execute: the real aggregation, 2000 times (S is reset so every draw uses the same S)
    draws = []
    for _ in range(2000):
        strat.clip_norm = s
        draws.append(strat.aggregate(ds, np.full(m, 0.25)))
    # Assert: per-coordinate std ≈ z_Δ·S/m (2000 draws: within 5 %); mean ≈ clipped mean
    sd = z_delta * s / m
    for k in SHAPES:
        stack = np.stack([d[k] for d in draws])
        np.testing.assert_allclose(stack.std(axis=0), sd, rtol=0.05)
        np.testing.assert_allclose(stack.mean(axis=0), clipped_mean[k], atol=4 * sd / np.sqrt(2000))
    assert strat.last_event.noise_multiplier == z and strat.last_event.clip_norm == s


# -- a whole round through Flower messages ---------------------------------------------


def test_round_uses_equal_weights_over_planned_m_and_ignores_example_counts(task_identity):
    # Prepare: m = 4 planned, 3 reply; one claims 1e9 examples and sends a huge delta
    strat = wrap(4, noise_multiplier=1e-9, clip_norm=1.0)
    msgs = list(strat.configure_train(1, zeros_record(), ConfigRecord({}), FakeGrid()))
    ds = [const_delta(0.1), const_delta(-0.05), const_delta(50.0)]
    replies = [reply(msgs[0], ds[0]), reply(msgs[1], ds[1]), reply(msgs[2], ds[2], num_examples=1e9)]
    # Execute
    arrays, metrics = strat.aggregate_train(1, replies)
    # Assert: A_1 = A_0 + Σ clip(Δ_i) / 4 (noise std 2.5e-10); the big client moved it by ≤ S/m
    got = deltas.from_record(arrays)
    want = {k: sum(M.clip_update(d, clip_norm=1.0)[0][k] for d in ds) / 4 for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6)
    big_share = M.stable_norm(M.clip_update(ds[2], clip_norm=1.0)[0]) / 4
    assert big_share <= 0.25
    assert msgs[0].content[P.CONFIG][CFG_CLIP_NORM] == 1.0
    assert metrics[M_NOISE_STD] == pytest.approx(1e-9 * 1.0 / 4)
    ev = strat.last_event
    assert (ev.round, ev.clients_per_round, ev.num_clients, ev.sampling) == (1, 4, NODES, "fixed")
    assert strat.client_name(int(msgs[0].metadata.dst_node_id)).startswith("client-")  # inner's names shared


def test_round_without_enough_replies_releases_nothing(task_identity):
    inner = build("fedavg", clients_per_round=4, min_replies=2)
    strat = UserLevelDP(inner, noise_multiplier=1.0, clip_norm=1.0, seed=0, sampling="fixed")
    msgs = list(strat.configure_train(3, zeros_record(), ConfigRecord({}), FakeGrid()))
    replies = [reply(msgs[0], const_delta(0.1)), reply(msgs[1], const_delta(0.1), nan=True)]
    arrays, _ = strat.aggregate_train(3, replies)
    assert arrays is None and strat.last_event is None
    assert "NaN" in strat.report.rejected[0][1]


@pytest.mark.parametrize("bit,direction", [(0.0, +1), (1.0, -1)])
def test_adaptive_clip_follows_the_clients_unclipped_bits(task_identity, bit, direction):
    # Prepare: clients clip before sending (norms ≤ S), so only their bits tell who was clipped
    strat = wrap(8, noise_multiplier=0.5, clip_norm=1.0, adaptive=True, target_quantile=0.5, clip_lr=0.2)
    msgs = list(strat.configure_train(1, zeros_record(), ConfigRecord({}), FakeGrid()))
    # Execute
    strat.aggregate_train(1, [reply(m, const_delta(0.2), metrics={M_UNCLIPPED: bit}) for m in msgs])
    # Assert: nobody unclipped -> S grows; everybody unclipped -> S shrinks
    assert np.sign(strat.clip_norm - 1.0) == direction
    assert strat.round_config(2)[CFG_CLIP_NORM] == strat.clip_norm


def test_state_round_trip_keeps_the_adaptive_clip_norm():
    a = wrap(4, adaptive=True, count_noise_std=2.0)
    a.clip_norm = 0.37
    b = wrap(4, adaptive=True, count_noise_std=2.0)
    b.load_state_dict(a.state_dict())
    assert b.clip_norm == 0.37
    with pytest.raises(ValueError, match="unknown keys"):
        b.load_state_dict({"other": np.zeros(1)})


@pytest.mark.parametrize("kw,match", [
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(adaptive=True, count_noise_std=0.1), "count_noise_std .* too small"),
    (dict(adaptive=True, target_quantile=1.5), "target_quantile"),
])
def test_config_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        wrap(4, **kw)


@pytest.mark.parametrize("name", ["median", "krum", "trimmed-mean"])
def test_robust_rules_are_not_silently_replaced(name):
    with pytest.raises(ValueError, match="weighted mean"):
        UserLevelDP(build(name, clients_per_round=8), noise_multiplier=1.0, clip_norm=1.0)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "norm-bounding"])
def test_mean_based_rules_can_be_wrapped(name):
    assert UserLevelDP(build(name, clients_per_round=8), noise_multiplier=1.0, clip_norm=1.0).inner.name == name


def test_cannot_wrap_twice_and_arguments_are_keyword_only():
    with pytest.raises(ValueError, match="already wrapped"):
        UserLevelDP(wrap(4), noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(TypeError):
        UserLevelDP(build("fedavg", clients_per_round=4), 1.0, 1.0)  # type: ignore[misc]


def test_wraps_a_server_optimiser_and_keeps_its_state():
    # Prepare: FedAdam keeps moments; the wrapper must pass them through checkpoints
    a = UserLevelDP(build("fedadam", clients_per_round=4), noise_multiplier=1.0, clip_norm=1.0, seed=0)
    current = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    # Execute
    a.server_update(current, a.aggregate([const_delta(0.1)] * 4, np.full(4, 0.25)))
    state = a.state_dict()
    b = UserLevelDP(build("fedadam", clients_per_round=4), noise_multiplier=1.0, clip_norm=1.0, seed=0)
    b.load_state_dict(state)
    # Assert
    assert any(k.startswith("inner/") for k in state)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


@pytest.mark.parametrize("name,frozen", [("ffa-lora", "lora_A"), ("head-only", "lora_A")])
def test_replies_carry_what_the_inner_algorithm_sends(task_identity, name, frozen):
    # Prepare: the inner freezes lora_A (FFA-LoRA; head only freezes every lora_ tensor), so
    # its clients send the rest alone. Before the fix the wrapper checked replies against all
    # of A_t, refused every one, and released noise alone under its private report.
    strat = UserLevelDP(build(name, clients_per_round=4), noise_multiplier=1e-9, clip_norm=1.0, seed=0,
                        sampling="fixed")
    msgs = list(strat.configure_train(1, zeros_record(), ConfigRecord({}), FakeGrid()))
    ds = [{"scalar": np.array(v)} for v in (0.1, 0.2, -0.05, 0.3)]
    # Execute
    arrays, _ = strat.aggregate_train(1, [reply(m, d) for m, d in zip(msgs, ds)])
    # Assert: all four accepted; the frozen tensor stays, the rest moves by the clipped mean / m
    got = deltas.from_record(arrays)
    assert strat.report.accepted == 4 and not strat.report.rejected
    np.testing.assert_array_equal(got[frozen], np.zeros(SHAPES[frozen]))
    np.testing.assert_allclose(got["scalar"], sum(float(d["scalar"]) for d in ds) / 4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(available()))
def test_a_declared_mean_rule_is_the_weighted_mean(name):
    # Prepare: five small deltas (below any norm bound) and unequal weights: the oracle is Σ w_i Δ_i
    strat = build(name, clients_per_round=8)
    rng = np.random.default_rng(0)
    ds = [{"p": rng.standard_normal(3) * 1e-3} for _ in range(5)]
    w = np.array([0.1, 0.15, 0.2, 0.25, 0.3])

    # Execute + Assert: what a strategy declares is what it computes; only a declared mean can be wrapped
    if strat.aggregation == "mean":
        got = strat.aggregate(ds, w)["p"]
        np.testing.assert_allclose(got, sum(wi * d["p"] for wi, d in zip(w, ds)), rtol=1e-9, atol=0)
        assert UserLevelDP(strat, noise_multiplier=1.0, clip_norm=1.0).inner is strat
    else:
        assert strat.aggregation in ("robust", "custom")
        with pytest.raises(ValueError, match="weighted mean"):
            UserLevelDP(strat, noise_multiplier=1.0, clip_norm=1.0)


def test_an_undeclared_rule_is_refused_even_when_it_averages():
    # A user's strategy that averages but does not say so: the wrapper does not guess from a probe
    class Averages(DeltaStrategy):
        def aggregate(self, deltas_, weights):
            return {k: sum(w * d[k] for w, d in zip(weights, deltas_)) for k in deltas_[0]}

    with pytest.raises(ValueError, match="declares aggregation = 'custom'"):
        UserLevelDP(Averages(clients_per_round=4), noise_multiplier=1.0, clip_norm=1.0)

    class DeclaresIt(Averages):
        aggregation = "mean"

    assert UserLevelDP(DeclaresIt(clients_per_round=4), noise_multiplier=1.0, clip_norm=1.0).inner.aggregation == "mean"
