"""Every contender scored on the same merchants, the same splits, the same test horizon.

Shopcast in its three training regimes (federated, local-only, centralised), its ablations (the LLM
removed, replaced by one attention layer, or randomly initialised) and the baselines a merchant's
analyst would use today (seasonal naive, ETS/Theta, LightGBM on lags + covariates). This is the
research harness: unlike the ClientApp it sees every merchant's data at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from shared.adapter import adapter_state, load_adapter, load_adapter_state
from shared.baselines import lightgbm, seasonal_naive, statistical
from shared.config import Config, load_config, with_overrides
from shared.metrics import score, season_for
from shared.personal import use_personal
from shared.pipeline import ForecastPipeline
from shared.privacy import federated_steps
from shared.rundir import fresh_run_dir
from shared.schema import DS, ID, MERCHANT, OPEN, SeriesTable
from shared.sources import load_table
from shared.windows import Splits, concat_windows
from simulations.federated import simulate

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


def merchant_splits(pipeline: ForecastPipeline, table: SeriesTable) -> dict[str, Splits]:
    return {m: pipeline.splits(table.for_merchant(m)) for m in table.merchants()}


def model_forecast(pipeline: ForecastPipeline, splits: dict[str, Splits]) -> pd.DataFrame:
    return pd.concat([pipeline.predict_frame(s, s.test) for s in splits.values()], ignore_index=True)


def local_only(pipeline: ForecastPipeline, splits: dict[str, Splits], steps: int) -> pd.DataFrame:
    """Each merchant alone: the same initial adapter and step budget as a federated merchant."""
    initial = adapter_state(pipeline.model)
    forecasts = []
    for merchant, s in splits.items():
        load_adapter_state(pipeline.model, initial)
        if len(s.train):  # a shop too new to have a window to learn from keeps the initial adapter's forecast
            pipeline.fit(s.train, steps=steps)
        forecasts.append(model_forecast(pipeline, {merchant: s}))
    load_adapter_state(pipeline.model, initial)
    return pd.concat(forecasts, ignore_index=True)


def personalised(pipeline: ForecastPipeline, splits: dict[str, Splits]) -> pd.DataFrame:
    """The pipeline's adapter with each merchant's own output layers refitted on its windows (shared.personal)."""
    global_adapter = adapter_state(pipeline.model)
    forecasts = []
    for (merchant, s), fit in zip(splits.items(), pipeline.personal_fits(list(splits.values())), strict=True):
        use_personal(pipeline.model, fit)
        forecasts.append(model_forecast(pipeline, {merchant: s}))
    load_adapter_state(pipeline.model, global_adapter)
    return pd.concat(forecasts, ignore_index=True)


def centralised(pipeline: ForecastPipeline, splits: dict[str, Splits], steps: int) -> pd.DataFrame:
    """All merchants' windows pooled in one place: the non-private upper bound."""
    initial = adapter_state(pipeline.model)
    pipeline.fit(concat_windows([s.train for s in splits.values()]), steps=steps)
    forecast = model_forecast(pipeline, splits)
    load_adapter_state(pipeline.model, initial)
    return forecast


def future_known(splits: dict[str, Splits], known: tuple[str, ...]) -> pd.DataFrame:
    """The test horizon's known covariates (promotions, holidays): LightGBM gets what shopcast gets."""
    h = next(iter(splits.values())).test.target.shape[1]
    frames = [s.frame.groupby(ID).tail(h) for s in splits.values()]
    return pd.concat(frames)[[MERCHANT, ID, DS, *known]]


def add_seasonal_naive(contest: Contest, splits: dict[str, Splits], cfg: Config) -> None:
    """The reference every relative score divides by."""
    history = pd.concat([s.history_before_test() for s in splits.values()])
    freq = next(iter(splits.values())).freq
    started = time.time()
    forecast = seasonal_naive(history, cfg.data.horizon, season_for(freq), cfg.model.quantiles, freq=freq)
    contest.add("seasonal_naive", forecast, splits, cfg, time.time() - started)


def baselines(contest: Contest, splits: dict[str, Splits], cfg: Config, known: tuple[str, ...], pooled_lightgbm: bool = False) -> None:
    """Seasonal naive, ETS, Theta and per-merchant LightGBM (also one pooled over all merchants, with
    per-series scaling, when asked) on the histories before the test part."""
    add_seasonal_naive(contest, splits, cfg)
    history = pd.concat([s.history_before_test() for s in splits.values()])
    freq = next(iter(splits.values())).freq
    h, m, levels = cfg.data.horizon, season_for(freq), cfg.model.quantiles
    started = time.time()
    for name, forecast in statistical(history, h, m, levels, freq=freq, jobs=cfg.benchmark.threads).items():
        contest.add(name, forecast, splits, cfg, (time.time() - started) / 2)
    for pooled in (False, True) if pooled_lightgbm else (False,):
        add_lightgbm(contest, splits, cfg, known, history, pooled)


