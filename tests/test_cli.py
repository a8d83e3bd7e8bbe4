"""The `shopcast` CLI end to end on the tiny backbone: files written, dates right, errors readable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner, Result

from client.cli import app
from shared.anomalies import COLUMNS as ANOMALY_COLUMNS
from shared.calibration import Calibration
from shared.config import ModelConfig
from shared.plots import bar_chart
from shared.schema import quantile_column
from shared.stock import COLUMNS as STOCK_COLUMNS
from shared.synthetic import generate_merchants

QUANTILES = [quantile_column(q) for q in ModelConfig().quantiles]
FAST = {
    "model.backbone": '"tiny"', "model.llm_layers": "2", "train.max_steps": "6", "train.eval_every": "3",
    "train.device": "cpu", "data.synthetic.n_merchants": "2", "data.synthetic.n_days": "240",
}
runner = CliRunner()


def invoke(*args: str, **overrides: str):
    sets = [part for key, value in {**FAST, **overrides}.items() for part in ("--set", f"{key}={value}")]
    return runner.invoke(app, [*args, *sets])


@pytest.fixture(scope="module")
def local_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    out = tmp_path_factory.mktemp("local")
    # its own ledger: were one spent, it must not be the checkout's
    result = invoke("local", "--merchant", "shop_01", "--out", str(out), "--set", f'privacy.ledger_dir="{out / "ledgers"}"')
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="module")
def local_run(local_result: tuple[Path, Result]) -> Path:
    return local_result[0]


def test_local_writes_a_forecast_after_the_last_date(local_run: Path) -> None:
    forecast = pd.read_csv(local_run / "forecast.csv", parse_dates=["ds"])
    assert list(forecast.columns) == ["merchant_id", "unique_id", "ds", *QUANTILES]
    assert (forecast["merchant_id"] == "shop_01").all()
    assert np.all(np.diff(forecast[QUANTILES].to_numpy(), axis=1) >= 0), "quantiles cross"

    data = generate_merchants(n_merchants=2, n_days=240)
    last = data[data["merchant_id"] == "shop_01"].groupby("unique_id")["ds"].max()
    assert set(forecast["unique_id"]) == set(last.index)
    for uid, dates in forecast.groupby("unique_id")["ds"]:
        expected = pd.date_range(last[uid] + pd.Timedelta(days=1), periods=14, freq="D")
        assert list(dates) == list(expected)

    for name in ("forecast.png", "test.png"):
        assert (local_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"adapter.safetensors", "meta.json", "metrics.csv"} <= {p.name for p in local_run.iterdir()}


def test_forecast_reloads_the_adapter_and_uses_planned_covariates(local_run: Path, tmp_path: Path) -> None:
    first = pd.read_csv(local_run / "forecast.csv", parse_dates=["ds"])
    planned = first[first["unique_id"] == "shop_01/p00"][["unique_id", "ds"]].assign(promo=1.0, holiday=0.0)
    planned.to_csv(tmp_path / "planned.csv", index=False)
    result = invoke("forecast", "--merchant", "shop_01", "--adapter", str(local_run), "--out", str(tmp_path),
                    "--future", str(tmp_path / "planned.csv"))
    assert result.exit_code == 0, result.output
    again = pd.read_csv(tmp_path / "forecast.csv", parse_dates=["ds"])
    promoted = again["unique_id"] == "shop_01/p00"
    assert np.allclose(again.loc[~promoted, QUANTILES], first.loc[~promoted, QUANTILES], atol=1e-5)
    assert not np.allclose(again.loc[promoted, QUANTILES], first.loc[promoted, QUANTILES], atol=1e-5)


def _shop_01_file(tmp_path: Path) -> dict[str, str]:
    """shop_01's data as a file with the shop closed every Sunday: the overrides that read it."""
    data = generate_merchants(n_merchants=2, n_days=240)
    sunday = data["ds"].dt.dayofweek == 6
    data.loc[sunday, ["open", "y"]] = 0.0
    data.to_csv(tmp_path / "sales.csv", index=False)
    # a file's mapping starts from the required columns alone: the synthetic shops' covariates are named here
    return {"data.source": '"file"', "data.path": f'"{tmp_path / "sales.csv"}"', "data.columns.open": '"open"',
            "data.columns.promo": '["promo"]', "data.columns.holiday": '["holiday"]', "data.columns.observed": '["visits"]'}


