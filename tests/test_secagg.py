"""Secure aggregation: the math (fedge/secagg.py) and the four-stage protocol between the
real server code (server/secagg.py) and the real client stage handlers (clients/secagg.py).

The transport here is a loopback grid that hands each message to the node's handler with
the node's own Flower Context (its secrets live there, as under the simulation engine);
tests/test_secagg_federation.py runs the same protocol through Flower's simulation engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats

from clients import secagg as C
from fedge import deltas
from fedge import protocol as P
from fedge import secagg as S
from server.secagg import SecAggParams, secure_train_round
from strategies import build

SHAPES = {"lora_A": (4, 8), "lora_B": (8, 4)}
PARAMS = SecAggParams(neighbours=0, threshold=0.67, fraction_bits=32)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class Dropout(RuntimeError):
    pass


class LoopbackGrid:
    """Nodes 101.. with their own Context; ``fail[(node, message type)]`` makes a node fail there."""

    def __init__(self, client_deltas: list[dict], weights: list[float], fail: set | None = None):
        self.deltas, self.weights, self.fail = client_deltas, weights, fail or set()
        self.nodes = [101 + i for i in range(len(client_deltas))]
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in self.nodes}
        self.masked_seen: dict[int, np.ndarray] = {}
        self.x_sent: dict[int, np.ndarray] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def _handle(self, msg: Message) -> Message:
        node, kind = int(msg.metadata.dst_node_id), msg.metadata.message_type
        ctx = self.contexts[node]
        if (node, kind) in self.fail:
            raise Dropout(f"node {node} dropped at {kind}")
        if kind == "query":
            return Message(RecordDict({P.IDENTITY: ConfigRecord({P.ID_CLIENT: f"c{node}"})}), reply_to=msg)
        if kind == P.SA_SETUP_TYPE:
            return C.setup(msg, ctx)
        if kind == P.SA_SHARE_TYPE:
            return C.share_keys(msg, ctx)
        if kind == P.SA_CHECK_TYPE:
            return C.consistency_check(msg, ctx)
        if kind == P.SA_UNMASK_TYPE:
            return C.unmask(msg, ctx)
        assert kind == P.SA_TRAIN_TYPE
        i = self.nodes.index(node)
        wire = C.masked_vector(msg, ctx, delta=self.deltas[i], weight=self.weights[i], loss=1.0 + i, unclipped=1.0)
        self.masked_seen[node] = wire[P.SA_MASKED].numpy()
        meta = ConfigRecord({P.META_BASE_HASH: "h", P.META_ENCODING: "secagg"})
        return Message(RecordDict({P.ARRAYS: wire, P.METRICS: MetricRecord({P.M_BYTES_UP: 1}), P.META: meta}),
                       reply_to=msg)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            try:
                out.append(self._handle(m))
            except Dropout:
                continue  # no reply before the timeout
            except Exception as err:  # noqa: BLE001 - Flower turns a client exception into an error reply
                out.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=m))
        return out


def _deltas(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{k: 0.01 * rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(n)]


def _run(strategy_name: str, client_deltas, weights, fail=None, params=PARAMS, **kw):
    current = {k: np.zeros(s) for k, s in SHAPES.items()}
    strategy = build(strategy_name, clients_per_round=len(client_deltas), min_replies=2, base_hash="h", **kw)
    grid = LoopbackGrid(client_deltas, weights, fail)
    arrays, _ = secure_train_round(grid, strategy, 1, deltas.to_record(current), ConfigRecord({}), params=params,
                                   timeout=10)
    return strategy, grid, (deltas.from_record(arrays) if arrays is not None else None)


def _oracle(client_deltas, weights, keep):
    w = np.array([weights[i] for i in keep])
    return {k: sum(wi * client_deltas[i][k] for wi, i in zip(w, keep)) / w.sum() for k in SHAPES}


def _assert_close(got, want, n):
    for k in want:  # truncation error ≤ 2^-f per client and coordinate, before dividing by Σw
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=n * 2.0**-PARAMS.fraction_bits, err_msg=k)


# -- the math -------------------------------------------------------------------------------

def test_fixed_point_round_trip_never_grows_a_value_and_refuses_out_of_range():
    # Prepare
    x = np.array([0.0, 1e-3, -1e-3, 0.5, -7.25, 1 / 3, -(2.0**-33)])
    # Execute
    back = S.decode_fixed(S.encode_fixed(x, fraction_bits=32, max_abs=8.0), fraction_bits=32)
    # Assert
    assert np.all(np.abs(back) <= np.abs(x)) and np.max(np.abs(back - x)) < 2.0**-32
    with pytest.raises(S.SecAggError, match="range"):
        S.encode_fixed(np.array([9.0]), fraction_bits=32, max_abs=8.0)
    with pytest.raises(S.SecAggError, match="non-finite"):
        S.encode_fixed(np.array([np.nan]), fraction_bits=32, max_abs=8.0)


def test_sum_of_encoded_values_wraps_back_to_the_signed_sum():
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-100, 100, 50) for _ in range(7)]
    total = sum((S.encode_fixed(x, fraction_bits=32, max_abs=1e3) for x in xs), np.zeros(50, np.uint64))
    np.testing.assert_allclose(S.decode_fixed(total, fraction_bits=32), sum(xs), atol=7 * 2.0**-32)


def test_pair_masks_cancel_and_dropped_masks_are_recomputable():
    # Prepare: 4 clients on a complete graph, zero inputs
    rid, n, size = b"r" * 16, 4, 33
    keys = {i: S.keypair() for i in range(1, n + 1)}
    seeds = {i: S.new_seed() for i in keys}

    def pair(i, j):
        return S.agree(keys[i][0], keys[j][1], context=S.pair_context(rid, i, j))

    ys = {i: S.mask(np.zeros(size, np.uint64), self_seed=seeds[i], pair_seeds={j: pair(i, j) for j in keys if j != i},
                    me=i) for i in keys}
    # Execute: remove self masks of all; then pretend client 4 dropped after masking nothing
    total = sum((ys[i] - S.prg(seeds[i], size) for i in keys), np.zeros(size, np.uint64))
    partial = sum((ys[i] - S.prg(seeds[i], size) for i in (1, 2, 3)), np.zeros(size, np.uint64))
    fix = S.pair_masks_of_dropped(dropped=4, dropped_private=keys[4][0], public_keys={i: keys[i][1] for i in (1, 2, 3)},
                                  survivors=[1, 2, 3], round_id=rid, size=size)
    # Assert
    assert not total.any()
    assert not (partial - fix).any()


def test_neighbour_graph_is_symmetric_with_the_asked_degree():
    for n, k in [(10, 4), (10, 3), (7, 6), (30, 8)]:
        g = S.neighbours(n, k, seed=5)
        assert all(i not in v for i, v in g.items())
        assert all(i in g[j] for i, v in g.items() for j in v)
        degree = n - 1 if k >= n - 1 else 2 * -(-k // 2)
        assert {len(v) for v in g.values()} == {degree}


@pytest.mark.parametrize("holders,fraction,want", [(5, 0.67, 4), (4, 0.67, 3), (10, 0.51, 6), (3, 0.67, 3), (2, 0.6, 2)])
def test_threshold_is_above_half_of_the_holders(holders, fraction, want):
    assert S.threshold_for(holders, fraction) == want


def test_shamir_rebuilds_from_any_threshold_subset_only():
    secret = S.new_seed()
    shares = S.split_secret(secret, threshold=3, holders=5)
    assert S.combine_secret([shares[4], shares[0], shares[2]]) == secret
    try:
        below = S.combine_secret(shares[:2])
    except S.SecAggError:
        below = None
    assert below != secret


# -- the protocol --------------------------------------------------------------------------------

@pytest.mark.parametrize("neighbours", [0, 4])
def test_secure_sum_equals_plain_weighted_mean(neighbours):
    # Prepare
    ds, w = _deltas(6), [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]
    params = SecAggParams(neighbours=neighbours, threshold=0.67, fraction_bits=32)
    # Execute
    strategy, _, got = _run("fedavg", ds, w, params=params)
    # Assert
    _assert_close(got, _oracle(ds, w, range(6)), 6)
    assert strategy.report.secure["survivors"] == 6 and strategy.report.accepted == 6
    assert strategy.report.train_loss == pytest.approx(np.average([1.0 + i for i in range(6)], weights=w))


@pytest.mark.parametrize("stage", [P.SA_SETUP_TYPE, P.SA_SHARE_TYPE, P.SA_TRAIN_TYPE, P.SA_CHECK_TYPE,
                                   P.SA_UNMASK_TYPE])
def test_one_client_dropping_out_at_any_stage(stage):
    # Prepare: the 3rd sampled client (node 103) drops out at ``stage``
    ds, w = _deltas(5, seed=2), [2.0, 1.0, 1.0, 3.0, 1.0]
    # Execute
    strategy, _, got = _run("fedavg", ds, w, fail={(103, stage)})
    # Assert: it still contributes if it dropped after sending y (its y is in the sum)
    keep = range(5) if stage in (P.SA_CHECK_TYPE, P.SA_UNMASK_TYPE) else [0, 1, 3, 4]
    _assert_close(got, _oracle(ds, w, keep), 5)
    if stage == P.SA_TRAIN_TYPE:
        assert strategy.report.secure["dropped_after_sharing"] == 1  # its pair masks were rebuilt and removed
    if stage == P.SA_CHECK_TYPE:
        assert strategy.report.secure["signed_survivor_set"] == 4  # still t = 4 signatures


def test_too_many_dropouts_keep_the_global_adapter():
    ds, w = _deltas(5), [1.0] * 5
    strategy, _, got = _run("fedavg", ds, w, fail={(101, P.SA_TRAIN_TYPE), (102, P.SA_TRAIN_TYPE),
                                                    (103, P.SA_TRAIN_TYPE)})
    assert got is None and strategy.report.secure["stage_failed"] == "masked input"


def test_server_view_of_one_upload_is_indistinguishable_from_random():
    # Prepare: two rounds in which client 0 sends a strongly structured delta, then all zeros
    ds = _deltas(4, seed=3)
    ds[0] = {k: np.full(s, 0.02) for k, s in SHAPES.items()}
    zeros = [dict(d) for d in ds]
    zeros[0] = {k: np.zeros(s) for k, s in SHAPES.items()}
    # Execute
    _, grid_a, _ = _run("fedavg", ds, [1.0] * 4)
    _, grid_b, _ = _run("fedavg", zeros, [1.0] * 4)
    y_a, y_b = grid_a.masked_seen[101], grid_b.masked_seen[101]
    # Assert: bytes uniform (chi-square), bits balanced, no correlation with the input,
    # and the upload of a real delta is distributed like the upload of zeros (two-sample KS).
    for y in (y_a, y_b):
        counts = np.bincount(y.view(np.uint8), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
        bits = np.unpackbits(y.view(np.uint8))
        assert abs(bits.mean() - 0.5) < 4 * 0.5 / np.sqrt(bits.size)
    x = S.encode_fixed(np.concatenate([ds[0][k].ravel() for k in sorted(SHAPES)] + [np.array([1.0, 1.0, 1.0, 1.0])]),
                       fraction_bits=32, max_abs=1e6)
    assert abs(np.corrcoef(x.astype(np.float64), y_a.astype(np.float64))[0, 1]) < 0.3
    assert stats.ks_2samp(y_a.astype(np.float64), y_b.astype(np.float64)).pvalue > 1e-3
    assert not np.array_equal(y_a[:-4], x[:-4])


def test_user_level_dp_under_secure_aggregation_noises_the_secure_sum():
    # Prepare: deltas already clipped by the clients (norm ≤ S)
    from strategies.dp_user_level import UserLevelDP

    ds = _deltas(5, seed=4)
    inner = build("fedavg", clients_per_round=5, min_replies=2, base_hash="h")
    dp = UserLevelDP(inner, noise_multiplier=1e-12, clip_norm=10.0, seed=0)
    grid = LoopbackGrid(ds, [1.0] * 5)
    current = {k: np.zeros(s) for k, s in SHAPES.items()}
    # Execute
    arrays, metrics = secure_train_round(grid, dp, 1, deltas.to_record(current), ConfigRecord({}), params=PARAMS,
                                         timeout=10)
    # Assert: Σ Δ_i / m (m planned), with (negligible) noise; the round is charged to the ledger
    got = deltas.from_record(arrays)
    _assert_close(got, {k: sum(d[k] for d in ds) / 5 for k in SHAPES}, 5)
    assert dp.last_event is not None and dp.last_event.clients_per_round == 5


# -- the client's refusals -----------------------------------------------------------------------

class Peer:
    """A neighbour played by the test: identity key, the round's two key pairs, signed."""

    def __init__(self, rid: bytes, index: int):
        self.index, self.name = index, f"peer-{index}"
        self.id_sk, self.id_pk = S.identity_keypair()
        self.c, self.s = S.keypair(), S.keypair()
        self.sig = S.sign(self.id_sk, S.keys_message(rid, index, self.c[1], self.s[1]))


