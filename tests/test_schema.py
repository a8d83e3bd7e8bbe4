"""Validation of merchant files: every rejection names the file, the spreadsheet row (header = row 1)
and the column, so a merchant can fix the export; every policy does exactly what it says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.config import Columns, DataConfig, load_config
from shared.pipeline import ForecastPipeline
from shared.schema import (
    DS,
    ID,
    MERCHANT,
    NEGATIVE_FLAG,
    OPEN,
    ROLE_CHANNELS,
    DataValidationError,
    Y,
    fit_short,
    load_file,
    prepare,
    read_table,
    regularise,
    to_long,
)
from shared.sources import load_table

PROMO, HOLIDAY = ROLE_CHANNELS["promo"], ROLE_CHANNELS["holiday"]

COLUMNS = Columns()  # merchant_id, unique_id, ds, y; no covariates
SOURCE = "shop.csv"


def _frame(n: int = 5, uid: str = "a", start: str = "2024-01-01", **extra) -> pd.DataFrame:
    return pd.DataFrame({
        MERCHANT: "m", ID: uid, DS: pd.date_range(start, periods=n, freq="D").strftime("%Y-%m-%d"),
        Y: np.arange(1.0, n + 1), **extra,
    })


def _config(**overrides):
    return load_config(overrides={"data.context": 14, "data.horizon": 7, "data.columns.promo": [], "data.columns.holiday": [],
                                  "data.columns.known": [], "data.columns.observed": [], "data.columns.open": "", **overrides})


def _error(call, *args, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        call(*args, **kwargs)
    return info.value


def _where(error: DataValidationError, file=None, row=None, column=None) -> None:
    """The error's fields and its message both name exactly the given place."""
    assert (error.file is not None and str(error.file) == str(file)) if file else error.file is None
    assert error.row == row and error.column == column
    message = str(error)
    if file:
        assert f"file {file}" in message
    if row:
        assert f"row {row}" in message
    if column:
        assert f"column {column!r}" in message


# --- values in a frame ----------------------------------------------------------------------------


def test_valid_frame_passes_unchanged():
    frame = to_long(_frame(), COLUMNS, SOURCE)
    assert list(frame.columns) == [ID, DS, Y, MERCHANT]
    assert frame[DS].dtype == "datetime64[ns]" and frame[Y].tolist() == [1, 2, 3, 4, 5]


def test_missing_column_names_file_and_column():
    error = _error(to_long, _frame().drop(columns=[Y]), COLUMNS, SOURCE)
    _where(error, file=SOURCE)
    assert "missing column(s) ['y']" in str(error) and "'unique_id'" in str(error)  # and lists what the file has
    covariate = Columns(known=("promo",))
    assert "['promo']" in str(_error(to_long, _frame(), covariate, SOURCE))


def test_missing_column_error_lists_only_the_files_own_columns():
    """Not the indicator columns shopcast made from them ("StateHoliday=a"), which the file never had."""
    coded = Columns(promo=("Promo",), holiday=("StateHoliday=a", "StateHoliday=b"))
    error = str(_error(to_long, _frame(StateHoliday=["0", "a", "b", "0", "0"]), coded, SOURCE))
    assert f"missing column(s) ['Promo']; the file has {[MERCHANT, ID, DS, Y, 'StateHoliday']}" in error and "=" not in error
    assert "missing column(s) ['StateHoliday']" in str(_error(to_long, _frame(Promo=0), coded, SOURCE))  # its column, not its levels


def test_a_missing_merchant_column_hints_at_a_file_of_one_shop():
    error = str(_error(to_long, _frame().drop(columns=[MERCHANT]), COLUMNS, SOURCE))
    assert "missing column(s) ['merchant_id']" in error and 'merchant_id = "" when the file holds one shop' in error
    assert (to_long(_frame().drop(columns=[MERCHANT]), Columns(merchant_id=""), SOURCE)[MERCHANT] == "shop").all()  # the file's name


