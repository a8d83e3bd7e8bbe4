"""Every contender scored on the same merchants, the same splits, the same test horizon.

Shopcast in its three training regimes (federated, local-only, centralised) and the baselines a
merchant's analyst would use today (seasonal naive, ETS/Theta, LightGBM on lags + covariates).
This is the research harness: unlike the ClientApp it sees every merchant's data at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shared.adapter import adapter_state, load_adapter_state
from shared.baselines import lightgbm, seasonal_naive, statistical
from shared.config import Config
from shared.forecast import forecast_frame
from shared.metrics import score, season_for
from shared.model import Forecaster
from shared.schema import DS, ID, MERCHANT, SeriesTable
from shared.train import fit, predict
from shared.windows import Splits, Windows, build_splits

log = logging.getLogger(__name__)


@dataclass
class Contest:
    """Per-series scores and wall time of each contender, plus forecasts to plot."""

    scores: dict[str, pd.DataFrame] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    forecasts: dict[str, pd.DataFrame] = field(default_factory=dict)

    def add(self, name: str, forecast: pd.DataFrame, splits: dict[str, Splits], cfg: Config, seconds: float) -> None:
        actual = pd.concat([s.test_actuals() for s in splits.values()])
        history = pd.concat([s.history_before_test() for s in splits.values()])
        freq = next(iter(splits.values())).freq
        self.scores[name] = score(forecast, actual, history, season_for(freq), cfg.model.quantiles)
        self.seconds[name] = seconds
        self.forecasts[name] = forecast


def merchant_splits(table: SeriesTable, cfg: Config, model: Forecaster) -> dict[str, Splits]:
    return {m: build_splits(table.for_merchant(m), cfg.data, model.encode_prompts) for m in table.merchants()}


def model_forecast(model: Forecaster, splits: dict[str, Splits], cfg: Config) -> pd.DataFrame:
    device = next(model.parameters()).device
    return pd.concat(
        [forecast_frame(s, s.test, predict(model, s.test, device), cfg.model.quantiles) for s in splits.values()], ignore_index=True
    )


def concat_windows(parts: list[Windows]) -> Windows:
    """Pools merchants' windows (series ids offset so they stay distinct)."""
    offsets = np.cumsum([0] + [int(w.series.max()) + 1 for w in parts[:-1]])
    pooled = {f: np.concatenate([getattr(w, f) for w in parts]) for f in Windows.__dataclass_fields__}
    pooled["series"] = np.concatenate([w.series + o for w, o in zip(parts, offsets)])
    return Windows(**pooled)


def local_only(model: Forecaster, splits: dict[str, Splits], cfg: Config, steps: int) -> pd.DataFrame:
    """Each merchant alone: the same initial adapter and step budget as a federated merchant."""
    initial = adapter_state(model)
    forecasts = []
    for merchant, s in splits.items():
        load_adapter_state(model, initial)
        fit(model, s.train, None, cfg.train, steps=steps)
        forecasts.append(model_forecast(model, {merchant: s}, cfg))
    load_adapter_state(model, initial)
    return pd.concat(forecasts, ignore_index=True)


def centralised(model: Forecaster, splits: dict[str, Splits], cfg: Config, steps: int) -> pd.DataFrame:
    """All merchants' windows pooled in one place: the non-private upper bound."""
    initial = adapter_state(model)
    fit(model, concat_windows([s.train for s in splits.values()]), None, cfg.train, steps=steps)
    forecast = model_forecast(model, splits, cfg)
    load_adapter_state(model, initial)
    return forecast


def future_known(splits: dict[str, Splits], known: tuple[str, ...]) -> pd.DataFrame:
    """The test horizon's known covariates (promotions, holidays): LightGBM gets what shopcast gets."""
    h = next(iter(splits.values())).test.target.shape[1]
    frames = [s.frame.groupby(ID).tail(h) for s in splits.values()]
    return pd.concat(frames)[[MERCHANT, ID, DS, *known]]


def baselines(contest: Contest, splits: dict[str, Splits], cfg: Config, known: tuple[str, ...]) -> None:
    """Seasonal naive, ETS, Theta and per-merchant LightGBM on the histories before the test part."""
    history = pd.concat([s.history_before_test() for s in splits.values()])
    freq = next(iter(splits.values())).freq
    h, m, levels = cfg.data.horizon, season_for(freq), cfg.model.quantiles
    started = time.time()
    contest.add("seasonal_naive", seasonal_naive(history, h, m, levels, freq=freq), splits, cfg, time.time() - started)
    started = time.time()
    for name, forecast in statistical(history, h, m, levels, freq=freq).items():
        contest.add(name, forecast, splits, cfg, (time.time() - started) / 2)
    started = time.time()
    gbm = lightgbm(history, h, m, levels, known=known, future_known=future_known(splits, known), pooled=False, freq=freq)
    contest.add("lightgbm_per_merchant", gbm, splits, cfg, time.time() - started)
