"""Reference forecasters every shopcast model is measured against, all producing forecast frames.

A forecast frame is long: merchant_id, unique_id, ds and one column per quantile level
(`quantile_column`), for the h timestamps after each series' last `ds`. Seasonal naive is the
denominator of the relative scores (Chronos convention); AutoETS / AutoTheta are the classical
local models; LightGBM is the strong global model that, unlike them, sees the known covariates.

The models come from statsforecast and mlforecast; this module only translates between their
output and the forecast frame. Series ids are keyed by merchant internally because two merchants
may both have a "sku_1". Quantiles are sorted per row (no crossing) and clipped at zero when the
history has no negative sales.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import joblib
import numpy as np
import pandas as pd
import statsforecast.models
from lightgbm import LGBMRegressor
from mlforecast import MLForecast
from mlforecast.lag_transforms import RollingMean
from mlforecast.target_transforms import LocalStandardScaler
from statsforecast import StatsForecast
from utilsforecast.processing import make_future_dataframe

from shared.schema import DS, ID, MERCHANT, Y, quantile_column

_KEY = "series_key"
_SEPARATOR = "\x1f"  # cannot occur in an id read from a CSV cell
# AutoETS raises on fewer than 7 points and AutoTheta on fewer than 4; such series get seasonal naive.
MIN_STATISTICAL_LENGTH = 10


def infer_freq(history: pd.DataFrame) -> str:
    """The pandas frequency of the longest series; an error when it has no regular grid."""
    merchant, uid = history.groupby([MERCHANT, ID]).size().idxmax()
    dates = history.loc[(history[MERCHANT] == merchant) & (history[ID] == uid), DS].sort_values()
    freq = pd.infer_freq(dates) if len(dates) >= 3 else None
    if freq is None:
        raise ValueError("cannot infer the frequency of the history; pass freq=")
    return freq


def _keyed(frame: pd.DataFrame, columns: Sequence[str] = (Y,)) -> pd.DataFrame:
    """`frame` with one id column that is unique across merchants, sorted as the libraries expect."""
    keyed = frame[[MERCHANT, ID, DS, *columns]].assign(**{_KEY: frame[MERCHANT].astype(str) + _SEPARATOR + frame[ID].astype(str)})
    return keyed.sort_values([_KEY, DS]).reset_index(drop=True)


def _forecast_frame(keys: pd.Series, dates: pd.Series, values: np.ndarray, levels: Sequence[float], nonnegative: bool) -> pd.DataFrame:
    """Turns library output (internal key, ds, one column per level) into a forecast frame."""
    values = np.sort(np.asarray(values, dtype=float), axis=1)
    if nonnegative:
        values = np.clip(values, 0.0, None)
    ids = keys.str.split(_SEPARATOR, n=1, expand=True)
    frame = pd.DataFrame({MERCHANT: ids[0].to_numpy(), ID: ids[1].to_numpy(), DS: pd.to_datetime(dates).to_numpy()})
    frame[[quantile_column(q) for q in levels]] = values
    return frame.sort_values([MERCHANT, ID, DS]).reset_index(drop=True)


def _interval(level: float) -> float | int:
    """Central interval (in %) whose lower or upper end is quantile `level`: 0.1 and 0.9 -> 80."""
    width = round(abs(100.0 - 200.0 * level), 6)
    return int(width) if width.is_integer() else width


def seasonal_naive(
    history: pd.DataFrame, h: int, season: int, levels: Sequence[float], *, freq: str | None = None
) -> pd.DataFrame:
    """Repeats the last season; quantiles from the history's own seasonal-naive errors.

    The median is the classic point forecast y[T + k - m·ceil(k/m)], so MASE matches published
    seasonal-naive numbers. Around it, quantile q adds the q-quantile minus the median of the
    empirical errors y_t - y_{t-L} of the history at the same lead L = m·ceil(k/m), so steps
    further than one season ahead get the wider spread they really have. Series with at most one
    season of history use m = 1 (naive), as MASE does; a lead without any error sample falls back
    to the longest lead that has one, and a one-point series gets no spread.
    """
    freq = freq or infer_freq(history)
    keyed = _keyed(history)
    steps = np.arange(h)
    rows = []
    for _, series in keyed.groupby(_KEY, sort=False)[Y]:
        y = series.to_numpy(dtype=float)
        m = season if len(y) > season else 1
        point = y[len(y) - m + steps % m]
        cycles = steps // m + 1
        spread = np.zeros((cycles[-1], len(levels)))
        for cycle in range(1, cycles[-1] + 1):
            lead = min(cycle, (len(y) - 1) // m) * m
            if lead:
                errors = y[lead:] - y[:-lead]
                spread[cycle - 1] = np.quantile(errors, levels) - np.median(errors)
        rows.append(point[:, None] + spread[cycles - 1])
    last = keyed.groupby(_KEY, sort=False)[DS].max()
    future = make_future_dataframe(last.index.to_series(), last, freq, h, id_col=_KEY, time_col=DS)
    return _forecast_frame(future[_KEY], future[DS], np.vstack(rows), levels, bool((history[Y] >= 0).all()))


def _statistical_model(name: str, season: int) -> object:
    model = getattr(statsforecast.models, name)
    accepts_season = "season_length" in inspect.signature(model).parameters
    return model(season_length=season) if accepts_season else model()


def statistical(
    history: pd.DataFrame,
    h: int,
    season: int,
    levels: Sequence[float],
    models: Sequence[str] = ("AutoETS", "AutoTheta"),
    *,
    freq: str | None = None,
    jobs: int = 1,
) -> dict[str, pd.DataFrame]:
    """statsforecast models by class name; their Gaussian prediction intervals become quantiles.

    Quantile q < 0.5 is the lower end of the (100 - 200q)% interval, q > 0.5 the upper end of the
    (200q - 100)% one, and the median is the mean forecast. Series shorter than
    MIN_STATISTICAL_LENGTH get seasonal-naive forecasts: statsforecast's own `fallback_model`
    mislabels interval columns (2.1.1) when the fallback's levels come out in another order.
    Each series is fitted alone, so `jobs` worker processes give the same forecasts sooner.
    """
    freq = freq or infer_freq(history)
    keyed = _keyed(history)
    long_enough = keyed.groupby(_KEY)[DS].transform("size") >= MIN_STATISTICAL_LENGTH
    short = keyed[~long_enough]
    fallback = seasonal_naive(short, h, season, levels, freq=freq) if len(short) else None
    fittable = keyed[long_enough]
    if fittable.empty:
        return {name: fallback.copy() for name in models}

    intervals = sorted({_interval(q) for q in levels if q != 0.5})
    engine = StatsForecast(models=[_statistical_model(name, season) for name in models], freq=freq, n_jobs=jobs)
    raw = engine.forecast(df=fittable[[_KEY, DS, Y]], h=h, level=intervals, id_col=_KEY, time_col=DS, target_col=Y)
    nonnegative = bool((history[Y] >= 0).all())
    out = {}
    for name in models:
        columns = [name if q == 0.5 else f"{name}-{'lo' if q < 0.5 else 'hi'}-{_interval(q)}" for q in levels]
        fitted = _forecast_frame(raw[_KEY], raw[DS], raw[columns].to_numpy(), levels, nonnegative)
        out[name] = pd.concat([fitted, fallback], ignore_index=True).sort_values([MERCHANT, ID, DS]).reset_index(drop=True)
    return out


def _week_of_year(dates: pd.DatetimeIndex) -> np.ndarray:
    return dates.isocalendar().week.to_numpy(dtype=int)


def _date_features(freq: str) -> list:
    """Calendar features that carry the seasonality of each frequency."""
    offset = pd.tseries.frequencies.to_offset(freq)
    if isinstance(offset, pd.offsets.Hour):
        return ["hour", "dayofweek"]
    if isinstance(offset, pd.offsets.Day):
        return ["dayofweek", "month"]
    if isinstance(offset, pd.offsets.Week):
        return [_week_of_year, "month"]
    return ["month"]


def _lgbm_one_group(
    history: pd.DataFrame, h: int, season: int, levels: Sequence[float], known: Sequence[str],
    future_known: pd.DataFrame | None, freq: str,
) -> pd.DataFrame:
    keyed = _keyed(history, (Y, *known))
    window = max(season, 2)
    engine = MLForecast(
        models={
            quantile_column(q): LGBMRegressor(
                objective="quantile", alpha=q, n_estimators=200, num_leaves=31, learning_rate=0.05,
                n_jobs=1, random_state=0, verbosity=-1,
            )
            for q in levels
        },
        freq=freq,
        lags=sorted({h} | {season * k for k in range(1, 5) if season * k >= h})[:3],
        lag_transforms={h: [RollingMean(window_size=window), RollingMean(window_size=4 * window)]},
        date_features=_date_features(freq),
        target_transforms=[LocalStandardScaler()],
    )
    engine.fit(keyed[[_KEY, DS, Y, *known]], id_col=_KEY, time_col=DS, target_col=Y, static_features=[], dropna=False)

    x_future = None
    if known:
        if future_known is None:
            raise ValueError(f"known covariates {list(known)} need their future values in future_known")
        expected = engine.make_future_dataframe(h)
        x_future = expected.merge(_keyed(future_known, known)[[_KEY, DS, *known]], on=[_KEY, DS], how="left")
        gaps = x_future[list(known)].isna().any(axis=1)
        if gaps.any():
            first = x_future.loc[gaps].iloc[0]
            raise ValueError(
                f"future_known lacks {int(gaps.sum())} of the {len(x_future)} future rows, first "
                f"{first[_KEY].replace(_SEPARATOR, '/')} at {first[DS]}"
            )
    with warnings.catch_warnings():  # lags beyond a short series' start are missing by design
        warnings.filterwarnings("ignore", message="Found null values in", category=UserWarning)
        raw = engine.predict(h, X_df=x_future)
    columns = [quantile_column(q) for q in levels]
    return _forecast_frame(raw[_KEY], raw[DS], raw[columns].to_numpy(), levels, bool((history[Y] >= 0).all()))


def lightgbm(
    history: pd.DataFrame,
    h: int,
    season: int,
    levels: Sequence[float],
    known: Sequence[str] = (),
    future_known: pd.DataFrame | None = None,
    pooled: bool = True,
    *,
    freq: str | None = None,
    jobs: int = 1,
) -> pd.DataFrame:
    """One quantile LightGBM per level over lags, rolling means, calendar and known covariates.

    Every lag is at least h, so the whole horizon is predicted directly from the history (the
    M5-winning "non-recursive" set-up): a recursive quantile model would feed its own q0.1 path
    back as lag 1 and drift ever lower. Each series is standardised by its own mean and spread
    (mlforecast's LocalStandardScaler), so one model can learn across series of any scale.
    `pooled` fits one model over all merchants; otherwise one per merchant, as a merchant that
    keeps its data would. Lags longer than a short series stay missing (LightGBM routes NaN), so
    short series neither crash nor force shorter lags on the rest. Per merchant, the merchants'
    models are fitted in `jobs` worker processes; each model still uses one thread, so the forecasts
    are the same as fitted one after another.
    """
    freq = freq or infer_freq(history)
    groups = [history] if pooled else [group for _, group in history.groupby(MERCHANT, sort=True)]
    fit = joblib.delayed(_lgbm_one_group)
    frames = joblib.Parallel(n_jobs=min(jobs, len(groups)))(fit(group, h, season, levels, known, future_known, freq) for group in groups)
    return pd.concat(frames, ignore_index=True).sort_values([MERCHANT, ID, DS]).reset_index(drop=True)
