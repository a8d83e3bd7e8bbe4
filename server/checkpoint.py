"""The server's checkpoints: what a restarted server needs to run the next round as if it had never stopped.

Under `<out_dir>`:
  checkpoint/        the newest: the global adapter (shared/adapter.py's layout), meta.json with the
                     round records ("history") and the strategy's scalars, strategy.safetensors
  checkpoint.prev/   the one before it
A checkpoint is written whole into `.checkpoint.partial/` (its meta.json last), fsynced, then renamed in
while the one it replaces becomes `checkpoint.prev/` (shared.adapter.write_atomically), so a crash at
any moment leaves at least one complete checkpoint. On restart a staged checkpoint that reads back
whole had only its renames cut short, so they are finished first: its round is not run (and its ε
spent) again. Then the newest that reads back whole is used; a corrupt `checkpoint/` is moved to
`checkpoint.corrupt/` so the next save cannot push the good one out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping
from flwr.serverapp.strategy.fedopt import FedOpt
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file as load_tensors

from shared.adapter import check_update, fsync_path, save_adapter, write_atomically
from shared.model import Forecaster

log = logging.getLogger(__name__)

CURRENT, PREVIOUS, CORRUPT = "checkpoint", "checkpoint.prev", "checkpoint.corrupt"
STAGED = f".{CURRENT}.partial"  # where write_atomically stages the next checkpoint
STRATEGY_FILE = "strategy.safetensors"
MOMENTS = ("m_t", "v_t")  # FedOpt's (FedAdam, FedYogi, FedAdagrad) moments: one array per shared tensor
UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)  # what a truncated or missing part raises


class CheckpointError(RuntimeError):
    """A run's checkpoints exist but none is usable: starting again at round 1 would silently discard the run."""


@dataclass(frozen=True)
class StrategyState:
    """Tensors are keyed "<attribute>/<shared tensor>"; scalars by attribute name."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint read back whole and checked, before anything is loaded into a model or strategy."""

    directory: Path
    adapter: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    strategy: StrategyState


def strategy_state(strategy: object) -> StrategyState:
    """What a strategy has learnt across rounds besides the adapter: FedOpt's moments and adaptive
    clipping's bound. FedOpt's `current_arrays` is not kept: configure_train resets it from the
    global adapter every round; everything else is configuration."""
    tensors = {}
    if isinstance(strategy, FedOpt):
        for name in MOMENTS:  # None before the first aggregation
            tensors.update({f"{name}/{key}": np.ascontiguousarray(value) for key, value in (getattr(strategy, name) or {}).items()})
    adaptive = isinstance(strategy, DifferentialPrivacyServerSideAdaptiveClipping)
    return StrategyState(tensors, {"clipping_norm": float(strategy.clipping_norm)} if adaptive else {})


def restore_strategy_state(strategy: object, state: StrategyState) -> None:
    """Puts `state` back into a freshly made strategy of the same kind; what this kind does not keep is ignored."""
    if isinstance(strategy, FedOpt):
        for name, arrays in _moments(state.tensors).items():
            setattr(strategy, name, arrays)
    if isinstance(strategy, DifferentialPrivacyServerSideAdaptiveClipping) and "clipping_norm" in state.scalars:
        strategy.clipping_norm = state.scalars["clipping_norm"]