def test_a_file_mapping_that_says_nothing_about_open_loads(tmp_path):
    """The mapping of one's own columns starts from the required ones: no inherited open = "open",
    known, observed, promo or holiday to trip over."""
    csv = tmp_path / "sales.csv"
    pd.DataFrame({"Store": "1", "Date": _days(), "Sales": np.arange(40.0)}).to_csv(csv, index=False)
    config = _write(tmp_path / "mine.toml", f"""
[data]
source = "file"
path = '{csv}'
context = 14
horizon = 7
[data.columns]
merchant_id = ""
unique_id = "Store"
ds = "Date"
y = "Sales"
""")
    table = load_table(load_config(config))
    assert table.known == () and table.observed == () and (table.frame[OPEN] == 1).all() and table.merchants() == ["sales"]


def test_unparseable_date():
    raw = _frame()
    raw.loc[3, DS] = "31/02/2024?"
    error = _error(to_long, raw, COLUMNS, SOURCE)
    _where(error, SOURCE, row=5, column=DS)  # data row index 3 -> spreadsheet row 5
    assert "unparseable date '31/02/2024?'" in str(error)


def test_missing_date_cell_is_unparseable():
    raw = _frame()
    raw.loc[1, DS] = None
    _where(_error(to_long, raw, COLUMNS, SOURCE), SOURCE, row=3, column=DS)


def _written(fmt: str, n: int = 20, start: str = "2013-01-01") -> tuple[pd.DataFrame, pd.DatetimeIndex]:
    """A frame whose dates are written with strftime `fmt`, and the dates they stand for."""
    dates = pd.date_range(start, periods=n, freq="D")
    return _frame(n).assign(**{DS: dates.strftime(fmt)}), dates


@pytest.mark.parametrize("fmt", ["%d.%m.%Y", "%m/%d/%Y", "%d-%m-%Y %H:%M", "%Y-%m-%d", "%Y-%m-%d %H:%M:%S"])
def test_the_one_format_every_row_fits_reads_the_whole_column(fmt):
    """01.01.2013 ... 12.01.2013 are read day-first because 13.01.2013 further down is: never 1 December, then an error.
    ISO stays ISO although its days, read as months, would fit too."""
    raw, dates = _written(fmt)
    assert to_long(raw, COLUMNS, SOURCE)[DS].tolist() == list(dates)


def test_ambiguous_dates_are_one_error_naming_the_option():
    raw, _ = _written("%d.%m.%Y", n=12)  # no day above 12: 02.01.2013 may be 1 February or 2 January
    error = _error(to_long, raw, COLUMNS, SOURCE)
    _where(error, SOURCE, column=DS)
    assert "'02.01.2013'" in str(error) and '[data] date_format = "%m.%d.%Y" or "%d.%m.%Y"' in str(error)


@pytest.mark.parametrize("fmt, second", [("%d.%m.%Y", "2013-01-02"), ("%m.%d.%Y", "2013-02-01")])
def test_date_format_decides_an_ambiguous_column(fmt, second):
    raw, _ = _written("%d.%m.%Y", n=12)
    assert to_long(raw, COLUMNS, SOURCE, date_format=fmt)[DS].iloc[1] == pd.Timestamp(second)  # written "02.01.2013"


def test_a_row_that_does_not_fit_the_format_names_row_column_and_format():
    raw, _ = _written("%d.%m.%Y")
    raw.loc[15, DS] = "2013-01-16"
    inferred = _error(to_long, raw, COLUMNS, SOURCE)
    _where(inferred, SOURCE, row=17, column=DS)
    assert "unparseable date '2013-01-16'" in str(inferred) and "'%d.%m.%Y'" in str(inferred)
    explicit = _error(to_long, raw, COLUMNS, SOURCE, date_format="%d.%m.%Y")
    _where(explicit, SOURCE, row=17, column=DS)
    assert "[data] date_format = '%d.%m.%Y'" in str(explicit)


