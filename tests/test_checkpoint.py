"""Checkpoints survive a crash at any moment, and a resumed run equals an uninterrupted one (issue 14, item 5).

Before: the server wrote adapter.safetensors, lora/ and meta.json in place into <out_dir>/checkpoint,
so a truncated file stopped every restart, a missing meta.json beside an adapter silently restarted
at round 1, and FedAdam's moments and the adaptive clip were lost on restart.

The first half drives server/checkpoint.py directly on a tiny forecaster; the second half runs the real
`run_federation` against `MerchantsGrid`, merchants whose training is a fixed function of the adapter
they receive (no Flower simulation, so no Ray start-up).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from fed_helpers import TINY_CONFIG, FakeGrid, enter_task, float32_arrays
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from server.app import run_federation
from server.checkpoint import (
    CORRUPT,
    CURRENT,
    PREVIOUS,
    STRATEGY_FILE,
    CheckpointError,
    StrategyState,
    load_checkpoint,
    read_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from server.strategy import make_strategy
from shared.adapter import adapter_shapes, adapter_state, load_adapter, load_adapter_state, save_adapter, shared_shapes
from shared.config import load_config
from shared.model import Forecaster
from shared.pipeline import ForecastPipeline


@pytest.fixture(scope="module")
def model() -> Forecaster:
    """With a shared part smaller than the adapter, so the checkpoint's adapter (all of it) and the
    strategy's moments (the shared part) are checked against different shapes."""
    return ForecastPipeline.from_config(load_config(TINY_CONFIG, {"model.shared": ["linear", "head"]})).model


def _shapes(model: Forecaster) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    return adapter_shapes(model), shared_shapes(model)


def _history(rounds: int) -> list[dict[str, Any]]:
    return [{"round": r, "accepted": 3} for r in range(1, rounds + 1)]


def _moments(model: Forecaster, value: float) -> StrategyState:
    return StrategyState({f"{name}/{k}": np.full(s, value, dtype=np.float32)
                          for name in ("m_t", "v_t") for k, s in shared_shapes(model).items()})


def _two_checkpoints(model: Forecaster, out: Path) -> None:
    """Rounds 1 and 2 saved, each with its own adapter and moments, so a test can tell them apart."""
    for rounds in (1, 2):
        load_adapter_state(model, {k: torch.full_like(v, rounds) for k, v in adapter_state(model).items()})
        save_checkpoint(out, model, _history(rounds), _moments(model, rounds))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated meta.json": lambda d: _truncate(d / "meta.json"),
    "truncated adapter": lambda d: _truncate(d / "adapter.safetensors"),
    "truncated strategy state": lambda d: _truncate(d / STRATEGY_FILE),
    "missing meta.json": lambda d: (d / "meta.json").unlink(),
    "missing adapter": lambda d: (d / "adapter.safetensors").unlink(),
}


# --- the checkpoint module -------------------------------------------------------------------------


def test_save_keeps_the_previous_checkpoint_and_leaves_nothing_half_written(model, tmp_path):
    _two_checkpoints(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT, PREVIOUS]
    for name, rounds in ((CURRENT, 2), (PREVIOUS, 1)):
        checkpoint = read_checkpoint(tmp_path / name, *_shapes(model))
        assert checkpoint.history == _history(rounds)
        assert all(torch.all(t == rounds) for t in checkpoint.adapter.values())
        assert all(np.all(v == rounds) for v in checkpoint.strategy.tensors.values())
    assert load_checkpoint(tmp_path / "elsewhere", *_shapes(model)) is None


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(model, tmp_path, caplog, corrupt):
    _two_checkpoints(model, tmp_path)
    corrupt(tmp_path / CURRENT)
    with caplog.at_level(logging.WARNING, logger="server.checkpoint"):
        checkpoint = load_checkpoint(tmp_path, *_shapes(model))
    assert checkpoint.directory == tmp_path / PREVIOUS and checkpoint.history == _history(1)
    assert any(str(tmp_path / CURRENT) in r.message and str(tmp_path / PREVIOUS) in r.message for r in caplog.records)
    # the corrupt one is set aside, so the next save keeps the good one as the previous checkpoint
    assert (tmp_path / CORRUPT).is_dir() and not (tmp_path / CURRENT).exists()
    save_checkpoint(tmp_path, model, _history(2), StrategyState())
    assert read_checkpoint(tmp_path / PREVIOUS, *_shapes(model)).history == _history(1)


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_no_usable_checkpoint_is_one_clear_error_not_a_fresh_start(model, tmp_path, corrupt):
    save_checkpoint(tmp_path, model, _history(1), _moments(model, 1.0))
    corrupt(tmp_path / CURRENT)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path, *_shapes(model))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / CURRENT) in message


