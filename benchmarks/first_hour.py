"""A merchant's first hour: the README's journey, run verbatim on a daily store export, scored on 28 kept-back days.

The case is built from public data (UCI Online Retail, `../shared/data/online_retail_uci`): three
"stores" (the shop's three largest customer countries, each its own merchant) with a daily sales
export as a chain's till system writes it: day-first dates (`13.01.2011`), `Sales` (net revenue,
returns included), `Customers`, `Open` (0 on the days the shop took no orders at all: every
Saturday and its Christmas and bank-holiday closures) and a `StateHoliday` code in the Rossmann
style (`0` none, `a` bank holiday, `b` Easter, `c` Christmas; England's bank holidays, a public
fact). The last 28 days are kept aside; the merchant sees only the rest, writes `mine.toml` as the
README shows (its own block, read from the README) and runs, per store, the journey's command:

    shopcast local --config mine.toml --merchant <store> --out <runs>/<store> --future planned.csv

with the plan for the horizon (its openings and holiday codes, as LightGBM is given them too), then
`shopcast forecast` with the adapter it saved and no `--future` (the shop's own closing pattern is
assumed, and the forecast says so). Both are
scored against seasonal naive (the same weekday last week) and a per-store LightGBM on lags,
calendar, the open flag and the holiday codes, on the same 28 days (MASE of the median, WQL; closed
days included: every forecaster is told they are closed, or learns it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks import scaffold
from shared import presets
from shared.baselines import lightgbm, seasonal_naive
from shared.config import PROJECT_ROOT
from shared.metrics import score, summarise, to_markdown
from shared.schema import DS, ID, MERCHANT, Y, quantile_column

STORES = ("United Kingdom", "Germany", "France")
HORIZON = 28
LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# England and Wales bank holidays inside the data's span (gov.uk), coded as Rossmann codes its holidays
HOLIDAYS = {
    "2010-12-27": "c", "2010-12-28": "c", "2011-01-03": "a", "2011-04-22": "b", "2011-04-25": "b",
    "2011-04-29": "a", "2011-05-02": "a", "2011-05-30": "a", "2011-08-29": "a",
}
HOLIDAY_LEVELS = ("StateHoliday=a", "StateHoliday=b", "StateHoliday=c")


def readme_config() -> str:
    """mine.toml exactly as the README's journey writes it, less the `promo` line (this export has no
    promotions, which the README says to leave out): the benchmark runs what a merchant would copy."""
    journey = (PROJECT_ROOT / "README.md").read_text().split("## A merchant's journey", 1)[1]
    block = journey.split("```toml\n", 1)[1].split("```", 1)[0]
    return "".join(line[3:] + "\n" for line in block.splitlines() if not line.strip().startswith("promo ="))


def store_export() -> pd.DataFrame:
    """Every calendar day of the three stores, in the export's own columns (dates still timestamps)."""
    daily = pd.read_csv(presets.SHARED_DATA / "online_retail_uci" / "daily_by_country.csv", parse_dates=["ds"])
    trading = pd.DatetimeIndex(sorted(daily["ds"].unique()))
    calendar = pd.date_range(trading.min(), trading.max(), freq="D")
    frames = []
    for store in STORES:
        own = daily[daily["unique_id"] == store].set_index("ds").reindex(calendar)
        frames.append(pd.DataFrame({
            "Store": store, "Date": calendar,
            "Sales": own["revenue"].fillna(0.0).round(2).to_numpy(),
            "Customers": own["n_customers"].fillna(0).astype(int).to_numpy(),
            "Open": calendar.isin(trading).astype(int),
            "StateHoliday": [HOLIDAYS.get(str(day.date()), "0") for day in calendar],
        }))
    return pd.concat(frames, ignore_index=True)


