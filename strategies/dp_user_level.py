"""User-level DP for any ``DeltaStrategy``: clip server-side, equal weights, Gaussian noise.

McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018, https://arxiv.org/abs/1710.06963 (DP-FedAvg, fixed clipping);
Andrew et al., "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021, https://arxiv.org/abs/1905.03871 (adaptive clipping).

With m = planned clients per round (not the number of replies, not client
reported example counts, so no client can exceed its share S/m):

    Ā = (1/m) Σ_{accepted i} Δ_i · min(1, S/‖Δ_i‖₂)  +  N(0, (z_Δ·S/m)² I)
    A_{t+1} = inner.server_update(A_t, Ā)

Client sampling (the accountant must follow the sampler):

* ``poisson`` (default): each connected client joins independently with
  q = m/N, N = max(planned clients, connected clients). m = q·N is the
  *expected* cohort size, so dividing by m never depends on who joined. Every
  round releases (an empty cohort releases noise alone) and is accounted
  add/remove with sensitivity S: Poisson-subsampled Gaussian, (z, q).
* ``fixed``: exactly m of the N connected clients, without replacement;
  accounted replace-one (the sum moves by up to 2S). Costs ~9x more ε at the
  same noise (N = 1000, m = 10, z = 1, 500 rounds, δ = 1e-5: 15.6 vs 1.65).

Either way the training cohort is drawn from OS entropy (``secrets.SystemRandom``),
never from the run's seed: subsampling amplifies privacy only if the cohort is
secret. The cohorts are kept in ``cohorts`` (round -> client names) for the
server's checkpoint, and nowhere else.

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
import secrets
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Message, MetricRecord
from flwr.serverapp import Grid

from fedge import deltas
from fedge import protocol as P
from fedge.privacy import mechanisms as M
from fedge.privacy.accounting import SAMPLINGS
from fedge.privacy.ledger import RoundReleased
from strategies.base import ClientUpdate, DeltaStrategy
from strategies.client_hooks import ClientHook, Extra, Finisher, State, client_hook

log = logging.getLogger("fedge.strategy")

# Wire keys: the clip norm S sent to clients, which clip before sending; and the
# client's bit "my delta was not clipped" (1.0/0.0).
CFG_CLIP_NORM = P.CFG_DP_CLIP_NORM
M_UNCLIPPED = P.M_DP_UNCLIPPED
M_NOISE_STD = "dp-noise-std"  # round metric: std of the noise added to the aggregate
M_NEXT_CLIP_NORM = "dp-next-clip-norm"  # round metric: S for the next round (changes if adaptive)
PUBLIC_METRICS = (M_NOISE_STD, M_NEXT_CLIP_NORM)  # the round metrics a DP round may publish
_STATE_CLIP = "dp/clip-norm"
_INNER = "inner/"


def require_mean_rule(inner: DeltaStrategy) -> None:
    """Refuse inner rules not declared a weighted mean (``aggregation``; median, Krum, ...): the
    wrapper replaces the rule, and silently dropping a robust rule would surprise the user."""
    if inner.aggregation != "mean":
        raise ValueError(f"strategy {inner.name!r} does not aggregate by a weighted mean; user-level DP replaces "
                         "the rule by a clipped, noised mean, so wrap a mean-based strategy (fedavg, fedprox, "
                         f"fedavgm, fedadam, ...) instead (it declares aggregation = {inner.aggregation!r})")


class UserLevelDP(DeltaStrategy):
    """Wraps a DeltaStrategy: clipped, equally weighted, noised mean of client deltas."""

    name = "dp-user-level"
    paper = "McMahan et al. 2018, arXiv:1710.06963; Andrew et al. 2021, arXiv:1905.03871"
    weighted = False
    private_report = True  # who replied, who was rejected and why stay out of the log
    sampling = "poisson"  # default client sampling; instances carry their own (see __init__)

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
        sampling: str | None = None,
        num_clients: int | None = None,
    ) -> None:
        if not isinstance(inner, DeltaStrategy) or isinstance(inner, UserLevelDP):
            raise ValueError("inner must be a DeltaStrategy that is not already wrapped for DP")
        super().__init__(clients_per_round=inner.clients_per_round,
                         evaluate_clients_per_round=inner.evaluate_clients_per_round,
                         min_replies=inner.min_replies, encoding=inner.encoding, base_hash=inner.base_hash,
                         max_delta_norm=inner.max_delta_norm, seed=inner.seed, wait_nodes_s=inner.wait_nodes_s)
        require_mean_rule(inner)
        self.sampling = self.sampling if sampling is None else sampling
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r}; choose one of {list(SAMPLINGS)}")
        if num_clients is not None and (int(num_clients) != num_clients or num_clients < self.clients_per_round):
            raise ValueError(f"num_clients ({num_clients!r}) must be an integer >= clients_per_round "
                             f"({self.clients_per_round})")
        self.num_clients = None if num_clients is None else int(num_clients)  # planned N
        if self.sampling == "poisson":
            # Every Poisson round releases (noise alone if nobody valid replied): skipping a
            # release when few replied would publish a function of the realized cohort.
            self.min_replies = 0
        self.inner = inner
        self.nodes = inner.nodes  # one directory: names learnt while sampling serve both
        self.noise_multiplier = M.positive("noise_multiplier", noise_multiplier)
        self.clip_norm = M.positive("clip_norm", clip_norm)
        self.adaptive = bool(adaptive)
        m = self.clients_per_round
        # Default σ_b: Andrew et al.'s m/20, but never so small that the count spends more than
        # 10 % of the budget ((2σ_b)⁻² ≤ 0.1·z⁻², i.e. z_Δ ≤ 1.054·z): m/20 alone is invalid for m ≤ 20z.
        self.count_noise_std = (float(count_noise_std) if count_noise_std is not None
                                else max(m / 20.0, self.noise_multiplier * 10 ** 0.5 / 2))
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
        self._cohort_rng = secrets.SystemRandom()  # never seeded: the cohort must stay secret
        self.cohorts: dict[int, list[str]] = {}  # round -> training cohort (client names), checkpoint only
        # Called with the round's prospective release before any message is sent; raises to refuse
        # it (the server passes its ledger's budget check here).
        self.release_guard: Callable[[RoundReleased], None] | None = None
        self._round = 0
        self._num_nodes = 0
        self._bits: list[float] = []
        self.last_noise_std = 0.0
        self.last_event: RoundReleased | None = None

    # -- delegated to the inner strategy -------------------------------------------

    def sample(self, grid: Grid, server_round: int, k: int, purpose: int) -> list[int]:
        """Evaluation (purpose 1): the inner, seeded sampler. Training (purpose 0): a secret
        cohort, Poisson (each node with q = k/N) or exactly k of N, from OS entropy."""
        if purpose != 0:
            return self.inner.sample(grid, server_round, k, purpose)
        nodes = self.inner.connected_nodes(grid, server_round, k)
        if self.num_clients is not None and len(nodes) < self.num_clients:
            log.warning("round %d: %d clients connected, %d planned (data.num_clients): %s", server_round,
                        len(nodes), self.num_clients,
                        "the expected cohort shrinks to q·connected; ε per round is unchanged"
                        if self.sampling == "poisson" else "each client is sampled more often, so ε per round "
                        "is higher than planned; the ledger charges what happens and the budget is enforced")
        if self.sampling == "poisson":
            population = max(self.num_clients or 0, len(nodes))
            q = k / population
            chosen = [n for n in nodes if self._cohort_rng.random() < q]
        else:
            population = len(nodes)
            chosen = [nodes[i] for i in sorted(self._cohort_rng.sample(range(len(nodes)), k))]
        self._num_nodes = population  # N for the accountant
        if self.release_guard is not None:
            self.release_guard(self.prospective_event(server_round))
        self.cohorts[server_round] = [self.client_name(n) for n in chosen]
        return chosen

    def prospective_event(self, server_round: int) -> RoundReleased:
        """What releasing round ``server_round`` with the current N and S will be charged."""
        m = self.clients_per_round
        return RoundReleased(round=server_round, noise_multiplier=self.noise_multiplier, clients_per_round=m,
                             num_clients=max(self._num_nodes, m), sampling=self.sampling, clip_norm=self.clip_norm)

    def round_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {**self.inner.round_config(server_round), CFG_CLIP_NORM: float(self.clip_norm)}

    def server_update(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        log.info("user-level DP: z=%g (delta noise z_Δ=%g), clip S=%g%s, %s sampling of %d clients/round "
                 "(secret cohort), sum divided by %d",
                 self.noise_multiplier, self.delta_noise_multiplier, self.clip_norm,
                 f" adaptive (γ={self.target_quantile}, η={self.clip_lr}, σ_b={self.count_noise_std:g})"
                 if self.adaptive else "", self.sampling,
                 self.clients_per_round, self.clients_per_round)

    # -- the private round ------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round, self._bits, self.last_event = server_round, [], None
        msgs = super().configure_train(server_round, arrays, config, grid)
        self.inner.current = self.current  # the inner's expected_shapes reads A_t
        return msgs

    def expected_shapes(self, msg: Message) -> dict[str, tuple[int, ...]]:
        # What a reply carries is the inner algorithm's call (FFA-LoRA: no lora_A; head only:
        # the head alone): checking against all of A_t would refuse every such reply, and a
        # Poisson round would then release noise alone, silently, under a private report.
        return self.inner.expected_shapes(msg)

    def decode_reply(self, msg: Message) -> ClientUpdate:
        upd = super().decode_reply(msg)
        # Clients clip before sending, so the server cannot see who was clipped: use the
        # client's bit when given (clamped to {0, 1}: sensitivity 1 whatever it sends).
        bit = upd.metrics.get(M_UNCLIPPED)
        self._bits.append(float(bit >= 0.5) if bit is not None and np.isfinite(bit)
                          else float(upd.norm <= self.clip_norm))
        return upd

    def aggregate(self, deltas_: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
        """Clipped sum / m + Gaussian noise; ``weights`` (example counts) are ignored on purpose.

        m is the planned (fixed) or expected (Poisson: q·N) cohort size, never the number of
        deltas: a Poisson cohort may be larger or smaller, or empty (noise alone)."""
        m, s = self.clients_per_round, self.clip_norm
        if self.sampling == "fixed" and len(deltas_) > m:
            raise RuntimeError(f"{len(deltas_)} deltas for {m} planned clients: sensitivity bound broken")
        if not deltas_:
            if self.current is None:
                raise RuntimeError("an empty cohort needs the current adapter's shapes (configure_train first)")
            return self._release({k: np.zeros(v.shape, np.float64) for k, v in self.current.items()}, [])
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
        self.last_event = self.prospective_event(self._round)
        self.last_noise_std = std
        if self.adaptive and self.sampling == "poisson":
            # Add/remove: centred bits b_i − ½ (sensitivity ½, what z_Δ assumes), then back to a fraction.
            ones = float(np.sum(np.asarray(bits, np.float64) >= 0.5))
            noised_count = ones - len(bits) / 2 + float(self._rng.normal(0.0, self.count_noise_std))
            self.clip_norm = M.adaptive_clip_update(s, unclipped_fraction_noised=noised_count / m + 0.5,
                                                    target_quantile=self.target_quantile, lr=self.clip_lr)
        elif self.adaptive:
            b = M.noised_unclipped_fraction(bits, count_noise_std=self.count_noise_std, rng=self._rng,
                                            expected_count=m)
            self.clip_norm = M.adaptive_clip_update(s, unclipped_fraction_noised=b,
                                                    target_quantile=self.target_quantile, lr=self.clip_lr)
        return noised

    def secure_step(self, weighted_sum: dict[str, np.ndarray], *, weight_sum: float, unclipped_sum: float,
                    accepted: int) -> dict[str, np.ndarray]:
        """Under secure aggregation the server sees only Σ Δ_i (weights are 1): the clients' own
        clipping to S is what bounds the sensitivity (it cannot be re-checked here), and the
        adaptive-clipping bits arrive as their sum."""
        if accepted > self.clients_per_round and self.sampling == "fixed":
            raise RuntimeError(f"{accepted} replies for {self.clients_per_round} planned clients")
        ones = int(round(unclipped_sum))
        if not 0 <= ones <= accepted:
            log.warning("%r clients report unclipped deltas out of %d: counted as none", unclipped_sum, accepted)
            ones = 0
        deltas.validate_values(weighted_sum, max_norm=None)
        return self._release(weighted_sum, [1.0] * ones + [0.0] * (accepted - ones))

    def aggregate_secure(self, server_round: int, weighted_sum: dict[str, np.ndarray],
                         **sums: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:  # sums: typed by the base
        arrays, metrics = super().aggregate_secure(server_round, weighted_sum, **sums)
        self._noise_metrics(metrics)
        return arrays, metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._noise_metrics(metrics)
        return arrays, metrics

    def _noise_metrics(self, metrics: MetricRecord | None) -> None:
        """Only noised or public quantities leave: the reply counts and the (unnoised) mean train
        loss of the cohort are removed; the noise std and the next S (from noised bits) stay."""
        if metrics is None:
            return
        for key in list(metrics.keys()):
            if key not in PUBLIC_METRICS:
                del metrics[key]
        if self.last_event is not None:
            metrics[M_NOISE_STD] = float(self.last_noise_std)
            metrics[M_NEXT_CLIP_NORM] = float(self.clip_norm)


# -- client half: the clip happens on the device --------------------------------------------------


@client_hook
class ClipUpdate(ClientHook):
    """User-level DP's client: Δ ← Δ · min(1, S/‖Δ‖₂) before it leaves the device; reports the
    bit ‖Δ‖ ≤ S for adaptive clipping. Last, so it clips what is actually sent."""

    key = CFG_CLIP_NORM
    order = 90

    @staticmethod
    def enter(peft_model: Any, conf: Any, context: Any, content: Any, stack: ExitStack) -> Finisher:
        s = float(conf[CFG_CLIP_NORM])

        def finish(delta: State, metrics: Any) -> tuple[State, Extra]:
            clipped, norm = M.clip_update(delta, clip_norm=s)
            metrics[M_UNCLIPPED] = float(norm <= s)
            return clipped, {}

        return finish
