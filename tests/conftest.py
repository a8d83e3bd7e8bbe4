"""Shared fixtures: a tiny-backbone config, a small synthetic table and tiny forecasters built from it.

Everything expensive is session scoped; tests that train get their own model from `make_forecaster`
so no test depends on what another one did to a shared model.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch

from shared.config import Config, load_config
from shared.model import Forecaster
from shared.pipeline import ForecastPipeline
from shared.schema import SeriesTable, prepare
from shared.synthetic import generate_merchants
from shared.windows import Splits

TINY = {"model.backbone": "tiny", "model.llm_layers": 2}


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tiny models are a few kB of matmuls: a second thread only adds contention on a 2-core runner
    (measured: ~30 ms a training step with one thread, up to 1 s with two when another process is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides: Any) -> Config:
    """The default config on the tiny random Llama (2 blocks), with dotted overrides on top."""
    return load_config(overrides={**TINY, **overrides})


def build_forecaster(cfg: Config, table: SeriesTable) -> tuple[Forecaster, Splits]:
    pipeline = ForecastPipeline.from_config(cfg, table)
    return pipeline.model, pipeline.splits(table)


def seasonal_frame(n_series: int = 3, n_days: int = 300, noise: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """Clean weekly-seasonal series y = 10 + 5 sin(2 pi t / 7) + N(0, noise), in the long schema."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_days)
    dates = pd.date_range("2023-01-02", periods=n_days, freq="D")
    pieces = [
        pd.DataFrame({
            "merchant_id": "m", "unique_id": f"s{i}", "ds": dates,
            "y": 10 + 5 * np.sin(2 * np.pi * (t + 2 * i) / 7) + rng.normal(0, noise, n_days),
        })
        for i in range(n_series)
    ]
    return pd.concat(pieces, ignore_index=True)


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    return tiny_config()


@pytest.fixture(scope="session")
def synthetic_table(tiny_cfg) -> SeriesTable:
    """One synthetic merchant over 240 days with promo/holiday (known) and visits (observed)."""
    table = prepare(generate_merchants(n_merchants=2, n_days=240, seed=0), tiny_cfg.data, "synthetic")
    return table.for_merchant(table.merchants()[0])


@pytest.fixture(scope="session")
def make_forecaster(synthetic_table) -> Callable[..., tuple[Forecaster, Splits, Config]]:
    """Factory: make(table=None, **dotted_overrides) -> (fresh tiny forecaster, its splits, its config)."""

    def make(table: SeriesTable | None = None, **overrides: Any) -> tuple[Forecaster, Splits, Config]:
        cfg = tiny_config(**overrides)
        model, splits = build_forecaster(cfg, synthetic_table if table is None else table)
        return model, splits, cfg

    return make


@pytest.fixture(scope="module")
def tiny_model_and_splits(tiny_cfg, synthetic_table) -> tuple[Forecaster, Splits]:
    """One untrained tiny forecaster per test module; a test that changes it must put it back."""
    return build_forecaster(tiny_cfg, synthetic_table)


@pytest.fixture(scope="session")
def seasonal_cfg() -> Config:
    return tiny_config(**{"data.columns.promo": [], "data.columns.holiday": [], "data.columns.observed": [], "data.columns.open": ""})


@pytest.fixture(scope="session")
def seasonal_table(seasonal_cfg) -> SeriesTable:
    return prepare(seasonal_frame(), seasonal_cfg.data, "seasonal")
