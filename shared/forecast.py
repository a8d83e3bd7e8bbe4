"""Model output -> the forecast frame every consumer reads (metrics, reports, the merchant's CSV)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from shared.schema import DS, ID, MERCHANT, quantile_column
from shared.windows import Splits, Windows


def forecast_frame(splits: Splits, windows: Windows, quantiles: np.ndarray, levels: tuple[float, ...]) -> pd.DataFrame:
    """Long frame merchant_id, unique_id, ds, q0.1 … q0.9: one row per window and horizon step."""
    n, horizon, _ = quantiles.shape
    rows = []
    for i in range(n):
        sid = int(windows.series[i])
        dates = pd.date_range(windows.target_start[i], periods=horizon, freq=splits.freq)
        block = pd.DataFrame(quantiles[i], columns=[quantile_column(q) for q in levels])
        block.insert(0, DS, dates)
        block.insert(0, ID, splits.series_ids[sid])
        block.insert(0, MERCHANT, splits.merchant_of[sid])
        rows.append(block)
    return pd.concat(rows, ignore_index=True)