def _moments(tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name, _, tensor = key.partition("/")
        if name not in MOMENTS:
            raise ValueError(f"{STRATEGY_FILE}: unknown tensor {key!r}")
        groups.setdefault(name, {})[tensor] = value
    return groups


def save_checkpoint(out_dir: Path, model: Forecaster, history: list[dict[str, Any]], state: StrategyState) -> None:
    """The model's adapter, the round records and the strategy's state as the newest checkpoint.

    The staged folder's meta.json is written last, each part durable before the next: a staged
    checkpoint holding it is complete, which is what lets `load_checkpoint` finish a cut-short commit."""

    def fill(staged: Path) -> None:
        staged.mkdir(parents=True)
        write_atomically(staged / STRATEGY_FILE, lambda path: save_arrays(state.tensors, str(path)))
        save_adapter(model, staged, {"round": len(history), "history": history, "strategy": state.scalars})

    write_atomically(out_dir / CURRENT, fill, previous=out_dir / PREVIOUS)


def read_checkpoint(directory: Path, adapter: dict[str, tuple[int, ...]], shared: dict[str, tuple[int, ...]]) -> Checkpoint:
    """Every part of a checkpoint, checked, without touching a model: raises one of UNREADABLE unless all of it is usable.
    `adapter` and `shared` are the shapes of the whole adapter (which the checkpoint holds) and of its
    shared part (by which the strategy's moments are keyed; shared.adapter)."""
    meta = json.loads((directory / "meta.json").read_text())
    history = meta["history"]
    if not isinstance(history, list) or meta["round"] != len(history):
        raise ValueError(f"meta.json: round {meta['round']!r} does not match its round records")
    tensors = load_tensors(str(directory / "adapter.safetensors"))
    check_update(tensors, adapter)
    # a checkpoint written before strategy state was kept has none: its strategy starts afresh, as it did then
    strategy = _read_strategy_state(directory, meta["strategy"], shared) if "strategy" in meta else StrategyState()
    return Checkpoint(directory, tensors, history, strategy)


def _read_strategy_state(directory: Path, scalars: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> StrategyState:
    tensors = load_arrays(str(directory / STRATEGY_FILE))
    for arrays in _moments(tensors).values():
        check_update({k: torch.from_numpy(v) for k, v in arrays.items()}, expected)
    scalars = {k: float(v) for k, v in dict(scalars).items()}
    if not all(math.isfinite(v) for v in scalars.values()):
        raise ValueError(f"meta.json: non-finite strategy state {scalars}")
    return StrategyState(tensors, scalars)


def load_checkpoint(out_dir: Path, adapter: dict[str, tuple[int, ...]], shared: dict[str, tuple[int, ...]]) -> Checkpoint | None:
    """The newest usable checkpoint under `out_dir`, None for a new run; CheckpointError if there are
    checkpoints but none is usable."""
    _finish_commit(out_dir, adapter, shared)
    candidates = [out_dir / CURRENT, out_dir / PREVIOUS]
    if not any(c.exists() for c in candidates):
        return None
    problems = []
    for directory in candidates:
        try:
            checkpoint = read_checkpoint(directory, adapter, shared)
        except UNREADABLE as exc:
            problems.append(f"{directory}: {type(exc).__name__}: {exc}")
            continue
        if problems:
            log.warning("newest checkpoint unusable (%s); resuming from %s after round %d",
                        "; ".join(problems), directory, len(checkpoint.history))
            _set_aside(out_dir / CURRENT, out_dir / CORRUPT)
        return checkpoint
    raise CheckpointError(f"no usable checkpoint in {out_dir} ({'; '.join(problems)}): "
                          "restore one, or use a new out_dir for a new federation")


def _finish_commit(out_dir: Path, adapter: dict[str, tuple[int, ...]], shared: dict[str, tuple[int, ...]]) -> None:
    """Completes the renames of a staged checkpoint that reads back whole: a crash cut short its commit,
    not its round, and resuming from the one before would run that round again and spend its ε twice.
    Every save starts by clearing the staging folder, so a whole staged checkpoint is always the newest."""
    staged = out_dir / STAGED
    if not staged.is_dir():
        return
    try:
        rounds = len(read_checkpoint(staged, adapter, shared).history)
    except UNREADABLE:
        return  # cut short while being written: the next save clears it
    log.warning("finishing the interrupted commit of the checkpoint after round %d", rounds)
    if (out_dir / CURRENT).exists():
        shutil.rmtree(out_dir / PREVIOUS, ignore_errors=True)
        os.replace(out_dir / CURRENT, out_dir / PREVIOUS)
    os.replace(staged, out_dir / CURRENT)
    fsync_path(out_dir)


def _set_aside(corrupt: Path, destination: Path) -> None:
    """Keeps a corrupt checkpoint for inspection, out of the rotation."""
    if corrupt.exists():
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(corrupt, destination)
