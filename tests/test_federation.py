"""Real Flower simulations (tiny backbone, 3 merchants): training, aggregation, faults and restart.

Three simulations in all, each ~20-60 s (mostly Ray start-up), shared across assertions:
  baseline: 2 rounds, DP on, every reply recorded (shared with tests/test_wire.py via fed_helpers)
  faults:   4 rounds of fedmedian with one misbehaving merchant per round
  resumed:  a copy of the baseline's out_dir (checkpoint + ledgers) restarted with num_rounds = 3
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from fed_helpers import N_MERCHANTS, TINY_CONFIG, Fault, Recorder, baseline_run, read_records, run, run_overrides
from safetensors.numpy import load_file

from shared.adapter import adapter_shapes, adapter_state, shared_shapes
from shared.config import load_config
from shared.pipeline import ForecastPipeline
from simulations.federated import round_timeout

pytestmark = pytest.mark.slow

PARTITIONS = {str(p) for p in range(N_MERCHANTS)}


def _final_adapter(out_dir) -> dict[str, np.ndarray]:
    return load_file(str(out_dir / "final_adapter" / "adapter.safetensors"))


def _train_replies(records, server_round: int) -> dict[int, dict]:
    """partition -> recorded train reply of that round."""
    return {r["partition"]: r for r in records if r["kind"] == "train" and r["round"] == server_round and r["error"] is None}


def _arrays(record) -> dict[str, np.ndarray]:
    kind, arrays = record["content"]["arrays"]
    assert kind == "ArrayRecord"
    return arrays


def _weighted_mean(values, weights) -> float:
    return float(np.sum(np.asarray(values) * np.asarray(weights)) / np.sum(weights))


# ----------------------------------------------------------------------------------------------
# 1. the baseline run
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return baseline_run(tmp_path_factory)


def test_final_adapter_is_trained_from_the_seeded_initial_one(baseline):
    cfg, out = baseline["cfg"], baseline["base"] / "out"
    initial = {k: v.numpy() for k, v in adapter_state(ForecastPipeline.from_config(cfg).model).items()}
    final = _final_adapter(out)
    assert set(final) == set(initial) == set(adapter_shapes(ForecastPipeline.from_config(cfg).model))
    assert all(final[k].shape == initial[k].shape and np.isfinite(final[k]).all() for k in final)
    moved = math.sqrt(sum(float(np.sum((final[k].astype(np.float64) - initial[k]) ** 2)) for k in final))
    assert moved > 1e-3, f"final adapter is (almost) the initial one: distance {moved}"
    # and it is exactly the plain mean (federation.weighting = "equal") of what the merchants sent in the last round
    last = _train_replies(baseline["records"], cfg.federation.num_rounds)
    assert sorted(last) == list(range(N_MERCHANTS))
    for key in final:
        expected = np.mean([_arrays(last[p])[key].astype(np.float64) for p in sorted(last)], axis=0)
        np.testing.assert_allclose(final[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["round"] == cfg.federation.num_rounds


def test_summary_history_has_per_merchant_and_aggregated_metrics(baseline):
    cfg, summary = baseline["cfg"], baseline["summary"]
    assert summary["rounds"] == cfg.federation.num_rounds == 2
    assert json.loads((baseline["base"] / "out" / "summary.json").read_text()) == summary
    history = summary["history"]
    assert [h["round"] for h in history] == [1, 2]
    for h in history:
        assert h["accepted"] == N_MERCHANTS and h["rejected"] == [] and h["failures"] == []
        assert set(h["merchants"]) == PARTITIONS
        for pid, m in h["merchants"].items():
            for key in ("train-loss", "eval-mase", "eval-wql", "eval-coverage-80"):
                assert math.isfinite(m[key]), (h["round"], pid, key, m)
            assert m["steps"] == cfg.federation.local_steps and m["partition-id"] == int(pid)
            assert 0 < m["epsilon"] <= cfg.privacy.target_epsilon and m["delta"] == cfg.privacy.delta
        agg, merchants = h["aggregated"], [h["merchants"][p] for p in sorted(PARTITIONS)]
        # the guard's aggregates: training means with the server's equal weights, holdout means by series evaluated
        train_weights = [1.0] * len(merchants)
        eval_weights = [m["eval-num-examples"] for m in merchants]
        assert agg["train-loss"] == pytest.approx(_weighted_mean([m["train-loss"] for m in merchants], train_weights), rel=1e-6)
        for key in ("mase", "wql", "coverage-80"):
            assert agg[f"eval-{key}"] == pytest.approx(_weighted_mean([m[f"eval-{key}"] for m in merchants], eval_weights), rel=1e-6)
    # the ledgers accumulate: every merchant's epsilon grows from round 1 to round 2
    for pid in PARTITIONS:
        assert history[1]["merchants"][pid]["epsilon"] > history[0]["merchants"][pid]["epsilon"]


# ----------------------------------------------------------------------------------------------
# 2. restart: a server that finds <out_dir>/checkpoint resumes after the last saved round
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(baseline, tmp_path_factory):
    """The baseline's out_dir and ledgers as a crashed server would leave them after round 2, then a
    restart asking for 3 rounds. (Equivalent to num_rounds 1 -> 2, and saves one Ray start-up.)"""
    base = tmp_path_factory.mktemp("fed_resumed")
    shutil.copytree(baseline["base"] / "out", base / "out")
    shutil.copytree(baseline["base"] / "ledgers", base / "ledgers")
    (base / "out" / "summary.json").unlink()  # a crash leaves no summary; only the checkpoint counts
    shutil.rmtree(base / "out" / "final_adapter")
    records = base / "records"
    records.mkdir()
    overrides = {**baseline["overrides"], **run_overrides(base), "federation.num_rounds": 3}
    cfg, summary = run(base, overrides, [Recorder(records, keep_incoming=True)])
    return {"base": base, "cfg": cfg, "summary": summary, "records": read_records(records)}


def test_restart_resumes_from_the_checkpoint(baseline, resumed):
    first, history = baseline["summary"]["history"], resumed["summary"]["history"]
    assert resumed["summary"]["rounds"] == len(history) == 3
    assert history[:2] == first, "the rounds before the restart must be kept exactly as they were"
    assert history[2]["round"] == 3 and set(history[2]["merchants"]) == PARTITIONS and history[2]["accepted"] == N_MERCHANTS
    # only the one missing round ran, and it started from the checkpointed adapter, not the seeded one
    trains = [r for r in resumed["records"] if r["kind"] == "train"]
    assert len(trains) == N_MERCHANTS
    checkpoint = _final_adapter(baseline["base"] / "out")  # == the round-2 checkpoint
    for r in trains:
        kind, received = r["incoming"]
        assert kind == "ArrayRecord" and set(received) == set(checkpoint)
        for key in checkpoint:
            np.testing.assert_array_equal(received[key], checkpoint[key], err_msg=key)
    final = _final_adapter(resumed["base"] / "out")
    assert any(not np.array_equal(final[k], checkpoint[k]) for k in final)
    # privacy spent before the restart stays spent
    for pid in PARTITIONS:
        assert history[2]["merchants"][pid]["epsilon"] > first[1]["merchants"][pid]["epsilon"]


# ----------------------------------------------------------------------------------------------
# 3. faults: one misbehaving merchant per round, under fedmedian
# ----------------------------------------------------------------------------------------------

NAN_ROUND, RAISE_ROUND, SCALE_ROUND, SHIFT_ROUND = 1, 2, 3, 4
SHIFT_NORM = 25.0  # half the default max_update_norm (50): big, but accepted by the guard


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """Round 1: merchant 2 sends NaN; 2: merchant 1's ClientApp raises; 3: merchant 0 sends its
    adapter x 1e6; 4: merchant 0 shifts every coordinate of its update so the update's norm is ~25.
    DP-SGD is off here: these tests are about the server's guard, not about privacy budgets."""
    base = tmp_path_factory.mktemp("fed_faults")
    records = base / "records"
    records.mkdir()
    overrides = run_overrides(base, **{"federation.num_rounds": 4, "federation.strategy": "fedmedian", "privacy.enabled": False})
    n_coordinates = sum(math.prod(s)
                        for s in shared_shapes(ForecastPipeline.from_config(load_config(TINY_CONFIG, overrides)).model).values())
    shift = SHIFT_NORM / math.sqrt(n_coordinates)
    mods = [
        Recorder(records, keep_incoming=True),  # outermost: records what actually leaves the merchant
        Fault("nan", partition=2, server_round=NAN_ROUND),
        Fault("raise", partition=1, server_round=RAISE_ROUND),
        Fault("scale", partition=0, server_round=SCALE_ROUND, value=1e6),
        Fault("shift", partition=0, server_round=SHIFT_ROUND, value=shift),
    ]
    cfg, summary = run(base, overrides, mods)
    return {"base": base, "cfg": cfg, "summary": summary, "records": read_records(records), "shift": shift}


