"""The synthetic retail prior: many shops, unlike any one merchant, for pretraining the base adapter.

Chronos (KernelSynth) and TimesFM pretrain on synthetic series as well as real ones; a forecaster
that has seen thousands of shops needs few local steps, and few noisy ones under DP. The prior
starts from the embedded generator (shared.synthetic: weekly and yearly seasonality, trends,
promotions, holidays, closed days, intermittent products, visits) and adds what it lacks: level
shifts, dips after a promotion, stock-outs (zero sales on an open day), scales from single units to
10^5, series that start late, and what store-level data has: a weekday some shops always close,
shop-wide promotions on a fixed cycle, and the shop's total as a series of its own. Seeds are drawn
from a range the embedded data never uses, so the corpus never holds a benchmark's series. `weekly` sums
the days into weeks ending on Friday, as Walmart's data is.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared.schema import DS, ID, MERCHANT, Y
from shared.synthetic import generate_merchants

SEED_OFFSET = 1_000_000  # the embedded data and the tests use small seeds
STORE_SHARE = 0.4  # the share of shops given each store-level effect (a closing weekday, a promotion cycle, a total)
# How rows summed into one (a shop's total, a week) carry their flags: a promotion as the share of rows
# on it, a holiday or an open day if any row had it
COMBINED_FLAGS = {Y: (Y, "sum"), "promo": ("promo", "mean"), "holiday": ("holiday", "max"), "open": ("open", "max")}


def _store_rhythm(frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """A shop that may close on one weekday every week (Sunday trading laws) and may run shop-wide
    promotions on a fixed cycle (a leaflet every two to four weeks, every product on offer at once):
    then last week is a poor guide to this one, and only the open and promotion flags say why."""
    frame = frame.copy()
    day = frame[DS].dt.dayofweek.to_numpy()
    if rng.random() < STORE_SHARE:
        shut = day == 6 if rng.random() < 0.8 else day == rng.integers(0, 6)
        frame.loc[shut, Y] = 0.0
        frame.loc[shut, "open"] = 0.0
        frame.loc[shut, "visits"] = np.round(frame.loc[shut, "visits"] * 0.1)  # the web shop still takes visits
    if rng.random() < STORE_SHARE:
        period, length = int(rng.choice([14, 21, 28])), int(rng.integers(3, 8))
        elapsed = (frame[DS] - frame[DS].min()).dt.days.to_numpy()
        on = ((elapsed + rng.integers(0, period)) % period < length) & (frame["open"].to_numpy() > 0)
        lifted = on & (frame["promo"].to_numpy() == 0)  # a product already on its own promotion keeps its own lift
        frame.loc[lifted, Y] = np.round(frame.loc[lifted, Y] * rng.uniform(1.2, 2.0))
        frame.loc[on, "promo"] = 1.0
    return frame


def _with_total(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """The shop's products plus their daily total as one more series (the share of products on
    promotion as its promo flag): a store-level series, far smoother than any one product."""
    total = frame.groupby(DS, sort=True).agg(**COMBINED_FLAGS, visits=("visits", "first")).reset_index()  # visits are the shop's
    return pd.concat([frame, total.assign(**{MERCHANT: name, ID: f"{name}/total"})], ignore_index=True)


def _retail_effects(frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Per series: a scale, maybe a level shift, dips after promotions and stock-outs, in place of `frame`'s y."""
    out = []
    scale = 10 ** rng.uniform(-0.5, 3.0)  # one shop's size: ~0.3x to 1000x the generator's
    for _, series in frame.groupby(ID, sort=False):
        y = series[Y].to_numpy(dtype=float) * scale
        n = len(y)
        if rng.random() < 0.3:  # a new range, a competitor, a lost listing
            y[rng.integers(n // 4, n):] *= rng.lognormal(0.0, 0.4)
        promo = series["promo"].to_numpy()
        ends = np.flatnonzero((promo[:-1] == 1) & (promo[1:] == 0)) + 1
        dip = rng.uniform(0.6, 0.95)
        for end in ends:  # customers bought ahead
            y[end : end + rng.integers(2, 8)] *= dip
        for start in rng.integers(0, n, rng.poisson(n / 200)):  # sold out: open, but nothing to sell
            y[start : start + rng.integers(1, 10)] = 0.0
        out.append(np.round(y) if scale * y.mean() >= 5 else np.round(y, 2))
    return frame.assign(**{Y: np.concatenate(out)})


def _weekly(frame: pd.DataFrame) -> pd.DataFrame:
    """Days summed into weeks ending on Friday; a week is open if any of its days was, a flag is the
    share of its days it was on; visits are summed."""
    weeks = frame.assign(week=frame[DS] + pd.to_timedelta((4 - frame[DS].dt.dayofweek) % 7, unit="D"))
    grouped = weeks.groupby([MERCHANT, ID, "week"], sort=True)
    out = grouped.agg(**COMBINED_FLAGS, visits=("visits", "sum"), days=(DS, "size")).reset_index()
    return out[out["days"] == 7].drop(columns="days").rename(columns={"week": DS})  # whole weeks only


def retail_prior(n_shops: int, seed: int = 0, weekly: bool = False) -> pd.DataFrame:
    """`n_shops` synthetic shops in the embedded schema (promo, holiday, open, visits), of varied
    lengths and start dates; merchant ids are prior_<k>."""
    rng = np.random.default_rng(SEED_OFFSET + seed)
    frames = []
    for k in range(n_shops):
        n_days = int(rng.integers(300, 1100))
        start = pd.Timestamp("2015-01-05") + pd.Timedelta(days=int(rng.integers(0, 2500)))
        shop = generate_merchants(1, n_days, int(rng.integers(SEED_OFFSET, 2 * SEED_OFFSET)), start=str(start.date()))
        shop = _retail_effects(_store_rhythm(shop, rng), rng)
        name = f"prior_{k:05d}"
        shop[MERCHANT] = name
        shop[ID] = name + "/" + shop[ID].str.split("/").str[-1]
        if rng.random() < STORE_SHARE:
            shop = _with_total(shop, name)
        frames.append(_weekly(shop) if weekly else shop)
    return pd.concat(frames, ignore_index=True)