def _mk(kind, fields):
    return Message(RecordDict({P.SECAGG: ConfigRecord(fields)}), message_type=kind, dst_node_id=1)


def _share_request(rid, peers, t=2):
    return _mk(P.SA_SHARE_TYPE, {P.SA_ROUND_ID: rid, P.SA_NEIGHBOURS: [p.index for p in peers],
                                 P.SA_NAMES: [p.name for p in peers], P.SA_C_PKS: [p.c[1] for p in peers],
                                 P.SA_S_PKS: [p.s[1] for p in peers], P.SA_ID_KEYS: [p.id_pk for p in peers],
                                 P.SA_KEY_SIGS: [p.sig for p in peers], P.SA_THRESHOLD: t})


def _client_through_stage_2(ctx: Context):
    """One client (index 1) with neighbours 2 and 3 played by the test (t = 2 of 3 holders)."""
    rid = b"x" * 16
    pk = C.setup(_mk(P.SA_SETUP_TYPE, {P.SA_ROUND_ID: rid, P.SA_INDEX: 1}), ctx).content[P.SECAGG]
    peers = [Peer(rid, 2), Peer(rid, 3)]
    shares = C.share_keys(_share_request(rid, peers), ctx)
    assert sorted(shares.content[P.SECAGG][P.SA_DST]) == [2, 3]
    return rid, peers, bytes(pk[P.SA_C_PK])


