"""Calibrated intervals and what a shop decides from them: conformal offsets on arrays with a known truth
(over- and under-confident bands, shops of different sizes, closed days), the pipeline's holdout and
back-test windows on the tiny backbone, anomaly scores and stock levels."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from shared.adapter import AdapterMismatch
from shared.anomalies import find_anomalies
from shared.calibration import Calibration, conformal_quantile, symmetric_pairs
from shared.pipeline import ForecastPipeline, recent_windows
from shared.schema import DS, ID, MERCHANT, Y, quantile_column
from shared.stock import quantile_at, stock_levels

LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MID = LEVELS.index(0.5)
Z = np.array([NormalDist().inv_cdf(q) for q in LEVELS])  # standard normal quantiles at LEVELS
BANDS = {0.8: (LEVELS.index(0.1), LEVELS.index(0.9)), 0.9: (LEVELS.index(0.05), LEVELS.index(0.95))}


def gaussian_windows(n: int, spread: float, seed: int, levels: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(quantiles [n, 14, Q], target [n, 14], context [n, 28], open flags [n, 42]): y ~ level + level/5 N(0, 1)
    with a level per window from 2 to 2000, forecast with a band `spread` times the true one (< 1:
    over-confident), every day open."""
    rng = np.random.default_rng(seed)
    level = np.exp(rng.uniform(np.log(2), np.log(2000), n)) if levels is None else levels
    sigma = level / 5
    context = level[:, None] + sigma[:, None] * rng.standard_normal((n, 28))
    target = level[:, None] + sigma[:, None] * rng.standard_normal((n, 14))
    quantiles = level[:, None, None] + spread * sigma[:, None, None] * Z[None, None, :]
    return np.broadcast_to(quantiles, (n, 14, len(LEVELS))).copy(), target, context, np.ones((n, 42))


def coverage(quantiles: np.ndarray, target: np.ndarray, band: float) -> float:
    lo, hi = BANDS[band]
    return float(((quantiles[..., lo] <= target) & (target <= quantiles[..., hi])).mean())


@pytest.mark.parametrize("spread", [0.4, 2.5], ids=["over-confident", "under-confident"])
def test_calibration_brings_coverage_to_nominal(spread: float) -> None:
    holdout, fresh = gaussian_windows(60, spread, seed=0), gaussian_windows(300, spread, seed=1)
    calibration = Calibration.fit(*holdout, LEVELS)
    calibrated = calibration.apply(fresh[0], fresh[2], fresh[3])
    for band in BANDS:
        before, after = coverage(fresh[0], fresh[1], band), coverage(calibrated, fresh[1], band)
        assert abs(before - band) > 0.08, "the raw band should be off for the test to mean anything"
        assert abs(after - band) < 0.03, (band, before, after)


def test_one_calibration_serves_small_and_large_shops() -> None:
    """Scores in units of each window's scale pool a 3-unit shop with a 3000-unit one."""
    calibration = Calibration.fit(*gaussian_windows(80, 0.4, seed=2), LEVELS)
    for level in (3.0, 3000.0):
        quantiles, target, context, is_open = gaussian_windows(200, 0.4, seed=3, levels=np.full(200, level))
        assert abs(coverage(calibration.apply(quantiles, context, is_open), target, 0.8) - 0.8) < 0.04


def test_quantiles_stay_monotone_and_the_median_stays() -> None:
    quantiles, _, context, is_open = gaussian_windows(20, 1.0, seed=4)
    # narrowing the inner pair past the median, widening the outer ones: crossings a sort would not undo cleanly
    crossing = Calibration(LEVELS, ((0.05, 0.95, 0.3), (0.1, 0.9, 0.5), (0.4, 0.6, -2.0)), 1)
    for calibration in (crossing, Calibration.fit(*gaussian_windows(50, 2.5, seed=5), LEVELS)):
        out = calibration.apply(quantiles, context, is_open)
        assert np.all(np.diff(out, axis=-1) >= 0)
        np.testing.assert_array_equal(out[..., MID], quantiles[..., MID])


