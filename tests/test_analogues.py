"""A new product's history stood in for by the shop's products most like it (shared.analogues)."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pandas as pd

from shared.analogues import description_vectors, pick_analogues, stand_in_history
from shared.config import with_overrides
from shared.pipeline import ForecastPipeline
from shared.schema import DS, ID, MERCHANT, OPEN, Y, prepare, quantile_column

DAYS = 200
PROFILE = 1 + 0.5 * np.sin(2 * np.pi * np.arange(DAYS) / 7)  # weekly shape, mean 1 over whole weeks
ANALOGUES = {"data.short_series": "analogues", "data.columns.promo": [], "data.columns.holiday": [], "data.columns.observed": [],
             "data.columns.open": ""}


def _shop(levels: dict[str, float], new: str = "new", merchant: str = "m", new_days: int = 21) -> pd.DataFrame:
    """Products selling level x PROFILE over DAYS days, and `new`, which only has its last `new_days`."""
    dates = pd.date_range("2024-01-01", periods=DAYS, freq="D")
    parts = [pd.DataFrame({MERCHANT: merchant, ID: uid, DS: dates, Y: level * PROFILE}) for uid, level in levels.items()]
    parts.append(pd.DataFrame({MERCHANT: merchant, ID: new, DS: dates[-new_days:], Y: 5.0 * PROFILE[-new_days:]}))
    return pd.concat(parts, ignore_index=True)


def _unused(texts: list[str]) -> np.ndarray:
    raise AssertionError("no description to read")


def test_a_new_product_stands_in_the_shops_typical_product_and_keeps_its_own_days(tiny_cfg):
    cfg = with_overrides(tiny_cfg, ANALOGUES)
    table = prepare(_shop({"a": 10.0, "b": 30.0, "c": 40.0}), cfg.data)
    padded = table.padded["new"]
    assert padded == cfg.data.context + 3 * cfg.data.horizon - 21

    filled = stand_in_history(table, _unused, k=3).frame
    new = filled[filled[ID] == "new"]
    np.testing.assert_allclose(new[Y].to_numpy()[:padded], 30.0 * PROFILE[DAYS - 21 - padded : DAYS - 21], rtol=1e-6)  # median level
    np.testing.assert_array_equal(new[OPEN].to_numpy(), 1.0)
    np.testing.assert_allclose(new[Y].to_numpy()[padded:], 5.0 * PROFILE[-21:])  # what it did sell is untouched
    pd.testing.assert_frame_equal(filled[filled[ID] != "new"], table.frame[table.frame[ID] != "new"])


def test_descriptions_pick_the_analogues(tiny_cfg):
    descriptions = {"bag": "lunch bag red spots", "stand": "cake stand three tier", "new": "lunch bag blue spots"}
    words = sorted({w for text in descriptions.values() for w in text.split()})

    def bag_of_words(texts: list[str]) -> np.ndarray:
        vectors = np.array([[w in text.split() for w in words] for text in texts], dtype=float)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    assert pick_analogues("new", ["stand", "bag"], descriptions, bag_of_words, k=1) == ["bag"]
    assert pick_analogues("new", ["stand", "bag"], {}, bag_of_words, k=1) == ["stand", "bag"]  # nothing to read: every product

    cfg = with_overrides(tiny_cfg, ANALOGUES)
    table = prepare(_shop({"bag": 10.0, "stand": 30.0}), cfg.data)
    table = stand_in_history(replace(table, descriptions=descriptions), bag_of_words, k=1)
    new = table.frame[table.frame[ID] == "new"]
    assert np.isclose(new[Y].iloc[: table.padded["new"]].mean(), 10.0, rtol=0.05)  # the bag's level, not the stand's


def test_the_backbone_reads_descriptions_as_vectors(tiny_cfg):
    pipeline = ForecastPipeline.from_config(tiny_cfg)
    vectors = pipeline.describe(["Lunch bag red", "LUNCH BAG RED", "lunch bag red spots", "cake stand", ""])
    np.testing.assert_allclose(np.linalg.norm(vectors[:4], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(vectors[4], 0.0)  # no text, no direction
    assert np.isclose(vectors[0] @ vectors[1], 1.0)  # case does not matter
    assert vectors[0] @ vectors[2] > vectors[0] @ vectors[3]
    np.testing.assert_allclose(description_vectors(["x"], pipeline.model.tokenizer, pipeline.model.embed_tokens), pipeline.describe(["x"]))


def test_a_shop_with_no_full_history_keeps_closed_days_and_says_so(tiny_cfg, caplog):
    cfg = with_overrides(tiny_cfg, ANALOGUES)
    table = prepare(_shop({}, merchant="fresh"), cfg.data)
    with caplog.at_level(logging.WARNING, logger="shared.analogues"):
        filled = stand_in_history(table, _unused, k=3)
    assert "no product with a full history" in caplog.text
    np.testing.assert_array_equal(filled.frame[OPEN].to_numpy()[: table.padded["new"]], 0.0)


def test_the_pipeline_forecasts_a_new_product_from_its_stand_in(tiny_cfg):
    cfg = with_overrides(tiny_cfg, ANALOGUES)
    table = prepare(_shop({"a": 10.0, "b": 30.0}), cfg.data)
    pipeline = ForecastPipeline.from_config(cfg, table)
    splits = pipeline.splits(table)
    new = splits.series_ids.index("new")
    context = splits.test.context[splits.test.series == new][0]
    assert context.mean() > 1.0 and (splits.test.open[splits.test.series == new] == 1).all()
    median = pipeline.predict_frame(splits, splits.test).query("unique_id == 'new'")[quantile_column(0.5)]
    assert median.between(10.0, 30.0).all()  # untrained, the forecaster starts at its context's mean: the analogues' level


def test_a_description_column_is_read_once_per_series(tiny_cfg):
    cfg = with_overrides(tiny_cfg, ANALOGUES | {"data.columns.description": "name"})
    raw = _shop({"a": 10.0})
    raw["name"] = np.where(raw[ID] == "a", "Lunch bag", None)
    raw.loc[raw[ID] == "new", "name"] = ["", *["  Cake stand "] * 20]
    table = prepare(raw, cfg.data)
    assert dict(table.descriptions) == {"a": "Lunch bag", "new": "Cake stand"}
    assert "name" not in table.frame and table.for_merchant("m").descriptions == table.descriptions
