"""Calibrated intervals and the anomaly flags built on them, on one dataset config.

    .venv/bin/python -m benchmarks.calibration configs/benchmarks/walmart.toml   # also synthetic.toml
                     [--holdouts 1,4] [--inject 0.25] [--min-scores 0.25,0.5,1] [--seed 0]

Two adapters, trained as benchmarks.accuracy trains them, without DP and with the same budgets:
local-only (each merchant alone, rounds x local_steps steps) and centralised (every merchant's
windows pooled, that many steps per merchant: the stand-in for a federation's final adapter). Each
merchant then calibrates the adapter on its own holdout (ForecastPipeline.calibrate: its validation
window; with holdout 4, its 4 latest windows before the test window, 3 of them trained on) and is
scored on its test window, raw and calibrated: 80% / 90% coverage and WQL over all series and per
merchant.

Anomalies: in a share (--inject) of each merchant's series one event is put into the test window: a
spike (+5 x the series' mean |y| on one step) or, on a series selling at least 3 a step there, a
stock-out (3 steps at 0). The test window is then back-tested with the calibrated 90% band (fitted on
the clean validation window) and shared.anomalies' flags are scored point by point against the
changed points: precision, and recall per kind of event, at each --min-scores.

Writes <results>/<benchmark.name>_calibration.md and .json.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.scaffold import Run, arguments, command, dataset_config, quiet
from shared.anomalies import find_anomalies
from shared.metrics import to_markdown
from shared.pipeline import ForecastPipeline
from shared.privacy import federated_steps
from shared.schema import DS, ID, MERCHANT, SeriesTable, Y
from shared.sources import load_table
from shared.windows import Splits, concat_windows
from simulations.compare import merchant_splits

KEYS = [ID, DS]


def trained_adapters(pipeline: ForecastPipeline, splits: dict[str, Splits], steps: int) -> dict[str, dict[str, Any]]:
    """regime -> merchant -> adapter state: each merchant's own (local-only), or the pooled one (centralised)."""
    local = {}
    with pipeline.keep_state() as initial:
        for merchant, s in splits.items():
            pipeline.restore(initial)
            pipeline.fit(s.train, steps=steps)
            local[merchant] = pipeline.state()
        pipeline.restore(initial)
        pipeline.fit(concat_windows([s.train for s in splits.values()]), steps=steps * len(splits))
        pooled = pipeline.state()
    return {"local_only": local, "centralised": dict.fromkeys(splits, pooled)}


def coverage_scores(pipeline: ForecastPipeline, s: Splits, holdouts: list[int]) -> pd.DataFrame:
    """Per-series test scores, raw and calibrated on each holdout size."""
    frames = [pipeline.score(s).assign(holdout="raw")]
    for windows in holdouts:
        calibrated = pipeline.predict_frame(s, s.test, pipeline.calibrate(s, windows))
        frames.append(pipeline.score(s, calibrated).assign(holdout=f"calibrated, {windows} window(s)"))
    return pd.concat(frames, ignore_index=True)


def series_interval(per_series: pd.Series, rng: np.random.Generator, draws: int = 2000) -> str:
    """The 90% bootstrap interval of a mean over series, resampling whole series: a series' test days
    are correlated, so the days themselves are not independent draws. It says whether a coverage
    away from nominal is more than the few series of a benchmark can tell apart."""
    values = per_series.to_numpy(dtype=float)
    means = rng.choice(values, size=(draws, len(values))).mean(axis=1)
    low, high = np.quantile(means, [0.05, 0.95])
    return f"{low:.3f} to {high:.3f}"


def inject(table: SeriesTable, horizon: int, share: float, rng: np.random.Generator) -> tuple[SeriesTable, pd.DataFrame]:
    """The table with one event in the test part of `share` of its series, and the points it changed."""
    frame = table.frame.copy()
    original = frame[Y].copy()
    kinds = []
    for uid in rng.permutation(frame[ID].unique())[: max(1, round(share * frame[ID].nunique()))]:
        rows = frame.index[frame[ID] == uid][np.argsort(frame.loc[frame[ID] == uid, DS].to_numpy())]
        test = rows[-horizon:]
        if frame.loc[test, Y].mean() >= 3 and rng.random() < 0.5:
            start = int(rng.integers(0, horizon - 2))
            frame.loc[test[start : start + 3], Y] = 0.0
            kinds.append(pd.DataFrame({ID: uid, DS: frame.loc[test[start : start + 3], DS], "kind": "stock_out"}))
        else:
            hit = test[int(rng.integers(horizon))]
            frame.loc[hit, Y] += 5 * max(frame.loc[rows[:-horizon], Y].abs().mean(), 1.0)
            kinds.append(pd.DataFrame({ID: [uid], DS: [frame.loc[hit, DS]], "kind": "spike"}))
    changed = frame.loc[frame[Y] != original, KEYS]
    events = pd.concat(kinds, ignore_index=True).merge(changed, on=KEYS)  # a stock-out day that sold 0 anyway is no event
    return dataclasses.replace(table, frame=frame), events