def _train_request(rid, peer, c_pk, *, ciphertext=None, fraction_bits=32):
    ctx_ = S.share_context(rid, peer.index, 1)
    ct = ciphertext or S.encrypt(S.agree(peer.c[0], c_pk, context=ctx_), S.pack_shares(b"b" * 20, b"s" * 20),
                                 aad=ctx_)
    return _mk(P.SA_TRAIN_TYPE, {P.SA_ROUND_ID: rid, P.SA_SRC: [peer.index], P.SA_CIPHERTEXTS: [ct],
                                 P.SA_FRACTION_BITS: fraction_bits, P.SA_NUM: 3, P.SA_WEIGHTED: True})


def _client_through_check(ctx: Context):
    """... then masked input (peer 2's share arrived) and the consistency check on U4 = {1, 2}."""
    rid, peers, c_pk = _client_through_stage_2(ctx)
    C.masked_vector(_train_request(rid, peers[0], c_pk), ctx, delta={"a": np.ones(3)}, weight=1.0, loss=None,
                    unclipped=1.0)
    C.consistency_check(_mk(P.SA_CHECK_TYPE, {P.SA_ROUND_ID: rid, P.SA_SURVIVORS: [1, 2]}), ctx)
    return rid, peers


def _unmask_request(rid, peers, survivors, dropped, signed=(1, 2)):
    sig = S.sign(peers[0].id_sk, S.survivors_message(rid, signed))
    return _mk(P.SA_UNMASK_TYPE, {P.SA_ROUND_ID: rid, P.SA_SURVIVORS: survivors, P.SA_DROPPED: dropped,
                                  P.SA_SIGNERS: [2], P.SA_SIGNATURES: [sig]})