def test_forecast_without_future_closes_a_weekday_closed_all_through_the_history_and_says_so(local_run: Path, tmp_path: Path) -> None:
    result = invoke("forecast", "--merchant", "shop_01", "--adapter", str(local_run), "--out", str(tmp_path), **_shop_01_file(tmp_path))
    assert result.exit_code == 0, result.output
    assert ("where --future plans nothing, promo, holiday assumed 0 over the horizon; "
            "Sundays assumed closed (closed every Sunday of the last 84 days)") in result.output
    forecast = pd.read_csv(tmp_path / "forecast.csv", parse_dates=["ds"])
    sunday = forecast["ds"].dt.dayofweek == 6
    assert sunday.any() and (forecast.loc[sunday, QUANTILES] == 0).all().all()
    assert (forecast.loc[~sunday, "q0.5"] > 0).any()


def test_a_future_file_in_its_own_date_format_may_leave_series_out_but_not_dates(local_run: Path, tmp_path: Path) -> None:
    """The plan is read like the data (here day-first dates); a series left out keeps the named defaults."""
    data = _shop_01_file(tmp_path)
    dates = pd.read_csv(local_run / "forecast.csv", parse_dates=["ds"])["ds"].drop_duplicates()
    plan = pd.DataFrame({"unique_id": "shop_01/p00", "ds": dates.dt.strftime("%d.%m.%Y"), "promo": "yes", "holiday": 0, "open": 1})
    plan.to_csv(tmp_path / "planned.csv", index=False)
    result = invoke("forecast", "--merchant", "shop_01", "--adapter", str(local_run), "--out", str(tmp_path),
                    "--future", str(tmp_path / "planned.csv"), **data)
    assert result.exit_code == 0, result.output
    series = pd.read_csv(tmp_path / "forecast.csv")["unique_id"].nunique()
    left_out = f"for {series - 1} of {series} series"
    assert f"promo, holiday assumed 0 over the horizon {left_out}; Sundays assumed closed {left_out}" in result.output
    forecast = pd.read_csv(tmp_path / "forecast.csv", parse_dates=["ds"])
    planned_sunday = (forecast["unique_id"] == "shop_01/p00") & (forecast["ds"].dt.dayofweek == 6)
    assert (forecast.loc[planned_sunday, "q0.5"] > 0).all()  # the plan opens it

    plan.drop(index=3).to_csv(tmp_path / "planned.csv", index=False)
    line = one_error_line(invoke("forecast", "--merchant", "shop_01", "--adapter", str(local_run), "--out", str(tmp_path),
                                 "--future", str(tmp_path / "planned.csv"), **data))
    assert str(tmp_path / "planned.csv") in line
    assert f"series 'shop_01/p00' lacks 1 of the horizon's 14 dates, first {dates.iloc[3].date()}" in line


@pytest.mark.parametrize("column, value, shown", [("promo", "soon", "non-numeric value 'soon'"), ("open", 2, "not an open flag")])
def test_a_future_file_is_checked_like_the_data(local_run: Path, tmp_path: Path, column: str, value: object, shown: str) -> None:
    dates = pd.read_csv(local_run / "forecast.csv")["ds"].drop_duplicates()
    plan = pd.DataFrame({"unique_id": "shop_01/p00", "ds": dates, "promo": 0, "holiday": 0, "open": 1}).astype({column: object})
    plan.loc[5, column] = value
    plan.to_csv(tmp_path / "planned.csv", index=False)
    line = one_error_line(invoke("forecast", "--merchant", "shop_01", "--adapter", str(local_run), "--out", str(tmp_path),
                                 "--future", str(tmp_path / "planned.csv")))
    assert shown in line and "row 7" in line and f"column {column!r}" in line


