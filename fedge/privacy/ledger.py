"""What was released, as immutable events, and the ε they add up to.

Two kinds of events (frozen dataclasses, after dp-accounting's ``DpEvent``s):

* :class:`RoundReleased` — the server released a noised aggregate in a round
  (user-level DP: m of N clients, noise z·S/m). Rounds that released nothing
  (too few replies) are never recorded, so they are never charged.
* :class:`ClientDPSGD` — one client ran DP-SGD in a round (record-level DP:
  ``steps`` Poisson-sampled steps at rate q with noise z). A client that sat a
  round out has no event for it: its ε stays put.

The :class:`PrivacyLedger` only appends and composes; all ε arithmetic lives in
:mod:`fedge.privacy.accounting`. It serialises to JSON for checkpoints (never pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from itertools import groupby
from typing import Any

from fedge.privacy import accounting

LEDGER_VERSION = 1


@dataclass(frozen=True)
class RoundReleased:
    """Round ``round`` released mean(clipped Δ) + N(0, (z·S/m)²) over m of N clients."""

    round: int
    noise_multiplier: float
    clients_per_round: int
    num_clients: int
    sampling: str
    clip_norm: float

    def __post_init__(self) -> None:
        if self.sampling not in accounting.SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r}; allowed: {list(accounting.SAMPLINGS)}")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(f"need 1 <= clients_per_round ({self.clients_per_round}) <= "
                             f"num_clients ({self.num_clients})")
        if not self.noise_multiplier > 0 or not self.clip_norm > 0:
            raise ValueError("noise_multiplier and clip_norm must be > 0")


@dataclass(frozen=True)
class ClientDPSGD:
    """Client ``client`` ran ``steps`` DP-SGD steps (noise z, Poisson rate q) in ``round``."""

    client: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not 0 < self.sample_rate <= 1 or self.steps < 0:
            raise ValueError(f"invalid DP-SGD event {self}")


_EVENT_TYPES = {cls.__name__: cls for cls in (RoundReleased, ClientDPSGD)}


class BudgetExceeded(RuntimeError):
    """Releasing one more round would take the user-level ε past its target."""


class PrivacyLedger:
    """Append-only list of privacy events; ε is always recomputed from them."""

    def __init__(self, events: tuple[RoundReleased | ClientDPSGD, ...] = ()) -> None:
        self._events: list[RoundReleased | ClientDPSGD] = []
        for e in events:
            self.record(e)

    @property
    def events(self) -> tuple[RoundReleased | ClientDPSGD, ...]:
        return tuple(self._events)

    def record(self, event: RoundReleased | ClientDPSGD) -> None:
        """Append one event; the same round (or client-round) twice is refused."""
        if isinstance(event, RoundReleased):
            if any(isinstance(e, RoundReleased) and e.round == event.round for e in self._events):
                raise ValueError(f"round {event.round} already has a release event")
        elif isinstance(event, ClientDPSGD):
            if any(isinstance(e, ClientDPSGD) and (e.client, e.round) == (event.client, event.round)
                   for e in self._events):
                raise ValueError(f"client {event.client!r} already has a DP-SGD event for round {event.round}")
        else:
            raise TypeError(f"not a privacy event: {event!r}")
        self._events.append(event)

    # -- user level ------------------------------------------------------------

    def releases(self, *, upto_round: int | None = None) -> list[RoundReleased]:
        rel = [e for e in self._events if isinstance(e, RoundReleased)]
        return sorted((e for e in rel if upto_round is None or e.round <= upto_round), key=lambda e: e.round)

    def user_level_epsilon(self, *, delta: float, upto_round: int | None = None, accountant: str = "rdp") -> float:
        """User-level ε of every release up to ``upto_round`` (all if None)."""
        rel = self.releases(upto_round=upto_round)
        samplings = {e.sampling for e in rel}
        if len(samplings) > 1:
            raise ValueError(f"rounds used different client sampling {sorted(samplings)}: no accountant "
                             "composes them here")
        key = lambda e: (e.noise_multiplier, e.clients_per_round, e.num_clients)  # noqa: E731
        groups = [(*k, len(list(g))) for k, g in groupby(rel, key=key)]
        return accounting.compose_user_level(groups, delta=delta, sampling=samplings.pop() if samplings else "fixed",
                                             accountant=accountant)

    def check_release(self, event: RoundReleased, *, delta: float, target_epsilon: float,
                      accountant: str = "rdp") -> float:
        """ε after this ledger plus ``event``; raise BudgetExceeded if it passes ``target_epsilon``
        (relative slack 1e-6: a z calibrated to the target lands on it within rounding)."""
        trial = PrivacyLedger(tuple(e for e in self._events if not (isinstance(e, RoundReleased)
                                                                    and e.round == event.round)) + (event,))
        eps = trial.user_level_epsilon(delta=delta, accountant=accountant)
        if eps > target_epsilon * (1 + 1e-6):
            raise BudgetExceeded(f"round {event.round} would bring user-level ε to {eps:.4g} > target "
                                 f"{target_epsilon:g} ({event.clients_per_round} of {event.num_clients} clients, "
                                 f"{event.sampling} sampling, z = {event.noise_multiplier:g}): not released")
        return eps

    def user_level_curve(self, *, delta: float, accountant: str = "rdp") -> list[tuple[int, float]]:
        """[(round, cumulative user-level ε)] for every round that released."""
        return [(e.round, self.user_level_epsilon(delta=delta, upto_round=e.round, accountant=accountant))
                for e in self.releases()]

    # -- record level ----------------------------------------------------------

    def clients(self) -> list[str]:
        return sorted({e.client for e in self._events if isinstance(e, ClientDPSGD)})

    def client_history(self, client: str, *, upto_round: int | None = None) -> accounting.History:
        """The client's Opacus accountant history [(z, q, steps)], in round order."""
        ev = sorted((e for e in self._events if isinstance(e, ClientDPSGD) and e.client == client
                     and (upto_round is None or e.round <= upto_round)), key=lambda e: e.round)
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in ev]

    def record_level_epsilon(self, client: str, *, delta: float, upto_round: int | None = None,
                             accountant: str = "rdp") -> float:
        """Record-level ε of one client's DP-SGD steps so far (0 if it never trained)."""
        return accounting.record_level_epsilon(self.client_history(client, upto_round=upto_round),
                                               delta=delta, accountant=accountant)

    def report(self, *, user_delta: float | None = None, record_delta: float | None = None,
               accountant: str = "rdp") -> dict[str, Any]:
        """JSON-ready summary: per-round and final user-level ε, per-client record-level ε."""
        out: dict[str, Any] = {"released_rounds": [e.round for e in self.releases()]}
        if user_delta is not None and self.releases():
            curve = self.user_level_curve(delta=user_delta, accountant=accountant)
            out["user_level"] = {"delta": user_delta, "per_round": [{"round": r, "epsilon": e} for r, e in curve],
                                 "epsilon": curve[-1][1]}
        if record_delta is not None and self.clients():
            out["record_level"] = {"delta": record_delta, "accountant": accountant, "epsilon": {
                c: self.record_level_epsilon(c, delta=record_delta, accountant=accountant) for c in self.clients()}}
        return out

    # -- serialisation -----------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"version": LEDGER_VERSION,
                           "events": [{"type": type(e).__name__, **asdict(e)} for e in self._events]})

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        data = json.loads(text)
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"privacy ledger version {data.get('version')!r}; this fedge reads {LEDGER_VERSION}")
        events = []
        for raw in data["events"]:
            kind = _EVENT_TYPES.get(raw.get("type"))
            if kind is None:
                raise ValueError(f"unknown privacy event type {raw.get('type')!r}; known: {sorted(_EVENT_TYPES)}")
            names = {f.name for f in fields(kind)}
            if set(raw) - {"type"} != names:
                raise ValueError(f"{kind.__name__} fields {sorted(set(raw) - {'type'})}, expected {sorted(names)}")
            events.append(kind(**{k: raw[k] for k in names}))
        return cls(tuple(events))
