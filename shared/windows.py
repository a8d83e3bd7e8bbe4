"""Series -> model-ready windows, with time-ordered splits (never random).

For a series of length T and horizon H: the test targets are its last H steps, the validation
targets the H before them, and every training window's target ends before validation starts. The
windows whose targets reach into the validation horizon are kept apart (`latest`): a fit may learn
from them once validation has chosen how long to fit. The window right after the last date is the
one a merchant actually forecasts.
"""

from __future__ import annotations

from calendar import day_name
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from shared.config import DataConfig
from shared.schema import DS, ID, MERCHANT, OPEN, SeriesTable, Y, role_names

PromptEncoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
MIN_CLOSED_WEEKS = 4  # a weekday closed fewer times than this in the recent history is no pattern yet


def calendar_features(ds: pd.DatetimeIndex, freq: str) -> np.ndarray:
    """Sin/cos of the cycles a frequency has (day of week, day/week of year), known for any future date."""
    offset = pd.tseries.frequencies.to_offset(freq).name
    cycles: list[tuple[np.ndarray, float]] = []
    if offset.startswith(("h", "H", "min", "T")):
        cycles.append((ds.hour.to_numpy(), 24.0))
    if offset.startswith(("D", "B", "h", "H", "min", "T")):
        cycles.append((ds.dayofweek.to_numpy(), 7.0))
    if offset.startswith(("D", "B", "W")):
        cycles.append((ds.dayofyear.to_numpy(), 365.25))
    if offset.startswith(("M", "Q")):
        cycles.append((ds.month.to_numpy(), 12.0))
    if not cycles:
        return np.zeros((len(ds), 0), dtype=np.float32)
    angles = [2 * np.pi * values / period for values, period in cycles]
    return np.stack([f(a) for a in angles for f in (np.sin, np.cos)], axis=1).astype(np.float32)


def _standardise_known(values: np.ndarray) -> np.ndarray:
    """Flags stay 0/1; other known covariates (price, markdown) are z-scored per series."""
    out = values.astype(np.float32).copy()
    for j in range(values.shape[1]):
        column = values[:, j]
        if not np.isin(column, (0.0, 1.0)).all():
            out[:, j] = (column - column.mean()) / (column.std() + 1e-8)
    return out