def test_date_format_from_the_config_reaches_a_file(tmp_path):
    raw, dates = _written("%m/%d/%Y", n=40, start="2024-02-01")  # 02/13/2024 would decide it; 12 rows less and nothing does
    path = tmp_path / "us.csv"
    raw.iloc[:12].to_csv(path, index=False)
    assert "date_format" in str(_error(load_file, path, _config().data))
    raw.to_csv(path, index=False)
    frame = load_file(path, _config(**{"data.date_format": "%m/%d/%Y"}).data).frame
    assert frame[DS].tolist() == list(dates)


def test_a_date_format_strftime_cannot_read_is_one_line():
    raw, _ = _written("%d.%m.%Y")
    assert "[data] date_format = '%Q'" in str(_error(to_long, raw, COLUMNS, SOURCE, date_format="%Q"))


def test_duplicate_timestamp_names_the_second_row():
    raw = pd.concat([_frame(4), _frame(4, uid="b"), _frame(1, start="2024-01-03")], ignore_index=True)
    error = _error(to_long, raw, COLUMNS, SOURCE)
    _where(error, SOURCE, row=10, column=DS)
    assert "duplicate timestamp 2024-01-03 for series 'a'" in str(error)
    # the same date in different series is no duplicate
    to_long(pd.concat([_frame(4), _frame(4, uid="b")], ignore_index=True), COLUMNS, SOURCE)


def test_non_numeric_value():
    raw = _frame()
    raw[Y] = raw[Y].astype(object)
    raw.loc[2, Y] = "12 units"
    error = _error(to_long, raw, COLUMNS, SOURCE)
    _where(error, SOURCE, row=4, column=Y)
    assert "non-numeric value '12 units'" in str(error)


def test_non_numeric_covariate_names_its_column():
    raw = _frame(promo=["0", "1", "n/a?", "0", "1"])
    error = _error(to_long, raw, Columns(known=("promo",)), SOURCE)
    _where(error, SOURCE, row=4, column="promo")
    assert 'level by level in [data.columns] promo, holiday, known or observed, e.g. "promo=n/a?"' in str(error)  # the way out for a code


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_nan_inf_and_empty_values(bad):
    raw = _frame()
    raw[Y] = raw[Y].astype(object)
    raw.loc[4, Y] = bad
    error = _error(to_long, raw, COLUMNS, SOURCE)
    _where(error, SOURCE, row=6, column=Y)
    assert "missing, NaN or infinite value" in str(error)


def test_nan_in_an_observed_covariate():
    raw = _frame(visits=[1.0, 2.0, np.nan, 4.0, 5.0])
    _where(_error(to_long, raw, Columns(observed=("visits",)), SOURCE), SOURCE, row=4, column="visits")


# --- negative values ------------------------------------------------------------------------------


def _with_negatives() -> pd.DataFrame:
    raw = _frame()
    raw.loc[[1, 3], Y] = [-2.0, -5.0]
    return raw


def test_negative_keep():
    frame = to_long(_with_negatives(), COLUMNS, SOURCE, negative="keep")
    assert frame[Y].tolist() == [1, -2, 3, -5, 5] and NEGATIVE_FLAG not in frame


def test_negative_clip():
    frame = to_long(_with_negatives(), COLUMNS, SOURCE, negative="clip")
    assert frame[Y].tolist() == [1, 0, 3, 0, 5] and NEGATIVE_FLAG not in frame


def test_negative_flag_adds_an_observed_column():
    frame = to_long(_with_negatives(), COLUMNS, SOURCE, negative="flag")
    assert frame[Y].tolist() == [1, -2, 3, -5, 5]
    assert frame[NEGATIVE_FLAG].tolist() == [0, 1, 0, 1, 0]
    negatives = _with_negatives().assign(ds=pd.date_range("2024-01-01", periods=5).strftime("%Y-%m-%d"))
    raw = pd.concat([negatives, _frame(40, start="2024-01-06")], ignore_index=True)
    table = prepare(raw, _config(**{"data.negative": "flag"}).data, SOURCE)
    assert table.observed == (NEGATIVE_FLAG,) and NEGATIVE_FLAG in table.frame
    assert table.frame[NEGATIVE_FLAG].sum() == 2