def test_non_negative_sales_stay_non_negative_and_a_closed_day_stays_zero() -> None:
    rng = np.random.default_rng(6)
    context = rng.poisson(0.5, (30, 28)).astype(float)
    target = rng.poisson(0.5, (30, 14)).astype(float)
    quantiles = np.broadcast_to(np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1.0]), (30, 14, len(LEVELS))).copy()
    is_open = np.ones((30, 42))
    is_open[:, 28 + 3] = 0.0  # horizon day 3: the shop is closed, every quantile 0, nothing sold
    quantiles[:, 3], target[:, 3] = 0.0, 0.0
    calibration = Calibration.fit(quantiles, target, context, is_open, LEVELS)
    assert calibration.points == 30 * 13, "a closed day is not a calibration point"
    widened = Calibration(LEVELS, tuple((lo, hi, 2.0) for lo, hi, _ in calibration.offsets), calibration.points)
    for fitted in (calibration, widened):
        out = fitted.apply(quantiles, context, is_open)
        assert out.min() >= 0.0
        np.testing.assert_array_equal(out[:, 3], 0.0)
    assert widened.apply(quantiles, context, is_open)[:, 4, -1].min() > 1.0, "open days do widen"


def test_conformal_rank_and_pairs() -> None:
    scores = np.arange(1.0, 10.0)  # n = 9: rank ceil(10 * 0.8) = 8
    assert conformal_quantile(scores, 0.8) == 8.0
    assert conformal_quantile(scores[:3], 0.9) == 3.0, "too few points for the rank: the largest score"
    assert [(LEVELS[i], LEVELS[j]) for i, j in symmetric_pairs(LEVELS)] == [(0.05, 0.95), (0.1, 0.9), (0.2, 0.8), (0.3, 0.7), (0.4, 0.6)]
    assert symmetric_pairs((0.1, 0.5, 0.8)) == []


def test_calibration_file_round_trip_and_a_corrupt_one(tmp_path: Path) -> None:
    calibration = Calibration.fit(*gaussian_windows(10, 0.5, seed=7), LEVELS)
    calibration.save(tmp_path)
    assert Calibration.load(tmp_path) == calibration
    assert Calibration.load(tmp_path / "absent") is None
    (tmp_path / "calibration.json").write_text('{"levels": [0.1')
    with pytest.raises(AdapterMismatch, match="calibration.json"):
        Calibration.load(tmp_path)


@pytest.fixture(scope="module")
def pipeline_and_splits(tiny_cfg, synthetic_table):
    pipeline = ForecastPipeline.from_config(tiny_cfg, synthetic_table)
    return pipeline, pipeline.splits(synthetic_table)


def test_recent_windows_end_at_the_test_window_without_overlap(pipeline_and_splits) -> None:
    _, splits = pipeline_and_splits
    horizon = splits.test.target.shape[1]
    windows = recent_windows(splits, 3)
    assert len(windows) == 3 * len(splits.series_ids)
    for sid in range(len(splits.series_ids)):
        offsets = windows.offset[windows.series == sid]
        assert offsets[-1] == splits.test.offset[sid]
        np.testing.assert_array_equal(np.diff(offsets), horizon)
    holdout = recent_windows(splits, 1, include_test=False)
    np.testing.assert_array_equal(holdout.offset, splits.val.offset)


def test_pipeline_calibrates_on_validation_and_keeps_the_median(pipeline_and_splits) -> None:
    pipeline, splits = pipeline_and_splits
    calibration = pipeline.calibrate(splits)
    assert calibration.points == splits.val.target.size
    raw, calibrated = pipeline.predict_frame(splits, splits.test), pipeline.predict_frame(splits, splits.test, calibration)
    columns = [quantile_column(q) for q in pipeline.cfg.model.quantiles]
    np.testing.assert_allclose(calibrated[quantile_column(0.5)], raw[quantile_column(0.5)], rtol=1e-6)
    assert np.all(np.diff(calibrated[columns].to_numpy(), axis=1) >= 0) and calibrated[columns].min().min() >= 0
    other = Calibration(LEVELS[1:-1], (), 1)
    with pytest.raises(AdapterMismatch, match="levels"):
        pipeline.predict_frame(splits, splits.test, other)
    backtest = pipeline.backtest(splits, 2, calibration)
    assert len(backtest) == 2 * splits.test.target.size and backtest[Y].notna().all()


