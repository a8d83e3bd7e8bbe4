"""Days that fell far outside the calibrated band: a spike, a stock-out, a broken tracking tag.

A calibrated 90% band leaves one ordinary day in ten outside it, too many to look at. So each day
of a back-test gets a score, how far outside the band it fell in band widths (0 inside), and only
days scoring at least `min_score` are listed. Half a width outside a 90% band is 3.3 standard
deviations from the median for Gaussian noise, about one ordinary day in a thousand.

A band narrower than a tenth of the series' mean |y| counts as that wide: a sale on a day forecast
at exactly zero (a closed day) is then measured against the series' usual size, not divided by zero.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared.schema import DS, ID, MERCHANT, Y, quantile_column

COLUMNS = [MERCHANT, ID, DS, Y, "low", "median", "high", "score", "direction"]
MIN_WIDTH = 0.1  # of the series' mean |y|


def band_columns(levels: tuple[float, ...], coverage: float) -> tuple[str, str]:
    """The quantile columns of the central band holding `coverage`, which must be one the model has."""
    low, high = quantile_column((1 - coverage) / 2), quantile_column((1 + coverage) / 2)
    have = {quantile_column(q) for q in levels}
    if low not in have or high not in have:
        raise ValueError(f"the model has no {coverage:.0%} band ({low}, {high}); its levels are {list(levels)}")
    return low, high


def outside_score(y: np.ndarray, low: np.ndarray, high: np.ndarray, min_width: np.ndarray | float) -> np.ndarray:
    """How far each y lies outside [low, high], in band widths (at least `min_width`); 0 inside."""
    excess = np.maximum(np.maximum(low - y, y - high), 0.0)
    return excess / np.maximum(np.maximum(high - low, min_width), np.finfo(float).tiny)


def find_anomalies(backtest: pd.DataFrame, levels: tuple[float, ...], coverage: float = 0.9, min_score: float = 0.5) -> pd.DataFrame:
    """The days of a back-test (forecast frame with column y) outside the `coverage` band by at least
    `min_score` band widths, highest score first; `direction` says above (a spike) or below (a
    stock-out, a tracking break)."""
    low_column, high_column = band_columns(levels, coverage)
    y, low, high = (backtest[c].to_numpy(dtype=float) for c in (Y, low_column, high_column))
    typical = backtest[Y].abs().groupby(backtest[ID]).transform("mean").to_numpy(dtype=float)
    scored = backtest.assign(low=low, median=backtest[quantile_column(0.5)], high=high,
                             score=outside_score(y, low, high, MIN_WIDTH * typical), direction=np.where(y > high, "above", "below"))
    flagged = scored[(scored["score"] > 0) & (scored["score"] >= min_score)]
    return flagged.sort_values("score", ascending=False, kind="stable")[COLUMNS].reset_index(drop=True)
