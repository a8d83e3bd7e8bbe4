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

from shared.baselines import lightgbm, seasonal_naive, statistical
from shared.config import Config, load_config, with_overrides
from shared.metrics import score, season_for
from shared.pipeline import ForecastPipeline
from shared.privacy import federated_steps
from shared.rundir import fresh_run_dir
from shared.schema import DS, ID, MERCHANT, OPEN, SeriesTable
from shared.sources import load_table
from shared.windows import Splits, concat_windows
from simulations.federated import FederatedRun, federate

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


def local_only(pipeline: ForecastPipeline, splits: dict[str, Splits], steps: int) -> pd.DataFrame:
    """Each merchant alone: the same initial adapter and step budget as a federated merchant."""
    forecasts = []
    with pipeline.keep_state() as initial:
        for merchant, s in splits.items():
            pipeline.restore(initial)
            if len(s.train):  # a shop too new to have a window to learn from keeps the initial adapter's forecast
                pipeline.fit(s.train, steps=steps)
            forecasts.append(pipeline.forecast_merchants({merchant: s}))
    return pd.concat(forecasts, ignore_index=True)


def personalised(pipeline: ForecastPipeline, splits: dict[str, Splits]) -> pd.DataFrame:
    """The pipeline's adapter with each merchant's own output layers refitted on its windows (shared.personal)."""
    forecasts = []
    with pipeline.keep_state():
        for (merchant, s), fit in zip(splits.items(), pipeline.personal_fits(list(splits.values())), strict=True):
            pipeline.use_personal(fit)
            forecasts.append(pipeline.forecast_merchants({merchant: s}))
    return pd.concat(forecasts, ignore_index=True)


def centralised(pipeline: ForecastPipeline, splits: dict[str, Splits], steps: int) -> pd.DataFrame:
    """All merchants' windows pooled in one place: the non-private upper bound."""
    with pipeline.keep_state():
        pipeline.fit(concat_windows([s.train for s in splits.values()]), steps=steps)
        return pipeline.forecast_merchants(splits)


def add_federated(contest: Contest, name: str, run: FederatedRun, pipeline: ForecastPipeline, splits: dict[str, Splits],
                  seconds: float, personal: bool = False) -> None:
    """A federation's final adapter, loaded into `pipeline`, as contender `name`; with `personal`, also
    with every merchant's own output layers refitted (`<name>_personal`, the refit's time added)."""
    pipeline.load(run.adapter_dir)
    contest.add(name, pipeline.forecast_merchants(splits), splits, pipeline.cfg, seconds)
    if personal:
        started = time.time()
        contest.add(f"{name}_personal", personalised(pipeline, splits), splits, pipeline.cfg, seconds + time.time() - started)


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
    runs_done: dict[str, FederatedRun] = {}
    seconds: dict[str, float] = {}
    for name, extra in runs.items():
        started = time.time()
        runs_done[name] = federate(with_overrides(cfg, extra | {"federation.out_dir": str(out / name)}), len(merchants))
        seconds[name] = time.time() - started
        log.info("%s: %.0f s", name, seconds[name])

    contest = Contest()
    pipeline = ForecastPipeline.from_config(cfg, table)
    splits = merchant_splits(pipeline, table)
    if pipeline.base is not None:
        contest.add("shopcast_zero_shot", pipeline.forecast_merchants(splits), splits, cfg, 0.0)
    with pipeline.keep_state():  # local-only and centralised must not start where a federation ended
        for name, run in runs_done.items():
            add_federated(contest, name, run, pipeline, splits, seconds[name], personal=cfg.train.personalise != "none")
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
    return ContestRun(contest, cfg, table, {name: run.summary for name, run in runs_done.items()}, steps)
