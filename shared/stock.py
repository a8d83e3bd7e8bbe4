"""How much to have on hand: an order-up-to level and a safety stock per series from its quantile forecast.

A simple, documented policy, not an optimiser. Over the `lead_time` steps the stock must last (the
supplier's lead time, plus the time to the next order if orders are placed on fixed days):
- lead-time demand = the sum of the daily medians;
- order-up-to level = the sum of the daily quantiles at the service level;
- safety stock = order-up-to level - lead-time demand.
Summing daily quantiles gives the lead-time quantile only if the days' demands move perfectly
together; real days partly offset each other, so the true quantile of their sum is lower and this
level over-covers the service level: the conservative choice, at the price of some extra stock. A
service level between the model's levels is interpolated linearly; one above its highest level (0.95
by default) or below the median is refused rather than extrapolated. The order to place is then the
order-up-to level less the stock on hand and on order, which only the merchant knows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared.schema import DS, ID, MERCHANT, quantile_column

COLUMNS = [MERCHANT, ID, "from", "to", "lead_time", "service_level", "lead_time_demand", "order_up_to", "safety_stock"]


def quantile_at(quantiles: np.ndarray, levels: tuple[float, ...], level: float) -> np.ndarray:
    """The quantile at `level` of forecasts [..., Q], linear between the two model levels around it."""
    if not 0.5 <= level <= levels[-1]:
        raise ValueError(f"service level {level} must lie between 0.5 and the model's highest quantile {levels[-1]}")
    j = int(np.clip(np.searchsorted(levels, level), 1, len(levels) - 1))
    weight = (level - levels[j - 1]) / (levels[j] - levels[j - 1])
    return (1 - weight) * quantiles[..., j - 1] + weight * quantiles[..., j]


def stock_levels(forecast: pd.DataFrame, levels: tuple[float, ...], service_level: float, lead_time: int) -> pd.DataFrame:
    """One row per series from the first `lead_time` steps of a forecast frame (columns `COLUMNS`)."""
    head = forecast.sort_values([ID, DS]).groupby(ID, sort=True).head(lead_time)
    if head.groupby(ID).size().min() < lead_time:
        raise ValueError(f"lead time {lead_time} is longer than the forecast ({head.groupby(ID).size().min()} steps)")
    columns = [quantile_column(q) for q in levels]
    head = head.assign(_median=head[quantile_column(0.5)], _level=quantile_at(head[columns].to_numpy(dtype=float), levels, service_level))
    out = head.groupby([MERCHANT, ID], sort=True).agg(
        **{"from": (DS, "min"), "to": (DS, "max"), "lead_time_demand": ("_median", "sum"), "order_up_to": ("_level", "sum")}
    ).reset_index()
    out["safety_stock"] = out["order_up_to"] - out["lead_time_demand"]
    return out.assign(lead_time=lead_time, service_level=service_level)[COLUMNS]
