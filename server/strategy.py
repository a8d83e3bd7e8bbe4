"""Flower strategies with a guard in front: nothing malformed, non-finite or outsized is averaged in.

`GuardedAggregation` sits before any Flower strategy in the class order, checks every reply
against the adapter's expected keys and shapes and the update-norm bound, and keeps the per-round,
per-merchant record (loss, ε, bytes, holdout metrics) that checkpoints and the report read.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import fixedclipping_mod as legacy_fixedclipping_mod
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.utils import make_ffn
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, add_gaussian_noise_inplace
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from shared.adapter import AdapterMismatch, check_update
from shared.config import Config, ConfigError, config_from_run

log = logging.getLogger(__name__)


class GuardedAggregation:
    """Mixin: validate replies, then hand the accepted ones to the wrapped strategy."""

    expected: dict[str, tuple[int, ...]]
    max_update_norm: float
    min_replies: int
    round_offset: int = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        self._started = time.time()
        self._current = {"round": server_round + self.round_offset, "merchants": {}, "rejected": [], "failures": []}
        return super().configure_train(server_round, arrays, config, grid)

    def rejection(self, msg: Message) -> str | None:
        """Why a reply must not be averaged in, or None if it may."""
        if "arrays" not in msg.content:
            return "no adapter in reply"
        state = {k: torch.from_numpy(np.asarray(v.numpy())) for k, v in msg.content["arrays"].items()}
        try:
            check_update(state, self.expected)
        except AdapterMismatch as exc:
            return str(exc)
        norm = float(np.sqrt(sum(np.sum((state[k].numpy() - self._global[k]) ** 2) for k in state)))
        if norm > self.max_update_norm:
            return f"update norm {norm:.3g} exceeds the bound {self.max_update_norm}"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: node %d failed or declined: %s", server_round, node, msg.error.reason)
                self._current["failures"].append({"node": node, "code": msg.error.code, "reason": msg.error.reason})
                continue
            reason = self.rejection(msg)
            if reason is not None:
                log.warning("round %d: update from node %d rejected: %s", server_round, node, reason)
                self._current["rejected"].append({"node": node, "reason": reason})
                continue
            accepted.append(msg)
            metrics = dict(msg.content["metrics"])
            self._current["merchants"][str(int(metrics.get("partition-id", node)))] = {"node": node, **metrics}
        self._current["accepted"] = len(accepted)
        self._current["wall_s"] = time.time() - self._started
        self.history.append(self._current)
        if len(accepted) < self.min_replies:
            log.warning("round %d: %d valid replies < min_replies %d; global adapter unchanged", server_round, len(accepted), self.min_replies)
            return None, None
        arrays, aggregated = super().aggregate_train(server_round, accepted)
        self._current["aggregated"] = dict(aggregated or {})
        return arrays, aggregated

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = [m for m in replies if not m.has_error()]
        for msg in replies:
            metrics = dict(msg.content["metrics"])
            key = str(int(metrics.get("partition-id", msg.metadata.src_node_id)))
            self.history[-1]["merchants"].setdefault(key, {}).update({f"eval-{k}": v for k, v in metrics.items()})
        aggregated = super().aggregate_evaluate(server_round, replies) if replies else None
        self.history[-1].setdefault("aggregated", {}).update({f"eval-{k}": v for k, v in (aggregated or {}).items()})
        return aggregated


_BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg}


def make_strategy(cfg: Config, expected: dict[str, tuple[int, ...]], history: list[dict[str, Any]] | None = None) -> FedAvg:
    fed = cfg.federation
    base = _BASES[fed.strategy]
    kwargs: dict[str, Any] = {"min_train_nodes": fed.min_replies, "min_evaluate_nodes": fed.min_replies, "min_available_nodes": fed.min_replies}
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy == "fedadam":
        kwargs["eta"] = fed.server_lr
    elif fed.strategy == "fedtrimmedavg":
        kwargs["beta"] = fed.trim_beta
    check_privacy_options(cfg)
    if fed.client_dp != "off":
        return make_client_dp_strategy(cfg, base(weighted_by_key=DP_WEIGHT, **kwargs), expected, history)
    strategy = type(f"Guarded{base.__name__}", (GuardedAggregation, base), {})(**kwargs)
    strategy.expected, strategy.max_update_norm, strategy.min_replies = expected, fed.max_update_norm, fed.min_replies
    strategy.history = history if history is not None else []
    strategy.round_offset = len(strategy.history)
    return strategy


# --------------------------------------------------------------------------------------------------
# Client-level DP: Flower's DP strategy wrappers, with the guard in front (docs/privacy.md)
# --------------------------------------------------------------------------------------------------
#
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
            raise ConfigError(f"[federation] secagg = true gives the server only the mean of the adapters; strategy must be fedavg or fedprox, not {fed.strategy!r}")
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


def _release_record(mode: str, clip: float, update_noise: float, cohort: int, release_noise: float, delta: float, earlier: list[dict[str, Any]]) -> dict[str, Any]:
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
    - each noised round is written to the round record with the ε any one merchant has spent so far.
    """

    client_dp_mode: str
    client_dp_delta: float

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [self._equal_weight(msg) for msg in replies if self._within_clip(server_round, msg)]
        self._current["accepted"] = len(replies)
        if len(replies) < self.min_replies:
            log.warning("round %d: %d updates within the client clip < min_replies %d; global adapter unchanged", server_round, len(replies), self.min_replies)
            return None, None
        self.num_sampled_clients = len(replies)
        clip, update_noise = self.clipping_norm, self.noise_multiplier
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            earlier = [r for r in self.history if r is not self._current]
            release_noise = self._release_noise_multiplier(update_noise)
            self._current["client_dp"] = _release_record(self.client_dp_mode, clip, update_noise, len(replies), release_noise, self.client_dp_delta, earlier)
        self._apply_pending_clip()
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for msg in replies:  # holdout metrics keep their usual weighting by examples
            if not msg.has_error():
                metrics = dict(msg.content["metrics"])
                msg.content["metrics"] = MetricRecord({**metrics, DP_WEIGHT: metrics.get("num-examples", 1)})
        return super().aggregate_evaluate(server_round, replies)

    def _equal_weight(self, msg: Message) -> Message:
        msg.content["metrics"] = MetricRecord({**dict(msg.content["metrics"]), DP_WEIGHT: 1.0})
        return msg

    def _within_clip(self, server_round: int, msg: Message) -> bool:
        if self.client_dp_mode != "client_fixed":
            return True
        arrays = msg.content["arrays"]
        norm = float(np.sqrt(sum(np.sum((np.asarray(v.numpy(), dtype=np.float64) - self._global[k]) ** 2) for k, v in arrays.items())))
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


