"""Differential privacy for fedge: pure mechanisms, accountants, a ledger, DP-SGD.

* :mod:`fedge.privacy.mechanisms` — clipping, Gaussian noise, adaptive clipping (pure functions).
* :mod:`fedge.privacy.accounting` — ε ↔ noise (Opacus RDP/PRV; dp-accounting for
  fixed-size client sampling), and the ``fedge privacy`` planning CLI (:func:`accounting.main`).
* :mod:`fedge.privacy.ledger` — immutable release events and the ε they compose to.
* :mod:`fedge.privacy.dpsgd` — record-level DP-SGD on a PEFT model (imports torch/Opacus).

The server-side wrapper is ``strategies.dp_user_level.UserLevelDP``.
"""

from fedge.privacy.accounting import (
    ACCOUNTANTS,
    SAMPLINGS,
    epsilon,
    noise_for_epsilon,
    record_level_epsilon,
    user_level_epsilon,
    user_level_noise_for_epsilon,
)
from fedge.privacy.ledger import ClientDPSGD, PrivacyLedger, RoundReleased

__all__ = [
    "ACCOUNTANTS",
    "SAMPLINGS",
    "ClientDPSGD",
    "PrivacyLedger",
    "RoundReleased",
    "epsilon",
    "noise_for_epsilon",
    "record_level_epsilon",
    "user_level_epsilon",
    "user_level_noise_for_epsilon",
]