def test_negative_error_names_the_first_negative_row():
    error = _error(to_long, _with_negatives(), COLUMNS, SOURCE, negative="error")
    _where(error, SOURCE, row=3, column=Y)
    assert "negative value -2.0" in str(error) and "keep, flag or clip" in str(error)


def test_negative_policies_leave_a_clean_frame_alone():
    for policy in ("keep", "clip", "error"):
        frame = to_long(_frame(), COLUMNS, SOURCE, negative=policy)
        assert NEGATIVE_FLAG not in frame and frame[Y].tolist() == [1, 2, 3, 4, 5]


def test_flag_column_exists_without_negatives():
    """Every merchant under "flag" gets the column, so all their models have the same inputs."""
    frame = to_long(_frame(), COLUMNS, SOURCE, negative="flag")
    assert frame[Y].tolist() == [1, 2, 3, 4, 5] and frame[NEGATIVE_FLAG].tolist() == [0] * 5
    assert prepare(_frame(40), _config(**{"data.negative": "flag"}).data, SOURCE).observed == (NEGATIVE_FLAG,)


# --- regular grid ---------------------------------------------------------------------------------


def _gappy() -> pd.DataFrame:
    """Series 'a' misses 2024-01-03 and -04; series 'b' is complete."""
    raw = pd.concat([_frame(6, promo=[1.0, 0, 1, 0, 1, 0]).drop(index=[2, 3]), _frame(3, uid="b", promo=[0.0, 0, 0])], ignore_index=True)
    return to_long(raw, Columns(known=("promo",)), SOURCE)


def test_gaps_filled_with_zero():
    frame = regularise(_gappy(), "D", "zero", SOURCE)
    a = frame[frame[ID] == "a"]
    assert a[DS].tolist() == list(pd.date_range("2024-01-01", periods=6))
    assert a[Y].tolist() == [1, 2, 0, 0, 5, 6] and a["promo"].tolist() == [1, 0, 0, 0, 1, 0]
    assert (a[MERCHANT] == "m").all() and (a[ID] == "a").all()
    assert len(frame[frame[ID] == "b"]) == 3


def test_gaps_filled_forward():
    a = regularise(_gappy(), "D", "ffill", SOURCE).query("unique_id == 'a'")
    assert a[Y].tolist() == [1, 2, 2, 2, 5, 6] and a["promo"].tolist() == [1, 0, 0, 0, 1, 0]


def test_gaps_rejected_under_fill_error():
    error = _error(regularise, _gappy(), "D", "error", SOURCE)
    _where(error, SOURCE, column=DS)
    assert "series 'a' has 2 missing timestamp(s), first 2024-01-03" in str(error)


def test_timestamp_off_the_grid():
    frame = to_long(_frame(), COLUMNS, SOURCE)
    frame.loc[2, DS] = pd.Timestamp("2024-01-03 12:00")
    error = _error(regularise, frame, "D", "zero", SOURCE)
    _where(error, SOURCE, column=DS)
    assert "2024-01-03 12:00:00" in str(error) and "grid" in str(error)


def test_unsorted_input_is_sorted_and_auto_frequency_inferred():
    frame = to_long(_frame(8).iloc[::-1].reset_index(drop=True), COLUMNS, SOURCE)
    out = regularise(frame, "auto", "zero", SOURCE)
    assert out[Y].tolist() == list(range(1, 9)) and out[DS].is_monotonic_increasing


def test_auto_frequency_on_a_single_timestamp_is_a_validation_error():
    frame = to_long(_frame(1), COLUMNS, SOURCE)
    _where(_error(regularise, frame, "auto", "zero", SOURCE), SOURCE)


def test_auto_frequency_fills_gaps():
    a = regularise(_gappy(), "auto", "zero", SOURCE).query("unique_id == 'a'")
    assert a[Y].tolist() == [1, 2, 0, 0, 5, 6]


# --- short series ---------------------------------------------------------------------------------


