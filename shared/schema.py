"""The long tabular schema every merchant file is turned into, and the checks that guard it.

One row per (series, timestamp): `merchant_id, unique_id, ds, y` plus covariate columns, the format
the forecasting ecosystem (statsforecast, mlforecast, GluonTS) uses. Every error names the file, the
row (1-based, as a spreadsheet shows it, header = row 1) and the column, so a merchant can fix the
export instead of guessing; nothing is silently dropped.
"""

from __future__ import annotations

import codecs
import gzip
import logging
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from shared.config import Columns, DataConfig

MERCHANT, ID, DS, Y = "merchant_id", "unique_id", "ds", "y"
OPEN = "is_open"  # 1 on a day the shop sold, 0 when closed (or before the series began): never scored, never learnt
NEGATIVE_FLAG = "y_was_negative"
DESCRIPTION = "description"  # the product's text, read once per series into SeriesTable.descriptions
_FILL_IT = "fill it in the export or drop the row"
ISO = "ISO8601"  # pandas' name for ISO 8601 in any of its spellings: 2024-01-31, 2024-01-31 10:00, 20240131
# The known covariates' roles, in the order of the slots a pretrained base learnt them in, each role's
# channel named so no file's own column ("promo", "holiday") can be mistaken for it
ROLE_CHANNELS = {"promo": "@promo", "holiday": "@holiday"}
NONE_CODE = "0"  # in a promotion or holiday code column: no promotion, no holiday; it needs no level of its own
NONE_LEVEL_SHARE = 0.5  # a role flag on at least this share of the open days means "none" ("StateHoliday=0")
# Names that say what a covariate is; a school holiday changes who shops, not whether the shop trades
LOOKS_LIKE = {
    "promo": re.compile(r"promo|mark.?down|discount|coupon|rebate", re.IGNORECASE),
    "holiday": re.compile(r"(?<!school)(?<!school[ _-])holiday|feiertag|christmas|easter|black.?friday", re.IGNORECASE),
}

log = logging.getLogger(__name__)


def quantile_column(level: float) -> str:
    """Column name of a quantile forecast, e.g. 0.1 -> "q0.1"; one spelling for model and baselines."""
    return f"q{level:g}"


class DataValidationError(ValueError):
    """Input that cannot be used as it is; the message says where and what to change."""

    def __init__(self, message: str, file: str | Path | None = None, row: int | None = None, column: str | None = None):
        where = ", ".join(
            part for part in (f"file {file}" if file else "", f"row {row}" if row else "", f"column {column!r}" if column else "") if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.row, self.column = file, row, column


@dataclass(frozen=True)
class SeriesTable:
    """A validated long frame plus which covariates are known ahead and which are only observed, each
    series' product text (where the file has one) and how many of its first rows are padding."""

    frame: pd.DataFrame
    known: tuple[str, ...]  # the known channels (known_channel_names), the frame's columns after the open flag
    observed: tuple[str, ...]
    freq: str
    descriptions: Mapping[str, str] = field(default_factory=dict)
    padded: Mapping[str, int] = field(default_factory=dict)  # series -> rows added before its first date
    none_levels: tuple[str, ...] = ()  # role columns left out as the "none" level: a planned-covariates file leaves them out too

    def merchants(self) -> list[str]:
        return sorted(self.frame[MERCHANT].unique())

    def for_merchants(self, merchants: Iterable[str]) -> "SeriesTable":
        frame = self.frame[self.frame[MERCHANT].isin(list(merchants))].reset_index(drop=True)
        ids = set(frame[ID])
        return replace(self, frame=frame, descriptions={k: v for k, v in self.descriptions.items() if k in ids},
                       padded={k: v for k, v in self.padded.items() if k in ids})

    def for_merchant(self, merchant: str) -> "SeriesTable":
        return self.for_merchants([merchant])


def read_table(path: str | Path, data: DataConfig | None = None) -> pd.DataFrame:
    """Reads CSV (as `data` says it is written) or Parquet; a file that cannot be parsed raises an error naming it."""
    path, data = Path(path), data or DataConfig()
    if not path.exists():
        raise DataValidationError("file does not exist", file=path)
    try:
        if path.suffix.lower() in {".parquet", ".pq"}:
            return pd.read_parquet(path)
        if path.suffix.lower() in {".csv", ".txt", ".gz"}:
            return _read_csv(path, data)
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"byte {exc.object[exc.start]:#04x} is not {data.encoding} text; set [data] encoding to the file's, "
            'e.g. "latin-1" or "cp1252" for an older Windows export', file=path, row=_undecodable_row(path, data.encoding),
        ) from exc
    except Exception as exc:  # pandas raises many types for a malformed file; all mean the same here
        raise DataValidationError(f"cannot be read as {path.suffix.lstrip('.')}: {exc}", file=path) from exc
    raise DataValidationError("unsupported format; use .csv or .parquet", file=path)