class AdaptiveClientLevelDP(ClientLevelDP):
    def _release_noise_multiplier(self, update_noise: float) -> float:
        """The update (noise z_Δ·C) and the clipped count (noise σ_b; sensitivity 1, as Flower does not
        centre the count) are both released: together an RDP of α/2·(z_Δ⁻² + σ_b⁻²)."""
        count_std = self.clipped_count_stddev
        return (update_noise**-2 + count_std**-2) ** -0.5 if count_std > 0 else update_noise

    def _apply_pending_clip(self) -> None:
        if self._pending_clipping_norm is not None:
            self.clipping_norm, self._pending_clipping_norm = self._pending_clipping_norm, None


def make_client_dp_strategy(cfg: Config, inner: FedAvg, expected: dict[str, tuple[int, ...]], history: list[dict[str, Any]] | None = None) -> Strategy:
    """The guarded strategy for federation.client_dp = server_fixed | server_adaptive | client_fixed, around `inner`."""
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
        # Flower requires z < 2·σ_b; its default σ_b = n/20 makes that impossible for a handful of merchants
        count_std = fed.client_dp_count_stddev or max(n / 20, fed.client_dp_noise)
        kwargs.update(initial_clipping_norm=fed.client_dp_clip, target_clipped_quantile=fed.client_dp_target_quantile, clipped_count_stddev=count_std)
    else:
        raise ConfigError(f"[federation] unknown client_dp {fed.client_dp!r}")
    strategy = type(f"Guarded{wrapper.__name__}", (GuardedAggregation, mixin, wrapper), {})(inner, **kwargs)
    strategy.expected, strategy.max_update_norm, strategy.min_replies = expected, fed.max_update_norm, fed.min_replies
    strategy.history = history if history is not None else []
    strategy.round_offset = len(strategy.history)
    strategy.client_dp_mode, strategy.client_dp_delta = fed.client_dp, fed.client_dp_delta
    return strategy


