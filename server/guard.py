"""The guard in front of every aggregation: a merchant's reply can neither crash a round nor steer it.

`GuardedAggregation` sits before any Flower strategy in the class order. Every reply is checked
against a strict schema: exactly the tensors of the adapter's shared part ([model] shared; keys,
shapes, float32, finite, within the update-norm bound) and a few typed, finite scalars under known
keys. What passes is rebuilt from the checked values before Flower sees it, with the weight the
server chooses, not the one a merchant claims (`federation.weighting`); what fails is recorded and
left out, and the round goes on. The guard also keeps the per-round, per-merchant record (loss, ε,
bytes, holdout metrics) that checkpoints and the report read. The helpers below serve the SecAgg+
path too (server/secagg.py), which sees only the mean, and client-level DP's clip check
(server/client_dp.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from shared.adapter import FEDERATION_ROUND, AdapterMismatch, check_update
from shared.config import Config

log = logging.getLogger(__name__)

# What a merchant may say, and of which type; anything else rejects the reply.
TRAIN_METRICS: dict[str, type] = {
    "train-loss": float, "num-examples": int, "steps": int, "bytes-sent": int, "partition-id": int, "epsilon": float, "delta": float,
}
EVALUATE_METRICS: dict[str, type] = {"mase": float, "wql": float, "coverage-80": float, "num-examples": int, "partition-id": int}
REQUIRED_METRICS = ("num-examples",)
WEIGHT = "num-examples"  # the key Flower's mean is weighted by; the guard writes the server's weight into it


class ReplyRejected(ValueError):
    """A reply that must not be averaged in: the reason is recorded and the round goes on."""


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 distance of an adapter from the round's global one, over all its tensors (in float64)."""
    return float(np.sqrt(sum(np.sum((np.asarray(update[k], dtype=np.float64) - reference[k]) ** 2) for k in update)))


def update_rejection(update: Mapping[str, np.ndarray], expected: dict[str, tuple[int, ...]], reference: Mapping[str, np.ndarray],
                     bound: float) -> str | None:
    """Why an adapter (one merchant's, or a secure mean) must not be adopted, or None if it may."""
    try:
        check_update({k: torch.from_numpy(np.asarray(v)) for k, v in update.items()}, expected)
    except AdapterMismatch as exc:
        return str(exc)
    norm = update_norm(update, reference)
    return f"update norm {norm:.3g} exceeds the bound {bound}" if norm > bound else None


