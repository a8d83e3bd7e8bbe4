"""Where a merchant's table comes from: the configured source, narrowed to the merchants asked for.

The local CLI, the federated client, the benchmarks and the simulation all read data here, so a
table is read and validated one way only, and a simulation partition always maps to the same merchant.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from shared.config import Config, ConfigError
from shared.presets import load_preset
from shared.schema import SeriesTable, prepare, read_table
from shared.synthetic import generate_merchants


def raw_frame(cfg: Config) -> tuple[pd.DataFrame, str]:
    """cfg.data.source's frame as written, before validation, and what to call it in errors."""
    data = cfg.data
    if data.source == "synthetic":
        s = data.synthetic
        return generate_merchants(s.n_merchants, s.n_days, s.seed), "synthetic"
    if data.source == "file":
        if not data.path:
            raise ConfigError('[data] source = "file" needs [data] path (a CSV or Parquet file)')
        return read_table(data.path, data), data.path
    return load_preset(data.source, data), data.source  # a preset; config validation has restricted the choices


def load_table(cfg: Config) -> SeriesTable:
    """The validated table of cfg.data.source, narrowed to cfg.data.merchants when that is set."""
    data = cfg.data
    frame, source = raw_frame(cfg)
    table = prepare(frame, data, source)
    if data.merchants:
        table = select_merchants(table, data.merchants)
    return table


def select_merchants(table: SeriesTable, merchants: Sequence[str]) -> SeriesTable:
    """The rows of `merchants` only; an id the table lacks is an error listing the ones it has."""
    available = table.merchants()
    unknown = [m for m in merchants if m not in available]
    if unknown:
        raise ConfigError(f"unknown merchant(s) {unknown}; the data has {available}")
    return table.for_merchants(merchants)


def one_merchant(table: SeriesTable, merchant: str | None) -> tuple[str, SeriesTable]:
    """The named merchant's rows; without a name the table must hold exactly one merchant."""
    if merchant is None:
        if len(table.merchants()) != 1:
            raise ConfigError(f"name the merchant (--merchant, or merchant=... in a SuperNode's node config); "
                              f"the data has {table.merchants()}")
        merchant = table.merchants()[0]
    return merchant, select_merchants(table, [merchant])


def merchant_of_partition(merchants: Sequence[str], partition_id: int | str) -> str:
    """The merchant a simulation partition (a SuperNode's `partition-id`, or the key the server files
    its reply under) stands for: the i-th merchant of the table in sorted order."""
    index = int(partition_id)
    if not 0 <= index < len(merchants):
        raise ConfigError(f"partition-id {index} but the data has {len(merchants)} merchants")
    return merchants[index]