# --------------------------------------------------------------------------------------------------
# SecAgg+: Flower's legacy workflow (docs/secure-aggregation.md)
# --------------------------------------------------------------------------------------------------
#
# flwr 1.41 offers SecAgg+ only as `flwr.server.workflow.SecAggPlusWorkflow`, run by the legacy
# `DefaultWorkflow` with a `LegacyContext` and a legacy `flwr.server.strategy.Strategy`; the
# Message-API strategies (`flwr.serverapp.strategy`) have no secure-aggregation hook. The workflow
# hands the strategy only the unmasked mean (copied into every merchant's FitRes), so the per-reply
# guard cannot run: `SecAggAggregation` guards the mean instead and records what stays visible per
# merchant (its plaintext metrics, and its failures).

ADAPTER_KEYS = "adapter-keys"  # legacy Parameters are an unnamed list; the names travel in the config


def secagg_workflow(cfg: Config) -> SecAggPlusWorkflow:
    """The SecAgg+ fit workflow; every merchant's weight is 1, so the result is the unweighted mean."""
    fed = cfg.federation
    return SecAggPlusWorkflow(
        num_shares=float(fed.secagg_shares), reconstruction_threshold=float(fed.secagg_threshold), max_weight=1.0,
        clipping_range=fed.secagg_clipping_range, timeout=fed.round_timeout_s,
    )


