"""The guard: a reply from one merchant can neither end a round nor steer the global adapter.

Each case drives the real strategy (`server.strategy.make_strategy`) with hand-made replies, the way
a hostile or broken merchant could send them; before the strict schema every one of these either
raised inside Flower's round loop (ending the run) or moved the average (issue 14, items 1-2; issue
33, items 1, 3, 4 and 6: crafted payloads, in-bound steering, borrowed partition ids, absurd scalars).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from fed_helpers import FakeGrid, enter_task, float32_arrays
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.guard import FEDERATION_ROUND, new_round, update_norm
from server.strategy import make_strategy
from shared.config import ConfigError, load_config

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


def _round(strategy, contents: list[RecordDict], start: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
    """One train round of `strategy` from `start` (a zero global adapter by default), node i + 1 replying `contents[i]`."""
    messages = _sent(strategy.configure_train(1, float32_arrays(start or _update(0.0)), ConfigRecord({}), FakeGrid(len(contents))))
    arrays, _ = strategy.aggregate_train(1, [Message(c, reply_to=m) for c, m in zip(contents, messages, strict=True)])
    return None if arrays is None else {k: np.asarray(v.numpy()) for k, v in arrays.items()}


def _sent(messages: Iterable[Message]) -> list[Message]:
    """The strategy's messages as a grid sends them, with their ids, in node order (it samples nodes in
    random order), so node i + 1 sends contents[i]."""
    for message in messages:
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what InMemoryGrid.push_messages does
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
    "string array": lambda: RecordDict({"arrays": ArrayRecord({"w": Array(np.full((4, 3), "x")),
                                                              "b": Array(np.zeros(2, dtype=np.float32))}),
                                       "metrics": MetricRecord(HONEST)}),
    "float64 array": lambda: RecordDict({"arrays": ArrayRecord({k: Array(np.zeros(s)) for k, s in SHAPES.items()}),
                                         "metrics": MetricRecord(HONEST)}),
    "wrong shape": lambda: _reply({"w": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}),
    "missing tensor": lambda: RecordDict({"arrays": float32_arrays({"w": np.zeros((4, 3))}), "metrics": MetricRecord(HONEST)}),
    "non-finite tensor": lambda: _reply(_update(float("nan"))),
    "outsized update": lambda: _reply(_update(100.0)),
    "a config record": lambda: RecordDict({"arrays": float32_arrays(_update(0.1)), "metrics": MetricRecord(HONEST),
                                           "config": ConfigRecord({"x": 1})}),
    # issue 33, item 1: an Array claiming float32 and the right shape whose bytes are something else
    "garbage bytes": lambda: _crafted(b"garbage"),
    "empty bytes": lambda: _crafted(b""),
    "string npy": lambda: _crafted(_npy(np.full((4, 3), "0.1"))),
    "object npy": lambda: _crafted(_npy(np.full((4, 3), None, dtype=object), allow_pickle=True)),
    "float64 npy": lambda: _crafted(_npy(np.full((4, 3), 0.1))),
    "complex npy": lambda: _crafted(_npy(np.full((4, 3), 0.1, dtype=np.complex64))),
    "npy of another shape": lambda: _crafted(_npy(np.zeros((3, 4), dtype=np.float32))),
    "npy claiming a huge shape": lambda: _crafted(_npy_header((10**11,)) + bytes(48)),  # np.load allocates 400 GB before reading
    "truncated npy": lambda: _crafted(_npy(np.zeros((4, 3), dtype=np.float32))[:-4]),
    "npy with trailing bytes": lambda: _crafted(_npy(np.zeros((4, 3), dtype=np.float32)) + b"1234"),
    "another stype": lambda: _crafted(_npy(np.zeros((4, 3), dtype=np.float32)), stype="torch"),
    # issue 33, item 6: numbers of the right type but absurd
    "negative epsilon": lambda: _reply(_update(0.1), epsilon=-5.0, delta=1e-5),
    "absurd epsilon": lambda: _reply(_update(0.1), epsilon=1e4, delta=1e-5),
    "delta 7": lambda: _reply(_update(0.1), epsilon=1.0, delta=7.0),
    "delta 1": lambda: _reply(_update(0.1), epsilon=1.0, delta=1.0),
    "loss 1e308": lambda: _reply(_update(0.1), **{"train-loss": 1e308}),
    "negative loss": lambda: _reply(_update(0.1), **{"train-loss": -1.0}),
    "301-digit example count": lambda: _reply(_update(0.1), **{"num-examples": 10**300}),
    "huge partition-id": lambda: _reply(_update(0.1), **{"partition-id": 10**40}),
}


def _npy(values: np.ndarray, allow_pickle: bool = False) -> bytes:
    stream = io.BytesIO()
    np.save(stream, values, allow_pickle=allow_pickle)
    return stream.getvalue()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return stream.getvalue()


def _crafted(data: bytes, stype: str = "numpy.ndarray") -> RecordDict:
    """A reply whose "w" claims to be float32 (4, 3) in `stype` but holds `data`."""
    arrays = ArrayRecord({"w": Array(dtype="float32", shape=(4, 3), stype=stype, data=data), "b": Array(np.zeros(2, dtype=np.float32))})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(HONEST)})


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


def test_a_partition_id_contested_in_its_first_round_goes_to_neither_node() -> None:
    strategy = _strategy()
    _round(strategy, [_reply(_update(0.2), **{"partition-id": 0}), _reply(_update(0.4), **{"partition-id": 0})])
    record = strategy.history[-1]
    assert set(record["merchants"]) == {"node-1", "node-2"} and record["accepted"] == 2 and _rejected(strategy) == []
    assert [c["node"] for c in record["conflicts"]] == [1, 2]


def test_a_node_claiming_anothers_partition_id_neither_displaces_nor_rejects_it() -> None:
    """Issue 33, item 4: the node that replied first under merchant 0's id was accepted and merchant 0 rejected."""
    strategy = _strategy()
    _round(strategy, [_reply(_update(0.2), **{"partition-id": 0}), _reply(_update(0.4), **{"partition-id": 1})])
    messages = _sent(strategy.configure_train(2, float32_arrays(_update(0.3)), ConfigRecord({}), FakeGrid(2)))
    squatter_first = [Message(_reply(_update(0.5), **{"partition-id": 0}), reply_to=messages[1]),
                      Message(_reply(_update(0.1), **{"partition-id": 0}), reply_to=messages[0])]
    strategy.aggregate_train(2, squatter_first)
    record = strategy.history[-1]
    assert record["merchants"]["0"]["node"] == 1 and record["merchants"]["node-2"]["partition-id"] == 0
    assert _rejected(strategy) == [] and record["accepted"] == 2
    assert record["conflicts"] == [{"node": 2, "partition-id": 0, "bound-to": 1}]