@dataclass
class Windows:
    """A stack of (context, horizon) windows; index i of every array is one window."""

    context: np.ndarray  # [N, L] target history
    target: np.ndarray  # [N, H] what to forecast (zeros for the future window)
    observed: np.ndarray  # [N, L, Co] past-only covariates
    known: np.ndarray  # [N, L + H, Ck] calendar, the open flag, known-ahead covariates
    open: np.ndarray  # [N, L + H] 1 where the shop sold, 0 on a closed (or padded) day: out of the scale and the loss
    series: np.ndarray  # [N] index into Splits.series_ids: the series each window belongs to
    target_start: np.ndarray  # [N] first timestamp of the target
    offset: np.ndarray  # [N] position of the window's first step in its series
    prompt_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    prompt_mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.context)

    def subset(self, index: np.ndarray) -> "Windows":
        return Windows(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def tensors(self, index: np.ndarray | slice | None = None) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for windows `index` (all when None)."""
        sel = slice(None) if index is None else index
        return {
            "context": torch.as_tensor(self.context[sel], dtype=torch.float32),
            "observed": torch.as_tensor(self.observed[sel], dtype=torch.float32),
            "known": torch.as_tensor(self.known[sel], dtype=torch.float32),
            "open": torch.as_tensor(self.open[sel], dtype=torch.float32),
            "prompt_ids": torch.as_tensor(self.prompt_ids[sel], dtype=torch.long),
            "prompt_mask": torch.as_tensor(self.prompt_mask[sel], dtype=torch.long),
        }


@dataclass
class Splits:
    """One merchant's (or a pooled set's) windows for training, validation, test and the real forecast."""

    train: Windows
    val: Windows
    latest: Windows  # the windows after the last training one up to the validation window (included), at the same stride
    test: Windows
    future: Windows
    series_ids: list[str]
    merchant_of: list[str]
    frame: pd.DataFrame  # the validated long frame the windows came from
    freq: str
    assumed: str = ""  # what the future windows took as given where no plan said otherwise, one line for the merchant

    def history_before_test(self) -> pd.DataFrame:
        return self.frame[self.frame.groupby(ID).cumcount(ascending=False) >= self.test.target.shape[1]]

    def test_actuals(self) -> pd.DataFrame:
        return self.frame.groupby(ID).tail(self.test.target.shape[1])[[MERCHANT, ID, DS, Y]]


def _pad_channels(values: np.ndarray, width: int) -> np.ndarray:
    """[T, C] -> [T, width], the added channels zero (covariate slots the data does not use)."""
    return np.pad(values, ((0, 0), (0, width - values.shape[1]))).astype(values.dtype, copy=False)


def stack_windows(pieces: list[dict[str, np.ndarray]]) -> Windows:
    return Windows(**{k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]})


def series_windows(
    y: np.ndarray, observed: np.ndarray, known: np.ndarray, is_open: np.ndarray, dates: pd.DatetimeIndex, starts: list[int], L: int, H: int,
    sid: int,
) -> dict[str, np.ndarray]:
    """The windows of one series starting at `starts` (fields of `Windows`, prompts not yet attached)."""
    idx = np.asarray(starts)
    ctx = idx[:, None] + np.arange(L)
    full = idx[:, None] + np.arange(L + H)
    tgt = idx[:, None] + L + np.arange(H)
    return {
        "context": y[ctx],
        "target": y[tgt],
        "observed": observed[ctx],
        "known": known[full],
        "open": is_open[full],
        "series": np.full(len(idx), sid),
        "target_start": dates[idx + L].to_numpy(),
        "offset": idx,
    }


def closed_weekdays(table: SeriesTable, days: int) -> dict[str, frozenset[int]]:
    """Per series, the weekdays (0 = Monday) it was closed on at every occurrence, at least
    MIN_CLOSED_WEEKS of them, in the last `days` days of its own history (padding before a new
    series' first date is none): a shop shut every Sunday is forecast shut on the coming Sundays, not
    at a weekday's usual sales, unless a plan says otherwise. Daily data only: a weekly or hourly step
    has no weekday that recurs as a whole day."""
    if pd.tseries.frequencies.to_offset(table.freq) != pd.offsets.Day():
        return {}
    closed = {}
    for uid, g in table.frame.groupby(ID, sort=True):
        recent = g.iloc[table.padded.get(uid, 0):].tail(days)
        per_weekday = recent[OPEN].groupby(pd.DatetimeIndex(recent[DS]).dayofweek).agg(["max", "size"])
        always = per_weekday.index[(per_weekday["max"] == 0) & (per_weekday["size"] >= MIN_CLOSED_WEEKS)]
        if len(always):
            closed[uid] = frozenset(int(day) for day in always)
    return closed


def _planned(future_known: pd.DataFrame | None, uid: str, future_dates: pd.DatetimeIndex, known: tuple[str, ...]) -> pd.DataFrame:
    """`future_known`'s covariates and open flag for series `uid` on `future_dates`, NaN where it plans nothing."""
    columns = [*known, OPEN]
    if future_known is None:
        return pd.DataFrame(np.nan, index=future_dates, columns=columns)
    return future_known[future_known[ID] == uid].set_index(DS).reindex(index=future_dates, columns=columns)


def _assumed(known: tuple[str, ...], unplanned: int, closed: Counter[int], n_series: int, days: int) -> str:
    """One line on the defaults the future windows used: what the merchant should plan if it is wrong
    (`known` as the merchant listed them, not the model's channel names)."""
    def share(count: int) -> str:
        return "" if count == n_series else f" for {count} of {n_series} series"
    parts = [f"{', '.join(known)} assumed 0 over the horizon{share(unplanned)}"] if known and unplanned else []
    parts += [f"{day_name[day]}s assumed closed{share(count)} (closed every {day_name[day]} of the last {days} days)"
              for day, count in sorted(closed.items())]
    return "; ".join(parts)


def build_splits(table: SeriesTable, cfg: DataConfig, encode_prompts: PromptEncoder, future_known: pd.DataFrame | None = None,
                 widths: tuple[int, int] | None = None) -> Splits:
    """Cuts every series of `table` into train/val/test/future windows and attaches prompt tokens.

    `future_known` holds known covariates for the H dates after the last one (promotions planned,
    and the open flag: days the shop will be closed). Where it plans nothing, the covariates are taken
    as zero, i.e. no promotion and no holiday, and the shop as open except on the weekdays it was closed
    on all through its last context (`closed_weekdays`); `Splits.assumed` says which defaults were used.
    `widths` (known, observed channels) pads the covariates with zero channels up to the model's slots.
    """
    L, H = cfg.context, cfg.horizon
    parts: dict[str, list[dict[str, np.ndarray]]] = {"train": [], "val": [], "latest": [], "test": [], "future": []}
    series_ids, merchant_of = [], []
    usually_closed = closed_weekdays(table, L)
    unplanned, assumed_closed = 0, Counter[int]()
    for sid, (uid, g) in enumerate(table.frame.groupby(ID, sort=True)):
        series_ids.append(uid)
        merchant_of.append(str(g[MERCHANT].iloc[0]))
        T = len(g)
        dates = pd.DatetimeIndex(g[DS])
        future_dates = pd.date_range(dates[-1], periods=H + 1, freq=table.freq)[1:]
        all_dates = dates.append(future_dates)
        plan = _planned(future_known, uid, future_dates, table.known)
        usual = np.where(future_dates.dayofweek.isin(usually_closed.get(uid, ())), 0.0, 1.0)
        future_cov = plan[list(table.known)].fillna(0.0).to_numpy(dtype=np.float64)
        future_open = np.where(plan[OPEN].isna(), usual, plan[OPEN]).astype(np.float32)
        unplanned += bool(plan[list(table.known)].isna().to_numpy().any())
        assumed_closed.update({int(day) for day in future_dates[plan[OPEN].isna().to_numpy() & (usual == 0)].dayofweek})
        is_open = np.concatenate([g[OPEN].to_numpy(dtype=np.float32), future_open])
        raw_known = np.concatenate([g[list(table.known)].to_numpy(dtype=np.float64), future_cov])
        known = np.concatenate([calendar_features(all_dates, table.freq), is_open[:, None], _standardise_known(raw_known)], axis=1)
        y = np.concatenate([g[Y].to_numpy(dtype=np.float32), np.zeros(H, dtype=np.float32)])
        observed = np.concatenate(
            [g[list(table.observed)].to_numpy(dtype=np.float32), np.zeros((H, len(table.observed)), dtype=np.float32)]
        )
        if widths is not None:
            known, observed = _pad_channels(known, widths[0]), _pad_channels(observed, widths[1])
        last_train_start, val_start = T - 2 * H - (L + H), T - 2 * H - L
        train_starts = sorted(set(range(0, last_train_start + 1, cfg.stride)) | {last_train_start})
        latest_starts = sorted(set(range(last_train_start + cfg.stride, val_start + 1, cfg.stride)) | {val_start})
        for name, starts in (("train", train_starts), ("val", [val_start]), ("latest", latest_starts), ("test", [T - H - L]),
                             ("future", [T - L])):
            parts[name].append(series_windows(y, observed, known, is_open, all_dates, starts, L, H, sid))
    windows = {name: stack_windows(pieces) for name, pieces in parts.items()}
    for w in windows.values():
        w.prompt_ids, w.prompt_mask = encode_prompts(w.context)
    # A training window needs an open day in its context (the scale comes from them) and in its target
    # (the loss does): before a new shop's first day there is neither, only padding.
    for name in ("train", "latest"):
        learnable = (windows[name].open[:, :L] > 0).any(axis=1) & (windows[name].open[:, L:] > 0).any(axis=1)
        windows[name] = windows[name].subset(np.flatnonzero(learnable))
    return Splits(**windows, series_ids=series_ids, merchant_of=merchant_of, frame=table.frame, freq=table.freq,
                  assumed=_assumed((*role_names(cfg.columns), *cfg.columns.known), unplanned, assumed_closed, len(series_ids), L))


def concat_windows(parts: list[Windows]) -> Windows:
    """Pools merchants' windows (series ids offset so they stay distinct)."""
    offsets = np.cumsum([0] + [int(w.series.max()) + 1 for w in parts[:-1]])
    pooled = {f: np.concatenate([getattr(w, f) for w in parts]) for f in Windows.__dataclass_fields__}
    pooled["series"] = np.concatenate([w.series + o for w, o in zip(parts, offsets)])
    return Windows(**pooled)


class WindowDataset(Dataset):
    """Item i is one window, or, when `units` is given, a random window of privacy unit i.

    Under DP the sampled thing must be the protected unit: a whole series contributes one window
    (hence one clipped gradient) per step, however many overlapping windows it has.
    """

    def __init__(self, windows: Windows, units: list[np.ndarray] | None = None, seed: int = 0):
        self.windows, self.units = windows, units
        # One generator per unit: the window a unit contributes depends on its own draws only, never on
        # which other units were sampled before it, so a dataset with one unit more or less changes one
        # clipped gradient of a step, not the windows of all the others.
        children = np.random.SeedSequence(seed).spawn(len(units)) if units is not None else []
        self.unit_rngs = [np.random.default_rng(child) for child in children]

    def __len__(self) -> int:
        return len(self.units) if self.units is not None else len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index = int(self.unit_rngs[i].choice(self.units[i])) if self.units is not None else i
        item = {k: v[0] for k, v in self.windows.tensors(np.array([index])).items()}
        item["target"] = torch.as_tensor(self.windows.target[index], dtype=torch.float32)
        return item
