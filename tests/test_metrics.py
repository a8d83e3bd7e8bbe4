"""Metrics against numbers worked out by hand, and the NaN rules for undefined scores."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.metrics import dataset_wql, per_merchant, pinball, score, season_for, summarise, to_markdown
from shared.schema import DS, ID, MERCHANT, Y, quantile_column

LEVELS = (0.1, 0.5, 0.9)


def _long(merchant: str, uid: str, start: str, values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({MERCHANT: merchant, ID: uid, DS: pd.date_range(start, periods=len(values), freq="D"), Y: values})


def _forecast(merchant: str, uid: str, start: str, quantiles: dict[float, list[float]]) -> pd.DataFrame:
    n = len(next(iter(quantiles.values())))
    frame = pd.DataFrame({MERCHANT: merchant, ID: uid, DS: pd.date_range(start, periods=n, freq="D")})
    for level, values in quantiles.items():
        frame[quantile_column(level)] = values
    return frame


# One series worked through by hand: history 1..8 (seasonal scale |8 - 1| = 7), test y = [10, 20].
HISTORY = _long("a", "sku", "2024-01-01", [1, 2, 3, 4, 5, 6, 7, 8])
ACTUAL = _long("a", "sku", "2024-01-09", [10, 20])
FORECAST = _forecast("a", "sku", "2024-01-09", {0.1: [8, 15], 0.5: [9, 20], 0.9: [12, 22]})


def test_pinball_by_hand() -> None:
    losses = pinball(np.array([10.0]), np.array([[8.0, 10.0, 13.0]]), LEVELS)
    np.testing.assert_allclose(losses, [[0.1 * 2, 0.0, 0.1 * 3]])


# a subnormal x level underflows to 0
@given(st.floats(-1e3, 1e3, allow_subnormal=False), st.floats(-1e3, 1e3, allow_subnormal=False), st.floats(0.01, 0.99))
def test_pinball_weighs_under_forecasts_by_level_and_over_forecasts_by_one_minus_level(y: float, q: float, level: float) -> None:
    loss = pinball(np.array([y]), np.array([[q]]), [level])[0, 0]
    assert loss == pytest.approx(level * (y - q) if y >= q else (1 - level) * (q - y))
    assert (loss == 0) == (y == q)


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=20), st.floats(0.01, 0.99))
def test_pinball_is_minimised_by_the_level_quantile(ys: list[float], level: float) -> None:
    y = np.array(ys)

    def mean_loss(q: float) -> float:
        return float(pinball(y, np.full((len(y), 1), q), [level]).mean())

    best = mean_loss(float(np.quantile(y, level, method="inverted_cdf")))
    assert best <= min(mean_loss(q) for q in np.unique(y)) + 1e-9 * (1 + np.abs(y).max())  # the minimum lies on a sample point


def test_score_by_hand() -> None:
    row = score(FORECAST, ACTUAL, HISTORY, season=7, levels=LEVELS).iloc[0]
    assert row["mase"] == pytest.approx(((1 + 0) / 2) / 7)
    assert row["smape"] == pytest.approx((200 * 1 / 19 + 0) / 2)
    per_level = [2 * (0.2 + 0.5) / 30, 2 * (0.5 + 0.0) / 30, 2 * (0.2 + 0.2) / 30]
    assert row["wql"] == pytest.approx(np.mean(per_level))
    assert row["coverage_80"] == 1.0
    assert math.isnan(row["coverage_90"])  # no 0.05 / 0.95 quantiles


def test_series_are_keyed_by_merchant_and_id() -> None:
    other = ACTUAL.assign(**{MERCHANT: "b", Y: [10.0, 30.0]})
    actual = pd.concat([ACTUAL, other])
    forecast = pd.concat([FORECAST, FORECAST.assign(**{MERCHANT: "b"})])
    history = pd.concat([HISTORY, HISTORY.assign(**{MERCHANT: "b"})])
    scores = score(forecast, actual, history, 7, LEVELS).set_index(MERCHANT)
    assert scores.loc["a", "coverage_80"] == 1.0 and scores.loc["b", "coverage_80"] == 0.5
    assert scores.loc["b", "mase"] == pytest.approx(((1 + 10) / 2) / 7)


def test_coverage_90_when_its_quantiles_exist() -> None:
    levels = (0.05, 0.1, 0.5, 0.9, 0.95)
    forecast = FORECAST.assign(**{quantile_column(0.05): [0.0, 0.0], quantile_column(0.95): [11.0, 30.0]})
    assert score(forecast, ACTUAL, HISTORY, 7, levels).loc[0, "coverage_90"] == 1.0


def test_mase_falls_back_to_one_step_scale_on_short_history() -> None:
    history = _long("a", "sku", "2024-01-06", [1, 3, 2])  # shorter than season + 1
    assert score(FORECAST, ACTUAL, history, 7, LEVELS).loc[0, "mase"] == pytest.approx(0.5 / 1.5)


def test_undefined_scores_are_nan_and_skipped_by_summaries() -> None:
    flat = _long("a", "flat", "2024-01-01", [0.0] * 8)
    zeros = _long("a", "flat", "2024-01-09", [0.0, 0.0])
    flat_forecast = _forecast("a", "flat", "2024-01-09", {0.1: [0, 15], 0.5: [0, 20], 0.9: [1, 22]})
    forecast = pd.concat([FORECAST, flat_forecast])
    scores = score(forecast, pd.concat([ACTUAL, zeros]), pd.concat([HISTORY, flat]), 7, LEVELS).set_index(ID)
    assert math.isnan(scores.loc["flat", "mase"]) and math.isnan(scores.loc["flat", "wql"])
    assert scores.loc["flat", "smape"] == pytest.approx(100.0)  # 0/0 counts as 0, then 200 |0 - 20| / 20
    summary = summarise({"seasonal_naive": scores.reset_index()}).iloc[0]
    assert summary["mase"] == pytest.approx(scores.loc["sku", "mase"])


def test_exact_forecast_of_a_flat_series_scores_zero() -> None:
    flat = _long("a", "sku", "2024-01-01", [5.0] * 8)
    exact = _forecast("a", "sku", "2024-01-09", {0.1: [5.0, 5.0], 0.5: [5.0, 5.0], 0.9: [5.0, 5.0]})
    row = score(exact, ACTUAL.assign(**{Y: 5.0}), flat, 7, LEVELS).iloc[0]
    assert row["mase"] == 0.0 and row["wql"] == 0.0 and row["smape"] == 0.0


def test_missing_forecast_is_an_error() -> None:
    with pytest.raises(ValueError, match="no forecast"):
        score(FORECAST.iloc[:1], ACTUAL, HISTORY, 7, LEVELS)


def test_dataset_wql_pools_before_dividing() -> None:
    big = ACTUAL.assign(**{ID: "big", Y: [1000.0, 1000.0]})
    forecast = pd.concat([FORECAST, FORECAST.assign(**{ID: "big"})])
    pooled = dataset_wql(forecast, pd.concat([ACTUAL, big]), LEVELS)
    y = np.array([10, 20, 1000, 1000.0])
    q = np.array([[8, 9, 12], [15, 20, 22], [8, 9, 12], [15, 20, 22.0]])
    expected = np.mean(2 * pinball(y, q, LEVELS).sum(axis=0) / np.abs(y).sum())
    assert pooled == pytest.approx(expected)


def test_summarise_relative_to_baseline() -> None:
    base = pd.DataFrame({MERCHANT: "a", ID: ["s1", "s2", "s3"], "mase": [1.0, 2.0, 0.0], "wql": [0.2, 0.4, np.nan],
                         "smape": 10.0, "coverage_80": 0.8, "coverage_90": np.nan})
    better = base.assign(mase=[0.5, 1.0, 0.3], wql=[0.1, 0.1, 0.1])
    summary = summarise({"seasonal_naive": base, "better": better}).set_index("model")
    assert summary.loc["seasonal_naive", "mase_gmean_rel"] == pytest.approx(1.0)
    assert summary.loc["seasonal_naive", "wql_gmean_rel"] == pytest.approx(1.0)
    assert summary.loc["better", "mase_gmean_rel"] == pytest.approx(0.5)  # s3 (baseline 0) left out
    assert summary.loc["better", "wql_gmean_rel"] == pytest.approx(math.sqrt(0.5 * 0.25))
    assert summary.loc["better", "mase"] == pytest.approx(1.8 / 3)
    assert list(summary.columns) == ["mase", "smape", "wql", "coverage_80", "coverage_90", "mase_gmean_rel", "wql_gmean_rel"]
    assert summarise({"better": better})["mase_gmean_rel"].isna().all()

    table = per_merchant({"seasonal_naive": base, "better": better})
    assert list(table.columns) == ["model", MERCHANT, "mase", "wql"]
    assert table.set_index("model").loc["better", "wql"] == pytest.approx(0.1)


@pytest.mark.parametrize(("freq", "season"), [("D", 7), ("W", 52), ("W-MON", 52), ("h", 24), ("MS", 12), ("2D", 1), ("QS", 1)])
def test_season_for(freq: str, season: int) -> None:
    assert season_for(freq) == season


def test_to_markdown() -> None:
    frame = pd.DataFrame({"model": ["x"], "mase": [0.12345], "n": [3]})
    assert to_markdown(frame) == "| model | mase | n |\n|---|---:|---:|\n| x | 0.123 | 3 |\n"