def anomaly_counts(pipeline: ForecastPipeline, table: SeriesTable, events: pd.DataFrame, min_scores: list[float]) -> list[dict[str, Any]]:
    """Flags on the test window of an injected table against its events, per minimum score."""
    s = pipeline.splits(table)
    backtest = pipeline.backtest(s, 1, pipeline.calibrate(s))
    found = find_anomalies(backtest, pipeline.cfg.model.quantiles, 0.9, min(min_scores))
    rows = []
    for min_score in min_scores:
        flagged = found.loc[found["score"] >= min_score, KEYS]
        hits = events.merge(flagged, on=KEYS)
        rows.append({"min_score": min_score, "days": len(backtest), "flagged": len(flagged), "true_flags": len(hits),
                     **{f"events_{kind}": int((events["kind"] == kind).sum()) for kind in ("spike", "stock_out")},
                     **{f"found_{kind}": int((hits["kind"] == kind).sum()) for kind in ("spike", "stock_out")}})
    return rows


def anomaly_table(counts: pd.DataFrame) -> pd.DataFrame:
    totals = counts.groupby(["regime", "min_score"], sort=False).sum(numeric_only=True).reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        return pd.DataFrame({
            "regime": totals["regime"], "min_score": totals["min_score"], "days": totals["days"], "flagged": totals["flagged"],
            "precision": totals["true_flags"] / totals["flagged"],
            "recall": (totals["found_spike"] + totals["found_stock_out"]) / (totals["events_spike"] + totals["events_stock_out"]),
            "recall_spike": totals["found_spike"] / totals["events_spike"],
            "recall_stock_out": totals["found_stock_out"] / totals["events_stock_out"],
            "false flags per 1000 days": 1000 * (totals["flagged"] - totals["true_flags"]) / totals["days"],
        })


def main(argv: list[str] | None = None) -> Path | None:
    parser = arguments(__doc__)
    parser.add_argument("config", help="dataset config, e.g. configs/benchmarks/walmart.toml")
    parser.add_argument("--holdouts", default="1,4", help="holdout sizes in windows per series to calibrate on")
    parser.add_argument("--inject", type=float, default=0.25, help="share of each merchant's series given one anomaly")
    parser.add_argument("--min-scores", default="0.25,0.5,1", help="anomaly score thresholds to report")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quiet(progress=True)
    if (loaded := dataset_config(args.config, args.set, "calibration")) is None:
        return None
    overrides, cfg, name = loaded
    holdouts = [int(h) for h in args.holdouts.split(",")]
    min_scores = [float(m) for m in args.min_scores.split(",")]
    steps = federated_steps(cfg)

    with Run("benchmarks.calibration", argv, threads=cfg.benchmark.threads) as run:
        table = load_table(cfg)
        pipeline = ForecastPipeline.from_config(cfg, table)
        splits = merchant_splits(pipeline, table)
        rng = np.random.default_rng(args.seed)
        scores, counts = [], []
        for regime, states in trained_adapters(pipeline, splits, steps).items():
            for merchant, s in splits.items():
                pipeline.restore(states[merchant])
                scores.append(coverage_scores(pipeline, s, holdouts).assign(regime=regime))
                injected, events = inject(table.for_merchant(merchant), cfg.data.horizon, args.inject, rng)
                counts += [row | {"regime": regime, MERCHANT: merchant} for row in anomaly_counts(pipeline, injected, events, min_scores)]

    per_series = pd.concat(scores, ignore_index=True)
    metrics = ["coverage_80", "coverage_90", "wql"]
    overall = per_series.groupby(["regime", "holdout"], sort=False)[metrics].mean().reset_index()
    for column in metrics[:2]:
        overall[f"{column} 90% interval"] = [series_interval(g[column], np.random.default_rng(args.seed))
                                             for _, g in per_series.groupby(["regime", "holdout"], sort=False)]
    per_merchant = per_series.groupby(["regime", MERCHANT, "holdout"], sort=False)[metrics[:2]].mean().reset_index()
    anomalies = anomaly_table(pd.DataFrame(counts))
    body = "\n".join([
        "## Coverage on the test window, raw and calibrated (nominal 0.8 and 0.9; mean over all series)", "",
        "The intervals are 90% bootstrap intervals over series (`series_interval`): a nominal level inside one is as close as "
        "this many series can measure.", "",
        to_markdown(overall),
        "## Per merchant", "", to_markdown(per_merchant),
        f"## Anomalies injected into {args.inject:.0%} of each merchant's series, flagged outside the calibrated 90% band", "",
        to_markdown(anomalies),
    ])
    extra = [f"config `{args.config}`, overrides {overrides}; {len(splits)} merchants, {sum(len(s.series_ids) for s in splits.values())} "
             f"series; context {cfg.data.context}, horizon {cfg.data.horizon}; backbone `{cfg.model.backbone}` ({cfg.model.llm_layers} "
             f"blocks); {steps} steps per merchant alone, {steps * len(splits)} pooled; no DP; seed {args.seed}"]
    payload = {"config": args.config, "overrides": overrides, "overall": overall.to_dict(orient="records"),
               "per_merchant": per_merchant.to_dict(orient="records"), "anomalies": anomalies.to_dict(orient="records"),
               "per_series": per_series.to_dict(orient="records")}
    return run.save(name, f"Calibrated intervals and anomaly flags `{cfg.benchmark.name}`", extra, body, payload, args.results)


if __name__ == "__main__":
    command(main)