def test_a_closed_day_is_forecast_exactly_zero_raw_and_calibrated(pipeline_and_splits) -> None:
    pipeline, splits = pipeline_and_splits
    test = splits.test.subset(np.arange(len(splits.test)))  # a copy whose horizon day 3 is planned closed
    horizon = test.target.shape[1]
    test.open[:, -horizon + 2] = 0.0
    widened = Calibration(LEVELS, tuple((lo, hi, 1.0) for lo, hi, _ in pipeline.calibrate(splits).offsets), 1)
    columns = [quantile_column(q) for q in LEVELS]
    for calibration in (None, widened):
        frame = pipeline.predict_frame(splits, test, calibration)
        day = frame[DS] == frame.groupby(ID)[DS].transform("min") + pd.Timedelta(days=2)
        assert day.sum() == len(splits.series_ids)
        assert (frame.loc[day, columns].to_numpy() == 0.0).all()
        assert (frame.loc[~day, quantile_column(0.95)] > 0).mean() > 0.9


def backtest_frame(y: np.ndarray, median: float, sigma: float) -> pd.DataFrame:
    """A back-test of one series whose quantiles are the true ones of N(median, sigma)."""
    frame = pd.DataFrame({MERCHANT: "m", ID: "s", DS: pd.date_range("2024-01-01", periods=len(y), freq="D"), Y: y})
    for q in LEVELS:
        frame[quantile_column(q)] = median + sigma * Z[LEVELS.index(q)]
    return frame


def test_anomalies_find_an_injected_spike_and_stock_out_and_little_else() -> None:
    y = 50 + 3 * np.random.default_rng(8).standard_normal(112)
    y[60], y[80] = 90.0, 0.0
    found = find_anomalies(backtest_frame(y, 50.0, 3.0), LEVELS)
    assert list(found[DS].iloc[:2]) == [pd.Timestamp("2024-03-21"), pd.Timestamp("2024-03-01")]
    assert list(found["direction"].iloc[:2]) == ["below", "above"]
    assert len(found) <= 3 and found["score"].iloc[0] > 2
    assert len(find_anomalies(backtest_frame(y, 50.0, 3.0), LEVELS, min_score=0.0)) > len(found)
    with pytest.raises(ValueError, match="no 50% band"):
        find_anomalies(backtest_frame(y, 50.0, 3.0), LEVELS, coverage=0.5)


def test_a_sale_on_a_day_forecast_at_zero_has_a_finite_score() -> None:
    y = np.r_[np.full(20, 10.0), 0.0, 10.0]
    frame = backtest_frame(y, 10.0, 1.0)
    frame.loc[20:, [quantile_column(q) for q in LEVELS]] = 0.0  # closed on day 20 and 21; it sold on 21
    found = find_anomalies(frame, LEVELS)
    assert list(found[DS]) == [frame[DS].iloc[21]] and np.isfinite(found["score"]).all()


def test_quantile_at_interpolates_between_levels_and_refuses_to_extrapolate() -> None:
    quantiles = np.array([[float(i) for i in range(len(LEVELS))]])
    assert quantile_at(quantiles, LEVELS, 0.9)[0] == LEVELS.index(0.9)
    assert quantile_at(quantiles, LEVELS, 0.925)[0] == pytest.approx(LEVELS.index(0.9) + 0.5)
    assert quantile_at(quantiles, LEVELS, 0.5)[0] == MID
    for level in (0.99, 0.3):
        with pytest.raises(ValueError, match="service level"):
            quantile_at(quantiles, LEVELS, level)


def test_stock_levels_sum_over_the_lead_time() -> None:
    frame = pd.concat([backtest_frame(np.zeros(14), median, median / 4).assign(**{ID: uid}) for uid, median in (("a", 4.0), ("b", 40.0))])
    out = stock_levels(frame, LEVELS, service_level=0.9, lead_time=7)
    assert list(out[ID]) == ["a", "b"] and (out["lead_time"] == 7).all()
    np.testing.assert_allclose(out["lead_time_demand"], [28.0, 280.0])
    np.testing.assert_allclose(out["order_up_to"], 7 * (np.array([4.0, 40.0]) * (1 + Z[LEVELS.index(0.9)] / 4)))
    np.testing.assert_allclose(out["safety_stock"], out["order_up_to"] - out["lead_time_demand"])
    with pytest.raises(ValueError, match="lead time 15"):
        stock_levels(frame, LEVELS, 0.9, 15)
