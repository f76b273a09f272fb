"""Contract every strategy must honour: one base class, one subclass per strategy.

A new strategy gets these checks by adding a three-line subclass at the bottom.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge import deltas
from fedge import protocol as P
from strategies import available, build

SHAPES = {"lora_A": (2, 3), "lora_B": (3, 2), "bias": (4,)}
N = 8  # clients per round: enough for Bulyan with f = 1 after one rejected reply
DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-strategy.md"


def random_deltas(rng: np.random.Generator, n: int, scale: float = 0.05) -> list[dict[str, np.ndarray]]:
    """n small float64 deltas (norm ~0.2, under every default bound)."""
    return [{k: scale * rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(n)]


def global_adapter(dtype=np.float64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def step(strategy, deltas_, weights, current) -> dict[str, np.ndarray]:
    """A_{t+1} − A_t for one round through the strategy's own two hooks."""
    new = strategy.server_update(current, strategy.aggregate(deltas_, np.asarray(weights, np.float64)))
    return {k: new[k] - current[k] for k in current}


def assert_same(a: dict, b: dict, **tol) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], **{"rtol": 1e-12, "atol": 1e-14, **tol}, err_msg=k)


class FakeGrid:
    """The parts of Flower's Grid that ``configure_train`` touches: node ids and the identity query."""

    def get_node_ids(self):
        return list(range(1, N + 1))

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, RecordDict

        from fedge import protocol as P

        return [Message(RecordDict({P.IDENTITY: ConfigRecord({P.ID_CLIENT: f"client-{m.metadata.dst_node_id:03d}"})}),
                        reply_to=m) for m in messages]


