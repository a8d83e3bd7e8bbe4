"""Helpers for the federation tests: recording / fault-injecting Flower client mods and cached runs.

Mods run inside the simulation's Ray actor processes, so a mod cannot append to a list the test can
see; `Recorder` writes one pickle per reply into a directory instead. Mods are plain picklable
objects whose settings (directory, fault kind, partition, round) travel with them; Flower puts the
driver's sys.path on the workers' PYTHONPATH, so this module imports there too.

A simulation costs ~20-30 s (mostly Ray start-up), so runs are memoised per pytest session:
`tests/test_federation.py` and `tests/test_wire.py` share the same recorded baseline run.
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import Mod
from flwr.supercore.task_identity import TaskIdentity

from client.app import make_app
from client.mods import client_privacy_mod
from shared.config import PROJECT_ROOT, Config, load_config
from simulations.federated import federate

TINY_CONFIG = PROJECT_ROOT / "configs" / "tiny.toml"
N_MERCHANTS = 3


def enter_task(monkeypatch) -> None:
    """Messages can only be built inside a Flower task; give this process one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """The node list a strategy samples from, for driving a strategy without a federation."""

    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def float32_arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in values.items()})

def _round_of(msg: Message) -> int:
    config = msg.content["config"] if "config" in msg.content else {}
    return int(config.get("server-round", -1))


def _partition_of(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


def snapshot_content(msg: Message) -> dict[str, tuple[str, Any]]:
    """Every record of a message as (record type name, plain Python/numpy payload)."""
    out: dict[str, tuple[str, Any]] = {}
    for name, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            out[name] = ("ArrayRecord", {k: np.array(v.numpy(), copy=True) for k, v in record.items()})
        elif isinstance(record, MetricRecord):
            out[name] = ("MetricRecord", dict(record))
        elif isinstance(record, ConfigRecord):
            out[name] = ("ConfigRecord", dict(record))
        else:  # any other record type is kept by name so a test can flag it
            out[name] = (type(record).__name__, None)
    return out


class Recorder:
    """Mod: writes each reply (and, for train messages, the global adapter received) to `directory`."""

    def __init__(self, directory: str | Path, keep_incoming: bool = False) -> None:
        self.directory = str(directory)
        self.keep_incoming = keep_incoming

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        entry = {
            "kind": msg.metadata.message_type,
            "round": _round_of(msg),
            "partition": _partition_of(context),
            "error": (reply.error.code, reply.error.reason) if reply.has_error() else None,
            "content": None if reply.has_error() else snapshot_content(reply),
            "incoming": snapshot_content(msg).get("arrays") if self.keep_incoming else None,
        }
        path = Path(self.directory) / f"{entry['kind']}-r{entry['round']}-p{entry['partition']}-{uuid.uuid4().hex}.pkl"
        path.write_bytes(pickle.dumps(entry))
        return reply


class Fault:
    """Mod: misbehaves in one merchant's train reply of one round.

    kind = "raise": the ClientApp raises; "nan": every sent tensor is NaN; "scale": every sent tensor is
    multiplied by `value`; "shift": `value` is added to every coordinate of the update (a large update
    that still passes the norm bound).
    """

    def __init__(self, kind: str, partition: int, server_round: int, value: float = 0.0) -> None:
        self.kind, self.partition, self.server_round, self.value = kind, partition, server_round, value

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        hit = msg.metadata.message_type == "train" and _partition_of(context) == self.partition and _round_of(msg) == self.server_round
        if hit and self.kind == "raise":
            raise RuntimeError(f"injected failure: partition {self.partition}, round {self.server_round}")
        reply = call_next(msg, context)
        if not hit or reply.has_error():
            return reply
        arrays = reply.content["arrays"]
        for key, array in list(arrays.items()):
            values = np.asarray(array.numpy())
            if self.kind == "nan":
                values = np.full_like(values, np.nan)
            elif self.kind == "scale":
                values = values * np.asarray(self.value, dtype=values.dtype)
            elif self.kind == "shift":
                values = values + np.asarray(self.value, dtype=values.dtype)
            else:
                raise ValueError(f"unknown fault kind {self.kind!r}")
            arrays[key] = Array(np.ascontiguousarray(values))
        return reply


def read_records(directory: str | Path) -> list[dict[str, Any]]:
    return [pickle.loads(p.read_bytes()) for p in sorted(Path(directory).glob("*.pkl"))]


def run_overrides(base: Path, **extra: Any) -> dict[str, Any]:
    return {
        "federation.out_dir": str(base / "out"),
        "privacy.ledger_dir": str(base / "ledgers"),
        "data.synthetic.n_merchants": N_MERCHANTS,
        **extra,
    }


def run(base: Path, overrides: dict[str, Any], mods: Sequence[Mod] = ()) -> tuple[Config, dict[str, Any]]:
    """One real Flower simulation of N_MERCHANTS merchants on configs/tiny.toml; returns (config, summary)."""
    cfg = load_config(TINY_CONFIG, overrides)
    summary = federate(cfg, N_MERCHANTS, client_app=make_app([*mods, client_privacy_mod])).summary
    return cfg, summary


_RUNS: dict[str, Any] = {}


def memo(name: str, make: Callable[[], Any]) -> Any:
    """`make()` once per pytest session (the two test modules share runs)."""
    if name not in _RUNS:
        _RUNS[name] = make()
    return _RUNS[name]


def baseline_run(tmp_path_factory) -> dict[str, Any]:
    """The shared recorded run: 3 merchants, 2 rounds, DP on, every reply written to disk."""

    def make() -> dict[str, Any]:
        base = tmp_path_factory.mktemp("fed_baseline")
        records = base / "records"
        records.mkdir()
        # a fixed σ: the restart test extends this run by a round, which a σ planned ("auto") for two would refuse
        overrides = run_overrides(base, **{"privacy.enabled": True, "privacy.noise_multiplier": 1.5})
        cfg, summary = run(base, overrides, [Recorder(records)])
        return {"base": base, "cfg": cfg, "overrides": overrides, "summary": json.loads(json.dumps(summary)),
                "records": read_records(records)}

    return memo("baseline", make)


