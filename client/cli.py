"""`shopcast`: one merchant trains, and forecasts with, its own adapter on its own machine.

    shopcast train     --config configs/default.toml --merchant shop_00 --out runs/local/shop_00
    shopcast forecast  --config configs/default.toml --merchant shop_00 --adapter runs/local/shop_00 [--future planned.csv]
    shopcast local     --config configs/default.toml --merchant shop_00 --out runs/local/shop_00
    shopcast anomalies --merchant shop_00 --adapter runs/local/shop_00 --windows 4
    shopcast stock     --merchant shop_00 --adapter runs/local/shop_00 --service-level 0.95 --lead-time 7

Intervals are calibrated (shared/calibration.py) on the merchant's own latest holdout: `train` and
`local` save calibration.json beside the adapter, and the other commands use it, or calibrate an
adapter that has none (a federated one) on the merchant's data before forecasting.

`train` and `local` train without DP noise: what they train stays on the merchant's machine, and DP
belongs on what leaves it (docs/privacy.md). `--dp` trains under [privacy] and spends the merchant's
ledger, for an adapter it means to share. A run that trained nothing (a spent budget, a non-finite
loss) writes no adapter and exits non-zero, unless `--accept-untrained` asks for its output anyway.

An adapter folder (`--out` of `train` and `local`) must be new, empty or shopcast's own (it holds
shopcast's meta.json), unless `--force`: this is checked before any training or ε is spent.

Any config key can be changed with `--set section.key=value` (the value is read as TOML, else as a
string). Bad input or configuration prints one red line and exits with code 2, so a merchant sees
what to fix rather than a traceback. Steps that can take minutes show progress bars on stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Callable

import pandas as pd
import typer
from tqdm import tqdm

from shared.adapter import AdapterMismatch
from shared.anomalies import find_anomalies
from shared.calibration import FILE as CALIBRATION_FILE
from shared.calibration import Calibration
from shared.config import Config, ConfigError, load_config, parse_overrides
from shared.ledger import LedgerError
from shared.metrics import METRICS
from shared.pipeline import ForecastPipeline, shown_path
from shared.plots import fan_chart
from shared.privacy import MerchantPins
from shared.schema import DS, ID, MERCHANT, OPEN, DataValidationError, SeriesTable, Y, read_table, to_long, with_known_channels
from shared.sources import load_table, one_merchant
from shared.stock import stock_levels
from shared.train import TrainResult
from shared.windows import Splits

app = typer.Typer(help=__doc__.split("\n")[0], no_args_is_help=True, pretty_exceptions_show_locals=False)


class OutputFolderError(ValueError):
    """`--out` names a file, or a folder of someone else's files that shopcast would write over."""


class NothingTrained(RuntimeError):
    """Training took no step, or none with a finite loss: its adapter is the one it started from."""


USER_ERRORS = (DataValidationError, ConfigError, AdapterMismatch, LedgerError, FileNotFoundError, OutputFolderError, NothingTrained)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file; keys it omits keep configs/default.toml's values")
]
MerchantOption = Annotated[str | None, typer.Option("--merchant", "-m", help="merchant id; optional if the data holds one")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key, e.g. --set train.max_steps=50")]
FutureOption = Annotated[Path | None, typer.Option("--future", help=(
    "CSV or Parquet plan for the horizon, in the data file's own column names (the config's data.columns): the series id, the date, "
    "every known covariate and optionally the open flag, one row per series and horizon date. A series left out is forecast "
    "with known covariates 0 and closed on a weekday it was closed at every occurrence of its last context; a listed series "
    "missing a date is an error"))]
AdapterOption = Annotated[Path | None, typer.Option(help="adapter directory (default: runs/local/<merchant>)")]
OutOption = Annotated[Path | None, typer.Option(help="output directory (default: the adapter directory)")]
AdapterOutOption = Annotated[Path | None, typer.Option("--out", help="adapter directory (default: runs/local/<merchant>)")]
ForceOption = Annotated[bool, typer.Option("--force", help="write the adapter into a folder of other files, over any of its names")]
DpOption = Annotated[bool, typer.Option(
    "--dp", help="train under DP-SGD (the privacy settings), spending the merchant's ledger: an adapter to share")]
AcceptUntrainedOption = Annotated[bool, typer.Option("--accept-untrained", help="write the outputs even if nothing was trained")]


def user_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Input mistakes become one red line and exit code 2; programming errors keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except USER_ERRORS as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def read_config(path: Path | None, sets: list[str] | None) -> Config:
    """The run's config; a `--config` that is a folder or not text (config.py reads it as text) is a user error."""
    try:
        return load_config(path, parse_overrides(sets or []))
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} is not a readable TOML file ({exc})") from None


