"""Known covariates by meaning, not by position: the order a merchant lists them in never changes the
forecast, the level that means "no holiday" never fills the holiday slot, and the shipped bases read
the same slots they learnt."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from shared.config import load_config
from shared.pipeline import ForecastPipeline
from shared.schema import OPEN, ROLE_CHANNELS, known_channel_names, known_channels, prepare
from shared.sources import load_table
from shared.train import predict

PROMO, HOLIDAY = ROLE_CHANNELS["promo"], ROLE_CHANNELS["holiday"]
DAYS = 126  # context 84 + 3 horizons of 14
CODES = ["0", "a", "b", "c"]


def drugstore(seed: int = 0) -> pd.DataFrame:
    """Two stores of a drugstore export: closed Sundays, two promotion flags, a holiday code 0/a/b/c
    ("0" on almost every day), school holidays and two more known columns, including one named "holiday"."""
    rng = np.random.default_rng(seed)
    days = pd.date_range("2024-01-01", periods=DAYS, freq="D")
    rows = []
    for store in ("1", "2"):
        is_open = (days.dayofweek != 6).astype(int)
        code = np.where(rng.random(DAYS) < 0.06, rng.choice(CODES[1:], DAYS), "0")
        rows.append(pd.DataFrame({
            "Store": store, "Date": days, "Sales": is_open * rng.integers(3000, 6000, DAYS), "Open": is_open,
            "Promo": (np.arange(DAYS) % 14 < 5).astype(int), "Promo2": (np.arange(DAYS) % 30 < 3).astype(int),
            "StateHoliday": code, "SchoolHoliday": (np.arange(DAYS) % 40 < 7).astype(int),
            "price": rng.uniform(1.0, 2.0, DAYS).round(2), "holiday": rng.integers(0, 2, DAYS),  # a column literally named holiday
        }))
    return pd.concat(rows, ignore_index=True)


def mapping(promo: list[str], holiday: list[str], known: list[str], **more) -> dict:
    return {"data.source": "file", "data.path": "drugstore.csv", "data.columns.merchant_id": "", "data.columns.unique_id": "Store",
            "data.columns.ds": "Date", "data.columns.y": "Sales", "data.columns.open": "Open", "data.columns.promo": promo,
            "data.columns.holiday": holiday, "data.columns.known": known, **more}


ORDERED = mapping(["Promo", "Promo2"], ["StateHoliday=a", "StateHoliday=b", "StateHoliday=c"], ["SchoolHoliday", "holiday", "price"])
PERMUTED = mapping(["Promo2", "Promo"], ["StateHoliday=c", "StateHoliday=a", "StateHoliday=b"], ["price", "SchoolHoliday", "holiday"])


def future_forecast(overrides: dict, backbone: dict) -> np.ndarray:
    cfg = load_config(None, {"data.context": 84, "data.horizon": 14, **backbone, **overrides})
    table = prepare(drugstore(), cfg.data, "drugstore.csv")
    pipeline = ForecastPipeline.from_config(cfg, table)
    return predict(pipeline.model, pipeline.splits(table).future, pipeline.device)


def test_permuting_known_and_a_roles_list_leaves_the_forecast_identical():
    tiny = {"model.backbone": "tiny", "model.llm_layers": 2}
    np.testing.assert_array_equal(future_forecast(ORDERED, tiny), future_forecast(PERMUTED, tiny))


@pytest.mark.slow
def test_permuting_leaves_the_real_daily_base_forecast_identical():
    ordered = future_forecast(ORDERED, {})
    np.testing.assert_array_equal(ordered, future_forecast(PERMUTED, {}))
    assert not np.array_equal(ordered, future_forecast({**ORDERED, "data.columns.promo": []}, {})), "the base reads the promo slot"


def test_roles_fill_their_slots_summed_and_other_known_covariates_follow_by_name():
    data = load_config(None, ORDERED).data
    table = prepare(drugstore(), data, "drugstore.csv")
    assert table.known == (PROMO, HOLIDAY, "SchoolHoliday", "holiday", "price")  # the file's "holiday" is just a covariate
    raw = drugstore()
    np.testing.assert_array_equal(table.frame[PROMO], raw["Promo"] + raw["Promo2"])
    np.testing.assert_array_equal(table.frame[HOLIDAY], (raw["StateHoliday"] != "0").astype(float))  # "0" needs no level
    np.testing.assert_array_equal(table.frame["holiday"], raw["holiday"])
    assert known_channel_names(load_config(None, mapping([], ["StateHoliday=a"], [])).data.columns) == (PROMO, HOLIDAY)  # promo: zeros
    assert known_channel_names(load_config(None, mapping([], [], [])).data.columns) == ()


def test_a_planned_covariates_file_gives_the_same_channels_as_the_history():
    """`--future` goes through known_channels as the data file does: the same sums, the same order."""
    data = load_config(None, ORDERED).data
    table = prepare(drugstore(), data, "drugstore.csv")
    raw = drugstore().iloc[:20]
    channels = known_channels(raw, data.columns, "planned.csv", table.none_levels)
    np.testing.assert_array_equal(channels.to_numpy(), table.frame[list(table.known)].iloc[:20].to_numpy())


def test_the_none_level_is_left_out_with_one_warning_naming_it(caplog):
    with_none = mapping(["Promo"], ["StateHoliday=0", "StateHoliday=a", "StateHoliday=b", "StateHoliday=c"], [])
    with caplog.at_level(logging.WARNING, logger="shared.schema"):
        table = prepare(drugstore(), load_config(None, with_none).data, "drugstore.csv")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'StateHoliday=0'" in warnings[0] and "means none" in warnings[0] and "\n" not in warnings[0]
    assert table.none_levels == ("StateHoliday=0",)
    listed = mapping(["Promo"], ["StateHoliday=a", "StateHoliday=b", "StateHoliday=c"], [])
    without = prepare(drugstore(), load_config(None, listed).data, "drugstore.csv")
    pd.testing.assert_frame_equal(table.frame, without.frame)
    assert table.frame.loc[table.frame[OPEN] > 0, HOLIDAY].mean() < 0.1


def test_a_promotion_on_under_half_the_open_days_is_kept():
    often = drugstore().assign(Promo=lambda f: (np.arange(len(f)) % 7 < 2).astype(int))  # 2 of 6 open days at most
    table = prepare(often, load_config(None, mapping(["Promo"], [], [])).data, "often.csv")
    assert table.none_levels == () and table.frame[PROMO].sum() > 0


def test_known_names_that_look_like_a_promotion_or_holiday_get_a_hint(caplog):
    listed = mapping([], [], ["Promo", *(f"StateHoliday={code}" for code in CODES), "SchoolHoliday", "price"])
    with caplog.at_level(logging.WARNING, logger="shared.schema"):
        prepare(drugstore(), load_config(None, listed).data, "drugstore.csv")
    hints = [r.getMessage() for r in caplog.records if "looks like" in r.getMessage()]
    assert len(hints) == 5, hints  # Promo and the four codes; a school holiday is no shop holiday, a price no promotion
    assert "'Promo', which looks like a promotion; list it under promo" in hints[0]
    assert "'StateHoliday=0', which looks like a holiday; list it under holiday" in hints[1]


# --- the shipped bases read the slots they learnt ---------------------------------------------------

# The per-quantile sums of each base's zero-shot forecast, computed at 4b5dab9, before covariates had
# roles, by zero_shot_sums below on the same data (their arrays were equal to these, bit for bit).
DAILY_BEFORE = [2315.09423828125, 3037.000244140625, 4119.33056640625, 5086.15478515625, 5433.4404296875, 6872.86572265625,
                7136.83056640625, 7829.9296875, 9165.8486328125, 11850.9345703125, 14266.78125]
WEEKLY_BEFORE = [320966.96875, 339833.53125, 360641.09375, 373441.84375, 382338.5625, 392227.375, 397983.625, 407972.40625,
                 422530.09375, 445472.46875, 468132.75]


def walmart_shaped(weeks: int = 150, depts: int = 3, seed: int = 0) -> pd.DataFrame:
    """A Walmart store's weekly departments: markdown dollars from the second year on, holiday weeks, weather."""
    rng = np.random.default_rng(seed)
    ds = pd.date_range("2010-02-05", periods=weeks, freq="W-FRI")
    markdown = np.where(np.arange(weeks) > 90, rng.gamma(2.0, 3000.0, weeks), 0.0).round(2)
    holiday = ds.isin(ds[[1, 30, 42, 47, 53, 82, 94, 99, 105, 134, 146]]).astype(float)
    temp = (60 + 25 * np.sin(2 * np.pi * np.arange(weeks) / 52) + rng.normal(0, 3, weeks)).round(2)
    fuel = (2.7 + np.cumsum(rng.normal(0, 0.03, weeks))).round(3)
    rows = []
    for d in range(depts):
        level = 5000 * (d + 1)
        y = level * (1 + 0.2 * np.sin(2 * np.pi * np.arange(weeks) / 52 + d)) * (1 + 0.3 * holiday) + rng.normal(0, level * 0.05, weeks)
        rows.append(pd.DataFrame({"merchant_id": "store_1", "unique_id": f"store_1/dept_{d}", "ds": ds, "y": y.round(2),
                                  "is_holiday": holiday, "markdown": markdown, "temperature": temp, "fuel_price": fuel}))
    return pd.concat(rows, ignore_index=True)


def zero_shot_sums(cfg, table) -> np.ndarray:
    pipeline = ForecastPipeline.from_config(cfg, table)
    assert pipeline.base is not None
    return predict(pipeline.model, pipeline.splits(table).future, pipeline.device).sum(axis=(0, 1))


@pytest.mark.slow
def test_the_shipped_bases_forecast_as_before_the_roles():
    daily = load_config()
    np.testing.assert_allclose(zero_shot_sums(daily, load_table(daily).for_merchant("shop_00")), DAILY_BEFORE, rtol=1e-6)
    weekly = load_config("configs/walmart.toml")
    np.testing.assert_allclose(zero_shot_sums(weekly, prepare(walmart_shaped(), weekly.data, "walmart-shaped")), WEEKLY_BEFORE, rtol=1e-6)