class SecAggAggregation(LegacyFedAvg):
    """The legacy strategy SecAggPlusWorkflow drives: guards and records rounds whose updates it never sees.

    `on_round(server_round, {name: array})` runs after every round (the checkpoint).
    """

    def __init__(self, cfg: Config, initial: dict[str, np.ndarray], history: list[dict[str, Any]], on_round: Callable[[int, dict[str, np.ndarray]], None]) -> None:
        fed = self.fed = cfg.federation
        self.keys, self.history, self.on_round = list(initial), history, on_round
        self.expected = {k: tuple(v.shape) for k, v in initial.items()}
        self.round_offset = len(history)
        super().__init__(
            min_fit_clients=fed.min_replies, min_evaluate_clients=fed.min_replies, min_available_clients=fed.min_replies,
            initial_parameters=ndarrays_to_parameters([initial[k] for k in self.keys]), on_fit_config_fn=self._fit_config,
            on_evaluate_config_fn=self._evaluate_config, evaluate_fn=self._after_round, accept_failures=True,
        )

    def _fit_config(self, server_round: int) -> dict[str, Any]:
        config: dict[str, Any] = {"server-round": server_round, "local-steps": self.fed.local_steps, ADAPTER_KEYS: "\n".join(self.keys)}
        if self.fed.strategy == "fedprox":
            config["proximal-mu"] = self.fed.proximal_mu
        if self.fed.client_dp == "client_fixed":
            config[KEY_CLIPPING_NORM] = self.fed.client_dp_clip  # read by the merchants' (legacy) fixedclipping_mod
        return config

    def _evaluate_config(self, server_round: int) -> dict[str, Any]:
        return {"server-round": server_round, ADAPTER_KEYS: "\n".join(self.keys)}

    def _after_round(self, server_round: int, arrays: list[np.ndarray], _config: dict[str, Any]) -> None:
        if server_round > 0:
            self.on_round(server_round, dict(zip(self.keys, arrays, strict=True)))
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        self._global = dict(zip(self.keys, parameters_to_ndarrays(parameters), strict=True))
        self._started = time.time()
        # appended now, so a round whose secure aggregation halts still counts as a round run
        self._current = {"round": server_round + self.round_offset, "merchants": {}, "rejected": [], "failures": [], "accepted": 0, "secagg": True}
        self.history.append(self._current)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        fed = self.fed
        for failure in failures:
            node = None if isinstance(failure, BaseException) else failure[0].node_id
            reason = str(failure) if isinstance(failure, BaseException) else failure[1].status.message
            log.warning("round %d: a merchant failed or declined during secure aggregation: %s", server_round, reason)
            self._current["failures"].append({"node": node, "reason": reason})
        for proxy, fitres in results:
            metrics = dict(fitres.metrics)
            self._current["merchants"][str(int(metrics.get("partition-id", proxy.node_id)))] = {"node": proxy.node_id, **metrics}
        self._current["accepted"] = len(results)
        self._current["wall_s"] = time.time() - self._started
        if len(results) < fed.min_replies:
            log.warning("round %d: %d merchants in the secure sum < min_replies %d; global adapter unchanged", server_round, len(results), fed.min_replies)
            return None, {}
        mean = dict(zip(self.keys, parameters_to_ndarrays(results[0][1].parameters), strict=True))  # every FitRes holds the mean
        reason = self.rejection(mean)
        if reason is not None:
            log.warning("round %d: securely aggregated mean rejected: %s", server_round, reason)
            self._current["rejected"].append({"node": None, "reason": f"aggregate: {reason}"})
            return None, {}
        arrays = [mean[k].astype(self._global[k].dtype, copy=True) for k in self.keys]
        if fed.client_dp == "client_fixed":  # central noise on the unmasked mean of client-clipped updates
            add_gaussian_noise_inplace(arrays, fed.client_dp_noise * fed.client_dp_clip / len(results))
            earlier = [r for r in self.history if r is not self._current]
            self._current["client_dp"] = _release_record(
                "client_fixed", fed.client_dp_clip, fed.client_dp_noise, len(results), fed.client_dp_noise, fed.client_dp_delta, earlier
            )
        numeric = [{k: v for k, v in fitres.metrics.items() if isinstance(v, (int, float))} for _, fitres in results]
        aggregated = {k: float(np.mean([m[k] for m in numeric if k in m])) for k in set().union(*numeric)}
        self._current["aggregated"] = aggregated
        return ndarrays_to_parameters(arrays), aggregated

    def rejection(self, mean: dict[str, np.ndarray]) -> str | None:
        """Why the securely aggregated mean must not become the global adapter, or None."""
        try:
            check_update({k: torch.from_numpy(np.asarray(v)) for k, v in mean.items()}, self.expected)
        except AdapterMismatch as exc:
            return str(exc)
        norm = float(np.sqrt(sum(np.sum((mean[k] - self._global[k]) ** 2) for k in self.keys)))
        if norm > self.fed.max_update_norm:
            return f"mean update norm {norm:.3g} exceeds the bound {self.fed.max_update_norm}"
        edge = max(float(np.abs(v).max()) for v in mean.values())
        if edge >= self.fed.secagg_clipping_range:
            log.warning("adapter values reach the SecAgg+ clipping range %g (max |x| = %.3g); raise secagg_clipping_range", self.fed.secagg_clipping_range, edge)
        return None

    def aggregate_evaluate(self, server_round, results, failures):
        for proxy, res in results:
            metrics = dict(res.metrics)
            key = str(int(metrics.get("partition-id", proxy.node_id)))
            self.history[-1]["merchants"].setdefault(key, {}).update({f"eval-{k}": v for k, v in metrics.items()})
        return super().aggregate_evaluate(server_round, results, failures)