def _crash_on_renaming(monkeypatch, name: str) -> None:
    """os.replace fails ("power cut") when it moves the file or folder named `name`."""
    real_replace = os.replace

    def crash(src, dst):
        if Path(src).name == name:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr("shared.adapter.os.replace", crash)


@pytest.mark.parametrize("cut", [f".{CURRENT}.partial", CURRENT], ids=["between the renames", "before the first rename"])
def test_a_crash_while_committing_a_complete_checkpoint_resumes_after_its_round(model, tmp_path, monkeypatch, cut):
    """The staged checkpoint of round 3 was whole when the renames were cut short; resuming from round 2
    ran round 3 again, and the merchants spent its ε twice."""
    _two_checkpoints(model, tmp_path)
    _crash_on_renaming(monkeypatch, cut)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, model, _history(3), StrategyState())
    monkeypatch.undo()
    assert load_checkpoint(tmp_path, *_shapes(model)).history == _history(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT, PREVIOUS]
    assert read_checkpoint(tmp_path / PREVIOUS, *_shapes(model)).history == _history(2)


def test_a_crash_while_staging_a_checkpoint_resumes_from_the_last_complete_one(model, tmp_path, monkeypatch):
    """meta.json is the staged checkpoint's last file: without it the staging was cut short, and the
    staged files are not taken for a round."""
    _two_checkpoints(model, tmp_path)
    _crash_on_renaming(monkeypatch, ".meta.json.partial")
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, model, _history(3), _moments(model, 3))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path, *_shapes(model)).history == _history(2)


def test_a_crash_while_saving_an_adapter_leaves_the_old_one_and_the_files_beside_it(model, tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    save_adapter(model, directory, {"round": 1})
    (directory / "metrics.csv").write_text("mase\n1.0\n")  # what the CLI keeps beside the adapter
    before = adapter_state(model)

    def torn_write(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x10\x00")
        raise OSError("disk full")

    monkeypatch.setattr("shared.adapter.save_file", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, directory, {"round": 2})
    monkeypatch.undo()
    assert load_adapter(model, directory)["round"] == 1
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model).items())
    assert (directory / "metrics.csv").read_text() == "mase\n1.0\n"


