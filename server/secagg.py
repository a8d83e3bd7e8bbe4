"""SecAgg+ through Flower's legacy workflow (docs/secure-aggregation.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Error, Message
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
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
    npy_values,
    record_evaluations,
    rejecting_failures,
    update_rejection,
    weighted_means,
)
from shared.adapter import ADAPTER_KEYS
from shared.config import Config

log = logging.getLogger(__name__)
MASKED_VECTOR_REJECTED = 911  # the error a rejected masked vector is replaced by: the workflow then unmasks the sum without it


# flwr 1.41 offers SecAgg+ only as `flwr.server.workflow.SecAggPlusWorkflow`, run by the legacy
# `DefaultWorkflow` with a `LegacyContext` and a legacy `flwr.server.strategy.Strategy`; the
# Message-API strategies (`flwr.serverapp.strategy`) have no secure-aggregation hook. The workflow
# hands the strategy only the unmasked mean (copied into every merchant's FitRes), so the per-reply
# guard cannot run: `SecAggAggregation` guards the mean instead and records what stays visible per
# merchant (its plaintext metrics, and its failures). What it can check per merchant, it does:
# `ScreenedSecAggPlusWorkflow` has each masked vector decoded (integers of the adapter's shapes)
# before Flower sums it, and a merchant whose vector fails is unmasked as one that dropped out. The
# median clip cannot apply (the server never sees an update); client_fixed clips on the merchant.


def secagg_workflow(cfg: Config) -> SecAggPlusWorkflow:
    """The SecAgg+ fit workflow; every merchant's weight is 1, so the result is the unweighted mean."""
    fed = cfg.federation
    return ScreenedSecAggPlusWorkflow(
        num_shares=float(fed.secagg_shares), reconstruction_threshold=float(fed.secagg_threshold), max_weight=1.0,
        clipping_range=fed.secagg_clipping_range, timeout=fed.round_timeout_s,
    )


class ScreenedGrid:
    """A Grid whose replies pass `rejection` first: one it finds a reason against comes back as an error
    reply to the same instruction, which Flower's workflow handles as a merchant that dropped out."""

    def __init__(self, grid: Grid, rejection: Callable[[Message], str | None]) -> None:
        self._grid, self._rejection = grid, rejection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        sent = {m.metadata.message_id: m for m in messages}  # ids given as the grid pushed them
        return [self._screened(reply, sent[reply.metadata.reply_to_message_id]) for reply in replies]

    def _screened(self, reply: Message, instruction: Message) -> Message:
        if reply.has_error() or (reason := self._rejection(reply)) is None:
            return reply
        return Message(Error(code=MASKED_VECTOR_REJECTED, reason=reason), reply_to=instruction)


class ScreenedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """SecAggPlusWorkflow whose masked vectors the guard decodes before Flower sums them: Flower's own
    `bytes_to_ndarray` and sum raised on a crafted one (garbage bytes, another shape), ending the run."""

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return super().collect_masked_vectors_stage(ScreenedGrid(grid, context.strategy.masked_vector_rejection), context, state)


class SecAggAggregation(LegacyFedAvg):
    """The legacy strategy SecAggPlusWorkflow drives: guards and records rounds whose updates it never sees.

    `on_round(server_round, {name: array})` runs after every round (the checkpoint).
    """

    def __init__(self, cfg: Config, initial: dict[str, np.ndarray], history: list[dict[str, Any]],
                 on_round: Callable[[int, dict[str, np.ndarray]], None]) -> None:
        fed = self.fed = cfg.federation
        self.keys, self.history, self.on_round = list(initial), history, on_round
        self.expected = {k: tuple(v.shape) for k, v in initial.items()}
        self.labels = MerchantLabels()
        super().__init__(
            min_fit_clients=fed.min_replies, min_evaluate_clients=fed.min_replies, min_available_clients=fed.min_replies,
            initial_parameters=ndarrays_to_parameters([initial[k] for k in self.keys]), on_fit_config_fn=self._fit_config,
            on_evaluate_config_fn=self._evaluate_config, evaluate_fn=self._after_round, accept_failures=True,
        )

    def masked_vector_rejection(self, reply: Message) -> str | None:
        """Why a merchant's masked vector must not enter the secure sum, recorded; None if it may. It must be
        the quantisation factor and one integer tensor per adapter tensor, of its shape, in the order sent,
        and its FitRes must convert."""
        shapes = [(1,), *self.expected.values()]
        try:
            with rejecting_failures("undecodable"):
                masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                if not isinstance(masked, list) or len(masked) != len(shapes):
                    raise ReplyRejected(f"expected {len(shapes)} masked tensors")
                for data, shape in zip(masked, shapes, strict=True):
                    npy_values(data, shape, "iu")
                compat.recorddict_to_fitres(reply.content, True)
        except ReplyRejected as exc:
            log.warning("secure aggregation: masked vector from node %d rejected: %s", reply.metadata.src_node_id, exc)
            self._current["rejected"].append({"node": reply.metadata.src_node_id, "reason": f"masked vector: {exc}"})
            return f"masked vector: {exc}"
        return None

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
            log.warning("round %d: %d merchants in the secure sum < min_replies %d; global adapter unchanged",
                        server_round, len(results), fed.min_replies)
            return None, {}
        mean = dict(zip(self.keys, parameters_to_ndarrays(results[0][1].parameters), strict=True))  # every FitRes holds the mean
        reason = update_rejection(mean, self.expected, self._global, fed.max_update_norm)
        if reason is not None:
            log.warning("round %d: securely aggregated mean rejected: %s", server_round, reason)
            self._current["rejected"].append({"node": None, "reason": f"aggregate: {reason}"})
            return None, {}
        edge = max(float(np.abs(v).max()) for v in mean.values())
        if edge >= fed.secagg_clipping_range:
            log.warning("adapter values reach the SecAgg+ clipping range %g (max |x| = %.3g); raise secagg_clipping_range",
                        fed.secagg_clipping_range, edge)
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
