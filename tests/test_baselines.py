"""Baselines return well-formed, non-crossing forecast frames, and LightGBM really uses covariates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.baselines import lightgbm, seasonal_naive, statistical
from shared.metrics import score
from shared.schema import DS, ID, MERCHANT, Y, quantile_column

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
COLUMNS = [quantile_column(q) for q in LEVELS]
H, SEASON = 14, 7


def _series(merchant: str, uid: str, y: np.ndarray, start: str = "2023-01-01", **covariates: np.ndarray) -> pd.DataFrame:
    dates = pd.date_range(start, periods=len(y), freq="D")
    return pd.DataFrame({MERCHANT: merchant, ID: uid, DS: dates, Y: y, **covariates})


def _split(frame: pd.DataFrame, h: int = H) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test part = the last h timestamps of each series, history = everything before."""
    test = frame.groupby([MERCHANT, ID]).tail(h)
    return frame.drop(test.index).reset_index(drop=True), test.reset_index(drop=True)


def _noisy_panel(seed: int = 0) -> pd.DataFrame:
    """Two merchants that share a "sku_1" id, plus one series too short for ETS."""
    rng = np.random.default_rng(seed)
    weekly = 5 * np.sin(2 * np.pi * np.arange(120) / 7)
    pieces = [_series(m, f"sku_{i}", np.maximum(0, 20 + weekly + rng.normal(0, 2, 120))) for m in ("m1", "m2") for i in (1, 2)]
    pieces.append(_series("m2", "new", rng.poisson(3, 5 + H).astype(float), start="2023-04-01"))
    return pd.concat(pieces, ignore_index=True)


def _assert_well_formed(forecast: pd.DataFrame, history: pd.DataFrame) -> None:
    assert list(forecast.columns) == [MERCHANT, ID, DS, *COLUMNS]
    values = forecast[COLUMNS].to_numpy()
    assert np.isfinite(values).all()
    assert (np.diff(values, axis=1) >= 0).all(), "quantiles cross"
    last = history.groupby([MERCHANT, ID])[DS].max()
    expected = pd.concat(
        [pd.DataFrame({MERCHANT: m, ID: u, DS: pd.date_range(t + pd.Timedelta(days=1), periods=H, freq="D")})
         for (m, u), t in last.items()],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(forecast[[MERCHANT, ID, DS]], expected, check_dtype=False)


def test_seasonal_naive_is_exact_on_a_purely_seasonal_series() -> None:
    pattern = np.array([3.0, 8, 1, 4, 9, 2, 6])
    history, test = _split(_series("m", "s", np.tile(pattern, 10)))
    forecast = seasonal_naive(history, H, SEASON, LEVELS)
    _assert_well_formed(forecast, history)
    assert score(forecast, test, history, SEASON, LEVELS).loc[0, "mase"] == 0.0
    np.testing.assert_allclose(forecast[COLUMNS].to_numpy(), np.repeat(test[[Y]].to_numpy(), len(LEVELS), axis=1))


def test_seasonal_naive_spread_grows_past_one_season() -> None:
    rng = np.random.default_rng(1)
    history, _ = _split(_series("m", "walk", 1000 + np.cumsum(rng.normal(0, 1, 2000))))
    forecast = seasonal_naive(history, H, SEASON, LEVELS)
    _assert_well_formed(forecast, history)
    width = (forecast[quantile_column(0.9)] - forecast[quantile_column(0.1)]).to_numpy()
    assert width[SEASON:].mean() > width[:SEASON].mean() > 0
    np.testing.assert_allclose(forecast[quantile_column(0.5)], np.tile(history[Y].to_numpy()[-SEASON:], 2))


def test_statistical_quantiles_are_well_formed() -> None:
    history, test = _split(_noisy_panel())
    forecasts = statistical(history, H, SEASON, LEVELS, freq="D")
    assert set(forecasts) == {"AutoETS", "AutoTheta"}
    for forecast in forecasts.values():
        _assert_well_formed(forecast, history)
        assert score(forecast, test, history, SEASON, LEVELS)["mase"].notna().all()


def _promo_panel(seed: int = 0, n: int = 150) -> pd.DataFrame:
    """y = 10 + 20 promo + noise with promo random: only a model that reads promo can forecast it."""
    rng = np.random.default_rng(seed)
    pieces = []
    for merchant in ("m1", "m2"):
        for uid in ("sku_1", "sku_2", "sku_3"):
            promo = rng.integers(0, 2, n).astype(float)
            pieces.append(_series(merchant, uid, 10 + 20 * promo + rng.normal(0, 1, n), promo=promo))
    return pd.concat(pieces, ignore_index=True)


@pytest.mark.parametrize("pooled", [True, False])
def test_lightgbm_uses_known_covariates(pooled: bool) -> None:
    history, test = _split(_promo_panel())
    forecast = lightgbm(history, H, SEASON, LEVELS, known=["promo"], future_known=test.drop(columns=Y), pooled=pooled)
    _assert_well_formed(forecast, history)
    naive = score(seasonal_naive(history, H, SEASON, LEVELS), test, history, SEASON, LEVELS)["mase"].mean()
    model = score(forecast, test, history, SEASON, LEVELS)["mase"].mean()
    assert model < 0.3 * naive, (model, naive)


def test_lightgbm_handles_short_series_and_no_covariates() -> None:
    history, _ = _split(_noisy_panel())
    _assert_well_formed(lightgbm(history, H, SEASON, LEVELS, freq="D"), history)


def test_lightgbm_needs_every_future_covariate() -> None:
    history, test = _split(_promo_panel(n=60))
    with pytest.raises(ValueError, match="future_known lacks"):
        lightgbm(history, H, SEASON, LEVELS, known=["promo"], future_known=test.iloc[1:].drop(columns=Y))


@pytest.mark.slow  # ~4 s on 2 cores: starts worker processes
def test_worker_processes_give_the_same_forecasts_as_one_after_another() -> None:
    """`jobs` only buys time: each series (ETS) or merchant (LightGBM) is fitted alone either way."""
    history, test = _split(_promo_panel(n=80))
    future = test.drop(columns=Y)
    pd.testing.assert_frame_equal(lightgbm(history, H, SEASON, LEVELS, known=["promo"], future_known=future, pooled=False, jobs=2),
                                  lightgbm(history, H, SEASON, LEVELS, known=["promo"], future_known=future, pooled=False))
    apart, together = (statistical(history, H, SEASON, LEVELS, freq="D", jobs=jobs) for jobs in (2, 1))
    for name, forecast in apart.items():
        pd.testing.assert_frame_equal(forecast, together[name])