@pytest.mark.parametrize("federation", [{"strategy": "fedadam"}, {"client_dp": "server_adaptive"}], ids=["fedadam", "adaptive clip"])
def test_strategy_state_round_trips_through_a_checkpoint(model, tmp_path, federation):
    cfg = load_config(TINY_CONFIG, {f"federation.{k}": v for k, v in federation.items()})
    shapes = shared_shapes(model)
    strategy = make_strategy(cfg, shapes)
    rng = np.random.default_rng(0)
    if "strategy" in federation:
        strategy.m_t, strategy.v_t = ({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(2))
    else:
        strategy.clipping_norm = 0.37
    save_checkpoint(tmp_path, model, _history(1), strategy_state(strategy))
    fresh = make_strategy(cfg, shapes)
    restore_strategy_state(fresh, read_checkpoint(tmp_path / CURRENT, adapter_shapes(model), shapes).strategy)
    saved, restored = strategy_state(strategy), strategy_state(fresh)
    assert saved.scalars == restored.scalars and saved.tensors.keys() == restored.tensors.keys() and (saved.tensors or saved.scalars)
    for key, value in saved.tensors.items():
        np.testing.assert_array_equal(restored.tensors[key], value, err_msg=key)


# --- run_federation, restarted ---------------------------------------------------------------------


class ServerKilled(RuntimeError):
    pass


class MerchantsGrid(FakeGrid):
    """Three honest merchants whose "training" is a fixed function of the adapter received, so runs
    that send the same adapters get the same replies; the server dies at train round `killed_at`."""

    def __init__(self, killed_at: int | None = None) -> None:
        super().__init__(3)
        self.killed_at, self.train_rounds = killed_at, 0

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train_rounds += 1
            if self.train_rounds == self.killed_at:
                raise ServerKilled(f"killed in train round {self.killed_at}")
        return [self._reply(msg) for msg in messages]

    @staticmethod
    def _reply(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        metrics = {"num-examples": 10 * node, "partition-id": node - 1}
        if msg.metadata.message_type == MessageType.EVALUATE:
            return Message(RecordDict({"metrics": MetricRecord({**metrics, "mase": 1.0})}), reply_to=msg)
        trained = {k: v.numpy() + 0.01 * node * np.cos(7 * v.numpy() + node) for k, v in msg.content["arrays"].items()}
        content = {"arrays": float32_arrays(trained), "metrics": MetricRecord({**metrics, "train-loss": 1.0, "steps": 3, "bytes-sent": 1})}
        return Message(RecordDict(content), reply_to=msg)


def _run(out: Path, rounds: int, grid: MerchantsGrid | None = None, shared: tuple[str, ...] = (), **federation: Any) -> dict[str, Any]:
    overrides = {"federation.out_dir": str(out), "federation.num_rounds": rounds, "model.shared": list(shared),
                 **{f"federation.{k}": v for k, v in federation.items()}}
    return run_federation(grid or MerchantsGrid(), load_config(TINY_CONFIG, overrides))


def _final(out: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in safetensors.torch.load_file(str(out / "final_adapter" / "adapter.safetensors")).items()}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    enter_task(monkeypatch)


@pytest.mark.parametrize("shared", [(), ("linear",)], ids=["whole adapter", "linear only"])
def test_fedadam_resumed_after_a_crash_equals_an_uninterrupted_run(tmp_path, shared):
    uninterrupted = _run(tmp_path / "a", 2, shared=shared, strategy="fedadam")
    with pytest.raises(ServerKilled):
        _run(tmp_path / "b", 2, MerchantsGrid(killed_at=2), shared=shared, strategy="fedadam")
    assert json.loads((tmp_path / "b" / CURRENT / "meta.json").read_text())["round"] == 1
    grid = MerchantsGrid()
    resumed = _run(tmp_path / "b", 2, grid, shared=shared, strategy="fedadam")
    assert grid.train_rounds == 1 and resumed["rounds"] == uninterrupted["rounds"] == 2
    assert [r["round"] for r in resumed["history"]] == [1, 2]
    expected, final = _final(tmp_path / "a"), _final(tmp_path / "b")
    for key in expected:
        np.testing.assert_allclose(final[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # the final adapter is whole; what was not shared is where every model of the config starts
    initial = adapter_state(ForecastPipeline.from_config(load_config(TINY_CONFIG, {"model.shared": list(shared)})).model)
    moved = {k for k in initial if not np.array_equal(final[k], initial[k].numpy())}
    assert final.keys() == initial.keys() and moved == (set(initial) if not shared else {"linear.weight", "linear.bias"})


def test_restart_after_a_truncated_checkpoint_resumes_from_the_previous_one(tmp_path):
    _run(tmp_path, 2)
    _truncate(tmp_path / CURRENT / "meta.json")
    grid = MerchantsGrid()
    summary = _run(tmp_path, 3, grid)
    assert grid.train_rounds == 2 and [r["round"] for r in summary["history"]] == [1, 2, 3]


def test_missing_meta_beside_an_adapter_is_not_a_silent_restart(tmp_path):
    _run(tmp_path, 1)
    (tmp_path / CURRENT / "meta.json").unlink()
    grid = MerchantsGrid()
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / CURRENT))):
        _run(tmp_path, 2, grid)
    assert grid.train_rounds == 0