def _node_of(history, partition: int) -> int:
    """A merchant's node id, from any round in which it trained."""
    nodes = {h["merchants"][str(partition)]["node"] for h in history if "train-loss" in h["merchants"].get(str(partition), {})}
    assert len(nodes) == 1
    return nodes.pop()


def _global_received(records, server_round: int) -> dict[str, np.ndarray]:
    received = [r["incoming"][1] for r in records if r["kind"] == "train" and r["round"] == server_round]
    assert received
    return received[0]


def test_faulty_run_completes_every_round(faults):
    summary = faults["summary"]
    assert summary["rounds"] == 4 and [h["round"] for h in summary["history"]] == [1, 2, 3, 4]
    final = _final_adapter(faults["base"] / "out")
    assert all(np.isfinite(v).all() for v in final.values())
    for h in summary["history"]:
        assert h["accepted"] >= faults["cfg"].federation.min_replies
        # every merchant still evaluates each round, the faulty one included
        assert all(math.isfinite(h["merchants"][p]["eval-mase"]) for p in PARTITIONS)


def test_client_exception_is_recorded_as_a_failure(faults):
    history = faults["summary"]["history"]
    h = history[RAISE_ROUND - 1]
    assert len(h["failures"]) == 1 and h["rejected"] == [] and h["accepted"] == 2
    failure = h["failures"][0]
    assert failure["node"] == _node_of(history, 1)
    assert "injected failure" in failure["reason"]
    assert "train-loss" not in h["merchants"].get("1", {})
    assert {p for p, m in h["merchants"].items() if "train-loss" in m} == {"0", "2"}
    # merchant 1 is back in the next round
    assert "train-loss" in history[RAISE_ROUND]["merchants"]["1"]
    assert all(not other["failures"] for i, other in enumerate(history) if i != RAISE_ROUND - 1)