# --------------------------------------------------------------------------------------------------
# The merchants' side of client_dp = "client_fixed" and secagg = true
# --------------------------------------------------------------------------------------------------
#
# Client mods; they live here, next to the server half they must match, until the ClientApp takes
# them up: `client.app.make_app([client_privacy_mod])`. The mod reads the run's config on every
# message, so one ClientApp serves every combination of the options.


def _train_only(mod: Callable) -> Callable:
    """Flower's Message-API fixedclipping_mod does not look at the message type and fails evaluate
    messages (no clipping norm in their config, no adapter in their reply); this applies it to train only."""

    def wrapped(msg: Message, ctxt: Context, call_next: Callable) -> Message:
        return mod(msg, ctxt, call_next) if msg.metadata.message_type == MessageType.TRAIN else call_next(msg, ctxt)

    return wrapped


def legacy_bridge_mod(msg: Message, ctxt: Context, call_next: Callable) -> Message:
    """Serves the legacy workflow's messages with the unchanged ClientApp functions.

    fitins/evaluateins records become {"arrays" (named again from ADAPTER_KEYS), "config"}; the
    {"arrays", "metrics"} reply becomes fitres (weight 1) or evaluateres (loss = wql). Other messages
    pass through.
    """
    original = msg.content
    is_fit = "fitins.parameters" in original.array_records
    if is_fit:
        ins = compat.recorddict_to_fitins(original, keep_input=True)
    elif "evaluateins.parameters" in original.array_records:
        ins = compat.recorddict_to_evaluateins(original, keep_input=True)
    else:
        return call_next(msg, ctxt)
    config = dict(ins.config)
    keys = str(config.pop(ADAPTER_KEYS)).split("\n")
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in zip(keys, parameters_to_ndarrays(ins.parameters), strict=True)})
    msg.content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    try:
        reply = call_next(msg, ctxt)
    finally:
        msg.content = original
    if reply.has_error():  # SecAgg+'s mod cannot pass an Error reply on; raising sends its reason to the server
        raise RuntimeError(f"[code {reply.error.code}] {reply.error.reason}")
    metrics = dict(reply.content["metrics"])
    ok = Status(code=Code.OK, message="ok")
    if is_fit:
        state = reply.content["arrays"]
        parameters = ndarrays_to_parameters([np.asarray(state[k].numpy()) for k in keys])
        reply.content = compat.fitres_to_recorddict(FitRes(status=ok, parameters=parameters, num_examples=1, metrics=metrics), keep_input=True)
    else:
        res = EvaluateRes(status=ok, loss=float(metrics.get("wql", float("nan"))), num_examples=int(metrics.get("num-examples", 1)), metrics=metrics)
        reply.content = compat.evaluateres_to_recorddict(res)
    return reply


def client_mods(cfg: Config) -> list[Callable]:
    """The mods a merchant must run for `cfg`'s federation options, outermost first."""
    fed = cfg.federation
    if fed.secagg:  # mask what is sent (outermost), after clipping it, after translating the legacy records
        return [secaggplus_mod, *([legacy_fixedclipping_mod] if fed.client_dp == "client_fixed" else []), legacy_bridge_mod]
    if fed.client_dp == "client_fixed":
        return [_train_only(fixedclipping_mod)]
    return []


def client_privacy_mod(msg: Message, ctxt: Context, call_next: Callable) -> Message:
    """One client mod for every option: applies `client_mods` of the run's config."""
    mods = client_mods(config_from_run(ctxt.run_config))
    return make_ffn(call_next, mods)(msg, ctxt) if mods else call_next(msg, ctxt)
