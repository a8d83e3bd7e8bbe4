"""The aggregation strategy a config asks for: a Flower strategy behind the guard (server/guard.py),
optionally wrapped for client-level DP (server/client_dp.py); SecAgg+ is driven separately
(server/secagg.py)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from server.client_dp import DP_WEIGHT, check_privacy_options, make_client_dp_strategy
from server.guard import GuardedAggregation, guard_options
from shared.config import Config

_BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg}


def make_strategy(cfg: Config, expected: dict[str, tuple[int, ...]], history: list[dict[str, Any]] | None = None) -> FedAvg:
    fed = cfg.federation
    base = _BASES[fed.strategy]
    kwargs: dict[str, Any] = {"min_train_nodes": fed.min_replies, "min_evaluate_nodes": fed.min_replies,
                              "min_available_nodes": fed.min_replies}
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy == "fedadam":
        kwargs["eta"] = fed.server_lr
    elif fed.strategy == "fedtrimmedavg":
        kwargs["beta"] = fed.trim_beta
    check_privacy_options(cfg)
    guard = guard_options(cfg, expected, history)
    if fed.client_dp != "off":
        return make_client_dp_strategy(cfg, base(weighted_by_key=DP_WEIGHT, **kwargs), guard)
    return type(f"Guarded{base.__name__}", (GuardedAggregation, base), {})(**kwargs, **guard)