def test_short_series_error_drop_and_pad():
    frame = to_long(pd.concat([_frame(40), _frame(20, uid="b")], ignore_index=True), COLUMNS, SOURCE)
    error = _error(fit_short, frame, 35, "error", "D", SOURCE)
    _where(error, SOURCE)
    assert "series 'b' has 20 timestamps, fewer than context + 3 x horizon = 35" in str(error)
    kept, padded = fit_short(frame, 35, "drop", "D", SOURCE)
    assert kept[ID].unique().tolist() == ["a"] and len(kept) == 40 and padded == {}


def test_a_new_series_is_padded_with_closed_days_before_its_first():
    raw = pd.concat([_frame(40), _frame(20, uid="b", start="2024-01-21")], ignore_index=True)
    table = prepare(raw, _config(**{"data.short_series": "pad"}).data, SOURCE)
    b = table.frame[table.frame[ID] == "b"]
    assert len(b) == 35 and b[DS].is_monotonic_increasing and (b[DS].diff().dropna() == pd.Timedelta(days=1)).all()
    assert b[DS].iloc[-1] == pd.Timestamp("2024-02-09") and b[MERCHANT].eq("m").all()
    np.testing.assert_array_equal(b[OPEN].to_numpy(), np.r_[np.zeros(15), np.ones(20)])
    np.testing.assert_array_equal(b[Y].to_numpy()[:15], 0.0)
    assert len(table.frame[table.frame[ID] == "a"]) == 40 and table.padded == {"b": 15}


def test_prepare_applies_the_short_series_policy():
    raw = pd.concat([_frame(40), _frame(20, uid="b")], ignore_index=True)
    with pytest.raises(DataValidationError, match="series 'b' has 20 timestamps"):
        prepare(raw, _config().data, SOURCE)
    assert prepare(raw, _config(**{"data.short_series": "drop"}).data, SOURCE).frame[ID].unique().tolist() == ["a"]
    error = _error(prepare, _frame(20), _config(**{"data.short_series": "drop"}).data, SOURCE)
    assert "no series left" in str(error) and error.file == SOURCE


# --- files ----------------------------------------------------------------------------------------


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _days(n: int = 40) -> list[str]:
    return pd.date_range("2024-01-01", periods=n, freq="D").strftime("%Y-%m-%d").tolist()


def test_nonexistent_file(tmp_path):
    missing = tmp_path / "nope.csv"
    _where(_error(read_table, missing), missing)
    assert "does not exist" in str(_error(load_file, missing, _config().data))


def test_unsupported_extension(tmp_path):
    path = _write(tmp_path / "sales.xlsx", "not really excel")
    error = _error(read_table, path)
    _where(error, path)
    assert "unsupported format" in str(error)


@pytest.mark.parametrize("content", [b"\x00\x01garbage\xff" * 40, b"PAR1garbagePAR1"])
def test_garbage_parquet(tmp_path, content):
    path = tmp_path / "sales.parquet"
    path.write_bytes(content)
    error = _error(read_table, path)
    _where(error, path)
    assert "cannot be read as parquet" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        'unique_id,ds,y\na,2024-01-01,1\n"a,2024-01-02,2\na,2024-01-03,3\n',  # unclosed quote
        "unique_id,ds,y\na,2024-01-01,1\na,2024-01-02,2,9\n",  # a row with an extra field
        "",  # empty file
    ],
    ids=["broken-quoting", "wrong-field-count", "empty"],
)
def test_malformed_csv(tmp_path, text):
    path = _write(tmp_path / "sales.csv", text)
    error = _error(read_table, path)
    _where(error, path)
    assert "cannot be read as csv" in str(error)


def test_empty_cell_in_a_csv_names_its_spreadsheet_row(tmp_path):
    lines = ["merchant_id,unique_id,ds,y"] + [f"m,a,2024-01-{d:02d},{d}" for d in range(1, 10)]
    lines[7] = "m,a,2024-01-07,"  # spreadsheet row 8 (header is row 1)
    lines[9] = "m,a,2024-01-09"  # a short row: the missing field is empty too, but row 8 comes first
    path = _write(tmp_path / "sales.csv", "\n".join(lines) + "\n")
    _where(_error(load_file, path, _config().data), path, row=8, column=Y)