def _ctx():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_client_never_reveals_both_secrets_of_one_client_answers_once_and_forgets_its_secrets():
    # Prepare
    ctx_a, ctx_b = _ctx(), _ctx()
    rid, peers = _client_through_check(ctx_a)
    rid_b, peers_b = _client_through_check(ctx_b)
    # Execute / Assert: asked for both secrets of client 2, the client aborts the round
    with pytest.raises(C.SecAggRefused, match="both"):
        C.unmask(_unmask_request(rid, peers, [1, 2], [2]), ctx_a)
    with pytest.raises(C.SecAggRefused, match="aborted"):
        C.unmask(_unmask_request(rid, peers, [1, 2], []), ctx_a)
    # an honest request is answered once, with b shares only, and the round's secrets are gone
    sa = C.unmask(_unmask_request(rid_b, peers_b, [1, 2], []), ctx_b).content[P.SECAGG]
    assert sorted(zip(sa[P.SA_SHARE_OF], sa[P.SA_SHARE_KIND])) == [(1, 0), (2, 0)]
    with pytest.raises(C.SecAggRefused, match="out of order"):
        C.unmask(_unmask_request(rid_b, peers_b, [1], [2]), ctx_b)
    for ctx in (ctx_a, ctx_b):
        assert not {"c-sk", "s-sk", "b", "own-share", P.SA_CIPHERTEXTS} & set(ctx.state[C.STATE].keys())


