"""Windows and prompts: time-ordered splits that never leak the future, calendar features, and the
statistics the prompt states about each window, checked on series whose answers are known by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from shared.backbone import ByteTokenizer
from shared.config import load_config
from shared.prompt import prompt_texts, tokenize_left_padded, window_statistics
from shared.schema import DS, ID, MERCHANT, OPEN, ROLE_CHANNELS, Y, prepare
from shared.windows import WindowDataset, build_splits, calendar_features, closed_weekdays

L, H, STRIDE = 14, 7, 3
PROMO = ROLE_CHANNELS["promo"]
LENGTHS = {"a": 50, "b": 57}
PATTERN = np.array([1.0, 5.0, 2.0, 8.0, 3.0, 9.0, 4.0])  # period 7; min 1, max 9, median 4


def no_prompt(context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((len(context), 0), dtype=np.int64), np.zeros((len(context), 0), dtype=np.int64)


def _config(**overrides):
    return load_config(overrides={
        "model.backbone": "tiny", "data.context": L, "data.horizon": H, "data.stride": STRIDE,
        "data.columns.holiday": [], "data.columns.observed": ["visits"], "data.columns.open": "", **overrides,
    })


@pytest.fixture(scope="module")
def ramp_table():
    """Two series whose value encodes its own position: y = 1000 * series + t (so a window shows where it came from)."""
    pieces = []
    for k, (uid, n) in enumerate(LENGTHS.items()):
        t = np.arange(n)
        pieces.append(pd.DataFrame({
            MERCHANT: "m", ID: uid, DS: pd.date_range("2024-01-01", periods=n, freq="D"),
            Y: 1000.0 * k + t, "promo": (t % 5 == 0).astype(float), "visits": 10.0 * t,
        }))
    return prepare(pd.concat(pieces, ignore_index=True), _config().data, "ramp")


@pytest.fixture(scope="module")
def splits(ramp_table):
    return build_splits(ramp_table, _config().data, no_prompt)


# --- prompt statistics ----------------------------------------------------------------------------


def test_statistics_of_a_period_7_pattern():
    context = np.tile(PATTERN, 12)[None]  # 84 steps
    stats = window_statistics(context, top_k=3)
    assert stats.minimum[0] == 1.0 and stats.maximum[0] == 9.0 and stats.median[0] == 4.0
    assert stats.top_lags[0, 0] == 7
    assert (stats.top_lags[0] % 7 == 0).all(), stats.top_lags  # 7, 14, 21: the season and its multiples
    text = prompt_texts(context, "Shop.", 14)[0]
    assert "Min 1, max 9, median 4" in text and "top lags 7, 14, 21" in text and "Forecast 14 steps from 84" in text


def test_top_lag_finds_the_season_through_noise_and_shift():
    rng = np.random.default_rng(0)
    t = np.arange(84)
    context = np.stack([10 + 5 * np.sin(2 * np.pi * (t + s) / 7) + rng.normal(0, 0.5, 84) for s in range(5)])
    assert (window_statistics(context).top_lags[:, 0] == 7).all()
    weekly_12 = np.tile(np.r_[np.zeros(11), 6.0], 7)  # a spike every 12 steps
    assert window_statistics(weekly_12[None]).top_lags[0, 0] == 12


def test_trend_sign_and_slope_of_ramps():
    t = np.arange(28, dtype=float)
    context = np.stack([3 + 2 * t, 100 - 0.5 * t, np.full(28, 5.0)])
    stats = window_statistics(context)
    np.testing.assert_allclose(stats.trend, [2.0, -0.5, 0.0], atol=1e-9)
    np.testing.assert_array_equal(stats.minimum, [3, 86.5, 5])
    np.testing.assert_array_equal(stats.maximum, [57, 100, 5])
    np.testing.assert_array_equal(stats.median, [30, 93.25, 5])
    texts = prompt_texts(context, "Shop.", 7)
    assert "trend upward" in texts[0] and "trend downward" in texts[1] and "trend flat" in texts[2]


def test_median_of_an_even_window_and_rows_are_independent():
    context = np.array([[4.0, 1.0, 3.0, 2.0], [10.0, 10.0, 0.0, 0.0]])
    stats = window_statistics(context)
    np.testing.assert_array_equal(stats.median, [2.5, 5.0])
    single = window_statistics(context[1:])
    assert single.median[0] == stats.median[1] and single.trend[0] == stats.trend[1]


def test_tokenize_left_padded_keeps_the_end():
    ids, mask = tokenize_left_padded(ByteTokenizer(), ["ab", "abcdefgh"], max_tokens=5)
    np.testing.assert_array_equal(ids, [[0, 0, 0, ord("a"), ord("b")], [ord(c) for c in "defgh"]])
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    ids, mask = tokenize_left_padded(ByteTokenizer(), [], max_tokens=5)
    assert ids.shape == mask.shape == (0, 5)


# --- splits ---------------------------------------------------------------------------------------


def test_splits_shapes(splits, ramp_table):
    n_series = len(LENGTHS)
    n_known = 4 + 1 + 1  # sin/cos day of week, sin/cos day of year, the open flag, promo
    assert splits.series_ids == ["a", "b"] and splits.merchant_of == ["m", "m"]
    for windows in (splits.train, splits.val, splits.latest, splits.test, splits.future):
        n = len(windows)
        assert windows.context.shape == (n, L) and windows.target.shape == (n, H)
        assert windows.observed.shape == (n, L, 1) and windows.known.shape == (n, L + H, n_known)
    assert len(splits.val) == len(splits.test) == len(splits.future) == n_series


def test_splits_are_time_ordered_and_test_is_the_last_horizon(splits, ramp_table):
    frame = ramp_table.frame
    for sid, uid in enumerate(splits.series_ids):
        y = frame.loc[frame[ID] == uid, Y].to_numpy()
        dates = pd.DatetimeIndex(frame.loc[frame[ID] == uid, DS])
        T = len(y)
        test, val, future = (w.subset(w.series == sid) for w in (splits.test, splits.val, splits.future))
        train = splits.train.subset(splits.train.series == sid)
        np.testing.assert_array_equal(test.target[0], y[-H:])  # test target = the last H values exactly
        np.testing.assert_array_equal(test.context[0], y[T - H - L : T - H])
        np.testing.assert_array_equal(val.target[0], y[T - 2 * H : T - H])
        np.testing.assert_array_equal(future.context[0], y[-L:])
        np.testing.assert_array_equal(future.target[0], np.zeros(H))
        assert future.target_start[0] == (dates[-1] + pd.Timedelta(days=1)).to_datetime64()
        # every training target ends before the validation target starts, validation before test
        train_target_end = train.offset + L + H - 1
        val_start, test_start = val.offset[0] + L, test.offset[0] + L
        assert train_target_end.max() == val_start - 1  # the last train window is used (stride or not)
        assert val_start + H == test_start
        assert (train.target_start < val.target_start[0]).all() and val.target_start[0] < test.target_start[0]
        assert train.target.max() < val.target.min() < test.target.min()  # y increases with time here
        # each train window is a contiguous slice of the series at its offset
        for i in range(len(train)):
            o = train.offset[i]
            np.testing.assert_array_equal(train.context[i], y[o : o + L])
            np.testing.assert_array_equal(train.target[i], y[o + L : o + L + H])
            assert train.target_start[i] == dates[o + L].to_datetime64()
        assert train.offset[0] == 0
        assert set(np.diff(train.offset)) <= {STRIDE} | set(range(1, STRIDE))


def test_the_latest_windows_reach_from_the_last_training_one_to_the_validation_window(splits, ramp_table):
    """A fit that learns from them after validation has chosen (shared.personal) sees every day before
    the test horizon, at the training stride, and never a test day."""
    frame = ramp_table.frame
    for sid, uid in enumerate(splits.series_ids):
        y = frame.loc[frame[ID] == uid, Y].to_numpy()
        train, latest, val = (w.subset(w.series == sid) for w in (splits.train, splits.latest, splits.val))
        assert latest.offset[0] > train.offset[-1] and latest.offset[-1] == val.offset[0]
        assert set(np.diff(np.concatenate([train.offset, latest.offset]))) <= set(range(1, STRIDE + 1))
        for i, o in enumerate(latest.offset):
            np.testing.assert_array_equal(latest.context[i], y[o : o + L])
            np.testing.assert_array_equal(latest.target[i], y[o + L : o + L + H])
        assert (latest.offset + L + H <= len(y) - H).all()


def test_splits_of_the_synthetic_merchant_do_not_leak(synthetic_table, tiny_cfg):
    splits = build_splits(synthetic_table, tiny_cfg.data, no_prompt)
    for sid in range(len(splits.series_ids)):
        train_end = splits.train.target_start[splits.train.series == sid].max()
        val_start = splits.val.target_start[splits.val.series == sid][0]
        test_start = splits.test.target_start[splits.test.series == sid][0]
        assert train_end + np.timedelta64(tiny_cfg.data.horizon - 1, "D") < val_start
        assert val_start + np.timedelta64(tiny_cfg.data.horizon, "D") == test_start
    actual = splits.test_actuals()
    assert len(actual) == len(splits.series_ids) * tiny_cfg.data.horizon
    np.testing.assert_array_equal(actual[Y].to_numpy(), splits.test.target.ravel())


def test_history_before_test_and_test_actuals(splits, ramp_table):
    history, actuals = splits.history_before_test(), splits.test_actuals()
    for sid, uid in enumerate(splits.series_ids):
        y = ramp_table.frame.loc[ramp_table.frame[ID] == uid, Y].to_numpy()
        np.testing.assert_array_equal(history.loc[history[ID] == uid, Y].to_numpy(), y[:-H])
        np.testing.assert_array_equal(actuals.loc[actuals[ID] == uid, Y].to_numpy(), splits.test.target[sid])
    assert list(actuals.columns) == [MERCHANT, ID, DS, Y]


@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_history_and_actuals_are_ready_for_pandas_3(splits):
    """groupby().apply over the grouping column is deprecated: pandas 3 drops ID from its result."""
    history, actuals = splits.history_before_test(), splits.test_actuals()
    assert set(history[ID]) == set(actuals[ID]) == set(splits.series_ids)


def test_known_covariates_reach_into_the_horizon(splits, ramp_table):
    frame = ramp_table.frame
    y_a = frame[frame[ID] == "a"]
    test = splits.test.subset(splits.test.series == 0)
    np.testing.assert_array_equal(test.known[0, :, 5], y_a[PROMO].to_numpy()[-(L + H) :])  # flag kept 0/1
    np.testing.assert_array_equal(test.observed[0, :, 0], y_a["visits"].to_numpy()[-(L + H) : -H])
    # future covariates: zero unless planned
    assert (splits.future.known[:, L:, 5] == 0).all() and (splits.future.known[:, :, 4] == 1).all()
    last = frame.groupby(ID)[DS].max()
    planned = pd.DataFrame({ID: "a", DS: pd.date_range(last["a"] + pd.Timedelta(days=1), periods=H, freq="D"), PROMO: 1.0})
    with_plan = build_splits(ramp_table, _config().data, no_prompt, future_known=planned)
    assert (with_plan.future.known[0, L:, 5] == 1).all() and (with_plan.future.known[1, L:, 5] == 0).all()


def test_prompts_are_attached_to_every_window(ramp_table):
    cfg = _config()
    texts_seen = []

    def encoder(context):
        texts_seen.append(len(context))
        return tokenize_left_padded(ByteTokenizer(), prompt_texts(context, "Shop.", H), 40)

    splits = build_splits(ramp_table, cfg.data, encoder)
    kinds = (splits.train, splits.val, splits.latest, splits.test, splits.future)
    for windows in kinds:
        assert windows.prompt_ids.shape == windows.prompt_mask.shape == (len(windows), 40)
        expected, _ = encoder(windows.context)
        np.testing.assert_array_equal(windows.prompt_ids, expected)  # each window's own statistics
    assert len(texts_seen) == 2 * len(kinds)


def test_splits_do_not_depend_on_privacy_settings(ramp_table, splits):
    private = _config(**{"privacy.enabled": True, "privacy.unit": "day", "privacy.noise_multiplier": 3.0})
    other = build_splits(ramp_table, private.data, no_prompt)
    for name in ("train", "val", "test", "future"):
        a, b = getattr(splits, name), getattr(other, name)
        for field in a.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{name}.{field}")


def test_window_dataset_items_and_privacy_units(splits):
    dataset = WindowDataset(splits.train)
    assert len(dataset) == len(splits.train)
    item = dataset[3]
    assert set(item) == {"context", "observed", "known", "open", "prompt_ids", "prompt_mask", "target"}
    np.testing.assert_array_equal(item["target"].numpy(), splits.train.target[3])
    assert item["context"].shape == (L,) and item["known"].dtype == torch.float32
    # under DP an item is a random window of one unit (a whole series)
    units = [np.flatnonzero(splits.train.series == sid) for sid in range(len(splits.series_ids))]
    per_unit = WindowDataset(splits.train, units=units, seed=0)
    assert len(per_unit) == len(units)
    for unit, members in enumerate(units):
        allowed = {tuple(splits.train.target[i]) for i in members}
        assert all(tuple(per_unit[unit]["target"].numpy()) in allowed for _ in range(10))


# --- calendar features ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("freq", "columns"), [("D", 4), ("B", 4), ("h", 4), ("W", 2), ("W-MON", 2), ("ME", 2), ("MS", 2), ("QE", 2), ("s", 0)]
)
def test_calendar_feature_shapes(freq, columns):
    ds = pd.date_range("2024-01-01", periods=30, freq=freq)
    features = calendar_features(ds, freq)
    assert features.shape == (30, columns) and features.dtype == np.float32
    if columns:  # sin/cos pairs on the unit circle
        np.testing.assert_allclose(features[:, 0::2] ** 2 + features[:, 1::2] ** 2, 1.0, atol=1e-6)


def test_daily_calendar_features_repeat_weekly_and_are_known_for_future_dates():
    ds = pd.date_range("2024-01-01", periods=21, freq="D")
    features = calendar_features(ds, "D")
    np.testing.assert_allclose(features[:7, :2], features[7:14, :2], atol=1e-6)  # day of week
    assert not np.allclose(features[:7, 2:], features[7:14, 2:])  # day of year moves on
    monday = calendar_features(pd.DatetimeIndex(["2030-06-03"]), "D")  # a Monday far in the future
    np.testing.assert_allclose(monday[0, :2], [0.0, 1.0], atol=1e-6)


def test_covariate_slots_pad_with_zeros_and_refuse_too_many(ramp_table):
    """With slots, the model's width is set by the config, not the shop: one adapter fits shops with
    fewer covariates (zeros in the slots they lack); more than the slots is a config error naming the key."""
    from shared.config import ConfigError
    from shared.pipeline import ForecastPipeline, input_shape

    cfg = _config(**{"model.known_slots": 3, "model.observed_slots": 2, "model.llm_layers": 2})
    assert input_shape(cfg, ramp_table) == input_shape(cfg)
    pipeline = ForecastPipeline.from_config(cfg, ramp_table)
    splits = pipeline.splits(ramp_table)
    assert splits.test.known.shape[2] == 4 + 1 + 3 and splits.test.observed.shape[2] == 2
    np.testing.assert_array_equal(splits.test.known[:, :, 5], splits.test.known[:, :, 5].round())  # promo, the first slot
    assert (splits.test.known[:, :, 6:] == 0).all() and (splits.test.observed[:, :, 1:] == 0).all()
    with pytest.raises(ConfigError, match="known_slots = 1"):
        input_shape(_config(**{"model.known_slots": 1, "data.columns.holiday": ["holiday"]}))


def test_a_new_series_is_padded_and_trains_only_where_it_has_open_days():
    """A series shorter than context + 3 horizons (a new product) is padded with closed days before its
    first; a training window whose context is all padding has no scale and is dropped."""
    def splits_of(n: int):
        raw = pd.DataFrame({MERCHANT: "m", ID: "new", DS: pd.date_range("2024-03-01", periods=n, freq="D"), Y: np.arange(1.0, n + 1),
                            "promo": 0.0, "visits": 5.0})
        table = prepare(raw, _config(**{"data.short_series": "pad"}).data, "new")
        assert len(table.frame) == L + 3 * H and table.frame["is_open"].sum() == n
        return build_splits(table, _config().data, no_prompt)

    kept = splits_of(3 * H + 3)  # the one training window's context holds the first 3 days
    assert len(kept.train) == 1 and kept.train.open[0, :L].sum() == 3 and (kept.train.open[0, L:] == 1).all()
    new = splits_of(2 * H + 6)  # its context would be all padding
    assert len(new.train) == 0 and (new.test.open[:, L:] == 1).all() and new.test.open[0, :L].sum() == 6 + H


def _closed_on_sundays(n: int = 70, opened: tuple[int, ...] = (), **overrides):
    """A shop closed every Sunday (2024-01-01 is a Monday) but on the days `opened`; context 28 days."""
    dates = pd.date_range("2024-01-01", periods=n, freq="D")
    is_open = (dates.dayofweek != 6).astype(float)
    is_open[list(opened)] = 1.0
    raw = pd.DataFrame({MERCHANT: "m", ID: "a", DS: dates, Y: 10.0 * is_open, "promo": 0.0, "visits": 1.0, "open": is_open})
    cfg = _config(**{"data.context": 28, "data.columns.open": "open", **overrides})
    return prepare(raw, cfg.data, "shop"), cfg


def test_a_weekday_closed_all_through_the_context_is_closed_in_the_future_unless_planned():
    table, cfg = _closed_on_sundays()
    future_dates = pd.date_range("2024-03-11", periods=H, freq="D")
    splits = build_splits(table, cfg.data, no_prompt)
    np.testing.assert_array_equal(splits.future.open[0, -H:], future_dates.dayofweek != 6)
    np.testing.assert_array_equal(splits.future.known[0, -H:, 4], future_dates.dayofweek != 6)  # the model's open channel
    assert splits.assumed == "promo assumed 0 over the horizon; Sundays assumed closed (closed every Sunday of the last 28 days)"
    planned = pd.DataFrame({ID: "a", DS: future_dates, PROMO: 1.0, OPEN: 1.0})  # a Sunday opening, planned
    opens = build_splits(table, cfg.data, no_prompt, future_known=planned)
    assert (opens.future.open[0, -H:] == 1).all() and opens.assumed == ""
    promo_only = build_splits(table, cfg.data, no_prompt, future_known=planned.drop(columns=OPEN))
    assert promo_only.assumed == "Sundays assumed closed (closed every Sunday of the last 28 days)"


@pytest.mark.parametrize("opened, overrides, closed", [
    ((), {}, {"a": frozenset({6})}),
    ((62,), {}, {}),  # one Sunday open in the last 28 days: no rule
    ((6, 13), {}, {"a": frozenset({6})}),  # Sundays open before the last 28 days do not count
    ((), {"data.context": 21}, {}),  # three Sundays seen: too few to call it a pattern
])
def test_closed_weekdays_needs_every_occurrence_of_the_recent_history(opened, overrides, closed):
    table, cfg = _closed_on_sundays(opened=opened, **overrides)
    assert closed_weekdays(table, cfg.data.context) == closed
    assert closed_weekdays(replace(table, freq="7D"), cfg.data.context) == {}  # weekly: no weekday to close


def test_a_new_series_padding_is_no_closed_history():
    """Five days Monday to Friday, padded with closed days: Saturdays and Sundays appear only in the padding."""
    table, cfg = _closed_on_sundays(n=5, **{"data.short_series": "pad"})
    assert table.padded == {"a": 44}
    assert closed_weekdays(table, cfg.data.context) == {}
