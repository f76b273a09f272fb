"""FedAvg over deltas through the real aggregate_train path, against a hand-computed mean."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

import strategies
from fedge import deltas
from fedge import protocol as P

HASH = "ab" * 32


def _reply(delta, n, *, node=1, base_hash=HASH, encoding="fp32", wire=None):
    train = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({
        P.ARRAYS: wire if wire is not None else deltas.to_record(deltas.encode(delta, encoding)),
        P.METRICS: MetricRecord({P.M_NUM_EXAMPLES: n, P.M_TRAIN_LOSS: 1.0, P.M_BYTES_UP: 10}),
        P.META: ConfigRecord({P.META_BASE_HASH: base_hash, P.META_ENCODING: encoding}),
    })
    return Message(content, reply_to=train)


def _strategy(**kw):
    s = strategies.build("fedavg", clients_per_round=3, base_hash=HASH, **kw)
    s.current = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    return s


def test_fedavg_is_the_example_weighted_mean(flower_identity):
    # Prepare: three clients with 1, 2 and 5 examples
    rng = np.random.default_rng(0)
    ds = [{"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)} for _ in range(3)]
    ns = [1, 2, 5]
    s = _strategy()
    # Execute
    arrays, metrics = s.aggregate_train(1, [_reply(d, n, node=i + 1) for i, (d, n) in enumerate(zip(ds, ns))])
    # Assert: A_1 = A_0 + (1·Δ1 + 2·Δ2 + 5·Δ3) / 8, computed by hand
    new = deltas.from_record(arrays)
    for k in ("w", "b"):
        expected = (np.ones((2, 3)) if k == "w" else np.zeros(3)) + (1 * ds[0][k] + 2 * ds[1][k] + 5 * ds[2][k]) / 8
        np.testing.assert_allclose(new[k], expected.astype(np.float32), rtol=1e-6)
        assert new[k].dtype == np.float32
    assert metrics["accepted"] == 3 and metrics["rejected"] == 0


def _bad_replies():
    good = {"w": np.full((2, 3), 0.1), "b": np.zeros(3)}
    nan = {"w": np.full((2, 3), np.nan), "b": np.zeros(3)}
    wrong_shape = ArrayRecord({"w": deltas.to_record({"w": np.zeros((3, 2), np.float32)})["w"],
                               "b": deltas.to_record({"b": np.zeros(3, np.float32)})["b"]})
    missing = deltas.to_record({"w": np.zeros((2, 3), np.float32)})
    wrong_dtype = deltas.to_record({"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float64)})
    nan_wire = ArrayRecord({"w": deltas.to_record({"w": nan["w"].astype(np.float32)})["w"],
                            "b": deltas.to_record({"b": np.zeros(3, np.float32)})["b"]})
    return good, {
        "NaN": _reply(None, 1, node=11, wire=nan_wire),
        "shape": _reply(None, 1, node=12, wire=wrong_shape),
        "missing": _reply(None, 1, node=13, wire=missing),
        "dtype": _reply(None, 1, node=14, wire=wrong_dtype),
        "base model hash": _reply(good, 1, node=15, base_hash="cd" * 32),
        "exceeds the bound": _reply({"w": np.full((2, 3), 100.0), "b": np.zeros(3)}, 1, node=16),
        "num-examples": _reply(good, -3, node=17),
        "encoding": _reply(good, 1, node=18, encoding="fp16"),
    }


def test_malformed_replies_are_rejected_with_reason_and_round_goes_on(flower_identity):
    good, bad = _bad_replies()
    s = _strategy(max_delta_norm=10.0)
    train = Message(RecordDict({}), dst_node_id=19, message_type=MessageType.TRAIN)
    error_reply = Message(Error(code=0, reason="boom"), reply_to=train)
    arrays, _ = s.aggregate_train(1, [_reply(good, 4, node=1), *bad.values(), error_reply])
    reasons = [r for _, r in s.report.rejected]
    assert len(reasons) == len(bad) + 1
    for needle, reason in zip(list(bad) + ["boom"], reasons):
        assert needle in reason, (needle, reason)
    new = deltas.from_record(arrays)
    np.testing.assert_allclose(new["w"], np.full((2, 3), 1.1, np.float32))  # only the good reply counted


def test_too_few_valid_replies_keep_the_global_adapter(flower_identity):
    good, bad = _bad_replies()
    s = _strategy(min_replies=2)
    arrays, metrics = s.aggregate_train(1, [_reply(good, 4, node=1), bad["NaN"]])
    assert arrays is None and metrics["accepted"] == 1 and not s.report.updated


def test_the_round_report_is_an_immutable_snapshot(flower_identity):
    import dataclasses

    # Prepare: one round with a good and a malformed reply
    good, bad = _bad_replies()
    s = _strategy()
    s.aggregate_train(1, [_reply(good, 4, node=1), bad["NaN"]])

    # Execute: the server loop's copy of round 1, then another round on the same strategy
    report = s.report
    s.aggregate_train(2, [_reply(good, 4, node=1), _reply(good, 2, node=2)])

    # Assert: round 1's report kept what round 1 did and cannot be written by whoever reads it
    assert report.accepted == 1 and len(report.rejected) == 1 and s.report.accepted == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.accepted = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        report.client_metrics["node-1"] = {}  # type: ignore[index]
    with pytest.raises(AttributeError):
        report.rejected.append((3, "forged"))  # type: ignore[attr-defined]


def test_registry_refuses_duplicates_and_lists_names():
    with pytest.raises(strategies.StrategyError, match="already registered"):
        strategies.register("fedavg")(type("Other", (strategies.DeltaStrategy,), {}))
    with pytest.raises(strategies.StrategyError, match="available: .*fedavg"):
        strategies.build("fedavgg", clients_per_round=2)