def test_client_refuses_to_sign_a_survivor_set_below_the_threshold():
    ctx = _ctx()
    rid, peers, c_pk = _client_through_stage_2(ctx)
    C.masked_vector(_train_request(rid, peers[0], c_pk), ctx, delta={"a": np.ones(3)}, weight=1.0, loss=None,
                    unclipped=1.0)
    with pytest.raises(C.SecAggRefused, match="threshold"):
        C.consistency_check(_mk(P.SA_CHECK_TYPE, {P.SA_ROUND_ID: rid, P.SA_SURVIVORS: [1]}), ctx)


def test_client_refuses_to_unmask_without_t_signatures_over_the_set_it_signed():
    # Prepare: the client signed U4 = {1, 2}; its neighbour's signature is over {1, 2, 3}
    # (the server showed it another set) or missing
    ctx_a, ctx_b = _ctx(), _ctx()
    rid, peers = _client_through_check(ctx_a)
    rid_b, peers_b = _client_through_check(ctx_b)
    # Execute / Assert
    with pytest.raises(C.SecAggRefused, match="1 valid signatures"):
        C.unmask(_unmask_request(rid, peers, [1, 2], [], signed=(1, 2, 3)), ctx_a)
    no_sig = _unmask_request(rid_b, peers_b, [1, 2], [])
    no_sig.content[P.SECAGG][P.SA_SIGNERS], no_sig.content[P.SECAGG][P.SA_SIGNATURES] = [], []
    with pytest.raises(C.SecAggRefused, match="1 valid signatures"):
        C.unmask(no_sig, ctx_b)


def test_client_refuses_duplicate_public_keys():
    ctx = _ctx()
    rid = b"x" * 16
    C.setup(_mk(P.SA_SETUP_TYPE, {P.SA_ROUND_ID: rid, P.SA_INDEX: 1}), ctx)
    a, b = Peer(rid, 2), Peer(rid, 3)
    b.c, b.s = a.c, a.s  # the server hands out one pair (its own) for two neighbours
    b.sig = S.sign(b.id_sk, S.keys_message(rid, 3, b.c[1], b.s[1]))
    with pytest.raises(C.SecAggRefused, match="same public key"):
        C.share_keys(_share_request(rid, [a, b]), ctx)


def test_client_refuses_a_tampered_share_and_a_value_out_of_range():
    ctx_a, ctx_b = _ctx(), _ctx()
    rid, peers, c_pk = _client_through_stage_2(ctx_a)
    rid_b, peers_b, c_pk_b = _client_through_stage_2(ctx_b)
    with pytest.raises(S.SecAggError, match="authenticate"):
        C.masked_vector(_train_request(rid, peers[0], c_pk, ciphertext=b"\0" * 60), ctx_a, delta={"a": np.ones(3)},
                        weight=1.0, loss=None, unclipped=1.0)
    with pytest.raises(S.SecAggError, match="range"):
        C.masked_vector(_train_request(rid_b, peers_b[0], c_pk_b, fraction_bits=40), ctx_b,
                        delta={"a": np.full(3, 1e7)}, weight=1.0, loss=None, unclipped=1.0)


def test_server_rejects_a_masked_vector_of_the_wrong_length():
    class Truncating(LoopbackGrid):
        def _handle(self, msg):
            reply = super()._handle(msg)
            if msg.metadata.message_type == P.SA_TRAIN_TYPE and int(msg.metadata.dst_node_id) == 102:
                y = reply.content[P.ARRAYS][P.SA_MASKED].numpy()
                reply.content[P.ARRAYS] = deltas.to_record({P.SA_MASKED: y[:-1]})
            return reply

    ds, w = _deltas(5), [1.0] * 5
    strategy = build("fedavg", clients_per_round=5, min_replies=2, base_hash="h")
    current = {k: np.zeros(s) for k, s in SHAPES.items()}
    arrays, _ = secure_train_round(Truncating(ds, w), strategy, 1, deltas.to_record(current), ConfigRecord({}),
                                   params=PARAMS, timeout=10)
    assert any("layout" in why for _, why in strategy.report.rejected)
    _assert_close(deltas.from_record(arrays), _oracle(ds, w, [0, 2, 3, 4]), 5)


