"""The SecAgg+ path's guard: a crafted masked vector is a merchant dropped from the secure sum, not a
crash in Flower's workflow (issue 33, item 1). Drives the workflow's collect stage directly, with a
grid that answers the way three merchants would."""

from __future__ import annotations

import io
import uuid

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from fed_helpers import enter_task
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Parameters, Status
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from server.guard import new_round
from server.secagg import SecAggAggregation, secagg_workflow
from shared.config import load_config

SHAPES = {"w": (4, 3), "b": (2,)}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    enter_task(monkeypatch)


def _npy(values: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, values, allow_pickle=False)
    return stream.getvalue()


HONEST = [_npy(np.array([1])), *(_npy(np.zeros(s, dtype=np.int64)) for s in SHAPES.values())]
CRAFTED = {
    "garbage": [b"garbage", *HONEST[1:]],
    "another shape": [*HONEST[:2], _npy(np.zeros(3, dtype=np.int64))],
    "floats": [HONEST[0], _npy(np.zeros((4, 3))), HONEST[2]],
    "a tensor short": HONEST[:2],
}


class AnsweringGrid:
    """Pushes messages as a grid does (giving them ids) and answers each from `masked[node]`."""

    def __init__(self, masked: dict[int, list[bytes]]) -> None:
        self.masked = masked

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            fitres = FitRes(Status(Code.OK, ""), Parameters([], ""), 1, {"num-examples": 1})
            content = compat.fitres_to_recorddict(fitres, True)
            content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.MASKED_PARAMETERS: self.masked[message.metadata.dst_node_id]})
            replies.append(Message(content, reply_to=message))
        return replies


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_masked_vector_drops_its_merchant_from_the_secure_sum(case: str) -> None:
    cfg = load_config(overrides={"federation.secagg": True})
    strategy = SecAggAggregation(cfg, {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}, [], lambda *_: None)
    strategy._current = new_round(1)  # what configure_fit starts, which the setup stage (not run here) calls
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), ServerConfig(num_rounds=1),
                            strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    nodes = {1, 2, 3}
    state = WorkflowState(sampled_node_ids=nodes, active_node_ids=set(nodes), threshold=2, mod_range=2**30,
                          nid_to_neighbours={n: set(nodes) for n in nodes}, nid_to_proxies={n: object() for n in nodes},
                          forward_srcs={n: [] for n in nodes}, forward_ciphertexts={n: [] for n in nodes},
                          nid_to_fitins={n: RecordDict() for n in nodes})
    grid = AnsweringGrid({1: HONEST, 2: HONEST, 3: CRAFTED[case]})
    assert secagg_workflow(cfg).collect_masked_vectors_stage(grid, context, state)
    assert state.active_node_ids == {1, 2} and len(state.legacy_results) == 2
    (rejected,) = strategy._current["rejected"]
    assert rejected["node"] == 3 and "masked" in rejected["reason"]
