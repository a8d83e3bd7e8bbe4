"""How a run's config reaches the Flower apps: the one place that hands it over and reads it back.

Deployed (`flwr run`), the run config names a config file ([tool.flwr.app.config] config) that every
party reads from its own app bundle. Simulated, the engine's Python API passes the apps no run config,
so the driver hands the whole config over as JSON in the environment, which the engine's worker
processes inherit. Every message of a run carries the same hand-off, so a worker parses it once and
keeps the Config, rather than reading files and validating again per message.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.config import PROJECT_ROOT, Config, load_config, with_overrides

RUN_ENV = "SHOPCAST_RUN"  # the simulated run's whole config, as JSON


def config_payload(cfg: Config) -> str:
    """`cfg` as the JSON text a worker rebuilds it from (`run_config`)."""
    return json.dumps(dataclasses.asdict(cfg))


@contextmanager
def handed_over(cfg: Config) -> Iterator[None]:
    """`cfg` in the environment while a simulation runs; afterwards the environment is as it was, so
    later code in this process does not inherit this run's config."""
    saved = os.environ.get(RUN_ENV)
    os.environ[RUN_ENV] = config_payload(cfg)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(RUN_ENV, None)
        else:
            os.environ[RUN_ENV] = saved


def run_config(run_config: Mapping[str, Any]) -> Config:
    """The config a Flower app runs with: a simulation's handed-over config, else the file that the
    run config's `config` names (relative to the app bundle), else the defaults."""
    path = run_config.get("config")
    return _parsed(os.environ.get(RUN_ENV), None if path is None else str(path))


@lru_cache(maxsize=4)
def _parsed(payload: str | None, path: str | None) -> Config:
    if payload:
        return with_overrides(load_config(), json.loads(payload))
    return load_config(PROJECT_ROOT / path if path and not Path(path).is_absolute() else path or None)