def _spellings(*words: str) -> list[str]:
    return [spelling for word in words for spelling in (word, word.upper(), word.title())]


def _read_csv(path: Path, data: DataConfig) -> pd.DataFrame:
    """A spreadsheet export as it is written: separator, decimal mark and encoding from [data]. Yes/no and
    Y/N flags become booleans as TRUE/FALSE already do in pandas; the column behind a `Column=level`
    indicator stays text, so its codes ("0", "Y") are compared as written, not as numbers or booleans."""
    categorical = {column: str for column, level in map(_indicator, covariate_names(data.columns)) if level}
    return pd.read_csv(
        path, sep=data.sep, decimal=data.decimal, encoding=data.encoding, dtype=categorical,
        true_values=_spellings("yes", "y"), false_values=_spellings("no", "n"),
    )


def _undecodable_row(path: Path, encoding: str) -> int | None:
    """The spreadsheet row of the first byte `encoding` cannot decode; pandas reports only an offset
    into its own buffer."""
    decoder = codecs.getincrementaldecoder(encoding)()
    with (gzip.open if path.suffix.lower() == ".gz" else open)(path, "rb") as lines:
        for row, line in enumerate(lines, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError:
                return row
    return None


def _spreadsheet_row(mask: np.ndarray | pd.Series) -> int:
    """The first flagged data row as a spreadsheet numbers it: by position, whatever the frame's index."""
    return int(np.flatnonzero(np.asarray(mask))[0]) + 2


def _indicator(name: str) -> tuple[str, str]:
    """`Column=level` -> (column, level): the 0/1 indicator of one level of a categorical column;
    a plain covariate name -> (name, "")."""
    column, _, level = name.partition("=")
    return (column, level) if level else (name, "")


def covariate_names(columns: Columns) -> tuple[str, ...]:
    """Every covariate [data.columns] lists, as written there (the file's columns or `Column=level`)."""
    return (*role_names(columns), *columns.known, *columns.observed)


def role_names(columns: Columns) -> tuple[str, ...]:
    return tuple(name for role in ROLE_CHANNELS for name in getattr(columns, role))


def add_indicators(raw: pd.DataFrame, names: Iterable[str], source: str | Path = "<frame>", roles: Iterable[str] = ()) -> pd.DataFrame:
    """`raw` plus a 0/1 column for each `Column=level` name it lacks, e.g. "StateHoliday=a" for a holiday
    code. A categorical is listed level by level in [data.columns], so the model's width
    follows from the config alone (the server sizes it without data) and every merchant has the same
    columns, also for a level it never saw. A value without a listed level is an error, not a row of zeros,
    except the code "0" of a promotion or holiday code (levels among `roles`): it means none, so a
    holiday lists only the holidays."""
    roles = set(roles)
    levels: dict[str, dict[str, str]] = {}
    for name in names:
        column, level = _indicator(name)
        if level and name not in raw and column in raw:
            levels.setdefault(column, {})[level] = name
    for column, named in levels.items():
        missing = raw[column].isna().to_numpy()
        if missing.any():
            raise DataValidationError(f"missing value; {_FILL_IT}", file=source, row=_spreadsheet_row(missing), column=column)
        codes = raw[column].astype(str)
        unlisted = ~codes.isin([*named, *([NONE_CODE] if roles & set(named.values()) else [])]).to_numpy()
        if unlisted.any():
            value = codes[unlisted].iloc[0]
            raise DataValidationError(
                f'level {value!r} is not listed; add "{column}={value}" to the [data.columns] list of its other levels '
                f'(listed: {sorted(named)})',
                file=source, row=_spreadsheet_row(unlisted), column=column,
            )
        raw = raw.assign(**{name: (codes == level).astype(float) for level, name in named.items()})
    return raw


def _numbers(values: pd.Series, source: str | Path, column: str, max_abs_value: float, covariate: bool) -> pd.Series:
    """`values` as floats; text, gaps, inf and magnitudes beyond max_abs_value (1e30 from a broken export
    overflows the prompt statistics and makes every metric meaningless) are errors naming the cell."""
    parsed = pd.to_numeric(values, errors="coerce")
    non_numeric = (parsed.isna() & values.notna()).to_numpy()
    if non_numeric.any():
        value = values[non_numeric].iloc[0]
        hint = f'; list a categorical column level by level in [data.columns] promo, holiday, known or observed, e.g. "{column}={value}"'
        raise DataValidationError(
            f"non-numeric value {value!r}" + (hint if covariate else ""), file=source, row=_spreadsheet_row(non_numeric), column=column,
        )
    numbers = parsed.to_numpy(dtype=float)
    not_finite = ~np.isfinite(numbers)
    if not_finite.any():
        raise DataValidationError(
            f"missing, NaN or infinite value; {_FILL_IT}", file=source, row=_spreadsheet_row(not_finite), column=column,
        )
    absurd = np.abs(numbers) > max_abs_value
    if absurd.any():
        raise DataValidationError(
            f"value {numbers[absurd][0]:g} is beyond [data] max_abs_value = {max_abs_value:g}; fix the export or raise the limit",
            file=source, row=_spreadsheet_row(absurd), column=column,
        )
    return pd.Series(numbers, index=values.index)


def to_long(
    raw: pd.DataFrame, columns: Columns, source: str | Path = "<frame>", negative: str = "clip",
    max_abs_value: float = DataConfig.max_abs_value, date_format: str = DataConfig.date_format,
) -> pd.DataFrame:
    """Renames a merchant's columns onto the schema and checks every value; columns it does not map
    (a second target, notes) are left out."""
    if raw.empty:
        raise DataValidationError("no data rows, only a header", file=source)
    covariates = list(covariate_names(columns))
    # (file column, schema column) pairs: one file column may fill two, as a store's id is often its only series' id
    wanted = [(columns.unique_id, ID), (columns.ds, DS), (columns.y, Y), *((c, c) for c in covariates)]
    wanted += [(name, target) for name, target in ((columns.open, OPEN), (columns.merchant_id, MERCHANT),
                                                   (columns.description, DESCRIPTION)) if name]
    require_columns(raw, [name for name, _ in wanted], columns, source)
    raw = add_indicators(raw.reset_index(drop=True), covariates, source, role_names(columns))
    frame = pd.DataFrame({target: raw[name] for name, target in wanted})
    if MERCHANT not in frame:
        frame[MERCHANT] = Path(str(source)).stem
    frame[MERCHANT] = frame[MERCHANT].astype(str)
    frame[ID] = frame[ID].astype(str)

    frame[DS] = parse_dates(frame[DS], date_format, source, columns.ds)

    for name, original in [(Y, columns.y)] + [(c, c) for c in covariates] + ([(OPEN, columns.open)] if columns.open else []):
        frame[name] = _numbers(frame[name], source, original, max_abs_value, covariate=name != Y)
    if columns.open:
        not_flag = ~frame[OPEN].isin((0.0, 1.0)).to_numpy()
        if not_flag.any():
            raise DataValidationError(f"value {frame.loc[not_flag, OPEN].iloc[0]:g} is not an open flag; write 1 (open) or 0 (closed)",
                                      file=source, row=_spreadsheet_row(not_flag), column=columns.open)

    duplicated = frame.duplicated([ID, DS], keep="first")
    if duplicated.any():
        row = _spreadsheet_row(duplicated)
        key = frame.loc[duplicated, [ID, DS]].iloc[0]
        raise DataValidationError(
            f"duplicate timestamp {key[DS].date()} for series {key[ID]!r}", file=source, row=row, column=columns.ds
        )
    return _apply_negative_policy(frame, negative, source, columns.y)


def parse_dates(values: pd.Series, date_format: str, source: str | Path, column: str) -> pd.Series:
    """`values` as timestamps, every row read with ONE format: `date_format` (strftime) or, for "auto",
    the one the whole column fits (`column_date_format`). Reading row by row would take 01.02.2013 as
    2 January and fail only at 13.01.2013, the misread rows already in the data."""
    if pd.api.types.is_datetime64_any_dtype(values):  # Parquet, or a preset that parsed its own dates
        return values
    text = values.astype("string")
    missing = text.isna().to_numpy()
    if missing.any():
        raise DataValidationError(f"missing date; {_FILL_IT}", file=source, row=_spreadsheet_row(missing), column=column)
    chosen = column_date_format(text, source, column) if date_format == "auto" else date_format
    dates = _read_dates(text, chosen)
    misfit = dates.isna().to_numpy()
    if misfit.any():
        how = f"[data] date_format = {chosen!r}" if date_format != "auto" else f"the column's format, {_format_name(chosen)}"
        raise DataValidationError(
            f"unparseable date {text[misfit].iloc[0]!r}: it does not fit {how}; fix the row"
            + ("" if date_format != "auto" else ' or set [data] date_format, e.g. "%d.%m.%Y"'),
            file=source, row=_spreadsheet_row(misfit), column=column,
        )
    return dates


def column_date_format(text: pd.Series, source: str | Path, column: str) -> str:
    """The format of a whole date column: ISO 8601 when every row is; else the day-first or the
    month-first reading of its first dates, whichever every row fits. Where both fit every row and
    disagree (no day above 12), only the merchant knows: an error naming [data] date_format. Where none
    fits, the one that fits most rows, so the error names the first row that breaks it."""
    candidates = [ISO, *_guessed_formats(text)]
    readings = {fmt: _read_dates(text, fmt) for fmt in candidates}
    complete = [fmt for fmt, dates in readings.items() if dates.notna().all()]
    if not complete:
        return max(candidates, key=lambda fmt: int(readings[fmt].notna().sum()))
    first = complete[0]
    if first == ISO:
        return ISO
    for other in complete[1:]:
        differ = (readings[other] != readings[first]).to_numpy()
        if differ.any():
            row = int(np.flatnonzero(differ)[0])
            raise DataValidationError(
                f"ambiguous dates: {text.iloc[row]!r} is {readings[first].iloc[row].date()} as {first!r} but "
                f'{readings[other].iloc[row].date()} as {other!r}, and no row tells which; set [data] date_format = "{first}" or "{other}"',
                file=source, column=column,
            )
    return first


def _guessed_formats(text: pd.Series, tries: int = 20) -> list[str]:
    """The month-first and day-first formats pandas guesses from the column's first distinct dates
    (fewer when they coincide, as for 31.01.2013 or 01 Mar 2024)."""
    formats: list[str] = []
    with warnings.catch_warnings():  # pandas warns when a dayfirst=False guess comes out day-first: the point here
        warnings.simplefilter("ignore", UserWarning)
        for dayfirst in (False, True):
            guesses = (pd.tseries.api.guess_datetime_format(value, dayfirst=dayfirst) for value in text.unique()[:tries])
            guess = next((fmt for fmt in guesses if fmt), None)
            if guess and guess not in formats:
                formats.append(guess)
    return formats


def _read_dates(text: pd.Series, date_format: str) -> pd.Series:
    """Every row read with `date_format` exactly; a row that does not fit it is NaT."""
    try:
        return pd.to_datetime(text, format=date_format, errors="coerce")
    except ValueError as exc:  # a directive strftime lacks ("%Q"), a stray %
        raise DataValidationError(f"[data] date_format = {date_format!r} is no strftime format: {exc}") from exc


def _format_name(date_format: str) -> str:
    return "ISO 8601 (e.g. 2024-01-31)" if date_format == ISO else repr(date_format)


def require_columns(raw: pd.DataFrame, names: Iterable[str], columns: Columns, source: str | Path) -> None:
    """Every named column in the file (for `Column=level`, its column): else one line naming those the
    file lacks beside those it has, never the indicator columns shopcast makes from them."""
    missing = list(dict.fromkeys(_indicator(name)[0] for name in names if name not in raw and _indicator(name)[0] not in raw))
    if missing:
        hints = {columns.open: '; set [data.columns] open = "" when the file has no open/closed flag',
                 columns.merchant_id: '; set [data.columns] merchant_id = "" when the file holds one shop (its name is then the id)'}
        hint = "".join(hints[name] for name in missing if name in hints)
        raise DataValidationError(f"missing column(s) {missing}; the file has {list(raw.columns)}{hint}", file=source)


def known_channel_names(columns: Columns) -> tuple[str, ...]:
    """The model's known covariate channels, in slot order: promo, holiday (a zero channel where the role has
    no column), then the other known covariates sorted by name, so the order they are listed in never
    matters. Role channels after the last role in use are left to the zero slots that follow anyway,
    which keeps a table without covariates at its own width."""
    roles = list(ROLE_CHANNELS.values())
    used = [i + 1 for i, role in enumerate(ROLE_CHANNELS) if getattr(columns, role)]
    width = len(roles) if columns.known else max(used, default=0)
    return (*roles[:width], *sorted(columns.known))


def known_channels(raw: pd.DataFrame, columns: Columns, source: str | Path = "<frame>", none_levels: Iterable[str] = (),
                   max_abs_value: float = DataConfig.max_abs_value) -> pd.DataFrame:
    """The known channels (known_channel_names) of a frame with the file's own covariate columns: each
    role's columns summed (one-hot levels: summed, they are "any of them"), except its `none_levels`.
    The data file and a file of planned covariates (`--future`) both go through it, so the horizon is
    read exactly as the history was."""
    names = [*role_names(columns), *columns.known]
    require_columns(raw, names, columns, source)
    raw = add_indicators(raw, names, source, role_names(columns))
    values = {name: _numbers(raw[name], source, name, max_abs_value, covariate=True) for name in names}
    zeros = pd.Series(0.0, index=raw.index)
    channels = {channel: sum((values[n] for n in getattr(columns, role) if n not in none_levels), zeros)
                for role, channel in ROLE_CHANNELS.items()}
    return pd.DataFrame({name: channels[name] if name in channels else values[name] for name in known_channel_names(columns)},
                        index=raw.index)


def with_known_channels(frame: pd.DataFrame, columns: Columns, source: str | Path, none_levels: Iterable[str],
                        max_abs_value: float) -> pd.DataFrame:
    """`to_long`'s frame with its covariate columns as mapped replaced by the model's known channels: the
    history and a plan for the horizon (`--future`) are turned into channels by this one step."""
    channels = known_channels(frame, columns, source, none_levels, max_abs_value)
    return frame.drop(columns=[*role_names(columns), *columns.known]).join(channels)


def find_none_levels(frame: pd.DataFrame, columns: Columns, source: str | Path) -> tuple[str, ...]:
    """The role flags on at least half of the open days: the level that means no holiday or no promotion
    ("StateHoliday=0"). Summed into the holiday slot it would say "holiday" almost every day (the base then
    over-forecast a drugstore by 63%), so it is left out, with one warning line each. Amounts (markdown
    dollars) are never a level, so only 0/1 columns are judged."""
    open_days = frame[frame[OPEN] > 0] if OPEN in frame else frame
    dropped = []
    for role in ROLE_CHANNELS:
        for name in getattr(columns, role):
            values = open_days[name]
            if len(values) and values.isin((0.0, 1.0)).all() and (values != 0).mean() >= NONE_LEVEL_SHARE:
                log.warning("%s: [data.columns] %s lists %r, on %.0f%% of the open days: the level that means none, so it is left out "
                            "of the %s slot; remove it from the list (a code \"0\" needs no level)", source, role, name,
                            100 * (values != 0).mean(), role)
                dropped.append(name)
    return tuple(dropped)


def hint_roles(columns: Columns, source: str | Path) -> None:
    """One line for each `known` covariate whose name says it is a promotion or a holiday: listed there,
    the base reads it as an unnamed covariate, not in the slot where it learnt what one does."""
    for name in columns.known:
        for role, pattern in LOOKS_LIKE.items():
            if pattern.search(_indicator(name)[0]):
                log.warning("%s: [data.columns] known lists %r, which looks like a %s; list it under %s to have it read as one",
                            source, name, "promotion" if role == "promo" else role, role)
                break


def _apply_negative_policy(frame: pd.DataFrame, policy: str, source: str | Path, y_name: str) -> pd.DataFrame:
    negative = frame[Y] < 0
    if policy == "flag":  # the column exists even without negatives, so every merchant's model has the same inputs
        frame[NEGATIVE_FLAG] = negative.astype(float)
    if not negative.any() or policy == "keep":
        return frame
    if policy == "error":
        raise DataValidationError(
            f"negative value {frame.loc[negative, Y].iloc[0]} (returns?); set [data] negative to keep, flag or clip",
            file=source, row=_spreadsheet_row(negative), column=y_name,
        )
    log.warning("%s: %d negative values in %r handled by policy %r", source, int(negative.sum()), y_name, policy)
    if policy == "clip":
        frame[Y] = frame[Y].clip(lower=0.0)
    return frame


def infer_step(dates: pd.Series) -> str:
    """The most common spacing, e.g. "1D" or "7D": unlike pd.infer_freq it survives the gaps that the
    fill policy exists for."""
    return pd.tseries.frequencies.to_offset(dates.sort_values().diff().mode().iloc[0]).freqstr


def regularise(frame: pd.DataFrame, freq: str, fill: str, source: str | Path = "<frame>") -> pd.DataFrame:
    """Puts every series on a regular grid at `freq`; gaps are filled by an explicit policy."""
    pieces = []
    for uid, series in frame.sort_values([ID, DS]).groupby(ID, sort=True):
        series_freq = freq
        if freq == "auto":
            if len(series) < 2:
                raise DataValidationError(f"cannot infer the frequency of series {uid!r} from one timestamp; set [data] freq", file=source)
            series_freq = infer_step(series[DS])
        grid = pd.date_range(series[DS].iloc[0], series[DS].iloc[-1], freq=series_freq)
        off_grid = ~series[DS].isin(grid)
        if off_grid.any():
            raise DataValidationError(
                f"timestamp {series.loc[off_grid, DS].iloc[0]} of series {uid!r} is not on the {series_freq!r} grid",
                file=source, column=DS,
            )
        full = series.set_index(DS).reindex(grid)
        gaps = int(full[Y].isna().sum())
        if gaps:
            if fill == "error":
                first_gap = full.index[full[Y].isna()][0]
                raise DataValidationError(
                    f"series {uid!r} has {gaps} missing timestamp(s), first {first_gap.date()}; set [data] fill to zero or ffill",
                    file=source, column=DS,
                )
            log.info("%s: series %r: %d missing timestamps filled by %r", source, uid, gaps, fill)
            numeric = [c for c in full.columns if c not in (ID, MERCHANT)]
            full[numeric] = full[numeric].ffill() if fill == "ffill" else full[numeric].fillna(0.0)
            full[[ID, MERCHANT]] = full[[ID, MERCHANT]].ffill()
        pieces.append(full.rename_axis(DS).reset_index())
    return pd.concat(pieces, ignore_index=True)


def fit_short(
    frame: pd.DataFrame, min_length: int, policy: str, freq: str, source: str | Path = "<frame>",
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Series shorter than one training window, a validation and a test horizon: an error, dropped, or
    (`pad`, a shop or product that is new) preceded by closed days, which the model neither scales by
    nor learns from, so the forecast rests on the days that exist and on what the federation learnt;
    `analogues` pads the same way and the pipeline then stands the shop's most similar products in for
    the padding (shared.analogues). Returns the frame and the rows padded per series."""
    lengths = frame.groupby(ID).size()
    short = lengths[lengths < min_length]
    if short.empty:
        return frame, {}
    if policy == "error":
        uid, n = short.index[0], int(short.iloc[0])
        raise DataValidationError(
            f"series {uid!r} has {n} timestamps, fewer than context + 3 x horizon = {min_length} "
            f"(one training window, a validation and a test horizon); {len(short)} series are this short. "
            "Shorten [data] context or set short_series = \"drop\" (or \"pad\" for a new shop, \"analogues\" for a new product)",
            file=source,
        )
    if policy == "drop":
        log.warning("%s: dropping %d series shorter than %d: %s", source, len(short), min_length, list(short.index[:5]))
        return frame[~frame[ID].isin(short.index)].reset_index(drop=True), {}
    log.info("%s: %d series shorter than %d padded with closed days before their first date", source, len(short), min_length)
    pads = []
    for uid, n in short.items():
        first = frame.loc[frame[ID] == uid].iloc[0]
        dates = pd.date_range(end=first[DS], periods=min_length - n + 1, freq=freq)[:-1]
        pad = pd.DataFrame({c: 0.0 for c in frame.columns if c not in (MERCHANT, ID, DS)}, index=range(len(dates)))
        pads.append(pad.assign(**{MERCHANT: first[MERCHANT], ID: uid, DS: dates}))
    padded = {str(uid): min_length - int(n) for uid, n in short.items()}
    return pd.concat([*pads, frame], ignore_index=True).sort_values([ID, DS], kind="stable").reset_index(drop=True), padded


def prepare(raw: pd.DataFrame, cfg: DataConfig, source: str | Path = "<frame>") -> SeriesTable:
    """Raw merchant table -> validated, regular, long SeriesTable ready for windowing."""
    frame = to_long(raw, cfg.columns, source, cfg.negative, cfg.max_abs_value, cfg.date_format)
    hint_roles(cfg.columns, source)
    none_levels = find_none_levels(frame, cfg.columns, source)
    frame = with_known_channels(frame, cfg.columns, source, none_levels, cfg.max_abs_value)
    descriptions = _descriptions(frame.pop(DESCRIPTION), frame[ID]) if DESCRIPTION in frame else {}
    frame = regularise(frame, cfg.freq, cfg.fill, source)
    if OPEN not in frame:  # after regularising: without an open column, a filled gap is a day without sales, not a closed one
        frame[OPEN] = 1.0
    freq = cfg.freq if cfg.freq != "auto" else infer_step(frame[DS].drop_duplicates())
    frame, padded = fit_short(frame, cfg.context + 3 * cfg.horizon, cfg.short_series, freq, source)
    if frame.empty:
        raise DataValidationError("no series left after validation", file=source)
    observed = tuple(cfg.columns.observed) + ((NEGATIVE_FLAG,) if NEGATIVE_FLAG in frame else ())
    known = known_channel_names(cfg.columns)
    ids = set(frame[ID])
    return SeriesTable(frame[[MERCHANT, ID, DS, Y, OPEN, *known, *observed]], known, observed, freq,
                       {k: v for k, v in descriptions.items() if k in ids}, padded, none_levels)


def _descriptions(text: pd.Series, ids: pd.Series) -> dict[str, str]:
    """Each series' first non-empty text: an export repeats the product's name on every row."""
    text = text.where(text.notna(), "").astype(str).str.strip()
    present = text != ""
    return text[present].groupby(ids[present], sort=False).first().to_dict()


def load_file(path: str | Path, cfg: DataConfig) -> SeriesTable:
    return prepare(read_table(path, cfg), cfg, path)