def test_column_mapping_from_arbitrary_names(tmp_path):
    """Store/Date/Sales plus a Promo flag and an Open flag, as a CSV and as a Parquet file, through load_file."""
    n = 40
    dates = pd.date_range("2024-03-01", periods=n, freq="D")
    raw = pd.concat(
        [pd.DataFrame({"Store": store, "Date": dates.strftime("%d %b %Y"), "Sales": np.arange(n) + 100.0 * k,
                       "Promo": (np.arange(n) % 7 == 0) * 1, "Open": (np.arange(n) % 7 != 6) * 1})
         for k, store in enumerate(["s1", "s2"])],
        ignore_index=True,
    )
    cfg = _config(**{
        "data.columns.merchant_id": "", "data.columns.unique_id": "Store", "data.columns.ds": "Date",
        "data.columns.y": "Sales", "data.columns.promo": ["Promo"], "data.columns.open": "Open",
    }).data
    csv = tmp_path / "corner_shop.csv"
    raw.to_csv(csv, index=False)
    parquet = tmp_path / "corner_shop.parquet"
    raw.assign(Date=dates.tolist() * 2).to_parquet(parquet)
    for path in (csv, parquet):
        table = load_file(path, cfg)
        frame = table.frame
        assert list(frame.columns) == [MERCHANT, ID, DS, Y, OPEN, PROMO] and table.known == (PROMO,) and table.observed == ()
        assert frame[OPEN].sum() == 2 * (n - len(range(6, n, 7)))
        assert (frame[MERCHANT] == "corner_shop").all()  # no merchant column: the file's name
        assert sorted(frame[ID].unique()) == ["s1", "s2"]
        s2 = frame[frame[ID] == "s2"]
        assert s2[DS].tolist() == list(dates) and s2[Y].tolist() == list(np.arange(n) + 100.0)
        assert frame[PROMO].sum() == 2 * len(range(0, n, 7))
    # an error in a mapped file names the merchant's own column
    raw.loc[3, "Open"] = 2
    raw.to_csv(csv, index=False)
    error = _error(load_file, csv, cfg)
    _where(error, csv, row=5, column="Open")
    assert "not an open flag" in str(error)
    raw.loc[3, "Open"] = 1
    raw["Sales"] = raw["Sales"].astype(object)
    raw.loc[5, "Sales"] = "n/a?"
    raw.to_csv(csv, index=False)
    _where(_error(load_file, csv, cfg), csv, row=7, column="Sales")


# --- real exports: codes, European spreadsheets, encodings, absurd values, flags, several targets --


def _mapped(**overrides) -> DataConfig:
    """A file without a merchant column (the merchant is the file's name) and no covariates unless given."""
    return _config(**{"data.columns.merchant_id": "", "data.columns.open": "", **overrides}).data


def _shop_csv(tmp_path: Path, header: str, rows: list[str], encoding: str = "utf-8") -> Path:
    """tmp_path/shop.csv as a spreadsheet exports it: the header, then row i on line i + 2."""
    return _write(tmp_path / "shop.csv", "\n".join([header, *rows]) + "\n", encoding)


HOLIDAYS = ["StateHoliday=0", "StateHoliday=a", "StateHoliday=b", "StateHoliday=c"]


def test_categorical_codes_become_one_indicator_per_listed_level(tmp_path):
    codes = ["0", "a", "0", "b", "0"] * 8  # this shop never had a "c" holiday
    path = _shop_csv(tmp_path, "unique_id,ds,y,StateHoliday", [f"s,{day},{i},{codes[i]}" for i, day in enumerate(_days())])
    table = load_file(path, _mapped(**{"data.columns.known": HOLIDAYS}))
    assert table.known == (PROMO, HOLIDAY, *HOLIDAYS) and table.observed == ()  # listed in known: one channel each
    assert table.frame["StateHoliday=a"].tolist() == [float(code == "a") for code in codes]
    assert table.frame["StateHoliday=c"].eq(0).all()  # listed but never seen: the column exists all the same
    assert table.frame[HOLIDAYS].sum(axis=1).eq(1).all()
    assert load_file(path, _mapped(**{"data.columns.observed": HOLIDAYS})).observed == tuple(HOLIDAYS)
    error = _error(load_file, path, _mapped(**{"data.columns.known": HOLIDAYS[:2]}))
    _where(error, path, row=5, column="StateHoliday")  # the first "b"
    assert "level 'b' is not listed" in str(error) and '"StateHoliday=b"' in str(error)