# -- refused at config time ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multikrum", "bulyan", "norm-bounding",
                                  "scaffold", "fedex-lora", "hetlora"])
def test_rules_that_need_individual_updates_are_refused_with_secure_aggregation(name):
    from fedge import config as fcfg
    from server.federation import build_strategy
    from strategies import StrategyError

    cfg = fcfg.load("default", [f"strategy.name={name}", "secure_aggregation.enabled=true", "export.enabled=false"])
    with pytest.raises(StrategyError, match="secure_aggregation.enabled") as err:
        build_strategy(cfg, base_hash="")
    assert "fedavg" in str(err.value) and name not in str(err.value).split("work with it:")[1]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "ffa-lora"])
def test_mean_rules_are_accepted_with_secure_aggregation(name):
    from fedge import config as fcfg
    from server.federation import build_strategy

    cfg = fcfg.load("default", [f"strategy.name={name}", "secure_aggregation.enabled=true"])
    assert build_strategy(cfg, base_hash="").secure_aggregation


def test_secure_aggregation_of_fewer_than_three_clients_is_refused():
    from fedge import config as fcfg

    with pytest.raises(fcfg.ConfigError, match="clients_per_round >= 3"):
        fcfg.load("default", ["secure_aggregation.enabled=true", "federation.clients_per_round=2",
                              "federation.min_replies=1"])
    with pytest.raises(fcfg.ConfigError, match="threshold"):
        fcfg.load("default", ["secure_aggregation.enabled=true", "secure_aggregation.threshold=0.5"])


# -- a malicious server (Bonawitz et al. 2017, §6: the actively secure variant) ------------------
#
# The real server code runs the round; the grid between it and the real client handlers
# plays the malicious server: it rewrites what it sends (``tamper``), keeps everything the
# clients answer, and then tries to rebuild the victim's (round index 1) input alone.

class MaliciousServer(LoopbackGrid):
    def __init__(self, client_deltas, weights, tamper):
        super().__init__(client_deltas, weights)
        self.tamper, self.seen = tamper, []  # (what was sent, the reply or None)
        self.node_of: dict[int, int] = {}  # round index -> node id

    @property
    def victim(self) -> int:
        return self.node_of[1]

    def index(self, m: Message) -> int:
        return {v: k for k, v in self.node_of.items()}[int(m.metadata.dst_node_id)]

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            if m.metadata.message_type == P.SA_SETUP_TYPE:
                self.node_of[int(_sa(m)[P.SA_INDEX])] = int(m.metadata.dst_node_id)
                self.rid = bytes(_sa(m)[P.SA_ROUND_ID])
            m = self.tamper(self, m)
            r = super().send_and_receive([m], timeout)
            self.seen.append((m, r[0] if r else None))
            out += r
        return out

    def replies(self, kind):
        """node -> reply content (or the error reason) for message type ``kind``."""
        return {int(m.metadata.dst_node_id): (r.error.reason if r.has_error() else r.content)
                for m, r in self.seen if m.metadata.message_type == kind and r is not None}


def _sa(m: Message) -> ConfigRecord:
    return m.content[P.SECAGG]


def _victim_input(grid, d):
    v = grid.victim - 101
    return grid.weights[v] * np.concatenate([grid.deltas[v][k].ravel() for k in sorted(SHAPES)])[:d]


def _recovered(grid, y, b_seed, pair_seeds, d):
    """Victim's input as the attacker rebuilds it: y − PRG(b) − Σ_j ±PRG(s_1j)."""
    x = y - S.prg(b_seed, y.size)
    for j, seed in pair_seeds.items():
        x = x - S.prg(seed, y.size) if j > 1 else x + S.prg(seed, y.size)
    return S.decode_fixed(x, fraction_bits=PARAMS.fraction_bits)[:d]


def _attack(tamper, n=5, rounds=1):
    ds, w = _deltas(n, seed=7), [2.0, 1.0, 3.0, 1.0, 2.0]
    grid = MaliciousServer(ds, w, tamper)
    current = {k: np.zeros(s) for k, s in SHAPES.items()}
    for r in range(1, rounds + 1):
        strategy = build("fedavg", clients_per_round=n, min_replies=2, base_hash="h")
        grid.round, grid.seen = r, []
        secure_train_round(grid, strategy, r, deltas.to_record(current), ConfigRecord({}), params=PARAMS, timeout=10)
    return grid, ds, w, sum(int(np.prod(s)) for s in SHAPES.values())


