"""The guard end to end: a crafted array payload in a real simulated federation is one rejected reply,
not an aborted run (issue 33, item 1: "RUN ABORTED in round 2", no final adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fed_helpers import N_MERCHANTS, run, run_overrides
from flwr.app import Array, Context, Message

pytestmark = pytest.mark.slow

CRAFTED_PARTITION, CRAFTED_ROUND = 1, 1


class GarbagePayload:
    """Mod: one merchant's train reply of one round keeps its keys, dtype and shapes but not its bytes.
    Defined here, not as a test closure, so that it pickles into the Ray workers."""

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        hit = (msg.metadata.message_type == "train" and int(context.node_config.get("partition-id", -1)) == CRAFTED_PARTITION
               and int(msg.content["config"].get("server-round", -1)) == CRAFTED_ROUND)
        if hit and not reply.has_error():
            arrays = reply.content["arrays"]
            name = next(iter(arrays))
            arrays[name] = Array(dtype="float32", shape=tuple(arrays[name].shape), stype=arrays[name].stype, data=b"garbage")
        return reply


@pytest.fixture(scope="module")
def crafted_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("fed_crafted")
    _, summary = run(base, run_overrides(base, **{"privacy.enabled": False}), [GarbagePayload()])
    return base, summary


def test_a_crafted_payload_is_one_rejected_reply_and_the_run_completes(crafted_run) -> None:
    base, summary = crafted_run
    history = summary["history"]
    assert summary["rounds"] == 2 and (Path(base) / "out" / "final_adapter" / "adapter.safetensors").exists()
    (rejected,) = history[CRAFTED_ROUND - 1]["rejected"]
    assert "undecodable payload" in rejected["reason"] and history[CRAFTED_ROUND - 1]["accepted"] == N_MERCHANTS - 1
    assert [h["accepted"] for h in history[CRAFTED_ROUND:]] == [N_MERCHANTS] * (len(history) - CRAFTED_ROUND)
