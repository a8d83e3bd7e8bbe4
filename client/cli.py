"""`shopcast`: one merchant trains, and forecasts with, its own adapter on its own machine.

    shopcast train    --config configs/default.toml --merchant shop_00 --out runs/local/shop_00
    shopcast forecast --config configs/default.toml --merchant shop_00 --adapter runs/local/shop_00 [--future planned.csv]
    shopcast local    --config configs/default.toml --merchant shop_00 --out runs/local/shop_00

Any config key can be changed with `--set section.key=value` (the value is read as TOML, else as a
string). Bad input or configuration prints one red line and exits with code 2, so a merchant sees
what to fix rather than a traceback.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated, Any, Callable

import numpy as np
import pandas as pd
import typer
from tqdm import tqdm

from shared.adapter import AdapterMismatch
from shared.config import Config, ConfigError, load_config, parse_overrides
from shared.ledger import LedgerError
from shared.metrics import METRICS
from shared.pipeline import ForecastPipeline
from shared.plots import fan_chart
from shared.schema import DS, ID, DataValidationError, SeriesTable, Y, read_table
from shared.sources import load_table, one_merchant
from shared.windows import Splits

app = typer.Typer(help=__doc__.split("\n")[0], no_args_is_help=True, pretty_exceptions_show_locals=False)

USER_ERRORS = (DataValidationError, ConfigError, AdapterMismatch, LedgerError, FileNotFoundError)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file; keys it omits keep configs/default.toml's values")
]
MerchantOption = Annotated[str | None, typer.Option("--merchant", "-m", help="merchant id; optional if the data holds one")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key, e.g. --set train.max_steps=50")]
FutureOption = Annotated[Path | None, typer.Option("--future", help="CSV of known covariates (unique_id, ds, ...) for the horizon")]


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


def merchant_table(cfg: Config, merchant: str | None) -> tuple[str, SeriesTable]:
    return one_merchant(load_table(cfg), merchant)


def read_future(path: Path | None, cfg: Config, table: SeriesTable) -> pd.DataFrame | None:
    """The planned known covariates, with the file's id/date columns renamed like the data file's."""
    if path is None:
        return None
    columns = cfg.data.columns
    raw = read_table(path).rename(columns={columns.unique_id: ID, columns.ds: DS})
    missing = [c for c in (ID, DS, *table.known) if c not in raw]
    if missing:
        raise DataValidationError(f"missing column(s) {missing}; the file has {list(raw.columns)}", file=path)
    raw[ID] = raw[ID].astype(str)
    raw[DS] = pd.to_datetime(raw[DS], errors="coerce")
    if raw[DS].isna().any():
        raise DataValidationError("unparseable date", file=path, row=int(np.flatnonzero(raw[DS].isna())[0]) + 2, column=columns.ds)
    unknown = sorted(set(raw[ID]) - set(table.frame[ID]))
    if unknown:
        typer.secho(f"warning: {path}: series {unknown[:3]} are not in the data and are ignored", fg=typer.colors.YELLOW, err=True)
    return raw


def train_model(pipeline: ForecastPipeline, merchant: str, splits: Splits, out: Path) -> None:
    """Early-stopped local training (fixed length under DP), then test-split scores and the adapter."""
    cfg = pipeline.cfg
    privacy = pipeline.private_training(merchant, splits.train)
    with tqdm(total=cfg.train.max_steps, desc=f"training {merchant}", unit="step") as bar:
        result = pipeline.fit(splits.train, splits.val, privacy=privacy, on_step=lambda step: bar.update(1))
    typer.echo(f"{merchant}: {result.steps} steps, train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f}"
               + (f", epsilon {result.epsilon:.2f}" if result.epsilon is not None else ""))
    if result.status != "ok":
        typer.secho(f"warning: training stopped early: {result.status}", fg=typer.colors.YELLOW, err=True)

    test = pipeline.predict_frame(splits, splits.test)
    scores = pipeline.score(splits, test)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "metrics.csv", index=False)
    means = scores[list(METRICS)].mean().round(4).to_dict()
    typer.echo("test: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    test = test.merge(splits.test_actuals()[[ID, DS, Y]], on=[ID, DS], how="left")
    fan_chart(splits.frame, test, out / "test.png", f"{merchant}: test split (dashed = actual)")

    meta = {"merchant": merchant, "freq": splits.freq, "steps": result.steps, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "epsilon": result.epsilon, "test": means}
    pipeline.save(out, meta)
    typer.echo(f"adapter, metrics.csv and test.png written to {out}")


def write_forecast(pipeline: ForecastPipeline, merchant: str, splits: Splits, out: Path) -> None:
    """The horizon after the last date: forecast.csv and a fan chart under `out`."""
    frame = pipeline.predict_frame(splits, splits.future)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "forecast.csv", index=False, date_format="%Y-%m-%d")
    fan_chart(splits.frame, frame, out / "forecast.png", f"{merchant}: forecast from {frame[DS].min().date()} (median, 80% band)")
    typer.echo(f"forecast of {frame[ID].nunique()} series x {pipeline.cfg.data.horizon} steps written to {out / 'forecast.csv'}")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log data-cleaning and training details")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
@user_errors
def train(
    config: ConfigOption = None,
    merchant: MerchantOption = None,
    out: Annotated[Path | None, typer.Option(help="adapter directory (default: runs/local/<merchant>)")] = None,
    sets: SetOption = None,
) -> None:
    """Train an adapter on one merchant's data; writes the adapter and its test-split scores."""
    cfg = load_config(config, parse_overrides(sets or []))
    merchant, table = merchant_table(cfg, merchant)
    pipeline = ForecastPipeline.from_config(cfg, table)
    train_model(pipeline, merchant, pipeline.splits(table), out or Path("runs/local") / merchant)


@app.command()
@user_errors
def forecast(
    config: ConfigOption = None,
    merchant: MerchantOption = None,
    adapter: Annotated[Path | None, typer.Option(help="adapter directory (default: runs/local/<merchant>)")] = None,
    out: Annotated[Path | None, typer.Option(help="output directory (default: the adapter directory)")] = None,
    future: FutureOption = None,
    sets: SetOption = None,
) -> None:
    """Forecast the horizon after the last date with a trained adapter.

    The model settings come from the adapter's meta.json, so they always match the trained weights.
    """
    cfg = load_config(config, parse_overrides(sets or []))
    merchant, table = merchant_table(cfg, merchant)
    adapter = adapter or Path("runs/local") / merchant
    pipeline = ForecastPipeline.from_adapter(adapter, cfg)
    splits = pipeline.splits(table, read_future(future, pipeline.cfg, table))
    write_forecast(pipeline, merchant, splits, out or adapter)


@app.command()
@user_errors
def local(
    config: ConfigOption = None,
    merchant: MerchantOption = None,
    out: Annotated[Path | None, typer.Option(help="output directory (default: runs/local/<merchant>)")] = None,
    future: FutureOption = None,
    sets: SetOption = None,
) -> None:
    """Train on one merchant's data, then forecast its next horizon: the quick start."""
    cfg = load_config(config, parse_overrides(sets or []))
    merchant, table = merchant_table(cfg, merchant)
    pipeline = ForecastPipeline.from_config(cfg, table)
    splits = pipeline.splits(table, read_future(future, cfg, table))
    out = out or Path("runs/local") / merchant
    train_model(pipeline, merchant, splits, out)
    write_forecast(pipeline, merchant, splits, out)


if __name__ == "__main__":
    app()