def test_semicolon_separated_file_with_decimal_commas(tmp_path):
    path = _shop_csv(tmp_path, "unique_id;ds;y;price", [f"s;{day};{i},5;{i % 3},25" for i, day in enumerate(_days())])
    european = _mapped(**{"data.sep": ";", "data.decimal": ",", "data.columns.observed": ["price"]})
    frame = load_file(path, european).frame
    assert frame[Y].tolist() == [i + 0.5 for i in range(40)] and frame["price"].tolist() == [i % 3 + 0.25 for i in range(40)]
    error = _error(load_file, path, _mapped(**{"data.columns.observed": ["price"]}))  # read with the default ","
    _where(error, path)
    assert "'unique_id;ds;y;price'" in str(error)


def test_latin1_file_reads_by_config_and_is_one_error_naming_the_option_otherwise(tmp_path):
    rows = [f"s,{day},{i},ok" for i, day in enumerate(_days())]
    rows[5] = rows[5].replace("ok", "Lieferung Müller")  # spreadsheet row 7
    path = _shop_csv(tmp_path, "unique_id,ds,y,note", rows, encoding="latin-1")
    error = _error(load_file, path, _mapped())
    _where(error, path, row=7)
    assert "byte 0xfc is not utf-8 text; set [data] encoding" in str(error) and "\n" not in str(error)
    latin1 = _mapped(**{"data.encoding": "latin-1"})
    assert read_table(path, latin1)["note"][5] == "Lieferung Müller"
    assert load_file(path, latin1).frame[Y].tolist() == list(range(40))


def test_header_only_file_is_one_line_naming_it(tmp_path):
    path = _shop_csv(tmp_path, "merchant_id,unique_id,ds,y", [])
    error = _error(load_file, path, _config().data)
    _where(error, path)
    assert "no data rows" in str(error)


@pytest.mark.parametrize("column, value, message", [
    ("y", "1e30", "value 1e+30 is beyond [data] max_abs_value = 1e+09"),
    ("y", "-1e30", "value -1e+30 is beyond [data] max_abs_value = 1e+09"),
    ("visits", "1e30", "value 1e+30 is beyond [data] max_abs_value = 1e+09"),
    ("visits", "inf", "infinite"),
])
def test_absurd_values_are_errors_naming_their_cell(tmp_path, column, value, message):
    cells = [{"y": str(i), "visits": str(10 * i)} for i in range(40)]
    cells[4][column] = value  # spreadsheet row 6
    rows = [f"s,{day},{cell['y']},{cell['visits']}" for day, cell in zip(_days(), cells, strict=True)]
    path = _shop_csv(tmp_path, "unique_id,ds,y,visits", rows)
    error = _error(load_file, path, _mapped(**{"data.columns.observed": ["visits"]}))
    _where(error, path, row=6, column=column)
    assert message in str(error)


def test_max_abs_value_is_the_limit(tmp_path):
    path = _shop_csv(tmp_path, "unique_id,ds,y", [f"s,{day},{1e12 if i == 4 else i}" for i, day in enumerate(_days())])
    assert "1e+12 is beyond" in str(_error(load_file, path, _mapped()))
    assert load_file(path, _mapped(**{"data.max_abs_value": 1e13})).frame[Y][4] == 1e12