@pytest.fixture
def task_identity(monkeypatch):
    """Instruction messages need a run id, as inside a running ServerApp."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def reply(msg: Message, wire: dict, *, num_examples: float = 10.0, encoding: str = "fp32") -> Message:
    content = RecordDict({
        P.ARRAYS: deltas.to_record(wire),
        P.METRICS: MetricRecord({P.M_NUM_EXAMPLES: num_examples, P.M_TRAIN_LOSS: 1.0}),
        P.META: ConfigRecord({P.META_ENCODING: encoding}),
    })
    return Message(content, reply_to=msg)


def faulty_reply(fault: str, msg: Message, delta: dict) -> Message:
    wire = deltas.encode(delta, "fp32")
    if fault == "nan":
        wire[next(k for k in ("lora_A", "lora_B", "bias") if k in wire)].flat[1] = np.nan
    elif fault == "wrong-shape":
        k = "lora_B" if "lora_B" in wire else "bias"  # head only: the reply carries the head alone
        wire[k] = wire[k].T.copy() if wire[k].ndim == 2 else wire[k].reshape(-1, 1)
    elif fault == "missing-tensor":
        del wire["bias"]
    elif fault == "wrong-dtype":
        wire["bias"] = wire["bias"].astype(np.float64)
    elif fault == "absurd-norm":
        wire = deltas.encode({k: 1e6 * v for k, v in delta.items()}, "fp32")
    elif fault == "no-examples":
        return reply(msg, wire, num_examples=0.0)
    elif fault == "wrong-encoding":
        return reply(msg, deltas.encode(delta, "int8"), encoding="int8")
    elif fault == "missing-record":
        content = reply(msg, wire).content
        del content[P.METRICS]
        return Message(content, reply_to=msg)
    elif fault == "error-reply":
        return Message(Error(code=0, reason="out of memory"), reply_to=msg)
    return reply(msg, wire)


FAULTS = {  # fault -> words the rejection reason must contain
    "nan": "NaN", "wrong-shape": "shape", "missing-tensor": "missing", "wrong-dtype": "dtype",
    "absurd-norm": "exceeds the bound", "no-examples": P.M_NUM_EXAMPLES, "wrong-encoding": "encoding",
    "missing-record": f"no {P.METRICS!r} record", "error-reply": "client error",
}


class StrategyContract:
    """Checks for any ``DeltaStrategy``; subclasses set ``name`` (and ``params``) or override ``make``."""

    name = ""
    params: dict = {}
    adaptive = False  # server optimiser: identical deltas give a finite step along Δ, not Δ itself
    stateful = False  # keeps state across rounds (momentum, moments)
    # Where an algorithm legitimately differs from "a rule over whole deltas":
    frozen: tuple[str, ...] = ()  # tensors it never moves and replies do not carry (FFA-LoRA: lora_A)
    state_moves_adapter = True  # False: its state is served beside the adapter (FedEx-LoRA's residual R)

    def make(self, **kw):
        return build(self.name, clients_per_round=N, **{**self.params, **kw})

    def reply_records(self) -> dict:
        """Extra records every valid train reply carries for this algorithm (SCAFFOLD: Δc_i)."""
        return {}

    @property
    def probe(self) -> str:
        """A tensor the rule moves, to tell two outcomes apart."""
        return next(k for k in SHAPES if k not in self.frozen)

    def test_describes_itself(self):
        s = self.make()
        summary = (type(s).__doc__ or "").strip().splitlines()
        assert summary and summary[0].endswith((".", ")"))
        assert s.paper
        ConfigRecord(s.round_config(1))  # whatever it sends must fit in a config record

    def test_identical_deltas_give_that_delta(self):
        # Prepare
        d = random_deltas(np.random.default_rng(0), 1)[0]
        w = np.full(N, 1 / N)
        # Execute
        got = step(self.make(), [d] * N, w, global_adapter())
        # Assert
        if not self.adaptive:
            assert_same(got, {k: 0 * v if k in self.frozen else v for k, v in d.items()}, rtol=1e-9, atol=1e-12)
            return
        flat_got = np.concatenate([got[k].ravel() for k in SHAPES])
        flat_d = np.concatenate([d[k].ravel() for k in SHAPES])
        assert np.all(np.isfinite(flat_got))
        assert np.array_equal(np.sign(flat_got), np.sign(flat_d))
        assert flat_got @ flat_d > 0

    def test_client_order_does_not_matter(self):
        rng = np.random.default_rng(1)
        ds, w = random_deltas(rng, N), rng.dirichlet(np.ones(N))
        perm = rng.permutation(N)
        a = step(self.make(), ds, w, global_adapter())
        b = step(self.make(), [ds[i] for i in perm], w[perm], global_adapter())
        assert_same(a, b, rtol=1e-10, atol=1e-13)

    def test_weights(self):
        rng = np.random.default_rng(2)
        ds = random_deltas(rng, N)
        w = rng.dirichlet(np.ones(N))
        if self.make().weighted:
            # a weight-0 client has no influence, however large its delta
            w[0] = 0.0
            w /= w.sum()
            wild = [{k: 1e3 * rng.standard_normal(s) for k, s in SHAPES.items()}] + ds[1:]
            assert_same(step(self.make(), ds, w, global_adapter()), step(self.make(), wild, w, global_adapter()))
            other = step(self.make(), ds, rng.dirichlet(np.ones(N)), global_adapter())
            assert not np.allclose(other[self.probe], step(self.make(), ds, w, global_adapter())[self.probe])
        else:
            # unweighted rules ignore the weights entirely
            assert_same(step(self.make(), ds, w, global_adapter()),
                        step(self.make(), ds, np.full(N, 1 / N), global_adapter()))

    def test_state_survives_a_checkpoint(self):
        # Prepare: two rounds on one instance
        rng = np.random.default_rng(3)
        rounds = [random_deltas(rng, N) for _ in range(3)]
        w = rng.dirichlet(np.ones(N))
        a, current = self.make(), global_adapter()
        for ds in rounds[:2]:
            current = a.server_update(current, a.aggregate(ds, w))
        # Execute: state -> fresh instance
        saved = a.state_dict()
        b = self.make()
        b.load_state_dict({k: v.copy() for k, v in saved.items()})
        # Assert: same state, same next round
        assert all(isinstance(v, np.ndarray) for v in saved.values())
        assert (len(saved) > 0) == self.stateful
        assert_same(b.state_dict(), saved, rtol=0, atol=0)
        assert_same(step(b, rounds[2], w, current), step(a, rounds[2], w, current), rtol=0, atol=0)
        if self.stateful and self.state_moves_adapter:  # the state matters: a fresh instance steps differently
            assert not np.allclose(step(self.make(), rounds[2], w, current)[self.probe],
                                   step(b, rounds[2], w, current)[self.probe])
        with pytest.raises(ValueError):
            self.make().load_state_dict({"bogus/lora_A": np.zeros(3)})

    @pytest.mark.parametrize("fault", sorted(FAULTS))
    def test_malformed_reply_is_refused(self, fault, task_identity):
        # Prepare: a real round, one faulty reply among N
        s = self.make(max_delta_norm=10.0)
        arrays = deltas.to_record(global_adapter(np.float32))
        msgs = list(s.configure_train(1, arrays, ConfigRecord({}), FakeGrid()))
        ds = [{k: v for k, v in d.items() if k not in self.frozen} for d in random_deltas(np.random.default_rng(4), N)]
        bad = 3
        replies = [faulty_reply(fault, m, d) if i == bad else reply(m, deltas.encode(d, "fp32"), num_examples=10.0 + i)
                   for i, (m, d) in enumerate(zip(msgs, ds))]
        for r in replies:
            if not r.has_error():
                r.content.update(self.reply_records())
        # Execute
        out, metrics = s.aggregate_train(1, replies)
        # Assert: rejected with its reason; the result is the aggregate of the other N − 1
        [(node, reason)] = s.report.rejected
        assert node == msgs[bad].metadata.dst_node_id and FAULTS[fault] in reason
        assert s.report.accepted == metrics["accepted"] == N - 1
        good = [{k: v.astype(np.float32).astype(np.float64) for k, v in d.items()} for i, d in enumerate(ds) if i != bad]
        n_ex = np.array([10.0 + i for i in range(N) if i != bad])
        w = n_ex / n_ex.sum() if s.weighted else np.full(N - 1, 1 / (N - 1))
        ref = self.make()
        expected = ref.server_update(deltas.from_record(arrays), ref.aggregate(good, w))
        assert_same(deltas.from_record(out), expected, rtol=0, atol=0)


class TestFedAvg(StrategyContract):
    name = "fedavg"


class TestFedAvgM(StrategyContract):
    name, stateful = "fedavgm", True


class TestFedProx(StrategyContract):
    name = "fedprox"


class TestFedAdam(StrategyContract):
    name, adaptive, stateful = "fedadam", True, True


class TestFedYogi(StrategyContract):
    name, adaptive, stateful = "fedyogi", True, True


class TestFedAdagrad(StrategyContract):
    name, adaptive, stateful = "fedadagrad", True, True


class TestMedian(StrategyContract):
    name = "median"


class TestTrimmedMean(StrategyContract):
    name, params = "trimmed-mean", {"beta": 0.2}


class TestKrum(StrategyContract):
    name = "krum"


class TestMultiKrum(StrategyContract):
    name = "multikrum"


class TestBulyan(StrategyContract):
    name = "bulyan"


class TestNormBounding(StrategyContract):
    name = "norm-bounding"


def load_doc_example():
    """The strategy class from the first ```python block of docs/writing-a-strategy.md."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("fedge_doc_example")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module.SmallestNormMean


class TestDocExample(StrategyContract):
    def make(self, **kw):
        return load_doc_example()(clients_per_round=N, **{"k": 5, **kw})


def test_every_registered_strategy_has_a_contract_test_and_a_paper():
    covered = {c.name for c in StrategyContract.__subclasses__() if c.name}
    assert set(available()) <= covered
    assert all("arXiv:" in cls.paper for cls in available().values())


# -- LoRA-aware strategies (tests/strategies/test_strategy_lora.py checks their LoRA behaviour) --


class TestScaffold(StrategyContract):
    # c changes only through the Δc_i records that aggregate_train reads, never through
    # aggregate/server_update: stateful stays False here; c's round trip is in test_strategy_lora.
    name, params = "scaffold", {"num_clients": 2 * N}

    def reply_records(self) -> dict:
        return {P.SCAFFOLD_DC: deltas.to_record({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})}


class TestFFALoRA(StrategyContract):
    # lora_A stays at its initialisation and is not sent: identical deltas move only the rest.
    name, frozen = "ffa-lora", ("lora_A",)


class TestHeadOnly(StrategyContract):
    # lora_A and lora_B stay at their initialisation and are not sent: only the head ("bias") moves.
    name, frozen = "head-only", ("lora_A", "lora_B")


class TestFedExLoRA(StrategyContract):
    # SHAPES' lora_A (2, 3) / lora_B (3, 2) pair into one residual R (3, 3), the state; R is
    # served beside the adapter, so it does not change A_{t+1} (hence state_moves_adapter).
    name, stateful, state_moves_adapter = "fedex-lora", True, False


class TestHetLoRA(StrategyContract):
    # Every reply here has the full rank r_max = 2 (no rank declared): the rule must reduce to FedAvg.
    name = "hetlora"