def test_file_missing_y_exits_2_naming_file_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "sales.csv"
    generate_merchants(n_merchants=1, n_days=200).drop(columns="y").to_csv(bad, index=False)
    result = invoke("local", "--merchant", "shop_00", **{"data.source": "file", "data.path": str(bad)})
    assert result.exit_code == 2
    assert str(bad) in result.output and "'y'" in result.output
    assert "Traceback" not in result.output


def test_unknown_merchant_exits_2_listing_merchants() -> None:
    result = invoke("train", "--merchant", "shop_99")
    assert result.exit_code == 2
    assert "shop_99" in result.output and "shop_00" in result.output and "shop_01" in result.output


def one_error_line(result: Result) -> str:
    """A user error's whole output: exit code 2 and one line, no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code, result.output)
    return lines[0]


@pytest.mark.parametrize("key, value, shown", [
    ("data.horizon", "10", "horizon (10)"),
    ("train.lr", "abc", "[train] lr = 'abc'"),
    ("train.batch_size", "0", "[train] batch_size = 0"),
    ("privacy.noise_multiplier", "nan", "[privacy] noise_multiplier = nan"),
    ("model.llm_layers", "9", "[model] llm_layers = 9, but backbone 'tiny' has 4 blocks"),  # known once the backbone loads
])
def test_bad_set_is_one_line_and_exit_2(key: str, value: str, shown: str) -> None:
    assert shown in one_error_line(invoke("train", "--merchant", "shop_00", **{key: value}))


def test_corrupt_ledger_is_one_line_and_exit_2(tmp_path: Path) -> None:
    ledger = tmp_path / "ledgers" / "shop_00.json"
    ledger.parent.mkdir()
    ledger.write_text('{"version": 1, "history": [[1.5, 0.1')
    line = one_error_line(invoke("train", "--merchant", "shop_00", "--out", str(tmp_path / "out"), "--dp",
                                 **{"privacy.ledger_dir": str(ledger.parent)}))
    assert str(ledger) in line and "unreadable" in line


def test_truncated_adapter_meta_is_one_line_and_exit_2(local_run: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text((local_run / "meta.json").read_text()[:40])
    line = one_error_line(invoke("forecast", "--merchant", "shop_01", "--adapter", str(tmp_path)))
    assert str(meta) in line and "JSONDecodeError" in line


def test_bar_chart_writes_a_png(tmp_path: Path) -> None:
    scores = pd.DataFrame({"model": ["llm", "llm", "seasonal_naive", "seasonal_naive"], "merchant_id": ["a", "b", "a", "b"],
                           "mase": [0.8, 0.9, 1.0, 1.0]})
    for path, group in ((tmp_path / "flat.png", None), (tmp_path / "grouped.png", "merchant_id")):
        bar_chart(scores.drop_duplicates("model") if group is None else scores, "mase", path, "MASE", group=group, reference=1.0)
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_local_saves_a_calibration_and_scores_the_test_split_before_and_after_it(local_run: Path) -> None:
    calibration = Calibration.load(local_run)
    assert calibration is not None and calibration.levels == ModelConfig().quantiles
    meta = json.loads((local_run / "meta.json").read_text())
    assert set(meta["test_calibrated"]) == set(meta["test"])


@pytest.mark.slow  # ~35 s on 2 cores: calibrates from scratch
def test_anomalies_calibrates_a_bare_adapter_and_finds_an_injected_spike(local_run: Path, tmp_path: Path) -> None:
    """A federated adapter comes without calibration.json: the merchant's own validation windows calibrate it."""
    bare = tmp_path / "adapter"
    shutil.copytree(local_run, bare, ignore=shutil.ignore_patterns("calibration.json"))
    data = generate_merchants(n_merchants=2, n_days=240)
    spike = data.index[(data["unique_id"] == "shop_01/p03") & (data["ds"] == data["ds"].max() - pd.Timedelta(days=5))]
    data.loc[spike, "y"] = 40 * data.loc[data["unique_id"] == "shop_01/p03", "y"].max()
    data.to_csv(tmp_path / "sales.csv", index=False)
    out = tmp_path / "out"
    result = invoke("anomalies", "--merchant", "shop_01", "--adapter", str(bare), "--out", str(out), "--windows", "2",
                    **{"data.source": '"file"', "data.path": f'"{tmp_path / "sales.csv"}"'})
    assert result.exit_code == 0, result.output
    assert "no calibration.json" in result.output and result.output.strip().endswith(str(out))
    assert (out / "calibration.json").exists() and (out / "anomalies.png").read_bytes()[:4] == b"\x89PNG"
    found = pd.read_csv(out / "anomalies.csv", parse_dates=["ds"])
    assert list(found.columns) == ANOMALY_COLUMNS
    top = found.iloc[0]
    assert (top["unique_id"], top["ds"], top["direction"]) == ("shop_01/p03", data.loc[spike[0], "ds"], "above")


