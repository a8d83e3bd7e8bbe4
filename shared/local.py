"""What every entry point does first: read the configured data and build a model sized for it.

The local CLI, the federated client, the server and the benchmarks all start here, so a merchant's
table is read and validated one way only, and the model's input width always agrees with the
windows `shared.windows.build_splits` cuts from that table. The server has no data: it sizes the
model from the config alone, which gives the same shape because `prepare` always emits exactly the
configured covariates (plus the negative-sales flag under negative = "flag").
"""

from __future__ import annotations

import pandas as pd

from shared.config import Config, ConfigError
from shared.model import Forecaster, SeriesShape
from shared.presets import load_preset
from shared.schema import MERCHANT, SeriesTable, load_file, prepare
from shared.synthetic import generate_merchants
from shared.train import resolve_device
from shared.windows import calendar_features


def load_table(cfg: Config) -> SeriesTable:
    """The validated table of cfg.data.source, narrowed to cfg.data.merchants when that is set."""
    data = cfg.data
    if data.source == "synthetic":
        s = data.synthetic
        table = prepare(generate_merchants(s.n_merchants, s.n_days, s.seed), data, "synthetic")
    elif data.source == "file":
        if not data.path:
            raise ConfigError('[data] source = "file" needs [data] path (a CSV or Parquet file)')
        table = load_file(data.path, data)
    else:  # a preset; config validation has already restricted the choices
        table = prepare(load_preset(data.source, data), data, data.source)
    if data.merchants:
        table = select_merchants(table, data.merchants)
    return table


def select_merchants(table: SeriesTable, merchants: tuple[str, ...] | list[str]) -> SeriesTable:
    """The rows of `merchants` only; an id the table lacks is an error listing the ones it has."""
    available = table.merchants()
    unknown = [m for m in merchants if m not in available]
    if unknown:
        raise ConfigError(f"unknown merchant(s) {unknown}; the data has {available}")
    frame = table.frame[table.frame[MERCHANT].isin(merchants)].reset_index(drop=True)
    return SeriesTable(frame, table.known, table.observed, table.freq)


def _shape(cfg: Config, freq: str, n_known_covariates: int, n_observed: int) -> SeriesShape:
    n_calendar = calendar_features(pd.date_range("2020-01-06", periods=2, freq=freq), freq).shape[1]
    return SeriesShape(cfg.data.context, cfg.data.horizon, n_known=n_calendar + n_known_covariates, n_observed=n_observed)


def shape_for(table: SeriesTable, cfg: Config) -> SeriesShape:
    """The model's input sizes: calendar features of the table's frequency plus its covariates."""
    return _shape(cfg, table.freq, len(table.known), len(table.observed))


def config_shape(cfg: Config) -> SeriesShape:
    """The shape `shape_for` gives for any table `prepare` makes under cfg, without reading data."""
    data = cfg.data
    if data.freq == "auto":
        raise ConfigError('[data] freq = "auto" is decided by the data; set it (e.g. "D", "W-FRI") to size the model without data')
    return _shape(cfg, data.freq, len(data.columns.known), len(data.columns.observed) + (1 if data.negative == "flag" else 0))


def build_model(cfg: Config, table: SeriesTable | None = None) -> Forecaster:
    """The seeded forecaster of cfg on cfg.train.device, sized for `table` (else from cfg alone).

    Every caller gets the same initial adapter for the same config, which federation relies on.
    """
    shape = shape_for(table, cfg) if table is not None else config_shape(cfg)
    return Forecaster(cfg.model, shape, device=resolve_device(cfg.train.device))