def _shares_of(grid, j, kind):
    out = []
    for content in grid.replies(P.SA_UNMASK_TYPE).values():
        if isinstance(content, str):
            continue
        sa = content[P.SECAGG]
        out += [bytes(s) for o, k, s in zip(sa[P.SA_SHARE_OF], sa[P.SA_SHARE_KIND], sa[P.SA_SHARES])
                if int(o) == j and int(k) == kind]
    return out


def test_attack_a_victim_told_no_shares_arrived_refuses_to_mask_with_its_self_seed_alone():
    # Prepare: the server tells client 1 that none of its neighbours' shares arrived, so
    # y_1 = x_1 + PRG(b_1) only, then asks the others for b_1's shares (client 1 "survived").
    def tamper(grid, m):
        if m.metadata.message_type == P.SA_TRAIN_TYPE and int(m.metadata.dst_node_id) == grid.victim:
            _sa(m)[P.SA_SRC], _sa(m)[P.SA_CIPHERTEXTS] = [], []
        return m

    # Execute
    grid, ds, w, d = _attack(tamper)
    t = S.threshold_for(5, PARAMS.threshold)
    b_shares = _shares_of(grid, 1, 0)
    got = (_recovered(grid, grid.masked_seen[grid.victim], S.combine_secret(b_shares[:t]), {}, d)
           if grid.victim in grid.masked_seen and len(b_shares) >= t else None)
    # Assert: the victim never sent a masked vector (so there is nothing to unmask), and said why
    assert got is None or not np.allclose(got, _victim_input(grid, d), atol=1e-6)
    assert grid.victim not in grid.masked_seen
    assert "shares" in grid.replies(P.SA_TRAIN_TYPE)[grid.victim]


def test_attack_b_survivor_set_padded_with_ids_that_hold_no_shares_is_refused():
    # Prepare: 5 clients, t = 4. Each honest client j is told "survivors = {1, j} plus three ids
    # that do not exist, dropped = the rest": padded past the threshold, every client reveals
    # b_1's share and the mask-key shares of all the others: x_1 alone could be unmasked.
    def tamper(grid, m):
        if m.metadata.message_type == P.SA_UNMASK_TYPE:
            me = grid.index(m)
            _sa(m)[P.SA_SURVIVORS] = sorted({1, me, 97, 98, 99})
            _sa(m)[P.SA_DROPPED] = [j for j in range(2, 6) if j != me]
        return m

    # Execute
    grid, ds, w, d = _attack(tamper)
    t = S.threshold_for(5, PARAMS.threshold)
    b_shares = _shares_of(grid, 1, 0)
    s_shares = {j: _shares_of(grid, j, 1) for j in range(2, 6)}
    got = None
    if len(b_shares) >= t and all(len(v) >= t for v in s_shares.values()):
        rid = grid.rid
        s_pk1 = bytes(grid.replies(P.SA_SETUP_TYPE)[grid.victim][P.SECAGG][P.SA_S_PK])
        pair = {j: S.agree(S.combine_secret(v[:t]), s_pk1, context=S.pair_context(rid, 1, j))
                for j, v in s_shares.items()}
        got = _recovered(grid, grid.masked_seen[grid.victim], S.combine_secret(b_shares[:t]), pair, d)
    # Assert: every client refuses to unmask for ids it holds no shares of
    assert got is None or not np.allclose(got, _victim_input(grid, d), atol=1e-6)
    refusals = grid.replies(P.SA_UNMASK_TYPE)
    assert all(isinstance(v, str) and "98" in v for v in refusals.values()), refusals