def test_stock_writes_order_up_to_levels_above_lead_time_demand(local_run: Path, tmp_path: Path) -> None:
    result = invoke("stock", "--merchant", "shop_01", "--adapter", str(local_run), "--out", str(tmp_path),
                    "--service-level", "0.9", "--lead-time", "7")
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str(tmp_path / "stock.csv"))
    stock = pd.read_csv(tmp_path / "stock.csv", parse_dates=["from", "to"])
    assert list(stock.columns) == STOCK_COLUMNS
    assert stock["unique_id"].nunique() == len(stock) == pd.read_csv(local_run / "forecast.csv")["unique_id"].nunique()
    assert (stock["order_up_to"] >= stock["lead_time_demand"]).all() and (stock["safety_stock"] >= 0).all()
    assert ((stock["to"] - stock["from"]).dt.days == 6).all()


def test_stock_past_the_horizon_is_a_usage_error(local_run: Path, tmp_path: Path) -> None:
    result = invoke("stock", "--merchant", "shop_01", "--adapter", str(local_run), "--out", str(tmp_path), "--lead-time", "15")
    assert result.exit_code == 2 and "lead time 15" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "stock.csv").exists()


@pytest.mark.parametrize("command", ["train", "forecast", "local", "anomalies", "stock"])
def test_every_command_has_an_example_in_its_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and f"Example: shopcast {command}" in result.output


def test_local_trains_without_dp_and_says_so(local_result: tuple[Path, Result]) -> None:
    """Training alone releases nothing: the [privacy] defaults (DP on) are for what leaves the shop."""
    out, result = local_result
    assert "training without DP noise" in result.output
    assert not (out / "ledgers").exists(), "no budget spent"
    assert json.loads((out / "meta.json").read_text())["epsilon"] is None


@pytest.mark.slow  # ~6 s on 2 cores: three CLI runs
def test_a_dp_run_on_a_spent_budget_writes_nothing_unless_accepted(tmp_path: Path) -> None:
    ledgers = {"privacy.ledger_dir": f'"{tmp_path / "ledgers"}"'}
    first = invoke("train", "--merchant", "shop_00", "--out", str(tmp_path / "first"), "--dp", **ledgers)
    assert first.exit_code == 0, first.output
    assert json.loads((tmp_path / "first" / "meta.json").read_text())["epsilon"] > 7.9, "σ auto plans the whole budget"
    again = tmp_path / "again"
    spent = invoke("train", "--merchant", "shop_00", "--out", str(again), "--dp", **ledgers)
    assert spent.exit_code == 2 and "Traceback" not in spent.output
    last = spent.output.strip().splitlines()[-1]
    assert last.startswith("error: nothing was trained (0 steps: the privacy budget is spent)") and "--accept-untrained" in last
    assert not again.exists()
    accepted = invoke("train", "--merchant", "shop_00", "--out", str(again), "--dp", "--accept-untrained", **ledgers)
    assert accepted.exit_code == 0 and "warning: nothing was trained" in accepted.output
    assert json.loads((again / "meta.json").read_text())["steps"] == 0