def merchant_table(cfg: Config, merchant: str | None) -> tuple[str, SeriesTable]:
    return one_merchant(load_table(cfg), merchant)


def written_by_shopcast(folder: Path) -> bool:
    """Whether `folder` holds an adapter's meta.json (shared.adapter.save_adapter writes its model and shape)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"model", "shape"} <= meta.keys()


def check_out(out: Path, adapter: bool, force: bool) -> None:
    """Refuses an output folder before anything is trained or spent: a file, or, for an adapter (whose
    meta.json and lora/ would replace files of those names), a folder of someone else's files."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file; name a folder")
    if adapter and not force and out.is_dir() and any(out.iterdir()) and not written_by_shopcast(out):
        raise OutputFolderError(f"--out {out} holds files shopcast did not write; name a new or empty folder, "
                                "or pass --force to write the adapter beside them")


def progress_bars(steps: range, stage: str) -> Iterable[int]:
    """A tqdm bar (stderr) with the time left, for the loops that can take minutes (shared.personal.Progress)."""
    return tqdm(steps, desc=stage, leave=False)


def read_future(path: Path | None, cfg: Config, table: SeriesTable) -> pd.DataFrame | None:
    """The plan for the horizon: the known covariates (and, where the file has the open column, the
    open flags) of each series it lists. It is the data file's layout without sales, read by the same
    to_long, so it is checked as strictly (numbers, 0/1 flags, one date format, no duplicates) and its
    columns become model channels the same way. A series the file leaves out keeps build_splits'
    defaults, which the forecast names; a series it lists must cover every date of the horizon, as a
    half-planned series is a mistake more often than a plan."""
    if path is None:
        return None
    data, columns = cfg.data, cfg.data.columns
    raw = read_table(path, data)
    if columns.merchant_id and columns.merchant_id in raw:  # a chain's plan for all its shops: this merchant's rows
        raw = raw[raw[columns.merchant_id].astype(str).isin(set(table.frame[MERCHANT]))]
    layout = replace(columns, merchant_id="", observed=(), description="", open=columns.open if columns.open in raw else "")
    no_sales = raw.assign(**{columns.y: 0.0})  # sales are what the forecast is for: zeros stand in
    planned = to_long(no_sales, layout, path, max_abs_value=data.max_abs_value, date_format=data.date_format)
    planned = with_known_channels(planned, columns, path, table.none_levels, data.max_abs_value)
    unknown = sorted(set(planned[ID]) - set(table.frame[ID]))
    if unknown:
        typer.secho(f"warning: {path}: series {unknown[:3]} are not in the data and are ignored", fg=typer.colors.YELLOW, err=True)
    gaps = unplanned_dates(planned, table, data.horizon)
    if not gaps.empty:
        first = gaps.iloc[0]
        raise DataValidationError(
            f"series {first[ID]!r} lacks {int((gaps[ID] == first[ID]).sum())} of the horizon's {data.horizon} dates, first "
            f"{first[DS].date()}; list every date of a series you plan (leave a series out to forecast it with the defaults)",
            file=path, column=columns.ds,
        )
    return planned[[ID, DS, *table.known, *([OPEN] if OPEN in planned else [])]]


def unplanned_dates(planned: pd.DataFrame, table: SeriesTable, horizon: int) -> pd.DataFrame:
    """The (series, date) pairs of the horizon that `planned` lists the series of but not the date."""
    last = table.frame.groupby(ID)[DS].max()
    listed = last[last.index.isin(planned[ID])]
    horizon_dates = pd.DataFrame(
        [(uid, ds) for uid, end in listed.items() for ds in pd.date_range(end, periods=horizon + 1, freq=table.freq)[1:]], columns=[ID, DS],
    )
    found = horizon_dates.merge(planned[[ID, DS]], on=[ID, DS], how="left", indicator=True)["_merge"] == "both"
    return horizon_dates[~found.to_numpy()]


