"""The ClientApp's own refusals: a bad round instruction costs no budget, a diverged adapter is never sent.

Drives `client.app.train` directly with a real message on the tiny config (no simulation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fed_helpers import TINY_CONFIG, enter_task
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import app as client_app
from shared.config import ConfigError, load_config
from shared.handoff import RUN_ENV, config_payload
from shared.pipeline import ForecastPipeline
from shared.synthetic import generate_merchants


@pytest.fixture
def run(monkeypatch, tmp_path: Path):
    """The environment a simulated merchant runs in, with DP on and its ledger under tmp_path."""
    enter_task(monkeypatch)
    overrides = {"privacy.enabled": True, "privacy.ledger_dir": str(tmp_path / "ledgers"), "federation.local_steps": 2}

    def train(config: dict, node: dict | None = None, evaluate: bool = False, arrays: ArrayRecord | None = None, **more) -> Message:
        """Sends `config` (and by default the adapter the server would send) to a train, or an evaluate, message."""
        cfg = load_config(TINY_CONFIG, overrides | more)
        monkeypatch.setenv(RUN_ENV, config_payload(cfg))
        arrays = arrays or ArrayRecord(ForecastPipeline.from_config(cfg).shared_state())  # what the server sends
        kind = MessageType.EVALUATE if evaluate else MessageType.TRAIN
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=1, message_type=kind)
        context = Context(run_id=1, node_id=1, node_config=node or {"partition-id": 0}, state=RecordDict(), run_config={})
        return (client_app.evaluate if evaluate else client_app.train)(msg, context)

    return train, tmp_path / "ledgers"


@pytest.mark.parametrize("mu", [float("nan"), -1.0, 1e9, "x"])
def test_a_bad_proximal_mu_is_declined_before_any_budget_is_spent(run, mu) -> None:
    train, ledgers = run
    reply = train({"proximal-mu": mu} if mu != "x" else {"proximal-mu": "x"})
    assert reply.has_error() and reply.error.code == client_app.BAD_INSTRUCTION
    assert not ledgers.exists() or not any(ledgers.glob("*.json"))


@pytest.mark.parametrize("number", [-1, 1.5, "2", True])
def test_a_bad_round_number_is_declined_before_any_budget_is_spent(run, number) -> None:
    train, ledgers = run
    reply = train({"federation-round": number})
    assert reply.has_error() and reply.error.code == client_app.BAD_INSTRUCTION and "round number" in reply.error.reason
    assert not ledgers.exists() or not any(ledgers.glob("*.json"))


def test_each_round_draws_its_own_batches(run) -> None:
    """fit used to reseed with the config's seed, so every round of a run trained on the same windows."""
    train, _ = run

    def adapter(config: dict) -> dict:
        reply = train(config, **{"privacy.enabled": False})
        return reply.content.array_records["arrays"].to_torch_state_dict()

    first, again, second = adapter({"federation-round": 1}), adapter({"federation-round": 1}), adapter({"federation-round": 2})
    assert all((first[k] == again[k]).all() for k in first), "a round is reproducible"
    assert any((first[k] != second[k]).any() for k in first), "the next round draws other windows"


def test_what_a_merchant_sends_does_not_depend_on_its_personal_part(run) -> None:
    """The personal part is refitted at forecast time only (client.cli), never in a round: a reply is
    the same with personalisation on and off."""
    train, _ = run
    replies = [train({"federation-round": 1}, **{"privacy.enabled": False, "train.personalise": mode}) for mode in ("none", "output")]
    sent = [reply.content.array_records["arrays"].to_torch_state_dict() for reply in replies]
    assert sent[0].keys() == sent[1].keys() and all((sent[0][k] == sent[1][k]).all() for k in sent[0])


def test_a_small_shared_part_is_all_that_is_trained_and_sent(run) -> None:
    """Under [model] shared = ["linear"], with DP on, the reply holds the linear path's tensors and
    nothing else, and bytes-sent counts only them."""
    train, _ = run
    reply = train({"federation-round": 1}, **{"model.shared": ["linear"]})
    arrays = reply.content.array_records["arrays"]
    assert set(arrays) == {"linear.weight", "linear.bias"}
    metrics = reply.content.metric_records["metrics"]
    assert metrics["bytes-sent"] == sum(a.numpy().nbytes for a in arrays.values()) and metrics["epsilon"] > 0


