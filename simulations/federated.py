"""Runs the real ServerApp and ClientApp through Flower's simulation engine on this machine."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from client.app import app as default_client_app
from server.app import app as server_app
from shared.config import Config, with_overrides
from shared.handoff import handed_over


@dataclass(frozen=True)
class FederatedRun:
    """What one federation leaves: the server's summary.json and the folder of its final adapter."""

    summary: dict[str, Any]
    adapter_dir: Path  # load it with ForecastPipeline.load or from_adapter


def round_timeout(cfg: Config, num_merchants: int) -> float:
    """The round timeout that fits the cohort on this machine: merchants run one per worker (one CPU
    each), so a round takes up to ceil(merchants / workers) merchants' time one after another, where
    deployed merchants, each on its own machine, would take one merchant's (round_timeout_s)."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cfg.federation.round_timeout_s * math.ceil(num_merchants / workers)


def federate(cfg: Config, num_merchants: int, client_app: ClientApp = default_client_app) -> FederatedRun:
    """One federated run of `num_merchants` simulated merchants under `cfg` (results in
    cfg.federation.out_dir); the apps get `cfg` through shared.handoff."""
    run_cfg = with_overrides(cfg, {"federation.round_timeout_s": round_timeout(cfg, num_merchants)})
    gpus = 1.0 / num_merchants if torch.cuda.is_available() else 0.0
    with handed_over(run_cfg):
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=num_merchants,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": gpus}},
        )
    out = Path(cfg.federation.out_dir)
    return FederatedRun(json.loads((out / "summary.json").read_text()), out / "final_adapter")
