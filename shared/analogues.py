"""A new product's missing history, stood in for by the shop's products most like it.

A product with no sales yet gives the model no level to scale by and no recent pattern to read.
A merchant would look at similar products it already sells (forecasting by analogy), and this does
the same. The days before a new series' first row (the padding of `short_series = "analogues"`) are
filled as follows:
  - the sales are the mean of its analogues' histories over those days, each divided by its own mean
    sale on open days, times the median of those means;
  - a day is open where any analogue sold;
  - the covariates are copied from the closest analogue.

The analogues are the k products of the same shop whose descriptions ([data.columns] description)
are closest to the new one's. Each description is turned into the mean of its tokens' embeddings in
the frozen backbone, with the vocabulary's mean subtracted, and two descriptions are compared by the
cosine of those vectors. This is the one place where the LLM reads something a numeric model cannot.
Without descriptions, every product of the shop with a full history stands in equally.

The stand-in feeds the forecast; it says nothing about the product itself. It never leaves the shop,
like the rest of the table, and benchmarks/cold_start.py measures how good it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from shared.schema import DS, ID, MERCHANT, OPEN, SeriesTable, Y

log = logging.getLogger(__name__)

Describe = Callable[[list[str]], np.ndarray]  # texts -> [N, d] unit vectors (zero for an empty text)


def description_vectors(texts: Sequence[str], tokenizer, embeddings: torch.nn.Embedding) -> np.ndarray:
    """[N, d] unit vectors: each text's mean token embedding minus the vocabulary's mean. Subtracting
    the mean removes the direction that all token embeddings share, which would otherwise make any two
    texts look alike. Texts are lower-cased because exports often write names in capitals, which
    tokenise into rare pieces."""
    weight = embeddings.weight.detach().float().cpu()
    centre = weight.mean(dim=0)
    out = np.zeros((len(texts), weight.shape[1]))
    for i, tokens in enumerate(tokenizer([t.lower() for t in texts], add_special_tokens=False)["input_ids"]):
        if tokens:
            vector = (weight[tokens].mean(dim=0) - centre).numpy()
            out[i] = vector / (np.linalg.norm(vector) or 1.0)
    return out


def pick_analogues(new: str, donors: list[str], descriptions: Mapping[str, str], describe: Describe, k: int) -> list[str]:
    """The (at most) k donors described most like `new`, closest first; all donors when `new` or
    every donor has no description."""
    described = [d for d in donors if descriptions.get(d)]
    if not descriptions.get(new) or not described:
        return donors
    vectors = describe([descriptions[new], *(descriptions[d] for d in described)])
    similarity = vectors[1:] @ vectors[0]
    return [described[i] for i in np.argsort(-similarity, kind="stable")[:k]]


def _stand_in(rows: pd.DataFrame, history: dict[str, pd.DataFrame], analogues: list[str]) -> pd.DataFrame | None:
    """Stand-in values for `rows` (a new series' padded rows) from the analogues' rows on the same dates;
    None when no analogue sold anything on those dates."""
    dates = pd.DatetimeIndex(rows[DS])
    profiles, levels, opens = [], [], []
    for name in analogues:
        them = history[name].reindex(dates)
        is_open = them[OPEN].fillna(0.0).to_numpy()
        sales = them[Y].fillna(0.0).to_numpy() * is_open
        level = np.abs(sales).sum() / max(is_open.sum(), 1.0)
        if level > 0:
            profiles.append(sales / level)
            levels.append(level)
            opens.append(is_open)
    if not levels:
        return None
    closest = history[analogues[0]].reindex(dates)
    filled = rows.copy()
    covariates = [c for c in rows.columns if c not in (MERCHANT, ID, DS, Y, OPEN)]
    filled[covariates] = closest[covariates].fillna(0.0).to_numpy()
    filled[OPEN] = np.max(opens, axis=0)
    filled[Y] = np.mean(profiles, axis=0) * float(np.median(levels)) * filled[OPEN].to_numpy()
    return filled


def stand_in_history(table: SeriesTable, describe: Describe, k: int) -> SeriesTable:
    """`table` with every padded series' padding replaced by its analogues' stand-in. A shop without any
    product with a full history keeps the closed-day padding, and a warning says so."""
    if not table.padded:
        return table
    frame = table.frame.copy()
    for merchant, shop in frame.groupby(MERCHANT, sort=True):
        series = list(shop[ID].unique())
        new = [s for s in series if s in table.padded]
        donors = [s for s in series if s not in table.padded]
        if not new:
            continue
        if not donors:
            log.warning("shop %s: no product with a full history to stand in for %s; they keep closed days before their first",
                        merchant, new)
            continue
        history = {s: shop[shop[ID] == s].set_index(DS) for s in donors}
        for uid in new:
            analogues = pick_analogues(uid, donors, table.descriptions, describe, k)
            rows = shop[shop[ID] == uid].iloc[: table.padded[uid]]
            filled = _stand_in(rows, history, analogues)
            if filled is not None:
                frame.loc[filled.index, filled.columns] = filled
                log.info("shop %s: %s stands in for the %d days before new product %s", merchant, analogues, len(rows), uid)
    return replace(table, frame=frame)