def test_a_diverged_adapter_is_not_sent(run) -> None:
    train, _ = run
    reply = train({}, **{"train.lr": 1e30, "privacy.enabled": False})
    assert reply.has_error() and reply.error.code == client_app.DIVERGED


def test_an_honest_round_replies_with_the_adapter(run) -> None:
    train, _ = run
    reply = train({"proximal-mu": 0.01})
    assert not reply.has_error() and set(reply.content.metric_records["metrics"]) >= {"num-examples", "steps", "epsilon"}


def test_a_file_of_several_merchants_needs_the_merchant_named(run, tmp_path: Path) -> None:
    """A SuperNode's data-path holding two shops used to train silently on the first one."""
    train, _ = run
    path = tmp_path / "two_shops.csv"
    generate_merchants(2, 200, 0).to_csv(path, index=False)
    with pytest.raises(ConfigError, match="name the merchant"):
        train({}, node={"data-path": str(path)})
    named = train({}, node={"data-path": str(path), "merchant": "shop_01"})
    assert not named.has_error()


@pytest.mark.parametrize("evaluate", [False, True], ids=["train", "evaluate"])
def test_an_adapter_of_the_wrong_shape_is_declined_not_raised(run, evaluate: bool) -> None:
    """Evaluate let AdapterMismatch escape (issue 33, item 1), which ended the merchant's process."""
    train, _ = run
    wrong = ArrayRecord({"linear.weight": Array(np.zeros((1, 1), dtype=np.float32))})
    reply = train({}, evaluate=evaluate, arrays=wrong)
    assert reply.has_error() and reply.error.code == client_app.ADAPTER_REJECTED and "adapter" in reply.error.reason


# --- the merchant's pins against the run config (issue 33, item 2) -------------------------------------


@pytest.fixture
def shop(tmp_path: Path) -> dict:
    """A deployed merchant's node config: its own file of one shop, its own ledger, its ε pinned at 2."""
    path = tmp_path / "sales.csv"
    generate_merchants(1, 200, 0).to_csv(path, index=False)
    return {"data-path": str(path), "ledger-dir": str(tmp_path / "mine"), "max-epsilon": 2.0}


def test_a_pinned_merchant_with_its_own_data_must_name_itself(run, shop: dict) -> None:
    """Its ledger was named after the data's merchant column, which the run config chooses: with
    data.columns.merchant_id = "" the merchant became the file's stem and got a fresh budget."""
    train, _ = run
    with pytest.raises(ConfigError, match="merchant="):
        train({}, node=shop)


def test_the_run_config_cannot_rename_a_pinned_merchant_to_a_fresh_ledger(run, shop: dict, tmp_path: Path) -> None:
    train, _ = run
    node = shop | {"merchant": "shop_00"}
    assert not train({}, node=node).has_error()
    with pytest.raises(ConfigError, match="unknown merchant"):
        train({}, node=node, **{"data.columns.merchant_id": ""})
    assert sorted(p.name for p in (tmp_path / "mine").glob("*.json")) == ["shop_00.json"]


@pytest.mark.parametrize("asked", [{"privacy.delta": 0.5}, {"privacy.unit": "day"}, {"privacy.unit": "window"},
                                   {"federation.local_steps": 3}], ids=["delta", "day", "window", "local steps"])
def test_a_run_asking_for_less_privacy_than_pinned_is_declined_before_any_budget_is_spent(run, shop: dict, tmp_path: Path,
                                                                                         asked: dict) -> None:
    """δ 0.5 from the run config lowered σ from 2.28 to 0.62, unit "day" to 1.68; local_steps 10^7
    reserved ε 5.3 of 8 in one round."""
    train, _ = run
    reply = train({}, node=shop | {"merchant": "shop_00", "max-local-steps": 2}, **asked)
    assert reply.has_error() and reply.error.code == client_app.BAD_INSTRUCTION
    assert not any((tmp_path / "mine").glob("*.json"))