def test_boolean_words_read_as_one_and_zero(tmp_path):
    words = {"promo": ("TRUE", "false"), "open": ("yes", "No"), "holiday": ("Y", "n"), "shipped": ("YES", "N")}
    on = [i % 3 == 0 for i in range(40)]
    path = _shop_csv(tmp_path, "unique_id,ds,y," + ",".join(words), [
        f"s,{day},{i}," + ",".join(yes if on[i] else no for yes, no in words.values()) for i, day in enumerate(_days())
    ])
    frame = load_file(path, _mapped(**{"data.columns.known": list(words)})).frame
    for column in words:
        assert frame[column].tolist() == [float(flag) for flag in on], column


def test_a_second_target_can_be_an_observed_covariate_and_unmapped_columns_are_ignored(tmp_path):
    path = _shop_csv(tmp_path, "Store,Date,Sales,Customers,Notes", [
        f"1,{day},{100 + i},{20 + i},{'stocktake?' if i == 3 else ''}" for i, day in enumerate(_days())
    ])
    columns = {"data.columns.unique_id": "Store", "data.columns.ds": "Date", "data.columns.y": "Sales"}
    table = load_file(path, _mapped(**columns, **{"data.columns.observed": ["Customers"]}))
    assert list(table.frame.columns) == [MERCHANT, ID, DS, Y, OPEN, "Customers"] and table.observed == ("Customers",)
    assert table.frame[Y].tolist() == [100.0 + i for i in range(40)]
    assert table.frame["Customers"].tolist() == [20.0 + i for i in range(40)]
    assert list(load_file(path, _mapped(**columns)).frame.columns) == [MERCHANT, ID, DS, Y, OPEN]


def test_rossmann_like_export_loads_and_server_and_merchant_agree_on_the_width(tmp_path):
    """A Rossmann-style European export (";" and decimal commas, newest day first, holiday codes 0/a/b/c,
    a static store type) through the configured source; the server sizes the model from the config
    alone, the merchant from its table, and both get the same input width."""
    csv = tmp_path / "rossmann.csv"
    lines = ["Store;Date;Sales;Customers;Open;Promo;StateHoliday;SchoolHoliday;StoreType"]
    for store, store_type in (("1", "c"), ("2", "a")):
        for i, day in reversed(list(enumerate(_days(42)))):
            is_open, promo, school, holiday = int(i % 7 != 6), int(i % 3 == 0), int(i < 5), {0: "a", 14: "b", 30: "c"}.get(i, "0")
            lines.append(f"{store};{day};{is_open * (5000 + i)},5;{is_open * (500 + i)};{is_open};{promo};{holiday};{school};{store_type}")
    _write(csv, "\n".join(lines) + "\n")
    known = ["SchoolHoliday", "StoreType=a", "StoreType=b", "StoreType=c", "StoreType=d"]
    config = _write(tmp_path / "rossmann.toml", f"""
[data]
source = "file"
path = '{csv}'
sep = ";"
decimal = ","
context = 14
horizon = 7
[data.columns]
merchant_id = ""
unique_id = "Store"
ds = "Date"
y = "Sales"
promo = ["Promo"]
holiday = ["StateHoliday=a", "StateHoliday=b", "StateHoliday=c"]
known = {json.dumps(known)}
observed = ["Customers"]
open = "Open"
[model]
backbone = "tiny"
llm_layers = 2
""")
    cfg = load_config(config)
    table = load_table(cfg)
    assert table.merchants() == ["rossmann"] and table.known == (PROMO, HOLIDAY, *known) and table.observed == ("Customers",)
    store_1 = table.frame[table.frame[ID] == "1"]
    assert store_1[DS].is_monotonic_increasing and store_1[Y].iloc[:2].tolist() == [5000.5, 5001.5]
    assert store_1[HOLIDAY].sum() == 3 and store_1["StoreType=c"].eq(1).all() and store_1["StoreType=a"].eq(0).all()
    assert (store_1[OPEN] == (store_1[Y] >= 5000)).all() and store_1[OPEN].sum() == 36
    assert ForecastPipeline.from_config(cfg).model.shape == ForecastPipeline.from_config(cfg, table).model.shape