def mean_scores(scores: pd.DataFrame) -> dict[str, float]:
    return scores[list(METRICS)].mean().round(4).to_dict()


def start_training(config: Path | None, merchant: str | None, out: Path | None, sets: list[str] | None,
                   force: bool) -> tuple[str, SeriesTable, ForecastPipeline, Path]:
    """What `train` and `local` start from: the merchant's table, a pipeline from the base that fits, and
    the adapter folder, checked before anything is trained or spent."""
    cfg = read_config(config, sets)
    merchant, table = merchant_table(cfg, merchant)
    out = out or Path("runs/local") / merchant
    check_out(out, adapter=True, force=force)
    pipeline = ForecastPipeline.from_config(cfg, table)
    pipeline.progress = progress_bars
    return merchant, table, pipeline, out


def train_model(pipeline: ForecastPipeline, merchant: str, splits: Splits, out: Path, dp: bool, accept_untrained: bool) -> Calibration:
    """Early-stopped local training (fixed length under DP), then the calibration, test-split scores
    before and after it, and the adapter with its calibration.json."""
    result = fit_locally(pipeline, merchant, splits, dp)
    check_trained(result, accept_untrained)

    scores = pipeline.score(splits)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "metrics.csv", index=False)
    means = mean_scores(scores)
    typer.echo("test: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    calibration = pipeline.calibrate(splits)
    test = pipeline.predict_frame(splits, splits.test, calibration)
    calibrated = mean_scores(pipeline.score(splits, test))
    typer.echo(f"test coverage, raw -> calibrated ({calibration.points} validation points): "
               + ", ".join(f"{k[-2:]}% band {means[k]:.3f} -> {calibrated[k]:.3f}" for k in ("coverage_80", "coverage_90")))
    test = test.merge(splits.test_actuals()[[ID, DS, Y]], on=[ID, DS], how="left")
    fan_chart(splits.frame, test, out / "test.png", f"{merchant}: test split, calibrated (dashed = actual)")

    base = shown_path(pipeline.base) if pipeline.base is not None else None
    meta = {"merchant": merchant, "freq": splits.freq, "base_folder": base, "steps": result.steps, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "epsilon": result.epsilon, "test": means, "test_calibrated": calibrated}
    pipeline.save(out, meta)
    calibration.save(out)
    typer.echo(f"adapter, {CALIBRATION_FILE}, metrics.csv and test.png written to {out}")
    return calibration


def fit_locally(pipeline: ForecastPipeline, merchant: str, splits: Splits, dp: bool) -> TrainResult:
    """Trains on the merchant's windows, under DP-SGD and its ledger only with `dp`: an adapter that
    stays on this machine releases nothing, so noise would only cost accuracy (docs/privacy.md)."""
    cfg = pipeline.cfg
    if dp:
        privacy = pipeline.private_training(merchant, splits.train, MerchantPins(require_dp=True), planned_steps=cfg.train.max_steps)
    else:
        privacy = None
        typer.echo("training without DP noise: the adapter stays on this machine (--dp trains one to share, spending the privacy budget)")
    typer.echo(pipeline.describe_base())
    with tqdm(total=cfg.train.max_steps, desc=f"training {merchant}", unit="step") as bar:
        result = pipeline.fit(splits.train, splits.val, privacy=privacy, on_step=lambda step: bar.update(1))
    typer.echo(f"{merchant}: {result.steps} steps, train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f}"
               + (f", epsilon {result.epsilon:.2f}" if result.epsilon is not None else ""))
    return result


def check_trained(result: TrainResult, accept_untrained: bool) -> None:
    """A run that took no step (a spent budget) or learnt nothing finite must not pass for a trained model."""
    if result.steps > 0 and math.isfinite(result.train_loss):
        return
    why = f"{result.steps} steps: " + ("the privacy budget is spent" if result.status == "budget_exhausted" else "no finite training loss")
    if not accept_untrained:
        raise NothingTrained(f"nothing was trained ({why}), so no adapter or forecast was written; "
                             "pass --accept-untrained to write the untrained one anyway")
    typer.secho(f"warning: nothing was trained ({why}); its outputs are written as --accept-untrained asks",
                fg=typer.colors.YELLOW, err=True)


def future_forecast(pipeline: ForecastPipeline, splits: Splits, calibration: Calibration) -> pd.DataFrame:
    """The calibrated forecast of the horizon after the last date, saying what it assumed where no plan spoke."""
    if splits.assumed:
        typer.secho(f"warning: where --future plans nothing, {splits.assumed}", fg=typer.colors.YELLOW, err=True)
    return pipeline.predict_frame(splits, splits.future, calibration)


def write_forecast(pipeline: ForecastPipeline, merchant: str, splits: Splits, out: Path, calibration: Calibration) -> None:
    """The horizon after the last date: forecast.csv and a fan chart under `out`."""
    frame = future_forecast(pipeline, splits, calibration)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "forecast.csv", index=False, date_format="%Y-%m-%d")
    title = f"{merchant}: forecast from {frame[DS].min().date()} (median, calibrated 80% band)"
    fan_chart(splits.frame, frame, out / "forecast.png", title)
    typer.echo(f"forecast of {frame[ID].nunique()} series x {pipeline.cfg.data.horizon} steps written to {out / 'forecast.csv'}")


