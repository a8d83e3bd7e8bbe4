"""The guard: a reply from one merchant can neither end a round nor steer the global adapter.

Each case drives the real strategy (`server.strategy.make_strategy`) with hand-made replies, the way
a hostile or broken merchant could send them; before the strict schema every one of these either
raised inside Flower's round loop (ending the run) or moved the average (issue 14, items 1-2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from fed_helpers import FakeGrid, enter_task, float32_arrays
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.guard import FEDERATION_ROUND, new_round
from server.strategy import make_strategy
from shared.config import load_config

SHAPES = {"w": (4, 3), "b": (2,)}
HONEST = {"train-loss": 1.0, "num-examples": 10, "steps": 5, "bytes-sent": 56}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    enter_task(monkeypatch)


def _strategy(**federation: Any):
    cfg = load_config(overrides={"federation.min_replies": 1, **{f"federation.{k}": v for k, v in federation.items()}})
    return make_strategy(cfg, SHAPES)


def _update(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def _reply(update: dict[str, np.ndarray], **metrics: Any) -> RecordDict:
    return RecordDict({"arrays": float32_arrays(update), "metrics": MetricRecord({**HONEST, **metrics})})


def _round(strategy, contents: list[RecordDict | Callable[[], RecordDict]]) -> dict[str, np.ndarray] | None:
    """One train and evaluate round of `strategy` from a zero global adapter, each node replying `contents[i]`."""
    zero = _update(0.0)
    messages = _by_node(strategy.configure_train(1, float32_arrays(zero), ConfigRecord({}), FakeGrid(len(contents))))
    arrays, _ = strategy.aggregate_train(1, [Message(c, reply_to=m) for c, m in zip(contents, messages, strict=True)])
    return None if arrays is None else {k: np.asarray(v.numpy()) for k, v in arrays.items()}


def _by_node(messages: Iterable[Message]) -> list[Message]:
    """The strategy's messages in node order (it samples nodes in random order), so node i + 1 sends contents[i]."""
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def _rejected(strategy) -> list[str]:
    return [r["reason"] for r in strategy.history[-1]["rejected"]]


