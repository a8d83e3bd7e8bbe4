"""Scores for probabilistic forecasts, defined so the numbers compare with published ones.

MASE and WQL follow GluonTS (`MASE`, `mean_weighted_sum_quantile_loss`), and the cross-series
summary follows Chronos: plain means plus the geometric mean of each model's score relative to
seasonal naive on the same series, which is what the Chronos / GluonTS tables report.

A score whose denominator is 0 (a flat history gives MASE no scale, an all-zero test part gives
WQL no weight) is 0 when its numerator is 0 too, since the forecast was exact, and NaN otherwise,
rather than a huge number from a guarded tiny denominator: one such series would swamp every
mean. NaN scores are skipped by the (NaN-aware) means.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from shared.schema import DS, ID, MERCHANT, Y, quantile_column

METRICS = ("mase", "smape", "wql", "coverage_80", "coverage_90")
RELATIVE = ("mase", "wql")
_KEYS = [MERCHANT, ID]
_INTERVALS = {"coverage_80": (0.1, 0.9), "coverage_90": (0.05, 0.95)}


def season_for(freq: str) -> int:
    """Seasonal period used for MASE scaling and the seasonal-naive baseline (GluonTS' defaults)."""
    offset = pd.tseries.frequencies.to_offset(freq)
    if offset.n != 1:
        return 1
    periods = {pd.offsets.Day: 7, pd.offsets.Week: 52, pd.offsets.Hour: 24,
               pd.offsets.MonthEnd: 12, pd.offsets.MonthBegin: 12}
    return next((p for kind, p in periods.items() if isinstance(offset, kind)), 1)


def pinball(y: np.ndarray, q: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Quantile (pinball) loss per point and level: `y` is (n,), `q` is (n, len(levels))."""
    error = np.asarray(y, dtype=float)[:, None] - np.asarray(q, dtype=float)
    alpha = np.asarray(levels, dtype=float)[None, :]
    return np.maximum(alpha * error, (alpha - 1.0) * error)


def _safe_divide(numerator: np.ndarray | pd.Series, denominator: np.ndarray | pd.Series) -> np.ndarray:
    """numerator / denominator; where the denominator is 0 (or NaN): 0 for an exact forecast
    (numerator 0), NaN for an error the metric has no scale for."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        undefined = np.where((numerator == 0) & (denominator == 0), 0.0, np.nan)
        return np.where(denominator > 0, numerator / denominator, undefined)


def _quantile_columns(frame: pd.DataFrame, levels: Sequence[float]) -> list[str]:
    columns = [quantile_column(q) for q in levels]
    if quantile_column(0.5) not in columns:
        raise ValueError(f"levels {list(levels)} lack the median 0.5, which MASE and sMAPE score")
    missing = [c for c in columns if c not in frame]
    if missing:
        raise ValueError(f"forecast lacks quantile column(s) {missing}")
    return columns


def _align(forecast: pd.DataFrame, actual: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Test points with their forecast; a test point without one is an error, not a skipped point."""
    joined = actual[[*_KEYS, DS, Y]].merge(forecast[[*_KEYS, DS, *columns]], on=[*_KEYS, DS], how="left", validate="one_to_one")
    unforecast = joined[columns].isna().any(axis=1)
    if unforecast.any():
        first = joined.loc[unforecast].iloc[0]
        raise ValueError(
            f"{int(unforecast.sum())} test point(s) have no forecast, first {first[MERCHANT]}/{first[ID]} at {first[DS]}"
        )
    return joined


def seasonal_scale(history: pd.DataFrame, season: int) -> pd.Series:
    """MASE denominator per series: mean |y_t - y_{t-m}| over the history, m = season, or 1 when
    the history holds no full season plus one point (GluonTS' fallback). 0 for a flat or purely
    seasonal history, NaN for a single point."""
    ordered = history.sort_values([*_KEYS, DS])
    grouped = ordered.groupby(_KEYS, sort=True)[Y]
    seasonal = ordered[Y].sub(grouped.shift(season)).abs().groupby([ordered[MERCHANT], ordered[ID]]).mean()
    one_step = ordered[Y].sub(grouped.shift(1)).abs().groupby([ordered[MERCHANT], ordered[ID]]).mean()
    return seasonal.where(grouped.size() > season, one_step)


def score(
    forecast: pd.DataFrame, actual: pd.DataFrame, history: pd.DataFrame, season: int, levels: Sequence[float]
) -> pd.DataFrame:
    """Per-series scores of a forecast frame over the test part `actual` (long frames).

    Columns: merchant_id, unique_id, mase, smape, wql, coverage_80, coverage_90. sMAPE is of the
    median on the 0..200 scale, with 0/0 counted as a perfect 0 (both actual and forecast zero, as
    utilsforecast does), and MASE and WQL follow the same 0/0 rule (module docstring). A coverage
    is NaN when its two quantiles are not among `levels`.
    """
    columns = _quantile_columns(forecast, levels)
    joined = _align(forecast, actual, columns)
    y = joined[Y].to_numpy(dtype=float)
    median = joined[quantile_column(0.5)].to_numpy(dtype=float)
    losses = pinball(y, joined[columns].to_numpy(dtype=float), levels)

    points = pd.DataFrame({MERCHANT: joined[MERCHANT], ID: joined[ID], "abs_error": np.abs(y - median), "abs_y": np.abs(y)})
    points["smape"] = _safe_divide(200.0 * np.abs(y - median), np.abs(y) + np.abs(median))
    for name, (low, high) in _INTERVALS.items():
        if low in levels and high in levels:
            inside = (joined[quantile_column(low)] <= y) & (y <= joined[quantile_column(high)])
            points[name] = inside.to_numpy(dtype=float)
        else:
            points[name] = np.nan
    loss_columns = [f"loss_{i}" for i in range(len(columns))]
    points[loss_columns] = losses

    grouped = points.groupby(_KEYS, sort=True)
    sums = grouped[["abs_y", *loss_columns]].sum()
    out = grouped[["smape", "coverage_80", "coverage_90"]].mean()
    scale = seasonal_scale(history, season).reindex(out.index)
    out["mase"] = _safe_divide(grouped["abs_error"].mean(), scale)
    out["wql"] = np.mean(_safe_divide(2.0 * sums[loss_columns].to_numpy(), sums["abs_y"].to_numpy()[:, None]), axis=1)
    return out.reset_index()[[*_KEYS, *METRICS]]


def dataset_wql(forecast: pd.DataFrame, actual: pd.DataFrame, levels: Sequence[float]) -> float:
    """WQL with losses and |y| pooled over all series before dividing (GluonTS' dataset-level number)."""
    columns = _quantile_columns(forecast, levels)
    joined = _align(forecast, actual, columns)
    y = joined[Y].to_numpy(dtype=float)
    losses = pinball(y, joined[columns].to_numpy(dtype=float), levels).sum(axis=0)
    return float(np.mean(_safe_divide(2.0 * losses, np.full_like(losses, np.abs(y).sum()))))


def _gmean_relative(model: pd.Series, baseline: pd.Series) -> float:
    """Geometric mean of model / baseline over series where both are finite and positive: a zero
    or NaN score makes the ratio 0, infinite or undefined, which says nothing about typical skill."""
    ratio = _safe_divide(model, baseline)
    usable = np.isfinite(ratio) & (ratio > 0)
    return float(np.exp(np.log(ratio[usable]).mean())) if usable.any() else float("nan")


def summarise(scores: dict[str, pd.DataFrame], baseline: str = "seasonal_naive") -> pd.DataFrame:
    """One row per model: NaN-aware means of every metric, and `<metric>_gmean_rel`, the geometric
    mean over series of the model's MASE / WQL divided by `baseline`'s (NaN if `baseline` is absent)."""
    reference = scores[baseline].set_index(_KEYS) if baseline in scores else None
    rows = []
    for name, frame in scores.items():
        row: dict[str, object] = {"model": name, **frame[list(METRICS)].mean().to_dict()}
        for metric in RELATIVE:
            if reference is None:
                row[f"{metric}_gmean_rel"] = float("nan")
            else:
                paired = frame.set_index(_KEYS)[metric].to_frame("model").join(reference[metric].rename("baseline"), how="inner")
                row[f"{metric}_gmean_rel"] = _gmean_relative(paired["model"], paired["baseline"])
        rows.append(row)
    return pd.DataFrame(rows)


def per_merchant(scores: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean MASE and WQL of each model on each merchant: federated models are judged per client too."""
    stacked = pd.concat([frame.assign(model=name) for name, frame in scores.items()], ignore_index=True)
    return stacked.groupby(["model", MERCHANT], sort=False)[list(RELATIVE)].mean().reset_index()


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 3 decimals, numbers right-aligned) without `tabulate`."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, (float, np.floating)) else str(value)

    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = [
        "| " + " | ".join(str(c) for c in frame.columns) + " |",
        "|" + "|".join("---:" if is_number else "---" for is_number in numeric) + "|",
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)),
    ]
    return "\n".join(lines) + "\n"
