"""User-level DP for any ``DeltaStrategy``: clip server-side, equal weights, Gaussian noise.

McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018, https://arxiv.org/abs/1710.06963 (DP-FedAvg, fixed clipping);
Andrew et al., "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021, https://arxiv.org/abs/1905.03871 (adaptive clipping).

With m = planned clients per round (not the number of replies, not client
reported example counts, so no client can exceed its share S/m):

    Ā = (1/m) Σ_{accepted i} Δ_i · min(1, S/‖Δ_i‖₂)  +  N(0, (z_Δ·S/m)² I)
    A_{t+1} = inner.server_update(A_t, Ā)

z_Δ = z without adaptive clipping; with it, the noised unclipped count costs part
of the budget and z_Δ = (z⁻² − (2σ_b)⁻²)^{-1/2}, so the round is accounted as one
Gaussian release with multiplier z. Each release is recorded in ``last_event``
(a :class:`fedge.privacy.ledger.RoundReleased`; None when the round released nothing).

The wrapper is itself a ``DeltaStrategy``: reply validation, sampling, the round
config, ``server_update`` and checkpoint state are the inner strategy's; only the
aggregation rule is replaced (the inner ``aggregate`` is not used: robust rules
such as medians do not have the sensitivity this noise is calibrated for).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedge import deltas
from fedge import protocol as P
from fedge.privacy import mechanisms as M
from fedge.privacy.ledger import RoundReleased
from strategies.base import ClientUpdate, DeltaStrategy

log = logging.getLogger("fedge.strategy")

# Wire keys: the clip norm S sent to clients, which clip before sending; and the
# client's bit "my delta was not clipped" (1.0/0.0).
CFG_CLIP_NORM = P.CFG_DP_CLIP_NORM
M_UNCLIPPED = P.M_DP_UNCLIPPED
M_NOISE_STD = "dp-noise-std"  # round metric: std of the noise added to the aggregate
M_NEXT_CLIP_NORM = "dp-next-clip-norm"  # round metric: S for the next round (changes if adaptive)
_STATE_CLIP = "dp/clip-norm"
_INNER = "inner/"


def _require_mean_rule(inner: DeltaStrategy) -> None:
    """Refuse inner rules that are not a weighted mean (median, Krum, ...): the wrapper
    replaces the rule, and silently dropping a robust rule would surprise the user."""
    rng = np.random.default_rng(0)
    probe = [{"p": rng.standard_normal(3) * 1e-3} for _ in range(5)]
    w = np.array([0.1, 0.15, 0.2, 0.25, 0.3])
    try:
        got = inner.aggregate(probe, w)["p"]
        same = np.allclose(got, sum(wi * d["p"] for wi, d in zip(w, probe)), rtol=1e-9, atol=0)
    except Exception:  # noqa: BLE001 - a rule that cannot even average five deltas is not a mean
        same = False
    if not same:
        raise ValueError(f"strategy {inner.name!r} does not aggregate by a weighted mean; user-level DP replaces "
                         "the rule by a clipped, noised mean, so wrap a mean-based strategy (fedavg, fedprox, "
                         "fedavgm, fedadam, ...) instead")


class UserLevelDP(DeltaStrategy):
    """Wraps a DeltaStrategy: clipped, equally weighted, noised mean of client deltas."""

    name = "dp-user-level"
    paper = "McMahan et al. 2018, arXiv:1710.06963; Andrew et al. 2021, arXiv:1905.03871"
    weighted = False
    sampling = "fixed"  # DeltaStrategy.sample draws exactly m of N clients without replacement

    def __init__(
        self,
        inner: DeltaStrategy,
        *,
        noise_multiplier: float,
        clip_norm: float,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_noise_std: float | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(inner, DeltaStrategy) or isinstance(inner, UserLevelDP):
            raise ValueError("inner must be a DeltaStrategy that is not already wrapped for DP")
        super().__init__(clients_per_round=inner.clients_per_round,
                         evaluate_clients_per_round=inner.evaluate_clients_per_round,
                         min_replies=inner.min_replies, encoding=inner.encoding, base_hash=inner.base_hash,
                         max_delta_norm=inner.max_delta_norm, seed=inner.seed, wait_nodes_s=inner.wait_nodes_s)
        _require_mean_rule(inner)
        self.inner = inner
        self.identities = inner.identities  # one node -> client-name map, filled by inner.sample
        self.installed = inner.installed
        self.noise_multiplier = M.positive("noise_multiplier", noise_multiplier)
        self.clip_norm = M.positive("clip_norm", clip_norm)
        self.adaptive = bool(adaptive)
        m = self.clients_per_round
        self.count_noise_std = float(count_noise_std) if count_noise_std is not None else m / 20.0
        if self.adaptive:
            # Validate now, at construction, not in round 7.
            M.adaptive_clip_update(1.0, unclipped_fraction_noised=0.5, target_quantile=target_quantile, lr=clip_lr)
            self.delta_noise_multiplier = M.delta_noise_multiplier(noise_multiplier=self.noise_multiplier,
                                                                   count_noise_std=self.count_noise_std)
        else:
            self.delta_noise_multiplier = self.noise_multiplier
        self.target_quantile, self.clip_lr = float(target_quantile), float(clip_lr)
        # Noise must not be reproducible from public config: OS entropy unless a test pins it.
        self._rng = np.random.default_rng(seed)
        self._round = 0
        self._num_nodes = 0
        self._bits: list[float] = []
        self.last_noise_std = 0.0
        self.last_event: RoundReleased | None = None

    # -- delegated to the inner strategy -------------------------------------------

    def sample(self, grid, server_round: int, k: int, purpose: int) -> list[int]:
        nodes = self.inner.sample(grid, server_round, k, purpose)
        if purpose == 0:
            # N for the accountant: the population the m clients were drawn from.
            self._num_nodes = max(len(list(grid.get_node_ids())), len(nodes))
        return nodes

    def round_config(self, server_round: int) -> dict:
        return {**self.inner.round_config(server_round), CFG_CLIP_NORM: float(self.clip_norm)}

    def server_update(self, current, aggregate):
        return self.inner.server_update(current, aggregate)

    def state_dict(self) -> dict[str, np.ndarray]:
        own = {_STATE_CLIP: np.array([self.clip_norm], np.float64)}
        return {**own, **{_INNER + k: v for k, v in self.inner.state_dict().items()}}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if _STATE_CLIP in state:
            self.clip_norm = float(np.asarray(state[_STATE_CLIP]).ravel()[0])
        self.inner.load_state_dict({k[len(_INNER):]: v for k, v in state.items() if k.startswith(_INNER)})
        unknown = sorted(k for k in state if k != _STATE_CLIP and not k.startswith(_INNER))
        if unknown:
            raise ValueError(f"UserLevelDP state has unknown keys {unknown[:3]}")

    def summary(self) -> None:
        self.inner.summary()
        log.info("user-level DP: z=%g (delta noise z_Δ=%g), clip S=%g%s, %d clients/round, equal weights 1/m",
                 self.noise_multiplier, self.delta_noise_multiplier, self.clip_norm,
                 f" adaptive (γ={self.target_quantile}, η={self.clip_lr}, σ_b={self.count_noise_std:g})"
                 if self.adaptive else "", self.clients_per_round)

    # -- the private round ------------------------------------------------------------

    def configure_train(self, server_round, arrays, config, grid):
        self._round, self._bits, self.last_event = server_round, [], None
        return super().configure_train(server_round, arrays, config, grid)

    def decode_reply(self, msg: Message) -> ClientUpdate:
        upd = super().decode_reply(msg)
        # Clients clip before sending, so the server cannot see who was clipped: use the
        # client's bit when given (clamped to {0, 1}: sensitivity 1 whatever it sends).
        bit = upd.metrics.get(M_UNCLIPPED)
        self._bits.append(float(bit >= 0.5) if bit is not None and np.isfinite(bit)
                          else float(upd.norm <= self.clip_norm))
        return upd

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        """Clipped sum / m + Gaussian noise; ``weights`` (example counts) are ignored on purpose."""
        m, s = self.clients_per_round, self.clip_norm
        if len(deltas_) > m:
            raise RuntimeError(f"{len(deltas_)} deltas for {m} planned clients: sensitivity bound broken")
        clipped, norms = zip(*(M.clip_update(d, clip_norm=s) for d in deltas_))
        total = {k: sum(c[k] for c in clipped) for k in deltas_[0]}
        # Bits recorded by decode_reply (same order as deltas_); else from the norms received.
        bits = self._bits if len(self._bits) == len(deltas_) else [float(n <= s) for n in norms]
        return self._release(total, bits)

    def _release(self, clipped_sum: dict[str, np.ndarray], bits: list[float]) -> dict[str, np.ndarray]:
        """Σ clipped Δ_i / m + N(0, (z_Δ·S/m)²); charge the round; adapt S from the bits."""
        m, s = self.clients_per_round, self.clip_norm
        mean = {k: v / m for k, v in clipped_sum.items()}
        std = M.gaussian_noise_std(noise_multiplier=self.delta_noise_multiplier, clip_norm=s, num_clients=m)
        noised = M.add_gaussian_noise(mean, std=std, rng=self._rng)
        self.last_event = RoundReleased(round=self._round, noise_multiplier=self.noise_multiplier,
                                        clients_per_round=m, num_clients=max(self._num_nodes, m),
                                        sampling=self.sampling, clip_norm=s)
        self.last_noise_std = std
        if self.adaptive:
            b = M.noised_unclipped_fraction(bits, count_noise_std=self.count_noise_std, rng=self._rng,
                                            expected_count=m)
            self.clip_norm = M.adaptive_clip_update(s, unclipped_fraction_noised=b,
                                                    target_quantile=self.target_quantile, lr=self.clip_lr)
        return noised

    def secure_step(self, weighted_sum, *, weight_sum, unclipped_sum, accepted):
        """Under secure aggregation the server sees only Σ Δ_i (weights are 1): the clients' own
        clipping to S is what bounds the sensitivity (it cannot be re-checked here), and the
        adaptive-clipping bits arrive as their sum."""
        if accepted > self.clients_per_round:
            raise RuntimeError(f"{accepted} replies for {self.clients_per_round} planned clients")
        ones = int(round(unclipped_sum))
        if not 0 <= ones <= accepted:
            log.warning("%r clients report unclipped deltas out of %d: counted as none", unclipped_sum, accepted)
            ones = 0
        deltas.validate_values(weighted_sum, max_norm=None)
        return self._release(weighted_sum, [1.0] * ones + [0.0] * (accepted - ones))

    def aggregate_secure(self, server_round, weighted_sum, **sums):
        arrays, metrics = super().aggregate_secure(server_round, weighted_sum, **sums)
        self._noise_metrics(metrics)
        return arrays, metrics

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._noise_metrics(metrics)
        return arrays, metrics

    def _noise_metrics(self, metrics: MetricRecord | None) -> None:
        if self.last_event is not None and metrics is not None:
            metrics[M_NOISE_STD] = float(self.last_noise_std)
            metrics[M_NEXT_CLIP_NORM] = float(self.clip_norm)
