"""Client-level DP: Flower's DP strategy wrappers, with the guard in front (docs/privacy.md)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from server.guard import GuardedAggregation, update_norm
from shared.config import Config, ConfigError, FederationConfig
from shared.privacy import dp_learning_rate

log = logging.getLogger(__name__)


# Class order of the strategy built for federation.client_dp != "off":
#     GuardedAggregation -> ClientLevelDP -> Flower DP wrapper  (holding)  FedAvg | FedProx
# so every reply is first validated by the guard on the raw update (keys, shapes, finiteness, norm
# bound; errors and budget-exhausted merchants dropped), then clipped (server_*), averaged with
# equal weights and noised by the wrapper. Guarding after clipping would hide outsized updates from
# the norm check and let a malformed reply crash the clipping.

DP_WEIGHT = "dp-weight"  # the weight key the mean is taken with under client-level DP: 1 per merchant
_CLIENT_DP_STRATEGIES = {"fedavg", "fedprox"}
_SECAGG_STRATEGIES = {"fedavg", "fedprox"}


def check_privacy_options(cfg: Config) -> None:
    """Refuses combinations of client_dp / secagg / strategy that would not give the stated guarantee."""
    fed = cfg.federation
    if fed.client_dp != "off":
        if fed.strategy not in _CLIENT_DP_STRATEGIES:
            raise ConfigError(
                f"[federation] client_dp = {fed.client_dp!r} needs strategy fedavg or fedprox, not {fed.strategy!r}: "
                "the noise is calibrated to the sensitivity of a plain mean (C / n); a median or trimmed mean "
                "has another sensitivity, and FedAdam's server step would come after the noise instead of before"
            )
        if not fed.client_dp_noise > 0 or not fed.client_dp_clip > 0 or not 0 < fed.client_dp_delta < 1:
            raise ConfigError("[federation] client-level DP needs client_dp_noise > 0, client_dp_clip > 0 and 0 < client_dp_delta < 1")
    if fed.secagg:
        if fed.strategy not in _SECAGG_STRATEGIES:
            raise ConfigError("[federation] secagg = true gives the server only the mean of the adapters; "
                              f"strategy must be fedavg or fedprox, not {fed.strategy!r}")
        if fed.client_dp in ("server_fixed", "server_adaptive"):
            raise ConfigError(
                "[federation] secagg = true hides each merchant's update from the server, so the server cannot clip it: "
                f"use client_dp = 'client_fixed' (clipping in the merchant's client mod) or 'off', not {fed.client_dp!r}"
            )


def client_epsilon(noise_multipliers: list[float], delta: float) -> float:
    """ε of a sequence of Gaussian releases with these noise multipliers (sensitivity 1 each), without sampling.

    Every merchant is asked every round (fraction_train = 1), so there is no amplification by
    sampling: each release is the plain Gaussian mechanism, whose RDP at order α is α / (2 z²)
    (Opacus' compute_rdp with q = 1), composed over releases and converted at δ as Opacus does.
    """
    if not noise_multipliers:
        return 0.0
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=orders) for z in noise_multipliers)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def release_record(mode: str, clip: float, update_noise: float, cohort: int, release_noise: float, delta: float,
                   earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """What a round record keeps about one noised release, with the ε any one merchant has spent so far."""
    released = [r["client_dp"]["release_noise_multiplier"] for r in earlier if "client_dp" in r]
    return {
        "mode": mode, "clip": clip, "noise_multiplier": update_noise, "noise_std": update_noise * clip / cohort, "cohort": cohort,
        "release_noise_multiplier": release_noise, "epsilon": client_epsilon([*released, release_noise], delta), "delta": delta,
    }


class ClientLevelDP:
    """Mixin between GuardedAggregation and a Flower DP wrapper: equal weights, honest calibration, accounting.

    - every accepted reply gets weight 1 (DP_WEIGHT), so one merchant moves the mean by at most C / n;
    - the wrapper's `num_sampled_clients` is set to the n actually averaged this round, so its noise
      std z·C/n matches that sensitivity (Flower would otherwise use the configured cohort size and
      under-noise a round in which some merchants failed or were rejected);
    - under client_fixed, an update longer than C (a merchant without the clipping mod) is rejected;
    - the noised mean step is scaled by s²/(1 + s²), s = n·√R / (z·√d) the run's signal-to-noise
      estimate (R planned rounds, d numbers), as DP-SGD's steps are (shared.privacy.dp_learning_rate):
      a step that is mostly noise leaves the global adapter near where it was. It acts on the released
      mean only, post-processing, so it costs no privacy;
    - each noised round is written to the round record with the ε any one merchant has spent so far.
    """

    def __init__(self, *args: Any, client_dp_mode: str, client_dp_delta: float, client_dp_rounds: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_dp_mode, self.client_dp_delta, self.client_dp_rounds = client_dp_mode, client_dp_delta, client_dp_rounds

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [self._equal_weight(msg) for msg in replies if self._within_clip(server_round, msg)]
        self._current["accepted"] = len(replies)
        if len(replies) < self.min_replies:
            log.warning("round %d: %d updates within the client clip < min_replies %d; global adapter unchanged",
                        server_round, len(replies), self.min_replies)
            return None, None
        self.num_sampled_clients = len(replies)
        clip, update_noise = self.clipping_norm, self.noise_multiplier
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            earlier = [r for r in self.history if r is not self._current]
            release_noise = self._release_noise_multiplier(update_noise)
            self._current["client_dp"] = release_record(self.client_dp_mode, clip, update_noise, len(replies), release_noise,
                                                        self.client_dp_delta, earlier)
            arrays, self._current["client_dp"]["step"] = self._scaled_step(arrays, update_noise, len(replies))
        self._apply_pending_clip()
        return arrays, metrics

    def _scaled_step(self, arrays: ArrayRecord, update_noise: float, cohort: int) -> tuple[ArrayRecord, float]:
        """The released adapter moved back towards this round's global: only s²/(1 + s²) of its step is kept."""
        released = {k: v.numpy() for k, v in arrays.items()}
        dims = sum(v.size for v in released.values())
        factor = dp_learning_rate(1.0, cohort * math.sqrt(self.client_dp_rounds) / (update_noise * math.sqrt(dims)))
        kept = {k: (self._global[k] + factor * (v - self._global[k])).astype(v.dtype) for k, v in released.items()}
        return ArrayRecord({k: Array(v) for k, v in kept.items()}), factor

    def _equal_weight(self, msg: Message) -> Message:
        msg.content["metrics"] = MetricRecord({**dict(msg.content["metrics"]), DP_WEIGHT: 1.0})
        return msg

    def _within_clip(self, server_round: int, msg: Message) -> bool:
        if self.client_dp_mode != "client_fixed":
            return True
        norm = update_norm({k: v.numpy() for k, v in msg.content["arrays"].items()}, self._global)
        if norm <= self.clipping_norm * (1 + 1e-4):
            return True
        reason = f"update norm {norm:.4g} exceeds the client clip {self.clipping_norm}: is the merchant's clipping mod missing?"
        log.warning("round %d: update from node %d rejected: %s", server_round, msg.metadata.src_node_id, reason)
        self._current["rejected"].append({"node": msg.metadata.src_node_id, "reason": reason})
        return False

    def _release_noise_multiplier(self, update_noise: float) -> float:
        """This round's release as one Gaussian mechanism of sensitivity 1: its noise multiplier."""
        return update_noise

    def _apply_pending_clip(self) -> None:
        pass


class PaperAdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with two corrections (flwr 1.41, serverapp/strategy/dp_adaptive_clipping.py).

    1. Direction: Flower counts the *clipped* updates and sets C <- C·exp(-η(clipped - γ)), so when
       every update is clipped C shrinks further (measured: 0.1 -> 0.061 in 5 rounds) instead of
       growing. Andrew et al. (arXiv:1905.03871) count the *unclipped* share b and set
       C <- C·exp(-η(b - γ)), γ being the quantile of update norms to track; that rule is used here.
    2. Timing: Flower moves C before it adds the noise, so the noise std z·C_new/n can be smaller
       than the sensitivity C_old/n of the mean it just clipped with C_old. Here the new bound takes
       effect after this round's noise (AdaptiveClientLevelDP._apply_pending_clip).
    """

    _pending_clipping_norm: float | None = None

    def _geometric_update(self, clipped_fraction: float) -> None:
        unclipped = 1.0 - clipped_fraction
        self._pending_clipping_norm = self.clipping_norm * math.exp(-self.clip_norm_lr * (unclipped - self.target_clipped_quantile))


def adaptive_release_noise(update_noise: float, count_std: float) -> float:
    """The update (noise z_Δ·C) and the clipped count (noise σ_b; sensitivity 1, as Flower does not
    centre the count) are both released: together an RDP of α/2·(z_Δ⁻² + σ_b⁻²)."""
    return (update_noise**-2 + count_std**-2) ** -0.5 if count_std > 0 else update_noise


def count_stddev(fed: FederationConfig, merchants: int) -> float:
    """σ_b of adaptive clipping's clipped count: the configured one, else max(n / 20, z). Flower requires
    z < 2·σ_b; its default σ_b = n/20 makes that impossible for a handful of merchants."""
    return fed.client_dp_count_stddev or max(merchants / 20, fed.client_dp_noise)


class AdaptiveClientLevelDP(ClientLevelDP):
    def _release_noise_multiplier(self, update_noise: float) -> float:
        return adaptive_release_noise(update_noise, self.clipped_count_stddev)

    def _apply_pending_clip(self) -> None:
        if self._pending_clipping_norm is not None:
            self.clipping_norm, self._pending_clipping_norm = self._pending_clipping_norm, None


def make_client_dp_strategy(cfg: Config, inner: FedAvg, guard: dict[str, Any]) -> Strategy:
    """The guarded strategy for federation.client_dp = server_fixed | server_adaptive | client_fixed, around
    `inner`; `guard` holds GuardedAggregation's options (server.guard.guard_options)."""
    fed = cfg.federation
    n = max(fed.num_merchants, fed.min_replies)  # the wrappers' initial cohort size; reset to the real one each round
    kwargs: dict[str, Any] = {"noise_multiplier": fed.client_dp_noise, "num_sampled_clients": n}
    if fed.client_dp == "server_fixed":
        mixin, wrapper = ClientLevelDP, DifferentialPrivacyServerSideFixedClipping
        kwargs["clipping_norm"] = fed.client_dp_clip
    elif fed.client_dp == "client_fixed":
        mixin, wrapper = ClientLevelDP, DifferentialPrivacyClientSideFixedClipping
        kwargs["clipping_norm"] = fed.client_dp_clip
    elif fed.client_dp == "server_adaptive":
        mixin, wrapper = AdaptiveClientLevelDP, PaperAdaptiveClipping
        kwargs.update(initial_clipping_norm=fed.client_dp_clip, target_clipped_quantile=fed.client_dp_target_quantile,
                      clipped_count_stddev=count_stddev(fed, n))
    else:
        raise ConfigError(f"[federation] unknown client_dp {fed.client_dp!r}")
    strategy_class = type(f"Guarded{wrapper.__name__}", (GuardedAggregation, mixin, wrapper), {})
    return strategy_class(inner, client_dp_mode=fed.client_dp, client_dp_delta=fed.client_dp_delta, client_dp_rounds=fed.num_rounds,
                          **kwargs, **guard)
