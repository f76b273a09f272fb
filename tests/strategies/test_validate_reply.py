"""``validate_reply``: the pure check every train reply passes before any aggregation sees it.

Oracle: each malformed reply is refused with its own reason; a valid one decodes to the
delta that was sent, its norm and its example count. No strategy, no grid: the function
reads the message and its arguments only.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedge import deltas
from fedge import protocol as P
from strategies.base import validate_reply

SHAPES = {"m.lora_A.weight": (2, 4), "m.lora_B.weight": (3, 2)}
HASH = "ab" * 32


def good_delta(scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def make(delta=None, *, encoding="fp32", base=HASH, num=12.0, drop=None, error=False) -> Message:
    if error:
        return Message(Error(code=0, reason="boom"), reply_to=Message(RecordDict(), dst_node_id=5,
                                                                       message_type="train"))
    records = {P.ARRAYS: deltas.to_record(deltas.encode(good_delta() if delta is None else delta, encoding)),
               P.METRICS: MetricRecord({P.M_NUM_EXAMPLES: num, P.M_TRAIN_LOSS: 1.5}),
               P.META: ConfigRecord({P.META_BASE_HASH: base, P.META_ENCODING: encoding})}
    if drop:
        records.pop(drop)
    return Message(RecordDict(records), reply_to=Message(RecordDict(), dst_node_id=5, message_type="train"))


def check(msg: Message, max_norm: float | None = None):
    return validate_reply(msg, base_hash=HASH, encoding="fp32", shapes=SHAPES, max_norm=max_norm)


def test_a_valid_reply_decodes_to_what_was_sent(flower_identity):
    # Execute
    update = check(make())

    # Assert
    want = good_delta()
    assert set(update.delta) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(update.delta[k], v.astype(np.float64))
    assert update.num_examples == 12.0 and update.metrics[P.M_TRAIN_LOSS] == 1.5
    assert update.norm == pytest.approx(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in want.values())))


@pytest.mark.parametrize("msg_kw,max_norm,reason", [
    (dict(error=True), None, "client error: boom"),
    (dict(drop=P.META), None, "no 'meta' record"),
    (dict(base="cd" * 32), None, "base model hash"),
    (dict(encoding="fp16"), None, "encoding 'fp16'"),
    (dict(num=0.0), None, "must be a positive number"),
    (dict(num=float("nan")), None, "must be a positive number"),
    (dict(delta={"m.lora_A.weight": np.zeros((2, 4), np.float32)}), None, "lora_B"),
    (dict(delta={**good_delta(), "m.lora_A.weight": np.zeros((4, 2), np.float32)}), None, "shape"),
    (dict(delta={**good_delta(), "m.lora_B.weight": np.full((3, 2), np.nan, np.float32)}), None, "NaN/Inf"),
    (dict(delta=good_delta(scale=10.0)), 1.0, "norm"),
])
def test_each_malformed_reply_is_refused_with_its_reason(flower_identity, msg_kw, max_norm, reason):
    with pytest.raises(deltas.InvalidUpdate, match=reason):
        check(make(**msg_kw), max_norm=max_norm)


def test_records_of_the_wrong_type_are_refused(flower_identity):
    msg = make()
    msg.content[P.ARRAYS] = ConfigRecord({"x": 1})  # type: ignore[assignment]
    with pytest.raises(deltas.InvalidUpdate, match="wrong types|no 'arrays'"):
        check(msg)
    assert isinstance(make().content[P.ARRAYS], ArrayRecord)
