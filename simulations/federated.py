"""Runs the real ServerApp and ClientApp through Flower's simulation engine on this machine."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from client.app import app as default_client_app
from server.app import app as server_app
from shared.config import Config


def round_timeout(cfg: Config, num_merchants: int) -> float:
    """The round timeout that fits the cohort on this machine: merchants run one per worker (one CPU
    each), so a round takes up to ceil(merchants / workers) merchants' time one after another, where
    deployed merchants, each on its own machine, would take one merchant's (round_timeout_s)."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cfg.federation.round_timeout_s * math.ceil(num_merchants / workers)


def simulate(
    cfg: Config, config_path: str | Path | None, overrides: dict[str, Any], num_merchants: int, client_app: ClientApp = default_client_app
) -> dict[str, Any]:
    """One federated run; returns the server's summary.json.

    The engine's Python API passes no run config to the apps, so the config travels in the
    environment, which the simulation's worker processes inherit.
    """
    saved = {k: os.environ.get(k) for k in ("SHOPCAST_CONFIG", "SHOPCAST_OVERRIDES")}
    os.environ["SHOPCAST_CONFIG"] = str(config_path or "")
    os.environ["SHOPCAST_OVERRIDES"] = json.dumps(overrides | {"federation.round_timeout_s": round_timeout(cfg, num_merchants)})
    gpus = 1.0 / num_merchants if torch.cuda.is_available() else 0.0
    try:
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=num_merchants,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": gpus}},
        )
    finally:  # later code in this process must not inherit this run's config
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return json.loads((Path(cfg.federation.out_dir) / "summary.json").read_text())