def _foreign_reply(content: RecordDict, dst_node: int) -> Message:
    """A reply to an instruction this strategy never sent (another strategy's message to `dst_node`)."""
    (other,) = [m for m in _sent(_strategy().configure_train(1, float32_arrays(_update(0.0)), ConfigRecord({}), FakeGrid(dst_node)))
                if m.metadata.dst_node_id == dst_node]
    return Message(content, reply_to=other)


def test_replies_are_bound_to_the_instructions_sent() -> None:
    """Issue 33, item 4: a reply to an instruction never sent was accepted."""
    strategy = _strategy()
    messages = _sent(strategy.configure_train(1, float32_arrays(_update(0.0)), ConfigRecord({}), FakeGrid(3)))
    forged_source = Message(_reply(_update(0.4)), reply_to=messages[1])
    forged_source.metadata.__dict__["_src_node_id"] = 3  # node 3 answering node 2's instruction
    replies = [Message(_reply(_update(0.2)), reply_to=messages[0]), Message(_reply(_update(0.6)), reply_to=messages[0]),
               forged_source, _foreign_reply(_reply(_update(0.8)), dst_node=3)]
    strategy.aggregate_train(1, replies)
    assert strategy.history[-1]["accepted"] == 1 and set(strategy.history[-1]["merchants"]) == {"node-1"}
    reasons = _rejected(strategy)
    assert "second reply" in reasons[0] and "sent to node 2" in reasons[1] and "never sent" in reasons[2]


