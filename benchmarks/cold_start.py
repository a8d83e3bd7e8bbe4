"""Cold start: shops that joined weeks ago, and new products with no history, forecast from what others taught.

    .venv/bin/python -m benchmarks.cold_start configs/benchmarks/synthetic.toml   # also online_retail.toml
                     [--weeks 1,4,8] [--local-steps 100]

New shops: every series of the config's data is cut to its last `weeks` x 7 days of history plus the
test horizon, and padded before that with closed days ([data] short_series = "pad"), so each shop
looks brand new.

New products: in each shop, every other product (by id; then the rest, in a second fold) keeps only
its test horizon: it has sold nothing before the day it is forecast from. Its history is stood in for
by the shop's products most like it ([data] short_series = "analogues", shared.analogues: by
description where the data has one), and only these products are scored. With descriptions, a
`shopcast_zero_shot_all_siblings` row reads none (every product of the shop stands in), which
measures what reading the description buys.

Contenders, scored on the same test horizon:
  - shopcast_zero_shot: the shipped base adapter alone (what a new shop gets on joining);
  - shopcast_base_personal: the base with the shop's own output layers refitted on its windows;
  - shopcast_local_only: the seeded init trained on the shop's own windows alone (`--local-steps`);
  - seasonal naive, and LightGBM per merchant on the same history (as a merchant would fit today).
For new products every contender sees the same stand-in history, and "seasonal naive" repeats the
stand-in's last week. Daily configs only. Writes <results>/<benchmark.name>_cold_start.md and .json.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.scaffold import Run, arguments, command, dataset_config, quiet
from shared.config import Config, with_overrides
from shared.metrics import to_markdown
from shared.pipeline import ForecastPipeline
from shared.schema import ID, OPEN, SeriesTable, prepare
from shared.sources import raw_frame
from simulations.compare import Contest, add_lightgbm, add_seasonal_naive, local_only, merchant_splits, personalised
from simulations.report import accuracy_summary


def newcomers(cfg: Config, weeks: int) -> SeriesTable:
    """Every series cut to its last `weeks` x 7 steps plus the horizon, padded before with closed days."""
    frame, source = raw_frame(cfg)
    unique_id = cfg.data.columns.unique_id
    cut = frame[frame.groupby(unique_id).cumcount(ascending=False) < 7 * weeks + cfg.data.horizon]
    return prepare(cut.reset_index(drop=True), with_overrides(cfg, {"data.short_series": "pad"}).data, f"{source} (last {weeks} weeks)")


def new_products(cfg: Config, fold: int) -> SeriesTable:
    """Every other product of each shop (from `fold`) cut to its test horizon, stood in for by analogues."""
    frame, source = raw_frame(cfg)
    columns = cfg.data.columns
    ids = frame.groupby(columns.merchant_id, sort=True)[columns.unique_id].transform(lambda s: s.rank(method="dense").astype(int))
    fresh = (ids % 2 == fold) & (frame.groupby(columns.unique_id).cumcount(ascending=False) >= cfg.data.horizon)
    data = with_overrides(cfg, {"data.short_series": "analogues"}).data
    return prepare(frame[~fresh].reset_index(drop=True), data, f"{source} (new products, fold {fold})")


def contest_for(cfg: Config, table: SeriesTable, local_steps: int) -> Contest:
    contest = Contest()
    base = ForecastPipeline.from_config(cfg, table)
    if base.base is None:
        raise SystemExit("no shipped base adapter fits this config; pretrain one (python -m server.pretrain)")
    splits = merchant_splits(base, table)
    rows = {"shopcast_zero_shot": lambda: base.forecast_merchants(splits), "shopcast_base_personal": lambda: personalised(base, splits)}
    if table.descriptions and cfg.data.short_series == "analogues":
        rows["shopcast_zero_shot_all_siblings"] = lambda: base.forecast_merchants(merchant_splits(base, replace(table, descriptions={})))
    for name, forecast in rows.items():
        started = time.time()
        contest.add(name, forecast(), splits, cfg, time.time() - started)
    started = time.time()
    local = ForecastPipeline.from_config(with_overrides(cfg, {"model.base": ""}), table)
    contest.add("shopcast_local_only", local_only(local, splits, local_steps), splits, cfg, time.time() - started)
    add_seasonal_naive(contest, splits, cfg)
    history = pd.concat([s.history_before_test() for s in splits.values()])
    add_lightgbm(contest, splits, cfg, table.known, history[history.groupby(ID)[OPEN].cummax() > 0])  # padding is not history
    return contest


def products_contest(cfg: Config, local_steps: int) -> Contest:
    """Both folds of new products, each contender scored on the new products only."""
    cfg = with_overrides(cfg, {"data.short_series": "analogues"})
    merged = Contest()
    for fold in (0, 1):
        table = new_products(cfg, fold)
        contest = contest_for(cfg, table, local_steps)
        for name, scores in contest.scores.items():
            merged.scores[name] = pd.concat([merged.scores.get(name), scores[scores[ID].isin(list(table.padded))]], ignore_index=True)
            merged.seconds[name] = merged.seconds.get(name, 0.0) + contest.seconds[name]
    return merged


def main(argv: list[str] | None = None) -> Path | None:
    parser = arguments(__doc__)
    parser.add_argument("config", help="a daily dataset config, e.g. configs/benchmarks/synthetic.toml")
    parser.add_argument("--weeks", default="1,4,8", help="weeks of history each new shop has")
    parser.add_argument("--local-steps", type=int, default=100)
    args = parser.parse_args(argv)
    quiet(progress=True)
    if (loaded := dataset_config(args.config, args.set, "cold_start")) is None:
        return None
    overrides, cfg, _ = loaded
    weeks = [int(w) for w in args.weeks.split(",")]
    summaries: dict[int, pd.DataFrame] = {}
    with Run("benchmarks.cold_start", argv, threads=cfg.benchmark.threads) as run:
        for w in weeks:
            summaries[w] = accuracy_summary(contest_for(cfg, newcomers(cfg, w), args.local_steps))
            print(f"[cold_start] {w} weeks:\n{summaries[w].to_string()}", flush=True)
        products = accuracy_summary(products_contest(cfg, args.local_steps))
        print(f"[cold_start] new products:\n{products.to_string()}", flush=True)
    table = pd.concat([s.assign(weeks=w) for w, s in summaries.items()])
    wide = table.pivot(index="model", columns="weeks", values="wql_gmean_rel").rename(columns=lambda w: f"{w} weeks").reset_index()
    extra = [
        f"config: `{args.config}`, overrides {overrides}; base: the shipped one that fits (`[model] base = \"{cfg.model.base}\"`); "
        f"local-only: {args.local_steps} steps from the seeded init on the shop's own windows",
        f"data: every series of the config's data cut to its last w x 7 days + the {cfg.data.horizon}-day test horizon and padded "
        "before with closed days; validation = the horizon before the test, training windows = what remains before it (for 4 "
        "weeks one per series, its context all padding; for 1 week none with an open day to learn from)",
        f"new products: in each shop every other product (two folds) keeps only its {cfg.data.horizon}-day test horizon; its history is "
        f"stood in for by the shop's {cfg.data.analogues} products with the closest descriptions (all of them without descriptions); "
        "only those products are scored, against the seasonal naive of that stand-in",
    ]
    body = "\n".join([
        "## gmean WQL relative to seasonal naive, by weeks of history (lower is better)", "", to_markdown(wide),
        *(f"\n## {w} weeks of history\n\n{to_markdown(s)}" for w, s in summaries.items()),
        f"\n## New products: no history, stood in for by analogues\n\n{to_markdown(products)}",
    ])
    payload: dict[str, Any] = {"config": args.config, "overrides": overrides, "weeks": weeks,
                               "summaries": {w: s.to_dict(orient="records") for w, s in summaries.items()},
                               "new_products": products.to_dict(orient="records")}
    return run.save(f"{cfg.benchmark.name}_cold_start", f"Cold start `{cfg.benchmark.name}`: new shops and products from the base",
                    extra, body, payload, args.results)


if __name__ == "__main__":
    command(main)
