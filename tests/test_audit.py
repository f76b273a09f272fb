"""``fedge audit``: canaries through the real DP mechanisms; ε_lb beside ε; a broken mechanism is flagged."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from fedge import cli
from fedge.privacy import accounting
from simulations import audit as SA
from strategies.dp_user_level import UserLevelDP

T, DELTA = 4, 1e-5


@pytest.mark.parametrize("sampling,z", [("poisson", 2.5), ("fixed", 5.0)])
def test_real_user_level_mechanism_stays_below_its_epsilon(sampling, z):
    # Prepare: noise for ε ≈ 3.5 over T rounds with the canaries as the whole population (N = m:
    # q = 1, or m of m); replace-one moves the sum by 2S, so "fixed" needs twice the z.
    m = 1000
    # Execute: the real UserLevelDP aggregation, T rounds.
    got = SA.audit_user_level(canaries=m, rounds=T, noise_multiplier=z, clip_norm=0.1, delta=DELTA, seed=0,
                              sampling=sampling)
    # Assert: the ledger's ε is the accountant's ε for (z, m, N = m, T); the audit measures
    # something (ε_lb well above 0) and never more than ε.
    expected = accounting.user_level_epsilon(noise_multiplier=z, clients_per_round=m, num_clients=m, rounds=T,
                                             delta=DELTA, sampling=sampling)
    assert got["epsilon"] == pytest.approx(expected, rel=1e-9) and 3.0 < got["epsilon"] < 4.5
    assert got["adjacency"] == ("replace-one" if sampling == "fixed" else "add/remove")
    assert 0.8 < got["epsilon_lb"] <= got["epsilon"]
    assert not SA.violated(got)


def test_no_dp_reaches_the_audits_ceiling():
    m = 1000
    got = SA.audit_user_level(canaries=m, rounds=T, noise_multiplier=None, clip_norm=0.1, delta=DELTA, seed=0)
    assert got["epsilon"] is None and got["auroc"] == 1.0
    assert got["epsilon_lb"] > 0.85 * got["ceiling"] and got["epsilon_lb"] > 4.0


class EveryoneEveryRound(UserLevelDP):
    """Charges Poisson sampling at q = k/N (its events say so) but trains every client every round."""

    def sample(self, grid, server_round, k, purpose):
        chosen = super().sample(grid, server_round, k, purpose)  # draws (and records) the secret cohort...
        return self.inner.connected_nodes(grid, server_round, k) if purpose == 0 else chosen  # ...then ignores it


@pytest.mark.parametrize("mechanism,flagged", [(None, False), (EveryoneEveryRound, True)])
def test_client_sampling_audit_holds_the_sampler_to_the_accountants_q(mechanism, flagged):
    # Prepare: 2,000 canaries among N = 4,000 clients, k = 1,000 expected per round (q = 1/4), 32 rounds;
    # z calibrated for ε = 4 with the amplification by Poisson client sampling.
    m, n, k, rounds = 2000, 4000, 1000, 32
    z = accounting.user_level_noise_for_epsilon(target_epsilon=4.0, clients_per_round=k, num_clients=n,
                                                rounds=rounds, delta=DELTA, sampling="poisson")

    # Execute: the real sampler draws each round's cohort; the real aggregation releases it
    got = SA.audit_user_level(canaries=m, rounds=rounds, noise_multiplier=z, clip_norm=0.1, delta=DELTA, seed=0,
                              sampling="poisson", population=n, clients_per_round=k, mechanism=mechanism)

    # Assert: the ledger charged q = 1/4 (ε ≈ 4). Sampling as charged: measured, and at most ε. A sampler
    # that takes every client while q is charged voids the amplification, and the audit says so.
    assert got["sample_rate"] == 0.25 and got["epsilon"] == pytest.approx(4.0, abs=0.01)
    assert SA.violated(got) == flagged
    if flagged:
        assert got["epsilon_lb"] > got["epsilon"]
    else:
        assert 0.5 < got["epsilon_lb"] <= got["epsilon"]
        present = int(np.sum(got["included"])) + (n - m)  # included canaries + background clients
        sd_of_mean = (present * 0.25 * 0.75 / rounds) ** 0.5
        assert abs(got["mean_cohort"] - 0.25 * present) < 5 * sd_of_mean  # each present client joins with q


_BROKEN = '''
from strategies.dp_user_level import UserLevelDP


class NoNoiseDP(UserLevelDP):
    """Claims z in its release events (the ledger charges z) but adds (almost) no noise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delta_noise_multiplier = 1e-6
