"""The guard in front of every aggregation: nothing malformed, non-finite or outsized is averaged in.

`GuardedAggregation` sits before any Flower strategy in the class order, checks every reply
against the adapter's expected keys and shapes and the update-norm bound, and keeps the per-round,
per-merchant record (loss, ε, bytes, holdout metrics) that checkpoints and the report read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from shared.adapter import AdapterMismatch, check_update

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
