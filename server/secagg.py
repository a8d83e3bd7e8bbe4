"""SecAgg+ through Flower's legacy workflow (docs/secure-aggregation.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, add_gaussian_noise_inplace

from server.client_dp import release_record
from server.guard import (
    COUNT,
    EVALUATE_METRICS,
    SCORE,
    TRAIN_METRICS,
    MerchantLabels,
    ReplyRejected,
    checked_scalar,
    checked_scalars,
    new_round,
    record_evaluations,
    update_rejection,
    weighted_means,
)
from shared.adapter import ADAPTER_KEYS
from shared.config import Config

log = logging.getLogger(__name__)


# flwr 1.41 offers SecAgg+ only as `flwr.server.workflow.SecAggPlusWorkflow`, run by the legacy
# `DefaultWorkflow` with a `LegacyContext` and a legacy `flwr.server.strategy.Strategy`; the
# Message-API strategies (`flwr.serverapp.strategy`) have no secure-aggregation hook. The workflow
# hands the strategy only the unmasked mean (copied into every merchant's FitRes), so the per-reply
# guard cannot run: `SecAggAggregation` guards the mean instead and records what stays visible per
# merchant (its plaintext metrics, and its failures).


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
        self.labels = MerchantLabels()
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
        self._current = new_round(len(self.history) + 1) | {"secagg": True, "halted": True}
        self.history.append(self._current)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        fed = self.fed
        for failure in failures:
            node = None if isinstance(failure, BaseException) else failure[0].node_id
            reason = str(failure) if isinstance(failure, BaseException) else failure[1].status.message
            log.warning("round %d: a merchant failed or declined during secure aggregation: %s", server_round, reason)
            self._current["failures"].append({"node": node, "reason": reason})
        reported = {}
        for proxy, fitres in results:
            try:
                reported[proxy.node_id] = checked_scalars(fitres.metrics, TRAIN_METRICS)
            except ReplyRejected as exc:  # its masked update is in the sum already; only its scalars are left out
                self._current["rejected"].append({"node": proxy.node_id, "reason": f"metrics: {exc}"})
        keys = self.labels.keys({node: metrics.get("partition-id") for node, metrics in reported.items()}, self._current["conflicts"])
        for node, metrics in reported.items():
            self._current["merchants"][keys[node]] = {"node": node, **metrics}
        rows = [reported[node] for node in sorted(reported)]
        self._current["accepted"], self._current["halted"] = len(results), False
        self._current["wall_s"] = time.time() - self._started
        if len(results) < fed.min_replies:
            log.warning("round %d: %d merchants in the secure sum < min_replies %d; global adapter unchanged", server_round, len(results), fed.min_replies)
            return None, {}
        mean = dict(zip(self.keys, parameters_to_ndarrays(results[0][1].parameters), strict=True))  # every FitRes holds the mean
        reason = update_rejection(mean, self.expected, self._global, fed.max_update_norm)
        if reason is not None:
            log.warning("round %d: securely aggregated mean rejected: %s", server_round, reason)
            self._current["rejected"].append({"node": None, "reason": f"aggregate: {reason}"})
            return None, {}
        edge = max(float(np.abs(v).max()) for v in mean.values())
        if edge >= fed.secagg_clipping_range:
            log.warning("adapter values reach the SecAgg+ clipping range %g (max |x| = %.3g); raise secagg_clipping_range", fed.secagg_clipping_range, edge)
        arrays = [mean[k].astype(self._global[k].dtype, copy=True) for k in self.keys]
        if fed.client_dp == "client_fixed":  # central noise on the unmasked mean of client-clipped updates
            add_gaussian_noise_inplace(arrays, fed.client_dp_noise * fed.client_dp_clip / len(results))
            earlier = [r for r in self.history if r is not self._current]
            self._current["client_dp"] = release_record(
                "client_fixed", fed.client_dp_clip, fed.client_dp_noise, len(results), fed.client_dp_noise, fed.client_dp_delta, earlier
            )
        aggregated = weighted_means(rows, [1.0] * len(rows), ("train-loss", "steps", "bytes-sent", "epsilon", "delta"))
        self._current["aggregated"] = aggregated
        return ndarrays_to_parameters(arrays), aggregated

    def aggregate_evaluate(self, server_round, results, failures):
        """Holdout metrics per merchant into the round record; the legacy mean loss over the replies whose
        loss and count are sane too (a count of 0 everywhere divided by zero, a loss of 1e308 overflowed)."""
        evaluations, usable = {}, []
        for proxy, res in results:
            try:
                evaluations[proxy.node_id] = checked_scalars(res.metrics, EVALUATE_METRICS)
                checked_scalar("loss", res.loss, SCORE)
                checked_scalar("num_examples", res.num_examples, COUNT)
            except ReplyRejected as exc:
                evaluations.pop(proxy.node_id, None)
                self.history[-1]["rejected"].append({"node": proxy.node_id, "reason": f"evaluation: {exc}"})
                continue
            usable.append((proxy, res))
        record_evaluations(self.history[-1], self.labels, evaluations)
        if sum(res.num_examples for _, res in usable) == 0:
            return None, {}
        return super().aggregate_evaluate(server_round, usable, failures)