@dataclass
class Trained:
    """What the commands after training start from: a merchant's data cut for a saved adapter, its calibration."""

    merchant: str
    pipeline: ForecastPipeline
    splits: Splits
    calibration: Calibration
    out: Path


def load_trained(config: Path | None, merchant: str | None, adapter: Path | None, out: Path | None,
                 future: Path | None, sets: list[str] | None, force: bool = False) -> Trained:
    """The adapter (with the model settings of its meta.json, so they match the weights), the merchant's
    splits, and the adapter's calibration.json; an adapter without one (a federated adapter) is
    personalised (train.personalise) and calibrated here on the merchant's own windows, and the result
    saved under `out`."""
    cfg = read_config(config, sets)
    merchant, table = merchant_table(cfg, merchant)
    adapter = adapter or Path("runs/local") / merchant
    out = out or adapter
    pipeline = ForecastPipeline.from_adapter(adapter, cfg)
    pipeline.progress = progress_bars
    calibration = Calibration.load(adapter)
    personalising = calibration is None and pipeline.cfg.train.personalise != "none"
    check_out(out, adapter=personalising, force=force)
    splits = pipeline.splits(table, read_future(future, pipeline.cfg, table))
    if calibration is None:
        if personalising:
            before, after, _ = pipeline.personalise(splits)
            saved = pipeline.save(out, {"merchant": merchant, "personalised_from": str(adapter)})
            typer.echo(f"output layers refitted on {merchant}'s own windows (validation loss {before:.4f} -> {after:.4f}); "
                       f"this personal adapter stays here: {saved}")
        calibration = pipeline.calibrate(splits)
        typer.echo(f"no {CALIBRATION_FILE} beside the adapter: calibrated on {calibration.points} validation points "
                   f"of {merchant}, saved to {calibration.save(out)}")
    return Trained(merchant, pipeline, splits, calibration, out)


def option_error(option: str, exc: ValueError) -> typer.BadParameter:
    """A value the model cannot serve (a band it lacks, a lead time past its horizon), as a usage error."""
    return typer.BadParameter(str(exc), param_hint=option)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log data-cleaning and training details")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command(epilog="Example: shopcast train --merchant shop_00 --out runs/local/shop_00 --set train.max_steps=100")
@user_errors
def train(
    config: ConfigOption = None,
    merchant: MerchantOption = None,
    out: AdapterOutOption = None,
    sets: SetOption = None,
    dp: DpOption = False,
    accept_untrained: AcceptUntrainedOption = False,
    force: ForceOption = False,
) -> None:
    """Train an adapter on one merchant's data; writes the adapter, its calibration and its test-split scores."""
    merchant, table, pipeline, out = start_training(config, merchant, out, sets, force)
    train_model(pipeline, merchant, pipeline.splits(table), out, dp, accept_untrained)