def test_out_naming_a_file_is_one_line_before_any_budget_is_spent(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    line = one_error_line(invoke("train", "--merchant", "shop_00", "--out", str(notes), "--dp",
                                 **{"privacy.ledger_dir": f'"{tmp_path / "ledgers"}"'}))
    assert f"--out {notes} is a file" in line
    assert not (tmp_path / "ledgers").exists() and notes.read_text() == "mine"


def test_out_of_someone_elses_files_is_refused_and_forced_keeps_them(tmp_path: Path) -> None:
    """`train --out ~` once replaced ~/lora/ whole and ~/meta.json."""
    home = tmp_path / "home"
    (home / "lora").mkdir(parents=True)
    (home / "lora" / "thesis.tex").write_text("mine")
    (home / "meta.json").write_text('{"mine": true}')
    line = one_error_line(invoke("train", "--merchant", "shop_00", "--out", str(home)))
    assert f"--out {home} holds files shopcast did not write" in line and "--force" in line
    assert (home / "meta.json").read_text() == '{"mine": true}' and not (home / "adapter.safetensors").exists()
    forced = invoke("train", "--merchant", "shop_00", "--out", str(home), "--force")
    assert forced.exit_code == 0, forced.output
    assert (home / "lora" / "thesis.tex").read_text() == "mine", "a file the adapter does not write stays"
    assert (home / "lora" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("kind", ["folder", "binary"])
def test_config_that_is_no_toml_file_is_one_line(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "mine.toml"
    if kind == "folder":
        config.mkdir()
    else:
        config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    assert f"--config {config} is not a readable TOML file" in one_error_line(invoke("train", "-c", str(config), "--merchant", "shop_00"))


def test_train_says_and_records_the_base_it_starts_from(local_result: tuple[Path, Result], tmp_path: Path) -> None:
    out, result = local_result
    assert "starting from the seeded init: no shipped base fits this config (closest: shared/base/" in result.output
    base = tmp_path / "base"
    shutil.copytree(out, base / "llm")
    trained = invoke("train", "--merchant", "shop_00", "--out", str(tmp_path / "out"), **{"model.base": f'"{base}"'})
    assert trained.exit_code == 0, trained.output
    assert f"starting from the base {base} (llm)" in trained.output
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["base_folder"] == str(base / "llm")


def test_forecast_with_a_federated_adapter_shows_progress(local_run: Path, tmp_path: Path) -> None:
    """The personal refit and calibration of an adapter without calibration.json once ran 25 minutes without a word."""
    bare = tmp_path / "adapter"
    shutil.copytree(local_run, bare, ignore=shutil.ignore_patterns("calibration.json"))
    result = invoke("forecast", "--merchant", "shop_01", "--adapter", str(bare), "--out", str(tmp_path / "out"),
                    **{"train.personal_steps": "40"})
    assert result.exit_code == 0, result.output
    for stage in ("personal refit: window features", "personal refit: steps", "calibrating", "forecasting"):
        assert f"\r{stage}: " in result.output, stage


def test_a_chains_plan_for_all_its_shops_is_read_for_this_merchant_alone(local_run: Path, tmp_path: Path) -> None:
    """One plan file for every shop (with the merchant column): each merchant takes its own rows, and
    the other shops' series are not reported as unknown ones."""
    dates = pd.read_csv(local_run / "forecast.csv")["ds"].drop_duplicates()
    plan = pd.concat([pd.DataFrame({"merchant_id": shop, "unique_id": f"{shop}/p00", "ds": dates, "promo": 1, "holiday": 0})
                      for shop in ("shop_00", "shop_01")])
    plan.to_csv(tmp_path / "planned.csv", index=False)
    result = invoke("forecast", "--merchant", "shop_01", "--adapter", str(local_run), "--out", str(tmp_path),
                    "--future", str(tmp_path / "planned.csv"))
    assert result.exit_code == 0, result.output
    assert "not in the data" not in result.output
