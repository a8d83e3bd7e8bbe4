"""Loaders that turn the public retail datasets beside the repo into shopcast's long schema.

The files stay in ../shared/data: their licences forbid or discourage redistribution, so nothing is
copied into the repo, and a missing file is reported together with the variable that points elsewhere.
Each loader only reshapes; validation and the negative-sales policy stay in shared.schema.prepare.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from shared.config import PROJECT_ROOT, DataConfig
from shared.schema import DS, ID, MERCHANT, Y

SHARED_DATA = Path(os.environ.get("SHOPCAST_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
FILES = {
    "walmart": ("walmart_weekly", ("train.csv", "features.csv")),
    "online_retail": ("online_retail_uci", ("transactions.parquet",)),
    "etth1": ("ETT", ("ETTh1.csv",)),
}
WALMART_STORES = (1, 2, 3)
RETAIL_COUNTRIES = ("United Kingdom", "Germany", "France", "EIRE")
PRODUCTS_PER_COUNTRY = 8
PRODUCT_CODE = r"\d{5}[A-Za-z]*"  # excludes postage, fees and manual adjustments (POST, M, DOT, C2, ...)


def _path(name: str, file: str) -> Path:
    path = SHARED_DATA / FILES[name][0] / file
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; the {name} preset needs it. Put the public datasets there "
                                "or set SHOPCAST_SHARED_DATA to the folder that holds them")
    return path


def preset_available(name: str) -> bool:
    folder, files = FILES[name]
    return all((SHARED_DATA / folder / file).exists() for file in files)


def load_walmart(stores: tuple[int, ...] = WALMART_STORES, max_depts: int | None = None) -> pd.DataFrame:
    """Store = merchant, department = series: weekly sales with the store's markdowns and weather."""
    sales = pd.read_csv(_path("walmart", "train.csv"), parse_dates=["Date"])
    features = pd.read_csv(_path("walmart", "features.csv"), parse_dates=["Date"])
    weeks = sales["Date"].nunique()  # gapped or late departments would be zero-filled into fake history
    sales = sales[sales["Store"].isin(stores)]
    sales = sales[sales.groupby(["Store", "Dept"])["Date"].transform("size") == weeks]
    if sales.empty:
        raise ValueError(f"no full-length Walmart departments in stores {stores}; stores are numbered 1 to 45")
    if max_depts is not None:
        totals = sales.groupby(["Store", "Dept"], as_index=False)["Weekly_Sales"].sum()
        top = totals.sort_values(["Store", "Weekly_Sales", "Dept"], ascending=[True, False, True]).groupby("Store").head(max_depts)
        sales = sales.merge(top[["Store", "Dept"]], on=["Store", "Dept"])
    features["markdown"] = features.filter(like="MarkDown").fillna(0.0).sum(axis=1)  # planned, so known ahead
    frame = sales.merge(features[["Store", "Date", "markdown", "Temperature", "Fuel_Price"]], on=["Store", "Date"], validate="many_to_one")
    frame = frame.sort_values(["Store", "Dept", "Date"], ignore_index=True)
    return pd.DataFrame({
        MERCHANT: "store_" + frame["Store"].astype(str),
        ID: "store_" + frame["Store"].astype(str) + "/dept_" + frame["Dept"].astype(str),
        DS: frame["Date"],
        Y: frame["Weekly_Sales"].astype(float),
        "is_holiday": frame["IsHoliday"].astype(float),
        "markdown": frame["markdown"],
        "temperature": frame["Temperature"],
        "fuel_price": frame["Fuel_Price"],
    })


def load_online_retail(countries: tuple[str, ...] = RETAIL_COUNTRIES, products_per_country: int = PRODUCTS_PER_COUNTRY) -> pd.DataFrame:
    """Country = merchant, product = series: daily units net of cancellations, zero-filled over the calendar,
    with the product's description (its most frequent spelling in the invoices)."""
    tx = pd.read_parquet(_path("online_retail", "transactions.parquet"),
                         columns=["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "Country"])
    described = tx.dropna(subset=["Description"])
    description = described.groupby("StockCode")["Description"].agg(lambda d: d.value_counts().index[0]).str.strip()
    tx["day"] = tx["InvoiceDate"].dt.normalize().astype("datetime64[ns]")
    days = pd.date_range(tx["day"].min(), tx["day"].max(), freq="D", name=DS)
    is_open = pd.Series(days.isin(tx["day"].unique()).astype(float), index=days, name="open")  # closed: Saturdays, Christmas
    frames = []
    for country in countries:
        shop = tx[tx["Country"] == country]
        if shop.empty:
            raise ValueError(f"no transactions for country {country!r}; some are {sorted(tx['Country'].unique())[:10]}")
        sold = shop[shop["StockCode"].str.fullmatch(PRODUCT_CODE) & (shop["Quantity"] > 0)]
        active = sold.groupby("StockCode")["day"].nunique().reset_index()
        top = active.sort_values(["day", "StockCode"], ascending=[False, True])["StockCode"].head(products_per_country)
        units = shop[shop["StockCode"].isin(top)].groupby(["day", "StockCode"])["Quantity"].sum().unstack()
        units = units.reindex(index=days, columns=top).fillna(0.0)
        n_invoices = shop.groupby("day")["InvoiceNo"].nunique().reindex(days, fill_value=0).astype(float).rename("n_invoices")
        merchant = country.replace(" ", "_")
        long = units.stack().rename(Y).reset_index().join(is_open, on=DS).join(n_invoices, on=DS)
        long["description"] = long["StockCode"].map(description).fillna("")
        long.insert(0, MERCHANT, merchant)
        long.insert(1, ID, merchant + "/" + long.pop("StockCode"))
        frames.append(long.sort_values([ID, DS], ignore_index=True))
    return pd.concat(frames, ignore_index=True)


def load_etth1() -> pd.DataFrame:
    """ETTh1 (hourly electricity-transformer load and oil temperature): one site, each of its 7 channels a
    series. Not retail: it is here so the forecaster can be set beside the long-horizon literature."""
    raw = pd.read_csv(_path("etth1", "ETTh1.csv"), parse_dates=["date"])
    long = raw.melt(id_vars="date", var_name="channel", value_name=Y)
    return pd.DataFrame({MERCHANT: "ETTh1", ID: "ETTh1/" + long["channel"], DS: long["date"], Y: long[Y].astype(float)})


def load_preset(name: str, cfg: DataConfig) -> pd.DataFrame:
    """The preset `name`, narrowed to cfg.merchants and cfg.max_series_per_merchant (0 or empty: loader defaults)."""
    limit = cfg.max_series_per_merchant or None
    if name == "walmart":
        stores = tuple(int(m.removeprefix("store_")) for m in cfg.merchants) or WALMART_STORES
        return load_walmart(stores, limit)
    if name == "online_retail":
        countries = tuple(m.replace("_", " ") for m in cfg.merchants) or RETAIL_COUNTRIES
        return load_online_retail(countries, limit or PRODUCTS_PER_COUNTRY)
    if name == "etth1":
        return load_etth1()
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(FILES)}")
