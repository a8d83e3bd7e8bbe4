"""The embedded default data: a seeded generator of shops that behave like real ones.

No data file ships with shopcast, so the demo, the tests and the benchmarks run anywhere. Every effect
a forecaster should learn is put in on purpose and strongly enough to be measured: weekly and yearly
seasonality, trend, promotions, holidays on which some shops close and others spike, intermittent
products, scales from a few units a day to hundreds, and merchants that joined late (short history).
Sales are visits x conversion, so the observed `visits` covariate carries real signal; `open` is 0 on
the days a shop closes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from dateutil.easter import easter

from shared.schema import DS, ID, MERCHANT, Y

# Relative demand Monday..Sunday; each merchant takes one shape and perturbs it.
WEEKLY_SHAPES = np.array([
    [0.8, 0.8, 0.9, 1.0, 1.2, 1.6, 1.4],  # high street: Saturday peak
    [1.2, 1.2, 1.2, 1.1, 1.0, 0.6, 0.4],  # trade supplies: weekday orders
    [1.1, 0.9, 0.9, 1.0, 1.0, 0.9, 1.3],  # web shop: Sunday-evening browsing
])


def holidays(ds: pd.DatetimeIndex) -> tuple[np.ndarray, np.ndarray]:
    """(holiday, closing) flags. Black Friday is a holiday no shop closes for, so it is not closing."""
    closing, shopping = [], []
    for year in range(ds[0].year, ds[-1].year + 1):
        sunday = pd.Timestamp(easter(year))
        closing += [pd.Timestamp(year, 1, 1), sunday - pd.Timedelta(days=2), sunday + pd.Timedelta(days=1),
                    pd.Timestamp(year, 12, 25), pd.Timestamp(year, 12, 26)]
        shopping.append(pd.Timestamp(year, 11, 23 + (3 - pd.Timestamp(year, 11, 1).weekday()) % 7))
    is_closing = ds.isin(closing)
    return is_closing | ds.isin(shopping), is_closing


def _merchant(rng: np.random.Generator, merchant: str, ds: pd.DatetimeIndex, level: float, closes: bool, short: bool) -> pd.DataFrame:
    n_days = len(ds)
    years = np.arange(n_days) / 365.25
    holiday, closing = holidays(ds)
    closed = closing & closes

    weekly = WEEKLY_SHAPES[rng.integers(len(WEEKLY_SHAPES))] * rng.lognormal(0.0, 0.08, 7)
    yearly = 1.0 + rng.uniform(0.1, 0.35) * np.cos(2 * np.pi * (ds.dayofyear.to_numpy() / 365.25 - rng.uniform()))
    trend = np.exp(rng.normal(0.1, 0.25) * years)
    on_holiday = np.where(closed, 0.1, np.where(holiday, rng.uniform(1.6, 3.0), 1.0))  # closed shops keep some web traffic

    n_products = int(rng.integers(16, 33))  # enough series for series-level DP sampling to amplify privacy
    base = level * rng.lognormal(0.0, 0.6, n_products)
    n_sparse = int(rng.integers(1, 3))
    base[:n_sparse] = rng.uniform(0.1, 0.6, n_sparse)  # intermittent: mostly zero days
    rng.shuffle(base)
    conversion = rng.uniform(0.02, 0.06)
    visits = base.sum() / conversion * weekly[ds.dayofweek] * yearly * trend * on_holiday * rng.lognormal(0.0, 0.1, n_days)
    visits = np.round(visits)

    promo = np.zeros((n_products, n_days))
    for product in range(n_products):
        for start in rng.integers(0, n_days, rng.poisson(n_days / 40)):
            promo[product, start : start + rng.integers(3, 11)] = 1.0
    uplift = 1.0 + (rng.uniform(1.5, 3.0, (n_products, 1)) - 1.0) * promo
    lifecycle = np.exp(rng.normal(0.0, 0.2, (n_products, 1)) * years)
    rate = visits * conversion * (base / base.sum())[:, None] * lifecycle * uplift * ~closed
    dispersion = np.broadcast_to(rng.uniform(3.0, 20.0, (n_products, 1)), rate.shape)
    sales = rng.negative_binomial(dispersion, dispersion / (dispersion + rate)).astype(float)

    first = n_days - min(n_days, int(rng.integers(150, 221))) if short else 0
    days = ds[first:]
    return pd.DataFrame({
        MERCHANT: merchant,
        ID: np.repeat([f"{merchant}/p{p:02d}" for p in range(n_products)], len(days)),
        DS: np.tile(days.to_numpy(), n_products),
        Y: sales[:, first:].ravel(),
        "promo": promo[:, first:].ravel(),
        "holiday": np.tile(holiday[first:].astype(float), n_products),
        "open": np.tile((~closed[first:]).astype(float), n_products),
        "visits": np.tile(visits[first:], n_products),
    })


def generate_merchants(n_merchants: int = 6, n_days: int = 540, seed: int = 0, start: str = "2023-01-02") -> pd.DataFrame:
    """Long frame of `n_merchants` shops over `n_days` days ending on the same date; a seed fixes it exactly."""
    rng = np.random.default_rng(seed)
    ds = pd.date_range(start, periods=n_days, freq="D")
    levels = np.geomspace(2.0, 300.0, n_merchants) * rng.lognormal(0.0, 0.15, n_merchants)
    rng.shuffle(levels)
    closes = rng.permutation(n_merchants) % 2 == 0  # half are high-street shops that close on holidays
    short = np.isin(np.arange(n_merchants), rng.choice(n_merchants, n_merchants // 3, replace=False))
    frames = [_merchant(rng, f"shop_{m:02d}", ds, levels[m], closes[m], short[m]) for m in range(n_merchants)]
    return pd.concat(frames, ignore_index=True)