def add_lightgbm(contest: Contest, splits: dict[str, Splits], cfg: Config, known: tuple[str, ...], history: pd.DataFrame,
                 pooled: bool = False) -> None:
    """LightGBM on `history`, per merchant or pooled, told the horizon's known covariates and which
    days the shop is closed, as shopcast is."""
    known = (*known, OPEN)
    freq = next(iter(splits.values())).freq
    started = time.time()
    gbm = lightgbm(history, cfg.data.horizon, season_for(freq), cfg.model.quantiles, known=known,
                   future_known=future_known(splits, known), pooled=pooled, freq=freq, jobs=cfg.benchmark.threads)
    contest.add("lightgbm_pooled" if pooled else "lightgbm_per_merchant", gbm, splits, cfg, time.time() - started)


@dataclass
class ContestRun:
    """A finished contest and what it ran on: the federated runs' server summaries and wall times too."""

    contest: Contest
    cfg: Config
    table: SeriesTable
    summaries: dict[str, dict[str, Any]]
    steps: int  # per merchant; centralised training and the ablations get steps x merchants


def run_contest(
    config: Path | str, overrides: dict[str, Any], out: Path, ablations: tuple[str, ...] = (), federated: bool = True,
    pooled_lightgbm: bool = False,
) -> ContestRun:
    """Every contender on one config's data: federated through Flower's simulation (without DP, then
    with it when privacy.enabled), local-only, centralised, each ablation trained like centralised,
    and the baselines; with train.personalise, also each federated adapter with every merchant's own
    output layers refitted (the `_personal` rows); from a pretrained base, also the base alone
    (`shopcast_zero_shot`). `out` is emptied first (only if a run made it: shared.rundir): a run never
    resumes another's checkpoint or ledger. Every shopcast row gets the same data budget: rounds x
    local steps per merchant."""
    out = fresh_run_dir(out)
    overrides = overrides | {"privacy.ledger_dir": str(out / "ledgers")}
    cfg = load_config(config, overrides)
    table = load_table(cfg)
    merchants = table.merchants()
    runs = {"shopcast_federated": {"privacy.enabled": False}} if federated else {}
    if federated and cfg.privacy.enabled:
        runs["shopcast_federated_dp"] = {"privacy.enabled": True}
    summaries, seconds = {}, {}
    for name, extra in runs.items():
        run_overrides = overrides | extra | {"federation.out_dir": str(out / name)}
        started = time.time()
        summaries[name] = simulate(load_config(config, run_overrides), config, run_overrides, len(merchants))
        seconds[name] = time.time() - started
        log.info("%s: %.0f s", name, seconds[name])

    contest = Contest()
    pipeline = ForecastPipeline.from_config(cfg, table)
    splits = merchant_splits(pipeline, table)
    initial = adapter_state(pipeline.model)  # the base (or the seeded init) every shopcast row starts from
    if pipeline.base is not None:
        contest.add("shopcast_zero_shot", model_forecast(pipeline, splits), splits, cfg, 0.0)
    for name in runs:
        load_adapter(pipeline.model, out / name / "final_adapter")
        contest.add(name, model_forecast(pipeline, splits), splits, cfg, seconds[name])
        if cfg.train.personalise != "none":
            started = time.time()
            contest.add(f"{name}_personal", personalised(pipeline, splits), splits, cfg, seconds[name] + time.time() - started)
    load_adapter_state(pipeline.model, initial)  # local-only and centralised must not start where a federation ended
    steps = federated_steps(cfg)
    for name, train, budget in (("shopcast_local_only", local_only, steps), ("shopcast_centralised", centralised, steps * len(merchants))):
        started = time.time()
        contest.add(name, train(pipeline, splits, budget), splits, cfg, time.time() - started)
        log.info("%s: %.0f s", name, contest.seconds[name])
    del pipeline
    for variant in ablations:
        name, started = f"ablation_{variant}", time.time()
        ablation = ForecastPipeline.from_config(with_overrides(cfg, {"model.variant": variant}), table)
        ablation_splits = merchant_splits(ablation, table)  # no prompt tokens without an LLM
        contest.add(name, centralised(ablation, ablation_splits, steps * len(merchants)), splits, cfg, time.time() - started)
        log.info("%s: %.0f s", name, contest.seconds[name])
        del ablation
    baselines(contest, splits, cfg, table.known, pooled_lightgbm)
    return ContestRun(contest, cfg, table, summaries, steps)