'''


def _audit(tmp_path, *extra):
    run = tmp_path / "run"
    # z = 8 (no calibration: fast): the audited run (8 rounds, q = 1) is charged ε ≈ 1.48.
    rc = cli.main(["audit", "classify", "--set", "privacy.user_level.enabled=true",
                   "--set", "privacy.user_level.noise_multiplier=8", "--canaries", "500", "--run-dir", str(run), *extra])
    return rc, run


def test_cli_flags_noise_off_while_epsilon_is_claimed(tmp_path, monkeypatch):
    # Prepare: a mechanism whose noise is off while its events still claim z.
    (tmp_path / "broken_dp_mod.py").write_text(textwrap.dedent(_BROKEN))
    monkeypatch.syspath_prepend(str(tmp_path))
    # Execute
    rc, run = _audit(tmp_path, "--mechanism", "broken_dp_mod:NoNoiseDP")
    # Assert: non-zero exit, and the outputs say why.
    doc = json.loads((run / "audit.json").read_text())["user-white"]
    assert rc == 1 and doc["violated"] and doc["epsilon_lb"] > doc["epsilon"]
    assert "privacy bug" in (run / "report.md").read_text()
    assert (run / doc["plot"]).stat().st_size > 0


def test_cli_passes_the_real_mechanism_and_writes_the_report(tmp_path):
    rc, run = _audit(tmp_path)
    doc = json.loads((run / "audit.json").read_text())["user-white"]
    assert rc == 0 and not doc["violated"] and doc["epsilon_lb"] <= doc["epsilon"]
    # The per-canary record survives into audit.json (scores and inclusion bits, one per canary).
    assert len(doc["scores"]) == len(doc["included"]) == 500 and doc["n_included"] == sum(doc["included"])
    # The audited run (q = 1) is charged at least the scenario's ε (10 of 20 clients per round).
    assert doc["epsilon_scenario"] <= doc["epsilon"]
    report = (run / "report.md").read_text()
    assert report.count("## Privacy audit: user level, white box") == 1
    rc2, _ = _audit(tmp_path)  # a second audit replaces the section
    assert rc2 == 0 and (run / "report.md").read_text().count("## Privacy audit: user level") == 1


def test_cli_client_sampling_audits_the_scenarios_own_epsilon(tmp_path):
    # Execute: classify (10 of 20 clients per round, q = 1/2), z = 8, 8 rounds, cohorts drawn by the real sampler
    rc, run = _audit(tmp_path, "--client-sampling")

    # Assert: the ledger charged the scenario's q, so the audit's ε is the scenario's ε; below it, measured
    doc = json.loads((run / "audit.json").read_text())["user-white"]
    assert doc["sample_rate"] == 0.5 and doc["population"] == 1000 and doc["clients_per_round"] == 500
    assert doc["epsilon"] == pytest.approx(doc["epsilon_scenario"], rel=1e-9)
    assert rc == 0 and not doc["violated"] and doc["epsilon_lb"] <= doc["epsilon"]


def test_cli_black_box_user_level_audits_the_scenarios_mechanism(tmp_path):
    # Execute: the scenario's z = 8 and clip, 2 rounds, canary clients trained for real
    run = tmp_path / "run"
    rc = cli.main(["audit", "classify", "--set", "privacy.user_level.enabled=true",
                   "--set", "privacy.user_level.noise_multiplier=8", "--set", "federation.num_rounds=2",
                   "--access", "black", "--canaries", "8", "--run-dir", str(run)])
    # Assert: the black-box section is written, with the scenario's z and clip, and no violation
    doc = json.loads((run / "audit.json").read_text())["user-black"]
    assert rc == 0 and doc["noise_multiplier"] == 8 and doc["rounds"] == 2 and len(doc["scores"]) == 8
    assert doc["epsilon_lb"] <= doc["epsilon"] and "## Privacy audit: user level, black box" in (run / "report.md").read_text()


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="canaries"):
        SA.audit_user_level(canaries=1, rounds=1, noise_multiplier=1.0, clip_norm=0.1, delta=DELTA)
    with pytest.raises(ValueError, match="mechanism"):
        SA.load_mechanism("no_colon_here")
    assert cli.main(["audit", "classify", "--level", "user", "--access", "black", "--client-sampling",
                     "--run-dir", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_record_level_black_box_dp_sgd_bounds_the_canaries():
    # Real DP-SGD (Opacus) on a tiny BERT; without DP the canaries are memorised.
    kw = dict(canaries=256, seed=0)
    none = SA.audit_record_level(target_epsilon=None, **kw)
    dp = SA.audit_record_level(target_epsilon=2.0, **kw)
    assert none["epsilon"] is None and none["auroc"] > 0.7
    assert dp["epsilon"] == pytest.approx(2.0, abs=0.05) and dp["epsilon_lb"] <= dp["epsilon"]
    assert np.isfinite(dp["scores"]).all()


# -- record level, white box: gradient canaries through the real DP-SGD --------


def _noise_off(monkeypatch):
    """A broken DP-SGD: Opacus' noise draw returns zeros while the accountant still charges z."""
    import torch

    monkeypatch.setattr("opacus.optimizers.optimizer._generate_noise",
                        lambda std, reference, generator=None, secure_mode=False: torch.zeros_like(reference))


def test_record_white_dp_sgd_stays_below_its_epsilon():
    # Prepare: 500 gradient canaries, 20 Poisson steps at q = 1/4, z calibrated for ε = 4.
    kw = dict(canaries=500, steps=20, delta=DELTA, seed=0)
    # Execute: the real train_local_dp (Opacus clipping, noise, 1/(qn); the rdp accountant).
    got = SA.audit_record_level_white(target_epsilon=4.0, **kw)
    # Assert: the accountant's ε is the target; the audit measures something, never more than ε.
    assert got["epsilon"] == pytest.approx(4.0, abs=0.05) and got["access"] == "white"
    assert 0.3 < got["epsilon_lb"] <= got["epsilon"] and not SA.violated(got)
    assert 0.6 < got["auroc"] < 0.95


def test_record_white_across_rounds_charges_the_whole_history():
    # Prepare: the same 20 steps split into 4 federated rounds of 5, σ calibrated for the 4 rounds
    kw = dict(canaries=500, steps=5, rounds=4, delta=DELTA, seed=0)

    # Execute: the client carries its accountant history between rounds in the record it stores
    got = SA.audit_record_level_white(target_epsilon=4.0, **kw)

    # Assert: ε is the accountant's over all four rounds (the target), and the released gradients of every
    # round together stay below it
    z = got["noise_multiplier"]
    assert got["epsilon"] == pytest.approx(accounting.record_level_epsilon([(z, 0.25, 5)] * 4, delta=DELTA),
                                           rel=1e-9)
    assert got["epsilon"] == pytest.approx(4.0, abs=0.05) and got["rounds"] == 4
    assert 0.3 < got["epsilon_lb"] <= got["epsilon"] and not SA.violated(got)


def test_record_white_noise_off_gives_the_closed_form_scores(monkeypatch):
    # Prepare: noise off, so score_j = K_j C / (qn) exactly (K_j: steps that sampled canary j).
    _noise_off(monkeypatch)
    m, steps, q, clip = 200, 20, 0.25, 0.5
    # Execute
    got = SA.audit_record_level_white(canaries=m, target_epsilon=1.0, steps=steps, sample_rate=q,
                                      max_grad_norm=clip, background=64, delta=DELTA, seed=1)
    # Assert: clipped to C (not the canary's 100 C) and divided by the expected batch qn:
    # included scores are whole multiples of C/(qn) with mean ≈ qT, excluded ones are 0.
    s, b = np.asarray(got["scores"]), np.asarray(got["included"])
    unit = clip / (q * (64 + b.sum()))
    k = s[b] / unit
    assert np.allclose(k, np.round(k), atol=1e-3) and abs(k.mean() - q * steps) < 1.0
    assert np.all(s[~b] == 0.0)
    # ...and a claimed ε = 1 is flagged: every canary is seen, ε_lb is at the audit's ceiling.
    assert SA.violated(got) and got["epsilon_lb"] > 3.0


def test_cli_flags_dp_sgd_with_noise_off(tmp_path, monkeypatch):
    # Prepare: DP-SGD with its noise draw broken, ε = 2 claimed by the scenario.
    _noise_off(monkeypatch)
    run = tmp_path / "run"
    # Execute
    rc = cli.main(["audit", "classify", "--level", "record", "--access", "white", "--canaries", "500",
                   "--set", "privacy.dp_sgd.enabled=true", "--set", "privacy.dp_sgd.target_epsilon=2",
                   "--run-dir", str(run)])
    # Assert: non-zero exit, and audit.json / report.md say why.
    doc = json.loads((run / "audit.json").read_text())["record-white"]
    assert rc == 1 and doc["violated"] and doc["epsilon_lb"] > doc["epsilon"]
    assert "privacy bug" in (run / "report.md").read_text()


# -- record level, black box, causal LM: secret canaries ----------------------


def test_secret_log_likelihood_matches_the_training_loss():
    # Prepare: the tiny Llama and three secrets; the oracle is fedge.train.per_example_loss with
    # labels only on the six digits (its per-token mean loss times 6 is −log p(secret | template)).
    import torch

    from fedge.data.tokenize import IGNORE, collate
    from fedge.train import per_example_loss

    model = SA.tiny_llama(seed=0)
    with torch.no_grad():  # LoRA B starts at 0: move it so the adapter takes part
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0.0, 0.5)
    secrets = np.array([[4, 9, 3, 0, 2, 7], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    records = [SA._secret_record(x) for x in secrets]
    for rec in records:
        rec["labels"] = [IGNORE] * 4 + rec["input_ids"][4:]
    # Execute
    got = SA.secret_log_likelihood(model, secrets)
    with torch.no_grad():
        loss = per_example_loss(model, collate(records, task="causal-lm", pad_id=0), task="causal-lm")
    # Assert
    assert got.shape == (3,) and np.allclose(got, -6.0 * loss.double().numpy(), atol=1e-4)


@pytest.mark.slow
def test_causal_lm_secrets_are_memorised_without_dp_and_not_with_it():
    # Prepare / Execute: 256 secret canaries, 600 steps, real DP-SGD at ε = 8 against no DP.
    kw = dict(canaries=256, seed=0)
    none = SA.audit_record_level_lm(target_epsilon=None, **kw)
    dp = SA.audit_record_level_lm(target_epsilon=8.0, **kw)
    # Assert: without DP the included secrets rank near the top of 2000 fresh ones (Carlini
    # exposure close to its log₂ 2001 ≈ 11 bits); with DP-SGD they do not, and ε_lb ≤ ε.
    assert none["auroc"] > 0.95 and none["exposure_references"]["mean"] > 8.0 and none["epsilon_lb"] > 3.0
    assert dp["epsilon"] == pytest.approx(8.0, abs=0.05) and dp["epsilon_lb"] <= dp["epsilon"]
    assert dp["exposure_references"]["mean"] < 3.0


def test_user_level_black_box_charges_the_run_and_stays_below_its_epsilon():
    # Prepare: a small black-box audit, z calibrated for ε = 4 over this run's clients (q = 1)
    # Execute: canary clients train the tiny classifier for real; their deltas go through UserLevelDP
    got = SA.audit_user_level_black(canaries=16, rounds=3, target_epsilon=4.0, clip_norm=0.5, delta=DELTA,
                                    background_clients=2, local_steps=2, seed=1)
    # Assert: the ledger charges exactly the Gaussian mechanism that ran (oracle: the accountant for the
    # realised n present clients, z, T); every canary is scored; ε_lb never above ε
    n = int(np.sum(got["included"])) + 2
    expected = accounting.user_level_epsilon(noise_multiplier=got["noise_multiplier"], clients_per_round=n,
                                             num_clients=n, rounds=3, delta=DELTA, sampling="poisson")
    assert got["epsilon"] == pytest.approx(expected, rel=1e-6) and got["epsilon"] == pytest.approx(4.0, rel=1e-2)
    assert got["access"] == "black" and len(got["scores"]) == 16 and np.all(np.isfinite(got["scores"]))
    assert got["epsilon_lb"] <= got["epsilon"] and not SA.violated(got)


def test_user_level_black_box_without_dp_moves_the_included_canaries_up():
    # Prepare / Execute: no DP, a few rounds: included canaries' clients train on their record
    got = SA.audit_user_level_black(canaries=32, rounds=6, clip_norm=0.5, delta=DELTA, background_clients=4,
                                    local_steps=8, lr=0.1, seed=0)
    # Assert: no ε is claimed; the released model scores the included canaries above the excluded ones
    scores, inc = np.asarray(got["scores"]), np.asarray(got["included"])
    assert got["epsilon"] is None and scores[inc].mean() > scores[~inc].mean() and got["auroc"] > 0.6