@app.command(epilog="Example: shopcast forecast --merchant shop_00 --adapter runs/local/shop_00 --future planned_promotions.csv")
@user_errors
def forecast(
    config: ConfigOption = None,
    merchant: MerchantOption = None,
    adapter: AdapterOption = None,
    out: OutOption = None,
    future: FutureOption = None,
    sets: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Forecast the horizon after the last date with a trained adapter, with calibrated bands.

    The model settings come from the adapter's meta.json, so they always match the trained weights.
    """
    run = load_trained(config, merchant, adapter, out, future, sets, force)
    write_forecast(run.pipeline, run.merchant, run.splits, run.out, run.calibration)


@app.command(epilog="Example: shopcast local --merchant shop_00 --out runs/local/shop_00")
@user_errors
def local(
    config: ConfigOption = None,
    merchant: MerchantOption = None,
    out: AdapterOutOption = None,
    future: FutureOption = None,
    sets: SetOption = None,
    dp: DpOption = False,
    accept_untrained: AcceptUntrainedOption = False,
    force: ForceOption = False,
) -> None:
    """Train on one merchant's data, then forecast its next horizon: the quick start."""
    merchant, table, pipeline, out = start_training(config, merchant, out, sets, force)
    splits = pipeline.splits(table, read_future(future, pipeline.cfg, table))
    calibration = train_model(pipeline, merchant, splits, out, dp, accept_untrained)
    write_forecast(pipeline, merchant, splits, out, calibration)


@app.command(epilog="Example: shopcast anomalies --merchant shop_00 --adapter runs/local/shop_00 --windows 8 --min-score 1")
@user_errors
def anomalies(
    config: ConfigOption = None,
    merchant: MerchantOption = None,
    adapter: AdapterOption = None,
    out: OutOption = None,
    windows: Annotated[int, typer.Option(min=1, help="horizons of recent history to check, each forecast from the context before it")] = 4,
    band: Annotated[float, typer.Option(min=0.0, max=1.0, help="the calibrated central band a day must fall outside")] = 0.9,
    min_score: Annotated[float, typer.Option(min=0.0, help="how far outside, in band widths, a day must fall to be listed")] = 0.5,
    sets: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Find the recent days that fell far outside the calibrated band: spikes, stock-outs, tracking breaks.

    Writes anomalies.csv (highest score first) and anomalies.png (the back-test, anomalies ringed).
    """
    run = load_trained(config, merchant, adapter, out, None, sets, force)
    backtest = run.pipeline.backtest(run.splits, windows, run.calibration)
    try:
        found = find_anomalies(backtest, run.pipeline.cfg.model.quantiles, band, min_score)
    except ValueError as exc:
        raise option_error("--band", exc) from None
    run.out.mkdir(parents=True, exist_ok=True)
    found.to_csv(run.out / "anomalies.csv", index=False, date_format="%Y-%m-%d")
    fan_chart(run.splits.frame, backtest, run.out / "anomalies.png", f"{run.merchant}: anomalies (ringed), calibrated {band:.0%} band",
              coverage=band, marks=found, first=list(dict.fromkeys(found[ID])))
    typer.echo(f"{len(found)} anomalies in {len(backtest)} days of {backtest[ID].nunique()} series; "
               f"anomalies.csv and anomalies.png written to {run.out}")


@app.command(epilog="Example: shopcast stock --merchant shop_00 --adapter runs/local/shop_00 --service-level 0.95 --lead-time 7")
@user_errors
def stock(
    config: ConfigOption = None,
    merchant: MerchantOption = None,
    adapter: AdapterOption = None,
    out: OutOption = None,
    future: FutureOption = None,
    service_level: Annotated[float, typer.Option(
        help="chance of not running out before the delivery, 0.5 to the model's top level")] = 0.95,
    lead_time: Annotated[int, typer.Option(
        min=1, help="steps the stock must last: the supplier's lead time (+ days to the next order)")] = 7,
    sets: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Suggest an order-up-to level and safety stock per series from the calibrated forecast (shared/stock.py).

    Sums the daily quantiles over the lead time, which over-covers the service level (the conservative
    choice); order the order-up-to level less the stock on hand and on order.
    """
    run = load_trained(config, merchant, adapter, out, future, sets, force)
    frame = future_forecast(run.pipeline, run.splits, run.calibration)
    try:
        levels = stock_levels(frame, run.pipeline.cfg.model.quantiles, service_level, lead_time)
    except ValueError as exc:
        raise option_error("--service-level / --lead-time", exc) from None
    run.out.mkdir(parents=True, exist_ok=True)
    levels.to_csv(run.out / "stock.csv", index=False, date_format="%Y-%m-%d")
    typer.echo(f"order-up-to levels of {len(levels)} series for {lead_time} steps at service level {service_level} "
               f"written to {run.out / 'stock.csv'}")


if __name__ == "__main__":
    app()