MALFORMED = {
    "partition-id NaN": lambda: _reply(_update(0.1), **{"partition-id": float("nan")}),
    "partition-id inf": lambda: _reply(_update(0.1), **{"partition-id": float("inf")}),
    "negative partition-id": lambda: _reply(_update(0.1), **{"partition-id": -1}),
    "no metrics record": lambda: RecordDict({"arrays": float32_arrays(_update(0.1))}),
    "missing num-examples": lambda: RecordDict({"arrays": float32_arrays(_update(0.1)), "metrics": MetricRecord({"train-loss": 1.0})}),
    "extra metric key": lambda: _reply(_update(0.1), **{"raw-sales-sum": 12345.0}),
    "list-valued metric": lambda: _reply(_update(0.1), **{"train-loss": [1.0, 2.0]}),
    "NaN metric": lambda: _reply(_update(0.1), **{"train-loss": float("nan")}),
    "second ArrayRecord": lambda: RecordDict({"arrays": float32_arrays(_update(0.1)), "extra": float32_arrays(_update(0.1)),
                                             "metrics": MetricRecord(HONEST)}),
    "complex array": lambda: RecordDict({"arrays": ArrayRecord({k: Array(np.zeros(s, dtype=np.complex64)) for k, s in SHAPES.items()}),
                                        "metrics": MetricRecord(HONEST)}),
    "string array": lambda: RecordDict({"arrays": ArrayRecord({"w": Array(np.full((4, 3), "x")), "b": Array(np.zeros(2, dtype=np.float32))}),
                                       "metrics": MetricRecord(HONEST)}),
    "float64 array": lambda: RecordDict({"arrays": ArrayRecord({k: Array(np.zeros(s)) for k, s in SHAPES.items()}), "metrics": MetricRecord(HONEST)}),
    "wrong shape": lambda: _reply({"w": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}),
    "missing tensor": lambda: RecordDict({"arrays": float32_arrays({"w": np.zeros((4, 3))}), "metrics": MetricRecord(HONEST)}),
    "non-finite tensor": lambda: _reply(_update(float("nan"))),
    "outsized update": lambda: _reply(_update(100.0)),
    "a config record": lambda: RecordDict({"arrays": float32_arrays(_update(0.1)), "metrics": MetricRecord(HONEST), "config": ConfigRecord({"x": 1})}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_reply_is_rejected_and_the_round_goes_on(case: str) -> None:
    strategy = _strategy()
    mean = _round(strategy, [_reply(_update(0.2), **{"partition-id": 0}), MALFORMED[case](), _reply(_update(0.4), **{"partition-id": 2})])
    assert len(_rejected(strategy)) == 1 and strategy.history[-1]["accepted"] == 2, _rejected(strategy)
    np.testing.assert_allclose(mean["w"], 0.3, rtol=1e-6)  # the two honest replies, equally weighted


def test_honest_merchants_with_and_without_partition_id_share_a_round() -> None:
    strategy = _strategy()
    mean = _round(strategy, [_reply(_update(0.2), **{"partition-id": 0}), _reply(_update(0.4)),
                             _reply(_update(0.6), **{"partition-id": 1, "epsilon": 1.5, "delta": 1e-5})])
    assert _rejected(strategy) == [] and set(strategy.history[-1]["merchants"]) == {"0", "1", "node-2"}
    np.testing.assert_allclose(mean["b"], 0.4, rtol=1e-6)


def test_claimed_example_counts_do_not_steer_the_default_mean() -> None:
    strategy = _strategy()
    mean = _round(strategy, [_reply(_update(0.2), **{"num-examples": 10**12}), _reply(_update(0.4), **{"num-examples": 1})])
    np.testing.assert_allclose(mean["w"], 0.3, rtol=1e-6)


@pytest.mark.parametrize("weights", [(100, -99), (0, 0), (1.5, 3)])
def test_example_weights_must_be_whole_positive_numbers(weights: tuple[float, float]) -> None:
    """Weights 100 and -99 on two bounded updates used to put a coordinate at 307; 0 and 0 divided by zero."""
    strategy = _strategy(weighting="examples")
    mean = _round(strategy, [_reply(_update(3.0), **{"num-examples": weights[0]}), _reply(_update(-3.0), **{"num-examples": weights[1]})])
    assert mean is None or np.all(np.abs(mean["w"]) <= 3.0 + 1e-6)
    assert mean is None or np.isfinite(mean["w"]).all()


def test_example_weighting_is_available_and_says_what_it_trusts() -> None:
    strategy = _strategy(weighting="examples")
    mean = _round(strategy, [_reply(_update(0.2), **{"num-examples": 3}), _reply(_update(0.6), **{"num-examples": 1})])
    np.testing.assert_allclose(mean["w"], 0.3, rtol=1e-6)


def test_a_merchant_cannot_claim_anothers_partition_id() -> None:
    strategy = _strategy()
    _round(strategy, [_reply(_update(0.2), **{"partition-id": 0}), _reply(_update(0.4), **{"partition-id": 0})])
    assert strategy.history[-1]["merchants"]["0"]["node"] == 1 and "already replied" in _rejected(strategy)[0]


def test_evaluation_replies_are_checked_too() -> None:
    strategy = _strategy()
    _round(strategy, [_reply(_update(0.2), **{"partition-id": 0}), _reply(_update(0.4), **{"partition-id": 1})])
    messages = _by_node(strategy.configure_evaluate(1, float32_arrays(_update(0.3)), ConfigRecord({}), FakeGrid(3)))
    replies = [RecordDict({"metrics": MetricRecord({"wql": 0.5, "mase": 1.0, "num-examples": 2, "partition-id": 0})}),
               RecordDict({"metrics": MetricRecord({"wql": float("inf"), "num-examples": 2, "partition-id": 1})}),
               RecordDict({"metrics": MetricRecord({"wql": 0.1, "num-examples": 2, "partition-id": 0})})]  # node 3 posing as merchant 0
    aggregated = strategy.aggregate_evaluate(1, [Message(c, reply_to=m) for c, m in zip(replies, messages, strict=True)])
    assert dict(aggregated) == {"wql": 0.5, "mase": 1.0}
    assert len(_rejected(strategy)) == 2 and strategy.history[-1]["merchants"]["0"]["eval-wql"] == 0.5


def test_late_merchants_are_named_not_dropped_silently() -> None:
    """Flower's round loop drops replies that miss the timeout without a word (100 merchants: 33 cut off, '0 failures')."""
    strategy = _strategy()
    messages = _by_node(strategy.configure_train(1, float32_arrays(_update(0.0)), ConfigRecord({}), FakeGrid(3)))
    strategy.aggregate_train(1, [Message(_reply(_update(0.2), **{"partition-id": i}), reply_to=m) for i, m in enumerate(messages[:2])])
    assert strategy.history[-1]["late"] == [3] and strategy.history[-1]["accepted"] == 2


def test_a_rejected_reply_keeps_the_budget_it_says_it_spent() -> None:
    strategy = _strategy()
    _round(strategy, [_reply(_update(0.2)), _reply(_update(100.0), epsilon=1.25, steps=7)])
    (rejected,) = strategy.history[-1]["rejected"]
    assert rejected["epsilon"] == 1.25 and rejected["steps"] == 7 and "exceeds the bound" in rejected["reason"]


def test_a_resumed_run_tells_merchants_the_round_of_the_whole_run() -> None:
    cfg = load_config(overrides={"federation.min_replies": 1})
    strategy = make_strategy(cfg, SHAPES, history=[new_round(1), new_round(2)])  # resumed after two rounds
    messages = list(strategy.configure_train(1, float32_arrays(_update(0.0)), ConfigRecord({}), FakeGrid(2)))
    assert {m.content["config"][FEDERATION_ROUND] for m in messages} == {3} and strategy._current["round"] == 3


def test_the_mean_does_not_depend_on_who_answered_first() -> None:
    """Float sums depend on their order; a resumed run must match an uninterrupted one bit for bit."""
    rng = np.random.default_rng(0)
    updates = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(5)]
    replies = [_reply(u, **{"partition-id": i}) for i, u in enumerate(updates)]
    forward, backward = _round(_strategy(), replies), _round(_strategy(), replies[::-1])
    assert all(np.array_equal(forward[k], backward[k]) for k in SHAPES)
