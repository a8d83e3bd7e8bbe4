"""What every entry point does first: read the configured data and size the model for it.

The local CLI, the federated client and the benchmarks all start from the same two calls, so a
merchant's table is read and validated one way only, and the model's input width always agrees with
the windows `shared.windows.build_splits` cuts from that table.
"""

from __future__ import annotations

import pandas as pd

from shared.config import Config, ConfigError
from shared.model import SeriesShape
from shared.presets import load_preset
from shared.schema import MERCHANT, SeriesTable, load_file, prepare
from shared.synthetic import generate_merchants
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


def shape_for(table: SeriesTable, cfg: Config) -> SeriesShape:
    """The model's input sizes: calendar features of the table's frequency plus its covariates."""
    n_calendar = calendar_features(pd.date_range("2020-01-06", periods=2, freq=table.freq), table.freq).shape[1]
    return SeriesShape(cfg.data.context, cfg.data.horizon, n_known=n_calendar + len(table.known), n_observed=len(table.observed))
