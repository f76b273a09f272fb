"""The ledger: only releases are charged, ε grows for clients that train and stays put otherwise."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedge.privacy import accounting as A
from fedge.privacy.ledger import ClientDPSGD, PrivacyLedger, RoundReleased


def release(r: int, z: float = 1.0) -> RoundReleased:
    return RoundReleased(round=r, noise_multiplier=z, clients_per_round=4, num_clients=40, sampling="fixed",
                         clip_norm=0.5)


def sgd(client: str, r: int) -> ClientDPSGD:
    return ClientDPSGD(client=client, round=r, noise_multiplier=1.0, sample_rate=0.1, steps=5)


def test_events_are_immutable():
    e = release(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.round = 2  # type: ignore[misc]


def test_only_released_rounds_are_charged():
    # Prepare: rounds 1, 2, 4 released; round 3 had too few replies (no event)
    led = PrivacyLedger()
    for r in (1, 2, 4):
        led.record(release(r))
    # Execute
    eps = led.user_level_epsilon(delta=1e-3)
    # Assert: same as three rounds with these parameters, composed by the accountant
    expected = A.user_level_epsilon(noise_multiplier=1.0, clients_per_round=4, num_clients=40, rounds=3, delta=1e-3)
    assert eps == pytest.approx(expected, rel=1e-12)
    curve = led.user_level_curve(delta=1e-3)
    assert [r for r, _ in curve] == [1, 2, 4]
    assert curve[0][1] < curve[1][1] < curve[2][1] == pytest.approx(eps)


def test_heterogeneous_rounds_compose():
    led = PrivacyLedger((release(1, z=1.0), release(2, z=2.0)))
    one = PrivacyLedger((release(1, z=1.0),)).user_level_epsilon(delta=1e-3)
    assert led.user_level_epsilon(delta=1e-3) > one


def test_client_epsilon_grows_when_training_and_stays_put_when_sitting_out():
    # Prepare: client a trains in rounds 1, 2, 4; client b only in round 3
    led = PrivacyLedger()
    for r in (1, 2, 4):
        led.record(sgd("a", r))
    led.record(sgd("b", 3))
    # Execute
    eps_a = [led.record_level_epsilon("a", delta=1e-5, upto_round=r) for r in (1, 2, 3, 4)]
    eps_b = [led.record_level_epsilon("b", delta=1e-5, upto_round=r) for r in (1, 2, 3, 4)]
    # Assert
    assert eps_a[0] < eps_a[1] == eps_a[2] < eps_a[3]
    assert eps_b[0] == eps_b[1] == 0.0 < eps_b[2] == eps_b[3]
    assert eps_a[3] == pytest.approx(A.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=15, delta=1e-5))
    assert led.record_level_epsilon("never-trained", delta=1e-5) == 0.0


def test_duplicate_events_are_refused():
    led = PrivacyLedger((release(1), sgd("a", 1)))
    with pytest.raises(ValueError, match="round 1"):
        led.record(release(1))
    with pytest.raises(ValueError, match="'a'"):
        led.record(sgd("a", 1))


def test_mixed_sampling_is_refused():
    led = PrivacyLedger((release(1), dataclasses.replace(release(2), sampling="poisson")))
    with pytest.raises(ValueError, match="different client sampling"):
        led.user_level_epsilon(delta=1e-3)


def test_invalid_events_are_refused():
    with pytest.raises(ValueError):
        RoundReleased(round=1, noise_multiplier=0.0, clients_per_round=4, num_clients=40, sampling="fixed",
                      clip_norm=1.0)
    with pytest.raises(ValueError):
        RoundReleased(round=1, noise_multiplier=1.0, clients_per_round=41, num_clients=40, sampling="fixed",
                      clip_norm=1.0)


def test_json_round_trip_and_report():
    # Prepare
    led = PrivacyLedger((release(1), release(2), sgd("a", 1), sgd("b", 2)))
    # Execute
    text = led.to_json()
    back = PrivacyLedger.from_json(text)
    report = back.report(user_delta=1e-3, record_delta=1e-5)
    # Assert
    assert back.events == led.events
    assert json.loads(json.dumps(report)) == report
    assert report["released_rounds"] == [1, 2]
    assert report["user_level"]["epsilon"] == pytest.approx(led.user_level_epsilon(delta=1e-3))
    assert set(report["record_level"]["epsilon"]) == {"a", "b"}


def test_json_with_unknown_event_type_is_refused():
    bad = json.dumps({"version": 1, "events": [{"type": "Pickle", "round": 1}]})
    with pytest.raises(ValueError, match="unknown privacy event type"):
        PrivacyLedger.from_json(bad)