def checked_arrays(content: RecordDict, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The adapter of a train reply, if it is exactly one ArrayRecord "arrays" of float32 tensors with the expected keys and shapes."""
    if list(content.array_records) != ["arrays"]:
        raise ReplyRejected(f"expected one ArrayRecord 'arrays', got {sorted(content.array_records)}")
    arrays = content.array_records["arrays"]
    if set(arrays) != set(expected):
        raise ReplyRejected(f"adapter keys differ: missing {sorted(set(expected) - set(arrays))[:3]}, unexpected {sorted(set(arrays) - set(expected))[:3]}")
    for name, array in arrays.items():
        if array.dtype != "float32" or tuple(array.shape) != expected[name]:
            raise ReplyRejected(f"{name}: {array.dtype} {tuple(array.shape)}, expected float32 {expected[name]}")
    return {name: np.asarray(arrays[name].numpy(), dtype=np.float32) for name in expected}


def checked_metrics(content: RecordDict, schema: dict[str, type]) -> dict[str, int | float]:
    """The scalars of a reply, if they are exactly one MetricRecord "metrics" (see `checked_scalars`)."""
    if list(content.metric_records) != ["metrics"] or content.config_records:
        raise ReplyRejected(f"expected one MetricRecord 'metrics', got {sorted(content.metric_records)} and configs {sorted(content.config_records)}")
    return checked_scalars(content.metric_records["metrics"], schema)


def checked_scalars(raw: Mapping[str, Any], schema: dict[str, type]) -> dict[str, int | float]:
    """`raw` if its keys are known, the required ones present, and every value a finite number of the
    schema's type (counts and ids non-negative whole numbers), with those types restored."""
    unknown, missing = sorted(set(raw) - set(schema)), [k for k in REQUIRED_METRICS if k not in raw]
    if unknown or missing:
        raise ReplyRejected(f"metrics: unknown keys {unknown[:3]}, missing {missing}")
    clean: dict[str, int | float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ReplyRejected(f"metric {key} = {value!r} is not a finite number")
        if schema[key] is int and (value < 0 or value != int(value)):
            raise ReplyRejected(f"metric {key} = {value!r} is not a non-negative whole number")
        clean[key] = schema[key](value)
    return clean


def merchant_key(metrics: Mapping[str, Any], node: int) -> str:
    """The key a merchant's replies are filed under: its partition id ("3") when it sends one, else its
    node id ("node-81723"), in separate namespaces so one can never be taken for the other."""
    return str(metrics["partition-id"]) if "partition-id" in metrics else f"node-{node}"


def weighted_means(rows: Sequence[Mapping[str, float]], weights: Sequence[float], keys: Iterable[str]) -> dict[str, float]:
    """Per key, the weighted mean over the rows that have it."""
    means = {}
    for key in keys:
        pairs = [(row[key], w) for row, w in zip(rows, weights, strict=True) if key in row]
        if pairs and (total := sum(w for _, w in pairs)) > 0:
            means[key] = sum(v * w for v, w in pairs) / total
    return means


def new_round(server_round: int) -> dict[str, Any]:
    return {"round": server_round, "merchants": {}, "rejected": [], "failures": [], "late": [], "accepted": 0}


def record_evaluation(record: dict[str, Any], metrics: Mapping[str, Any], node: int) -> None:
    """Files a merchant's holdout metrics beside its training reply in the round record."""
    record["merchants"].setdefault(merchant_key(metrics, node), {}).update({f"eval-{k}": v for k, v in metrics.items()})


def guard_options(cfg: Config, expected: dict[str, tuple[int, ...]], history: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The keyword arguments `GuardedAggregation` takes, from the federation config.

    The aggregate's norm is checked against the bound too where the strategy returns a weighted
    mean of the accepted adapters (then it cannot exceed the largest accepted update unless
    something upstream went wrong); noised (client-level DP), server-optimiser (FedAdam) and
    coordinate-wise (FedMedian) aggregates are checked for finiteness only.
    """
    fed = cfg.federation
    mean_like = fed.client_dp == "off" and fed.strategy in ("fedavg", "fedprox", "fedtrimmedavg")
    return {"expected": expected, "max_update_norm": fed.max_update_norm, "min_replies": fed.min_replies, "history": history,
            "equal_weights": fed.weighting == "equal", "bound_aggregate": mean_like}


class GuardedAggregation:
    """Mixin: validate and rebuild replies, then hand the accepted ones to the wrapped strategy.

    `history` is the list of round records so far (a resumed run's, from its checkpoint); rounds
    count on from its length.
    """

    def __init__(self, *args: Any, expected: dict[str, tuple[int, ...]], max_update_norm: float, min_replies: int,
                 history: list[dict[str, Any]] | None = None, equal_weights: bool = True, bound_aggregate: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected, self.max_update_norm, self.min_replies = expected, max_update_norm, min_replies
        self.equal_weights, self.bound_aggregate = equal_weights, bound_aggregate
        self.history = history if history is not None else []
        self.round_offset = len(self.history)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        self._started = time.time()
        self._current = new_round(server_round + self.round_offset)
        config[FEDERATION_ROUND] = self._current["round"]  # Flower's server-round restarts at 1 when a run resumes
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._current["asked"] = [m.metadata.dst_node_id for m in messages]
        return messages

    def _checked_train_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
        update, metrics = checked_arrays(msg.content, self.expected), checked_metrics(msg.content, TRAIN_METRICS)
        if (reason := update_rejection(update, self.expected, self._global, self.max_update_norm)) is not None:
            raise ReplyRejected(reason)
        key = merchant_key(metrics, msg.metadata.src_node_id)
        if key in self._current["merchants"]:
            raise ReplyRejected(f"merchant key {key} already replied this round (node {self._current['merchants'][key]['node']})")
        return update, metrics

    def _reject(self, server_round: int, msg: Message, reason: str) -> None:
        """Records why a reply was left out, with the DP steps and ε it says it spent for nothing, where it says so validly."""
        node = msg.metadata.src_node_id
        log.warning("round %d: reply from node %d rejected: %s", server_round, node, reason)
        try:
            spent = {k: v for k, v in checked_metrics(msg.content, TRAIN_METRICS).items() if k in ("steps", "epsilon")}
        except ReplyRejected:
            spent = {}
        self._current["rejected"].append({"node": node, "reason": reason, **spent})

    def _record_late(self, server_round: int, replies: list[Message]) -> None:
        """Merchants asked this round whose reply did not arrive before the round's timeout: Flower drops
        them silently; they are named here, since each may have spent privacy budget on work not used."""
        received = {m.metadata.src_node_id for m in replies}
        late = [node for node in self._current.get("asked", []) if node not in received]
        self._current["late"] = late
        if late:
            log.warning("round %d: %d of %d merchants asked sent no reply in time: %s", server_round, len(late),
                        len(self._current["asked"]), late[:10])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record_late(server_round, replies)
        accepted: dict[str, tuple[Message, dict[str, int | float], float]] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: node %d failed or declined: %s", server_round, node, msg.error.reason)
                self._current["failures"].append({"node": node, "code": msg.error.code, "reason": msg.error.reason})
                continue
            try:
                update, metrics = self._checked_train_reply(msg)
            except ReplyRejected as exc:
                self._reject(server_round, msg, str(exc))
                continue
            weight = 1.0 if self.equal_weights else float(metrics["num-examples"])
            msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in update.items()}), "metrics": MetricRecord({WEIGHT: weight})})
            key = merchant_key(metrics, node)
            self._current["merchants"][key] = {"node": node, **metrics}
            accepted[key] = (msg, metrics, weight)
        # summed in the merchants' order, not in the order they answered: the same replies give the same mean, bit for bit
        ordered = [accepted[key] for key in sorted(accepted)]
        messages, rows, weights = [m for m, _, _ in ordered], [r for _, r, _ in ordered], [w for _, _, w in ordered]
        self._current["accepted"] = len(messages)
        self._current["wall_s"] = time.time() - self._started
        self.history.append(self._current)
        if len(messages) < self.min_replies or sum(weights) <= 0:
            log.warning("round %d: %d valid replies < min_replies %d; global adapter unchanged", server_round, len(messages), self.min_replies)
            return None, None
        # the run's round, not this start's: FedAdam corrects its moments' bias by it
        arrays, aggregated = super().aggregate_train(server_round + self.round_offset, messages)
        if arrays is not None and (reason := self._aggregate_rejection(arrays)) is not None:
            log.warning("round %d: aggregate rejected, global adapter unchanged: %s", server_round, reason)
            self._current["rejected"].append({"node": None, "reason": f"aggregate: {reason}"})
            return None, None
        self._current["aggregated"] = weighted_means(rows, weights, ("train-loss", "steps", "bytes-sent", "epsilon", "delta"))
        return arrays, aggregated

    def _aggregate_rejection(self, arrays: ArrayRecord) -> str | None:
        aggregate = {k: np.asarray(v.numpy()) for k, v in arrays.items()}
        bound = self.max_update_norm if self.bound_aggregate else math.inf
        return update_rejection(aggregate, self.expected, self._global, bound)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Holdout metrics per merchant into the round record, and their means weighted by the series each evaluated."""
        record, rows = self.history[-1], []
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            try:
                metrics = checked_metrics(msg.content, EVALUATE_METRICS)
                owner = record["merchants"].get(merchant_key(metrics, node), {}).get("node", node)
                if owner != node:
                    raise ReplyRejected(f"merchant key {merchant_key(metrics, node)} belongs to node {owner}")
            except ReplyRejected as exc:
                log.warning("round %d: evaluation from node %d rejected: %s", server_round, node, exc)
                record["rejected"].append({"node": node, "reason": f"evaluation: {exc}"})
                continue
            record_evaluation(record, metrics, node)
            rows.append(metrics)
        if not rows:
            return None
        means = weighted_means(rows, [row["num-examples"] for row in rows], ("mase", "wql", "coverage-80"))
        record.setdefault("aggregated", {}).update({f"eval-{k}": v for k, v in means.items()})
        return MetricRecord(means)