def test_nan_update_is_rejected(faults):
    history, records = faults["summary"]["history"], faults["records"]
    sent = _arrays(_train_replies(records, NAN_ROUND)[2])
    assert all(np.isnan(v).all() for v in sent.values()), "the NaN fault did not fire"
    h = history[NAN_ROUND - 1]
    assert h["failures"] == [] and h["accepted"] == 2 and len(h["rejected"]) == 1
    assert h["rejected"][0]["node"] == _node_of(history, 2) and "non-finite" in h["rejected"][0]["reason"]
    assert "train-loss" not in h["merchants"].get("2", {})
    # the round's aggregate (median of two = mean) is built from merchants 0 and 1 only, and is finite
    honest = _train_replies(records, NAN_ROUND)
    received_next = _global_received(records, NAN_ROUND + 1)
    for key, value in received_next.items():
        assert np.isfinite(value).all()
        np.testing.assert_allclose(value, (_arrays(honest[0])[key] + _arrays(honest[1])[key]) / 2, rtol=1e-5, atol=1e-6)


def test_scaled_update_is_rejected_by_the_norm_bound(faults):
    history, records, cfg = faults["summary"]["history"], faults["records"], faults["cfg"]
    replies = _train_replies(records, SCALE_ROUND)
    received = _global_received(records, SCALE_ROUND)
    poisoned = _arrays(replies[0])
    norm = math.sqrt(sum(float(np.sum((poisoned[k].astype(np.float64) - received[k]) ** 2)) for k in poisoned))
    assert norm > 1e3 * cfg.federation.max_update_norm, "the x1e6 fault did not fire"
    h = history[SCALE_ROUND - 1]
    assert h["accepted"] == 2 and len(h["rejected"]) == 1
    assert h["rejected"][0]["node"] == _node_of(history, 0) and "exceeds the bound" in h["rejected"][0]["reason"]
    # the next round starts from the median (= mean) of merchants 1 and 2 alone
    for key, value in _global_received(records, SCALE_ROUND + 1).items():
        np.testing.assert_allclose(value, (_arrays(replies[1])[key] + _arrays(replies[2])[key]) / 2, rtol=1e-5, atol=1e-6)
        assert np.max(np.abs(value - received[key])) < 1.0


def test_fedmedian_outlier_under_the_bound_does_not_dominate(faults):
    history, records, cfg = faults["summary"]["history"], faults["records"], faults["cfg"]
    h = history[SHIFT_ROUND - 1]
    assert h["accepted"] == N_MERCHANTS and h["rejected"] == [], "the shifted update should pass the guard"
    replies = _train_replies(records, SHIFT_ROUND)
    received = _global_received(records, SHIFT_ROUND)
    shifted = _arrays(replies[0])
    norm = math.sqrt(sum(float(np.sum((shifted[k].astype(np.float64) - received[k]) ** 2)) for k in shifted))
    assert SHIFT_NORM / 2 < norm < cfg.federation.max_update_norm
    final = _final_adapter(faults["base"] / "out")
    mean_gap = 0.0
    for key, value in final.items():
        a, b = _arrays(replies[1])[key], _arrays(replies[2])[key]
        tol = 1e-6 + 1e-6 * np.abs(value)
        assert np.all(value >= np.minimum(a, b) - tol) and np.all(value <= np.maximum(a, b) + tol), key
        mean_gap += float(np.sum((shifted[key] + a + b) / 3 - value))
    # under a mean the shift would have moved every coordinate by shift / 3 (so this test can tell)
    n = sum(v.size for v in final.values())
    assert mean_gap / n > faults["shift"] / 4


def test_a_simulated_round_gives_every_queued_merchant_its_time(monkeypatch) -> None:
    """100 merchants on 2 CPUs queue 50 deep; a fixed 600 s round cut a third of them off (issue 14)."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})
    cfg = load_config(TINY_CONFIG, {"federation.round_timeout_s": 600})
    assert round_timeout(cfg, 100) == 600 * 50 and round_timeout(cfg, 2) == 600 and round_timeout(cfg, 3) == 1200
