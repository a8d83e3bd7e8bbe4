"""What leaves a merchant: every reply of a real simulated run (train and evaluate), recorded by a
client mod inside the Ray workers, must carry only the adapter's shared part and allow-listed scalars.

The run is the shared baseline of tests/fed_helpers.py (3 merchants, 2 rounds, DP on); a second run
shares only the linear path ([model] shared), from a stand-in base.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fed_helpers import N_MERCHANTS, TINY_CONFIG, Recorder, baseline_run, read_records, run, run_overrides

from shared.adapter import adapter_state, load_adapter_state, save_adapter, shared_shapes
from shared.config import load_config
from shared.pipeline import ForecastPipeline
from shared.schema import Y
from shared.sources import load_table, merchant_of_partition

pytestmark = pytest.mark.slow

# The only scalars a reply may carry, by message type (epsilon/delta: train replies under DP).
TRAIN_METRICS = {"train-loss", "num-examples", "steps", "bytes-sent", "partition-id", "epsilon", "delta"}
EVALUATE_METRICS = {"mase", "wql", "coverage-80", "num-examples", "partition-id"}
ALLOWED_METRICS = TRAIN_METRICS | EVALUATE_METRICS
# Counts whose exact value the tests below pin down (so they carry nothing beyond the count), and the
# configured delta: these are excluded from the raw-value comparison, everything else is compared.
PINNED = {"num-examples", "steps", "bytes-sent", "partition-id", "delta"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return baseline_run(tmp_path_factory)


@pytest.fixture(scope="module")
def merchants(recorded):
    """partition id -> (merchant's validated table, its splits), the way client/app.py picks them."""
    cfg = recorded["cfg"]
    table = load_table(cfg)
    pipeline = ForecastPipeline.from_config(cfg)
    out = {}
    for p in range(N_MERCHANTS):
        mine = table.for_merchant(merchant_of_partition(table.merchants(), p))
        out[p] = (mine, pipeline.splits(mine))
    return out


def test_every_message_got_exactly_one_successful_reply(recorded):
    records, rounds = recorded["records"], recorded["cfg"].federation.num_rounds
    seen = Counter((r["kind"], r["round"], r["partition"]) for r in records)
    expected = {(kind, rnd, p) for kind in ("train", "evaluate") for rnd in range(1, rounds + 1) for p in range(N_MERCHANTS)}
    assert set(seen) == expected and all(n == 1 for n in seen.values()), seen
    assert [r["error"] for r in records if r["error"] is not None] == []


def test_only_adapter_tensors_and_allowed_scalars_leave(recorded):
    expected_shapes = shared_shapes(ForecastPipeline.from_config(recorded["cfg"]).model)
    for r in recorded["records"]:
        where = (r["kind"], r["round"], r["partition"])
        content = r["content"]
        kinds = {name: kind for name, (kind, _) in content.items()}
        if r["kind"] == "train":
            # exactly one ArrayRecord named "arrays" and one MetricRecord: no ConfigRecord, nothing else
            assert kinds == {"arrays": "ArrayRecord", "metrics": "MetricRecord"}, where
            arrays = content["arrays"][1]
            assert {k: tuple(v.shape) for k, v in arrays.items()} == expected_shapes, where
            assert all(v.dtype == np.float32 for v in arrays.values()), where
            assert set(content["metrics"][1]) == TRAIN_METRICS, where  # DP is on: epsilon and delta too
        else:
            assert kinds == {"metrics": "MetricRecord"}, where
            assert set(content["metrics"][1]) == EVALUATE_METRICS, where
        for key, value in content["metrics"][1].items():
            assert key in ALLOWED_METRICS, (where, key)
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (where, key, value)  # no lists
            assert math.isfinite(value), (where, key, value)


def test_pinned_counts_are_exactly_what_they_claim(recorded, merchants):
    cfg = recorded["cfg"]
    for r in recorded["records"]:
        metrics = r["content"]["metrics"][1]
        _, splits = merchants[r["partition"]]
        assert metrics["partition-id"] == r["partition"]
        if r["kind"] == "train":
            arrays = r["content"]["arrays"][1]
            assert metrics["steps"] == cfg.federation.local_steps
            assert metrics["bytes-sent"] == sum(v.nbytes for v in arrays.values())
            assert metrics["num-examples"] == len(splits.train)
            assert metrics["delta"] == cfg.privacy.delta
            assert 0 < metrics["epsilon"] <= cfg.privacy.target_epsilon
        else:
            assert metrics["num-examples"] == len(splits.series_ids)


# --- a small shared part ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_only(tmp_path_factory) -> dict[str, Any]:
    """A recorded run (DP on) sharing only the linear path. The tiny config has no shipped base, so it
    starts from a stand-in one unlike the seeded init: the frozen tensors can then only be right if the
    server and every merchant load the base before freezing what is not shared."""
    base = tmp_path_factory.mktemp("fed_linear_only")
    records = base / "records"
    records.mkdir()
    overrides = run_overrides(base, **{"privacy.enabled": True, "model.shared": ["linear"], "model.base": str(base / "base")})
    start = ForecastPipeline.from_config(load_config(TINY_CONFIG, {**overrides, "model.base": ""})).model
    torch.manual_seed(0)
    load_adapter_state(start, {k: v + 0.01 * torch.randn_like(v) for k, v in adapter_state(start).items()})
    save_adapter(start, base / "base" / start.cfg.variant)
    cfg, summary = run(base, overrides, [Recorder(records)])
    return {"cfg": cfg, "summary": summary, "records": read_records(records), "start": adapter_state(start)}


def test_with_a_small_shared_part_only_its_tensors_leave(linear_only):
    cfg, records = linear_only["cfg"], linear_only["records"]
    expected = shared_shapes(ForecastPipeline.from_config(cfg).model)
    assert set(expected) == {"linear.weight", "linear.bias"}
    assert [r["error"] for r in records if r["error"] is not None] == []
    trains = [r for r in records if r["kind"] == "train"]
    assert len(trains) == N_MERCHANTS * cfg.federation.num_rounds
    for r in trains:
        arrays, metrics = r["content"]["arrays"][1], r["content"]["metrics"][1]
        assert {k: tuple(v.shape) for k, v in arrays.items()} == expected, (r["round"], r["partition"])
        assert metrics["bytes-sent"] == sum(v.nbytes for v in arrays.values()) and metrics["epsilon"] > 0
    assert linear_only["summary"]["shared_size"] == sum(math.prod(s) for s in expected.values())


def test_a_federated_adapter_with_a_small_shared_part_reloads_whole(linear_only):
    """from_adapter loads no base: the final adapter alone brings back the frozen tensors, at the base's values."""
    final = Path(linear_only["cfg"].federation.out_dir) / "final_adapter"
    state, start = adapter_state(ForecastPipeline.from_adapter(final, load_config(TINY_CONFIG)).model), linear_only["start"]
    assert state.keys() == start.keys()
    assert all(torch.equal(state[k], start[k]) for k in start if not k.startswith("linear.")), "a frozen tensor is not the base's"
    assert not torch.equal(state["linear.weight"], start["linear.weight"])


# --- no sent number equals a raw value -------------------------------------------------------------
#
# Chance argument. Treat every compared sent number (adapter weights, losses, scores, epsilon) as a
# continuous quantity unrelated to the data. float32 has 2^23 values per binade, so within a window
# r * (1 +- 2^-10) around a raw value r lie at least 2^14 float32 values; a sent value that falls in
# that window equals float32(r) exactly with probability <= 2^-14. The expected number of chance
# matches is therefore lambda <= 2^-14 * sum over distinct raw r of (#sent values in r's window), and
# the test allows the Poisson(lambda) count exceeded with probability < 1e-6: with these data
# (integer sales and visits > 3, adapter weights mostly |w| < 1) lambda ~ 0, so zero matches.
# Trivial raw values (0, +-1, and integers |v| <= 3: promo/holiday flags, zero-sales days) are
# ignored: adapter weights and scores hit them without any leak (LoRA init, coverage = 1.0, ...).


def _nontrivial(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32).ravel()
    values = values[np.isfinite(values)]
    trivial = (values == np.round(values)) & (np.abs(values) <= 3)
    return np.unique(values[~trivial])


def _raw_values(table) -> np.ndarray:
    """Every raw number of the merchant: target and covariates, float32-rounded, non-trivial only."""
    columns = [Y, *table.known, *table.observed]
    return _nontrivial(table.frame[columns].to_numpy(dtype=np.float64))


def _sent_values(records, partition: int) -> np.ndarray:
    parts = []
    for r in records:
        if r["partition"] != partition:
            continue
        for kind, payload in r["content"].values():
            if kind == "ArrayRecord":
                parts += [np.asarray(v, dtype=np.float32).ravel() for v in payload.values()]
            elif kind == "MetricRecord":
                parts.append(np.asarray([v for k, v in payload.items() if k not in PINNED], dtype=np.float32))
    return np.concatenate(parts)


def _matches(sent: np.ndarray, raw: np.ndarray) -> int:
    """How many sent numbers equal (float32-exactly) a raw value."""
    return int(np.isin(sent, raw).sum())


def _chance_allowance(sent: np.ndarray, raw: np.ndarray) -> tuple[float, int]:
    """(lambda, the expected chance matches; the smallest k with P(Poisson(lambda) > k) < 1e-6)."""
    ordered = np.sort(sent.astype(np.float64))
    r = raw.astype(np.float64)
    lo, hi = np.minimum(r * (1 - 2**-10), r * (1 + 2**-10)), np.maximum(r * (1 - 2**-10), r * (1 + 2**-10))
    near = np.searchsorted(ordered, hi, side="right") - np.searchsorted(ordered, lo, side="left")
    lam = float(near.sum()) * 2.0**-14
    allowed, tail, term = 0, 1.0 - math.exp(-lam), math.exp(-lam)
    while tail >= 1e-6:
        allowed += 1
        term *= lam / allowed
        tail -= term
    return lam, allowed


def test_no_sent_number_equals_a_raw_value_of_the_merchant(recorded, merchants):
    for p, (table, _) in merchants.items():
        raw, sent = _raw_values(table), _sent_values(recorded["records"], p)
        assert raw.size > 100 and sent.size > 100_000  # the comparison is not vacuous
        matches, (lam, allowed) = _matches(sent, raw), _chance_allowance(sent, raw)
        assert matches <= allowed, f"partition {p}: {matches} sent numbers equal raw values (chance allows {allowed}, lambda={lam:.2g})"


def test_the_leak_check_catches_a_planted_raw_value(recorded, merchants):
    """The comparison above can fail: one raw sales figure, or one raw context window, slipped into a reply."""
    table, splits = merchants[0]
    raw, sent = _raw_values(table), _sent_values(recorded["records"], 0)
    _, allowed = _chance_allowance(sent, raw)  # what chance allows for the honest replies
    assert _matches(sent, raw) <= allowed
    planted = sent.copy()
    planted[12345] = np.float32(table.frame[Y].max())
    assert _matches(planted, raw) == _matches(sent, raw) + 1 > allowed
    window = splits.train.context[np.argmax(splits.train.context.sum(axis=1))].astype(np.float32)  # a raw context window
    assert _matches(np.concatenate([sent, window]), raw) >= len(_nontrivial(window)) > allowed
