"""PNG charts for merchants and reports, drawn without a display.

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot, so plotting
works on servers and in tests and cannot change the backend of a caller's own session.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared.schema import DS, ID, Y, quantile_column

MEDIAN = quantile_column(0.5)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)
    return path


def fan_chart(
    history: pd.DataFrame, forecast: pd.DataFrame, path: str | Path, title: str, n_history: int = 56, max_series: int = 6,
    coverage: float = 0.8, marks: pd.DataFrame | None = None, first: list[str] | None = None,
) -> Path:
    """One panel per series (the first `max_series`, by id after those in `first`): recent history, median, band.

    `history` is long (unique_id, ds, y); only the `n_history` points before each series' first
    forecast date are drawn, so a full frame can be passed with a test-window forecast. A `y` column
    in `forecast` (the actuals of a back-test) is drawn dashed. `coverage` picks the band drawn;
    `marks` (unique_id, ds, y) are ringed in red on their series, e.g. anomalies, and `first` puts
    series ahead of the others (e.g. those the marks are on).
    """
    low, high = quantile_column((1 - coverage) / 2), quantile_column((1 + coverage) / 2)
    every = list(dict.fromkeys([*(first or []), *sorted(forecast[ID].unique())]))
    series = every[:max_series]
    if len(every) > len(series):
        title = f"{title}; {len(series)} of {len(every)} series"
    ncols = min(len(series), 3)
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, uid in zip(axes, series, strict=False):  # axes may outnumber series
        fc = forecast[forecast[ID] == uid].sort_values(DS)
        past = history[(history[ID] == uid) & (history[DS] < fc[DS].min())].sort_values(DS).tail(n_history)
        ax.plot(past[DS], past[Y], color="0.3", lw=1, label="history")
        if low in fc and high in fc:
            ax.fill_between(fc[DS], fc[low], fc[high], color="tab:blue", alpha=0.25, lw=0, label=f"{coverage:.0%} band")
        ax.plot(fc[DS], fc[MEDIAN], color="tab:blue", lw=1.5, label="median")
        if Y in fc:
            ax.plot(fc[DS], fc[Y], color="black", lw=1, ls="--", label="actual")
        if marks is not None and len(marked := marks[marks[ID] == uid]):
            ax.scatter(marked[DS], marked[Y], s=40, facecolors="none", edgecolors="tab:red", lw=1.5, zorder=3, label="anomaly")
        ax.set_title(uid, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    return _save(fig, path)


def bar_chart(
    table: pd.DataFrame, value: str, path: str | Path, title: str, group: str | None = None, reference: float | None = None
) -> Path:
    """Bars of `value` per model (the `model` column, else the index); side by side per `group` if given.

    `reference` draws a horizontal line, e.g. 1.0 for scores relative to seasonal naive.
    """
    frame = table if "model" in table else table.rename_axis("model").reset_index()
    frame = frame.assign(model=frame["model"].astype(str), _group=frame[group].astype(str) if group else "")
    models = list(dict.fromkeys(frame["model"]))
    groups = list(dict.fromkeys(frame["_group"]))
    fig = Figure(figsize=(max(5.0, 0.5 * len(models) * len(groups) + 2), 3.5), layout="constrained")
    ax = fig.subplots()
    if group is None:
        ax.bar(models, frame.groupby("model", sort=False)[value].first(), color=[f"C{i}" for i in range(len(models))])
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    else:
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            heights = frame[frame["model"] == model].set_index("_group")[value].reindex(groups)
            ax.bar(np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width, heights, width, label=model)
        ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7, ncols=min(len(models), 4))
    if reference is not None:
        ax.axhline(reference, color="0.4", lw=1, ls="--")
    ax.set_ylabel(value)
    ax.set_title(title)
    return _save(fig, path)