def write_case(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """stores.csv (all but the last 28 days, day-first dates), planned.csv (the horizon's openings and
    holiday codes) and mine.toml under `folder`; returns the history and the kept-back days."""
    export = store_export()
    cut = export["Date"].max() - pd.Timedelta(days=HORIZON)
    history, kept = export[export["Date"] <= cut], export[export["Date"] > cut]
    folder.mkdir(parents=True, exist_ok=True)
    history.to_csv(folder / "stores.csv", index=False, date_format="%d.%m.%Y")
    kept[["Store", "Date", "Open", "StateHoliday"]].to_csv(folder / "planned.csv", index=False, date_format="%d.%m.%Y")
    (folder / "mine.toml").write_text(readme_config())
    return history, kept


def long_frame(export: pd.DataFrame) -> pd.DataFrame:
    """The export in the forecast frames' schema, with the known covariates LightGBM reads."""
    frame = pd.DataFrame({MERCHANT: export["Store"], ID: export["Store"], DS: export["Date"], Y: export["Sales"].clip(lower=0.0),
                          "open": export["Open"].astype(float)})
    for level in HOLIDAY_LEVELS:
        frame[level] = (export["StateHoliday"] == level.split("=")[1]).astype(float).to_numpy()
    return frame.reset_index(drop=True)


def shopcast(folder: Path, *args: str) -> None:
    """One shopcast command, typed as a merchant types it in the folder holding mine.toml."""
    command = [str(Path(sys.executable).parent / "shopcast"), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=folder, check=True, env=os.environ | {"TQDM_DISABLE": "1"})


def journey(folder: Path, runs: Path, seed: int) -> tuple[dict[str, pd.DataFrame], float]:
    """Per store, the journey's `shopcast local ... --future planned.csv` (with `--set train.seed=<seed>`),
    then `shopcast forecast` with the adapter it saved and no plan (the forecast a merchant gets without
    `--future`); both forecasts' frames, and the wall time of the `local` commands."""
    frames: dict[str, list[pd.DataFrame]] = {"shopcast_with_plan": [], "shopcast_without_plan": []}
    seconds = 0.0
    for store in STORES:
        out = runs / store.replace(" ", "_")
        started = time.time()
        shopcast(folder, "local", "--config", "mine.toml", "--merchant", store, "--out", str(out), "--future", "planned.csv",
                 "--set", f"train.seed={seed}")
        seconds += time.time() - started
        shopcast(folder, "forecast", "--config", "mine.toml", "--merchant", store, "--adapter", str(out), "--out", str(out / "no_plan"))
        frames["shopcast_with_plan"].append(pd.read_csv(out / "forecast.csv", parse_dates=[DS]))
        frames["shopcast_without_plan"].append(pd.read_csv(out / "no_plan" / "forecast.csv", parse_dates=[DS]))
    joined = {name: pd.concat(parts, ignore_index=True).astype({ID: str}) for name, parts in frames.items()}
    return {name: frame.assign(**{MERCHANT: frame[ID]}) for name, frame in joined.items()}, seconds


def main() -> None:
    parser = scaffold.arguments(__doc__)
    parser.add_argument("--work", type=Path, default=Path("runs/first_hour"), help="folder for the case and the runs")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds of the journey, comma-separated")
    args = parser.parse_args()
    if scaffold.data_missing("online_retail", "first_hour"):
        return
    work, seeds = args.work.resolve(), [int(s) for s in args.seeds.split(",")]
    columns = [MERCHANT, ID, DS, *(quantile_column(q) for q in LEVELS)]
    with scaffold.Run("benchmarks.first_hour", None) as run:
        history, kept = write_case(work)
        past, actual = long_frame(history), long_frame(kept)
        known = ["open", *HOLIDAY_LEVELS]
        baselines = {"seasonal_naive": seasonal_naive(past, HORIZON, 7, LEVELS, freq="D"),
                     "lightgbm_per_store": lightgbm(past, HORIZON, 7, LEVELS, known, actual[[MERCHANT, ID, DS, *known]],
                                                    pooled=False, freq="D")}
        summaries, stores, seconds = [], [], []
        for seed in seeds:
            forecasts, wall = journey(work, work / f"runs_seed{seed}", seed)
            scores = {name: score(frame[columns], actual, past, 7, LEVELS) for name, frame in {**forecasts, **baselines}.items()}
            summaries.append(summarise(scores).assign(seed=seed))
            stores.append(pd.concat([frame.assign(model=name, seed=seed) for name, frame in scores.items()]))
            seconds.append(wall)
    every = pd.concat(summaries)
    spread = every.groupby("model", sort=False)[["mase_gmean_rel", "wql_gmean_rel", "coverage_80"]].agg(["mean", "std"])
    table = pd.DataFrame({"model": spread.index, **{f"{metric} {stat}": spread[(metric, stat)].fillna(0.0).to_numpy()
                                                      for metric in ("mase_gmean_rel", "wql_gmean_rel", "coverage_80")
                                                      for stat in ("mean", "std")}})
    per_store = pd.concat(stores).groupby(["model", ID], sort=False)[["mase", "wql", "coverage_80"]].mean().reset_index()
    body = (
        f"Gmean over the three stores relative to seasonal naive (lower is better), mean and standard deviation over "
        f"training seeds {seeds} (the baselines do not depend on them):\n\n" + to_markdown(table)
        + "\nPer store, mean over the seeds:\n\n" + to_markdown(per_store.sort_values([ID, "model"]).reset_index(drop=True))
    )
    given = (f"stores {', '.join(STORES)}; {len(history) // len(STORES)} days each given, the last {HORIZON} kept aside "
             f"({kept['Date'].min().date()} to {kept['Date'].max().date()})")
    extra = [given, "`shopcast local` wall time for the three stores, per seed: " + ", ".join(f"{s:.0f} s" for s in seconds)]
    run.save("first_hour", "A merchant's first hour on a daily store export (UCI Online Retail, three stores)", extra, body,
             {"summary": every.to_dict(orient="records"), "per_store": per_store.to_dict(orient="records"),
              "config": readme_config()}, args.results)


if __name__ == "__main__":
    scaffold.command(main)
