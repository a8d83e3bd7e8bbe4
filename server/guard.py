"""The guard in front of every aggregation: nothing malformed, non-finite or outsized is averaged in.

`GuardedAggregation` sits before any Flower strategy in the class order, checks every reply
against the adapter's expected keys and shapes and the update-norm bound, and keeps the per-round,
per-merchant record (loss, ε, bytes, holdout metrics) that checkpoints and the report read. The
helpers below are the same checks and records for the SecAgg+ path (server/secagg.py), which sees
only the mean, and for client-level DP's clip check (server/client_dp.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from shared.adapter import AdapterMismatch, check_update
from shared.config import Config

log = logging.getLogger(__name__)


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


def merchant_key(metrics: Mapping[str, Any], node: int) -> str:
    """The key a merchant's replies are filed under: its partition id when it sends one, else its node id."""
    return str(int(metrics.get("partition-id", node)))


def new_round(server_round: int) -> dict[str, Any]:
    return {"round": server_round, "merchants": {}, "rejected": [], "failures": [], "accepted": 0}


def record_evaluation(record: dict[str, Any], metrics: Mapping[str, Any], node: int) -> None:
    """Files a merchant's holdout metrics beside its training reply in the round record."""
    record["merchants"].setdefault(merchant_key(metrics, node), {}).update({f"eval-{k}": v for k, v in metrics.items()})


def guard_options(cfg: Config, expected: dict[str, tuple[int, ...]], history: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The keyword arguments `GuardedAggregation` takes, from the federation config."""
    fed = cfg.federation
    return {"expected": expected, "max_update_norm": fed.max_update_norm, "min_replies": fed.min_replies, "history": history}


class GuardedAggregation:
    """Mixin: validate replies, then hand the accepted ones to the wrapped strategy.

    `history` is the list of round records so far (a resumed run's, from its checkpoint); rounds
    count on from its length.
    """

    def __init__(self, *args: Any, expected: dict[str, tuple[int, ...]], max_update_norm: float, min_replies: int,
                 history: list[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected, self.max_update_norm, self.min_replies = expected, max_update_norm, min_replies
        self.history = history if history is not None else []
        self.round_offset = len(self.history)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        self._started = time.time()
        self._current = new_round(server_round + self.round_offset)
        return super().configure_train(server_round, arrays, config, grid)

    def rejection(self, msg: Message) -> str | None:
        """Why a reply must not be averaged in, or None if it may."""
        if "arrays" not in msg.content:
            return "no adapter in reply"
        update = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        return update_rejection(update, self.expected, self._global, self.max_update_norm)

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
            self._current["merchants"][merchant_key(metrics, node)] = {"node": node, **metrics}
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
            record_evaluation(self.history[-1], dict(msg.content["metrics"]), msg.metadata.src_node_id)
        aggregated = super().aggregate_evaluate(server_round, replies) if replies else None
        self.history[-1].setdefault("aggregated", {}).update({f"eval-{k}": v for k, v in (aggregated or {}).items()})
        return aggregated