def test_evaluation_replies_are_checked_too() -> None:
    strategy = _strategy()
    _round(strategy, [_reply(_update(0.2), **{"partition-id": 0}), _reply(_update(0.4), **{"partition-id": 1})])
    messages = _sent(strategy.configure_evaluate(1, float32_arrays(_update(0.3)), ConfigRecord({}), FakeGrid(4)))
    replies = [RecordDict({"metrics": MetricRecord({"wql": 0.5, "mase": 1.0, "num-examples": 2, "partition-id": 0})}),
               RecordDict({"metrics": MetricRecord({"wql": float("inf"), "num-examples": 2, "partition-id": 1})}),
               RecordDict({"metrics": MetricRecord({"wql": 0.1, "num-examples": 2, "partition-id": 0})}),  # node 3 posing as merchant 0
               RecordDict({"arrays": _crafted(b"garbage")["arrays"], "metrics": MetricRecord({"wql": 0.1, "num-examples": 2})})]
    aggregated = strategy.aggregate_evaluate(1, [*(Message(c, reply_to=m) for c, m in zip(replies, messages, strict=True)),
                                                 _foreign_reply(RecordDict({"metrics": MetricRecord({"wql": 9.0, "num-examples": 1})}), 4)])
    assert dict(aggregated) == {"wql": 0.3, "mase": 1.0}  # merchant 0 and node 3, each over 2 series
    merchants = strategy.history[-1]["merchants"]
    assert len(_rejected(strategy)) == 3 and merchants["0"]["eval-wql"] == 0.5 and merchants["node-3"]["eval-wql"] == 0.1


def test_late_merchants_are_named_not_dropped_silently() -> None:
    """Flower's round loop drops replies that miss the timeout without a word (100 merchants: 33 cut off, '0 failures')."""
    strategy = _strategy()
    messages = _sent(strategy.configure_train(1, float32_arrays(_update(0.0)), ConfigRecord({}), FakeGrid(3)))
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


@pytest.mark.parametrize("honest", [[0.003, 0.004], [0.003]])
def test_an_in_bound_attacker_is_clipped_to_the_honest_median(honest: list[float]) -> None:
    """Issue 33, item 3: an update just under max_update_norm (50) moved the mean ~16 when honest ones were ~0.01."""
    strategy = _strategy()
    attacker = _reply(_update(-13.0))  # norm 48.6: within the absolute ceiling
    mean = _round(strategy, [*(_reply(_update(v)) for v in honest), attacker])
    honest_norm = max(update_norm(_update(v), _update(0.0)) for v in honest)
    record = strategy.history[-1]
    assert record["accepted"] == len(honest) + 1 and record["norm_clip"]["clipped"] == [f"node-{len(honest) + 1}"]
    assert record["norm_clip"]["bound"] == pytest.approx(3 * honest_norm)
    assert update_norm(mean, _update(0.0)) <= 3 * honest_norm * (1 + 1e-6)


def test_honest_updates_of_like_norms_are_not_clipped() -> None:
    strategy = _strategy()
    mean = _round(strategy, [_reply(_update(v)) for v in (0.1, 0.2, 0.25, 0.3)])
    assert strategy.history[-1]["norm_clip"]["clipped"] == []
    np.testing.assert_allclose(mean["w"], 0.2125, rtol=1e-6)


def test_the_median_clip_is_a_checked_config_key() -> None:
    with pytest.raises(ConfigError, match="median_norm_clip"):
        load_config(overrides={"federation.median_norm_clip": 0.5})


def test_a_node_holds_one_partition_id() -> None:
    """A node bound to merchant 0 cannot also take the id of a merchant that has not replied yet."""
    strategy = _strategy()
    _round(strategy, [_reply(_update(0.2), **{"partition-id": 0}), _reply(_update(0.4), **{"partition-id": 1})])
    messages = _sent(strategy.configure_train(2, float32_arrays(_update(0.3)), ConfigRecord({}), FakeGrid(2)))
    strategy.aggregate_train(2, [Message(_reply(_update(0.3), **{"partition-id": 2}), reply_to=messages[0])])
    assert set(strategy.history[-1]["merchants"]) == {"node-1"} and strategy.history[-1]["conflicts"][0]["partition-id"] == 2
