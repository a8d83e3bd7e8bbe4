"""The public-dataset presets load into the long schema; skipped where ../shared/data is absent."""

import pandas as pd
import pytest

from shared import presets
from shared.config import PROJECT_ROOT, load_config
from shared.presets import load_online_retail, load_preset, load_walmart, preset_available
from shared.schema import prepare

needs_walmart = pytest.mark.skipif(not preset_available("walmart"), reason="walmart data not in SHOPCAST_SHARED_DATA")
needs_retail = pytest.mark.skipif(not preset_available("online_retail"), reason="online retail data not in SHOPCAST_SHARED_DATA")


def test_missing_data_names_the_file_and_variable(monkeypatch, tmp_path):
    monkeypatch.setattr(presets, "SHARED_DATA", tmp_path)
    assert not preset_available("walmart")
    with pytest.raises(FileNotFoundError, match="train.csv.*SHOPCAST_SHARED_DATA"):
        load_walmart()
    with pytest.raises(FileNotFoundError, match="transactions.parquet.*SHOPCAST_SHARED_DATA"):
        load_online_retail()


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("nope", load_config().data)


@pytest.fixture(scope="module")
def walmart() -> pd.DataFrame:
    return load_walmart()


@pytest.fixture(scope="module")
def retail() -> pd.DataFrame:
    return load_online_retail()


@needs_walmart
def test_walmart(walmart):
    assert list(walmart.columns) == ["merchant_id", "unique_id", "ds", "y", "is_holiday", "markdown", "temperature", "fuel_price"]
    assert sorted(walmart["merchant_id"].unique()) == ["store_1", "store_2", "store_3"]
    assert walmart.groupby("unique_id").size().eq(143).all()
    assert (walmart["ds"].dt.dayofweek == 4).all() and walmart.notna().all().all()
    assert walmart["unique_id"].str.fullmatch(r"store_\d+/dept_\d+").all()
    cfg = load_config(PROJECT_ROOT / "configs" / "walmart.toml")
    table = prepare(walmart, cfg.data, "walmart")
    assert len(table.frame) == len(walmart) and table.freq == "W-FRI"


@needs_walmart
def test_walmart_preset_narrows_by_config():
    cfg = load_config(PROJECT_ROOT / "configs" / "walmart.toml", {"data.merchants": ["store_2"], "data.max_series_per_merchant": 3})
    frame = load_preset("walmart", cfg.data)
    totals = frame.groupby("unique_id")["y"].sum()
    assert frame["merchant_id"].unique().tolist() == ["store_2"] and len(totals) == 3
    full = load_walmart((2,))
    assert totals.min() >= full.groupby("unique_id")["y"].sum().nlargest(3).min()


@needs_retail
def test_online_retail(retail):
    assert list(retail.columns) == ["merchant_id", "unique_id", "ds", "y", "open", "n_invoices", "description"]
    assert sorted(retail["merchant_id"].unique()) == ["EIRE", "France", "Germany", "United_Kingdom"]
    assert retail.groupby("merchant_id")["unique_id"].nunique().eq(8).all()
    assert retail.groupby("unique_id").size().eq(374).all()  # every calendar day 2010-12-01 .. 2011-12-09
    closed = retail[retail["open"] == 0]
    assert (closed["y"] == 0).all() and (closed["n_invoices"] == 0).all()
    assert closed["ds"].dt.dayofweek.eq(5).mean() > 0.7  # mostly Saturdays
    cfg = load_config(PROJECT_ROOT / "configs" / "online_retail.toml")
    table = prepare(retail, cfg.data, "online_retail")
    assert len(table.frame) == len(retail) and (table.frame["y"] >= 0).all()
    assert (table.frame["is_open"] == retail["open"]).all()
    assert table.descriptions["United_Kingdom/85123A"] == "WHITE HANGING HEART T-LIGHT HOLDER" and len(table.descriptions) == 32


@needs_retail
def test_online_retail_preset_narrows_by_config():
    cfg = load_config(PROJECT_ROOT / "configs" / "online_retail.toml",
                      {"data.merchants": ["United_Kingdom"], "data.max_series_per_merchant": 2})
    frame = load_preset("online_retail", cfg.data)
    assert frame["unique_id"].unique().tolist() == ["United_Kingdom/22423", "United_Kingdom/85123A"]
