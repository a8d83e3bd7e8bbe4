"""The embedded shops must carry every effect the forecaster is meant to learn, measurably."""

import numpy as np
import pandas as pd
import pytest

from shared.config import load_config
from shared.schema import ROLE_CHANNELS, prepare
from shared.synthetic import generate_merchants, holidays

COLUMNS = ["merchant_id", "unique_id", "ds", "y", "promo", "holiday", "open", "visits"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate_merchants()


def test_columns_dtypes_and_grid(frame):
    assert list(frame.columns) == COLUMNS
    assert frame["ds"].dtype == "datetime64[ns]"
    assert all(frame[c].dtype == np.float64 for c in ["y", "promo", "holiday", "open", "visits"])
    assert (frame["y"] >= 0).all() and (frame["y"] == frame["y"].round()).all()
    assert set(frame["promo"].unique()) == {0.0, 1.0} and set(frame["holiday"].unique()) == {0.0, 1.0}
    assert frame.groupby("unique_id")["merchant_id"].nunique().eq(1).all()
    assert frame.groupby("unique_id")["ds"].apply(lambda ds: ds.diff().dropna().eq(pd.Timedelta(days=1)).all()).all()
    assert frame.groupby("merchant_id")["unique_id"].nunique().between(16, 32).all()
    per_day = frame.groupby(["merchant_id", "ds"])[["holiday", "visits"]].nunique()
    assert (per_day == 1).all().all()  # merchant-level covariates, the same for all its products


def test_deterministic_per_seed(frame):
    pd.testing.assert_frame_equal(frame, generate_merchants())
    assert not frame.equals(generate_merchants(seed=1))


def test_size_and_start_arguments_are_honoured():
    frame = generate_merchants(n_merchants=3, n_days=300, start="2024-02-01")
    assert sorted(frame["merchant_id"].unique()) == ["shop_00", "shop_01", "shop_02"]
    days = frame.groupby("merchant_id")["ds"].agg(["min", "max", "nunique"])
    assert (days["max"] == pd.Timestamp("2024-02-01") + pd.Timedelta(days=299)).all()
    full = days[days["nunique"] == 300]
    assert len(full) == 2 and (full["min"] == pd.Timestamp("2024-02-01")).all()  # n_merchants // 3 = 1 joins late


def test_promotions_lift_demand(frame):
    assert frame.loc[frame["promo"] == 1, "y"].mean() > 1.3 * frame.loc[frame["promo"] == 0, "y"].mean()


def test_holidays_close_some_shops_and_lift_others(frame):
    ratio = frame.groupby("merchant_id").apply(
        lambda m: m.loc[m["holiday"] == 1, "y"].mean() / m.loc[m["holiday"] == 0, "y"].mean(), include_groups=False
    )
    assert ratio.min() < 0.5 and ratio.max() > 1.3
    christmas = frame[frame["ds"] == "2023-12-25"].groupby("merchant_id")[["y", "open"]].sum()
    assert (christmas["y"] == 0).any() and (christmas["open"] == 0).any() and (christmas["open"] > 0).any()
    assert (frame.loc[frame["open"] == 0, "y"] == 0).all(), "a closed shop sells nothing"


def test_holiday_calendar():
    ds = pd.date_range("2024-01-01", "2024-12-31")
    holiday, closing = holidays(ds)
    named = set(ds[holiday].strftime("%m-%d"))
    assert {"01-01", "03-29", "04-01", "11-29", "12-25", "12-26"} == named  # Good Friday, Easter Monday, Black Friday
    assert not closing[ds == "2024-11-29"].any()


def test_intermittent_products_and_scale_spread(frame):
    zeros = frame.groupby("unique_id")["y"].apply(lambda y: (y == 0).mean())
    assert (zeros > 0.4).any()
    means = frame.groupby("merchant_id")["y"].mean()
    assert means.max() / means.min() > 20


def test_visits_drive_sales(frame):
    daily = frame.groupby(["merchant_id", "ds"]).agg(y=("y", "sum"), visits=("visits", "first"))
    corr = daily.groupby(level=0).apply(lambda d: np.corrcoef(d["y"], d["visits"])[0, 1])
    assert (corr > 0.5).all()


def test_short_history_merchant(frame):
    days = frame.groupby("merchant_id")["ds"].nunique()
    short = days[days < 540]
    assert len(short) >= 1 and short.between(150, 220).all()
    assert frame.groupby("merchant_id")["ds"].max().nunique() == 1  # late joiners, not early leavers
    assert generate_merchants(n_merchants=3, seed=5).groupby("merchant_id")["ds"].nunique().lt(540).sum() == 1


def test_passes_prepare(frame):
    table = prepare(frame, load_config().data, "synthetic")
    assert len(table.frame) == len(frame)
    assert table.known == tuple(ROLE_CHANNELS.values()) and table.observed == ("visits",)  # promotions, holidays: the base's slots