@pytest.mark.parametrize("swap_identity", [False, True])
def test_attack_c_swapped_public_keys_are_detected(swap_identity):
    # Prepare: the server hands client 1 its own X25519 keys in place of each neighbour's, so it
    # can read every share client 1 encrypts (b_1 and s_sk_1) and knows every pair mask it adds.
    # With ``swap_identity`` it also swaps the neighbours' identity keys for its own and signs
    # the swapped keys itself — in round 2, after an honest round 1 in which client 1 met them.
    att = {j: (S.keypair(), S.keypair(), S.identity_keypair()) for j in range(2, 6)}
    rounds = 2 if swap_identity else 1

    def tamper(grid, m):
        if P.SECAGG not in m.content or int(m.metadata.dst_node_id) != grid.victim or grid.round != rounds:
            return m
        sa = _sa(m)
        if m.metadata.message_type == P.SA_SHARE_TYPE:
            nb = [int(j) for j in sa[P.SA_NEIGHBOURS]]
            sa[P.SA_C_PKS] = [att[j][0][1] for j in nb]
            sa[P.SA_S_PKS] = [att[j][1][1] for j in nb]
            if swap_identity:
                sa[P.SA_ID_KEYS] = [att[j][2][1] for j in nb]
                sa[P.SA_KEY_SIGS] = [S.sign(att[j][2][0], S.keys_message(grid.rid, j, att[j][0][1], att[j][1][1]))
                                     for j in nb]
        elif m.metadata.message_type == P.SA_TRAIN_TYPE:  # shares that decrypt under the swapped keys
            c_pk1 = bytes(grid.replies(P.SA_SETUP_TYPE)[grid.victim][P.SECAGG][P.SA_C_PK])
            sa[P.SA_SRC] = list(att)
            sa[P.SA_CIPHERTEXTS] = [
                S.encrypt(S.agree(att[j][0][0], c_pk1, context=S.share_context(grid.rid, j, 1)),
                          S.pack_shares(b"b" * 20, b"s" * 20), aad=S.share_context(grid.rid, j, 1)) for j in att]
        return m

    # Execute
    grid, ds, w, d = _attack(tamper, rounds=rounds)
    got = None
    share_reply = grid.replies(P.SA_SHARE_TYPE).get(grid.victim)
    if not isinstance(share_reply, str) and grid.victim in grid.masked_seen:
        sa = share_reply[P.SECAGG]
        setup = grid.replies(P.SA_SETUP_TYPE)[grid.victim][P.SECAGG]
        b = []
        for j, ct in zip(sa[P.SA_DST], sa[P.SA_CIPHERTEXTS]):
            ctx = S.share_context(grid.rid, 1, int(j))
            bs, ss = S.unpack_shares(S.decrypt(S.agree(att[int(j)][0][0], bytes(setup[P.SA_C_PK]), context=ctx),
                                               bytes(ct), aad=ctx))
            b.append(bs)
        t = S.threshold_for(5, PARAMS.threshold)
        pair = {j: S.agree(att[j][1][0], bytes(setup[P.SA_S_PK]), context=S.pair_context(grid.rid, 1, j))
                for j in att}
        got = _recovered(grid, grid.masked_seen[grid.victim], S.combine_secret(b[:t]), pair, d)
    # Assert: client 1 refuses the keys (not signed by the identity keys it pinned for its
    # neighbours) before it shares anything
    assert got is None or not np.allclose(got, _victim_input(grid, d), atol=1e-6)
    assert isinstance(share_reply, str) and ("pinned" if swap_identity else "signature") in share_reply


def test_a_device_keeps_its_identity_key_and_its_pins_across_runs(tmp_path):
    # Prepare: run 1 meets peers 2 and 3; run 2 (a fresh Context, as after a SuperNode restart)
    # is shown peer 2 under a new identity key, signed by that key
    rid = b"x" * 16
    setup = _mk(P.SA_SETUP_TYPE, {P.SA_ROUND_ID: rid, P.SA_INDEX: 1})
    run1, run2 = _ctx(), _ctx()
    id_1 = bytes(C.setup(setup, run1, key_dir=tmp_path).content[P.SECAGG][P.SA_ID_KEY])
    peers = [Peer(rid, 2), Peer(rid, 3)]
    C.share_keys(_share_request(rid, peers), run1, key_dir=tmp_path)
    impostor = Peer(rid, 2)
    # Execute
    id_2 = bytes(C.setup(setup, run2, key_dir=tmp_path).content[P.SECAGG][P.SA_ID_KEY])
    # Assert: same identity key, created owner-only; the new key for "peer-2" is refused
    assert id_1 == id_2 and (tmp_path / C.ID_FILE).stat().st_mode & 0o777 == 0o600
    with pytest.raises(C.SecAggRefused, match="pinned"):
        C.share_keys(_share_request(rid, [impostor, peers[1]]), run2, key_dir=tmp_path)
