"""A merchant's differential-privacy budget, kept on the merchant's own disk across rounds and restarts.

Opacus' accountant lives in memory, so a restarted client would otherwise start again from ε = 0 and
could spend its whole budget a second time on the same data. The ledger stores the accountant's
history, a list of (noise_multiplier, sample_rate, num_steps), as JSON next to the merchant's data and
refuses any step that would take ε past the target: training `reserve`s its steps before it runs
them, and the file is replaced atomically before that returns. Every change holds an exclusive lock
on the file from reading it to writing it, so two processes on one merchant's ledger (two rounds
in flight, a restarted client beside a stale one) cannot both spend the same remaining budget.

ε is always Opacus' RDP analysis (`compute_rdp` composed over the history, converted with
`get_privacy_spent`, exactly as `RDPAccountant.get_epsilon` does); the only addition is a cache of the
one-step RDP curve per (noise, rate), because that curve is what costs time (up to ~0.2 s each) and
the binary search in `affordable_steps` evaluates ε many times with the same pairs. The tests check
that the result is bit-for-bit the accountant's.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

Entry = tuple[float, float, int]  # (noise_multiplier, sample_rate, num_steps), as Opacus stores it

_FORMAT_VERSION = 1


class BudgetExceeded(RuntimeError):
    """Recording the requested steps would spend more than the merchant's ε budget."""

    def __init__(self, path: Path, spent: float, would_be: float, target: float) -> None:
        self.spent, self.would_be, self.target = spent, would_be, target
        super().__init__(
            f"privacy budget of merchant ledger {path} exceeded: ε spent {spent:.4f}, these steps would "
            f"make it {would_be:.4f}, target {target:g}; nothing was recorded"
        )


class LedgerError(ValueError):
    """The ledger file cannot be trusted as this merchant's budget (corrupt, or for another budget)."""


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP curve of one step; `compute_rdp` scales it by the step count, so this is exact."""
    curve = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    curve.setflags(write=False)  # shared by every caller through the cache
    return curve


def _epsilon(history: list[Entry], delta: float) -> float:
    """`RDPAccountant.get_epsilon(delta)` for `history`, composed in the same order so it matches bitwise."""
    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(noise, rate) * steps for noise, rate, steps in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _extended(history: list[Entry], noise_multiplier: float, sample_rate: float, steps: int) -> list[Entry]:
    """`history` after `steps` more steps, merged into the last entry when noise and rate are equal.

    Opacus merges the same way, so a resumed engine's history stays identical to the ledger's; and
    `affordable_steps` and `record` both go through here, so they judge exactly the same history; the
    casts keep numpy scalars out of the JSON file.
    """
    noise_multiplier, sample_rate, steps = float(noise_multiplier), float(sample_rate), int(steps)
    if steps == 0:
        return list(history)
    if history and history[-1][:2] == (noise_multiplier, sample_rate):
        return [*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + steps)]
    return [*history, (noise_multiplier, sample_rate, steps)]


def _check_step_args(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    # an infinite σ would make each step free in name, and sends the RDP conversion into minutes of work
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)) or not 0 < sample_rate <= 1:
        raise ValueError(f"need noise_multiplier > 0 and 0 < sample_rate <= 1, got {noise_multiplier}, {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def _exact(value: Any, kind: type) -> Any:
    """`value` if it is exactly of `kind`: JSON's true is Python's 1 and "40" is no number, and either,
    hand-edited into a ledger, would rewrite what was spent without a trace."""
    if type(value) is not kind:
        raise TypeError(f"expected a JSON {kind.__name__}, got {value!r}")
    return value


def _number(value: Any) -> float:
    """A JSON number (an int or a float, not a bool or a string) as a float."""
    if type(value) not in (int, float):
        raise TypeError(f"expected a JSON number, got {value!r}")
    return float(value)


def _entry(item: Any) -> Entry:
    """One stored history entry, as `_save` writes it: [noise, rate, steps], steps a whole number."""
    noise, rate, steps = _exact(item, list)
    entry = (_number(noise), _number(rate), _exact(steps, int))
    _check_step_args(*entry)
    return entry


class PrivacyLedger:
    """The ε spent by one merchant under one (target ε, δ, unit) budget, persisted at `path`."""

    def __init__(self, path: Path, target_epsilon: float, delta: float, unit: str) -> None:
        if not (target_epsilon > 0 and math.isfinite(target_epsilon)) or not 0 < delta < 1:
            raise ValueError(f"need a finite target_epsilon > 0 and 0 < delta < 1, got {target_epsilon}, {delta}")
        self.path = Path(path)
        self.target_epsilon, self.delta, self.unit = float(target_epsilon), float(delta), unit
        self._history: list[Entry] = self._load() if self.path.exists() else []

    @property
    def history(self) -> list[Entry]:
        """A copy, so callers cannot change what was spent without going through `record`."""
        return list(self._history)

    def epsilon(self) -> float:
        """ε spent so far at this ledger's δ."""
        return _epsilon(self._history, self.delta)

    def remaining(self) -> float:
        return max(0.0, self.target_epsilon - self.epsilon())

    def limit(self, ceiling: float | None = None) -> float:
        """The ε a run may reach: the budget, or the lower `ceiling` it asks for. One definition, so the
        σ a run is planned with ("auto", shared.privacy) aims at exactly the ε its steps are refused past."""
        return self.target_epsilon if ceiling is None else min(ceiling, self.target_epsilon)

    def affordable_steps(self, noise_multiplier: float, sample_rate: float, planned: int, ceiling: float | None = None) -> int:
        """The most steps, up to `planned`, that can still be taken without ε passing the target (or
        the lower `ceiling` a run asks for), judged on the history as last read.

        ε grows monotonically with the step count, so a binary search finds the boundary.
        """
        _check_step_args(noise_multiplier, sample_rate, planned)
        limit = self.limit(ceiling)

        def fits(n: int) -> bool:
            extended = _extended(self._history, noise_multiplier, sample_rate, n)
            return _epsilon(extended, self.delta) <= limit

        if fits(planned):
            return planned
        low, high = 0, planned  # fits(high) is False; fits(low) is assumed, and 0 is the answer if not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def reserve(self, noise_multiplier: float, sample_rate: float, planned: int, ceiling: float | None = None) -> int:
        """Records as many of `planned` steps as the budget on disk still allows, in one locked
        read-decide-write; returns that number (0 when the budget is spent)."""
        with self._locked():
            steps = self.affordable_steps(noise_multiplier, sample_rate, planned, ceiling)
            if steps:
                self._save(_extended(self._history, noise_multiplier, sample_rate, steps))
        return steps

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Adds `steps` to the history on disk, or raises `BudgetExceeded` and changes nothing."""
        _check_step_args(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        with self._locked():
            extended = _extended(self._history, noise_multiplier, sample_rate, steps)
            would_be = _epsilon(extended, self.delta)
            if not would_be <= self.target_epsilon:
                raise BudgetExceeded(self.path, self.epsilon(), would_be, self.target_epsilon)
            self._save(extended)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Holds the ledger's lock file and re-reads the ledger under it: a change is decided on what
        is on disk now, not on what this process read earlier."""
        lock = FileLock(self.path.parent / f".{self.path.name}.lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except OSError as exc:  # the folder is a file, the lock a folder, no permission: the operator's to fix
            raise LedgerError(f"privacy ledger folder {self.path.parent} cannot hold a ledger ({exc})") from exc
        try:
            self._history = self._load() if self.path.exists() else []
            yield
        finally:
            lock.release()

    def accountant(self) -> RDPAccountant:
        """A fresh Opacus accountant holding this history, e.g. to resume a PrivacyEngine(accountant="rdp")."""
        accountant = RDPAccountant()
        accountant.history = self.history
        return accountant

    def to_metrics(self) -> dict[str, float]:
        return {"epsilon": self.epsilon(), "delta": self.delta, "target_epsilon": self.target_epsilon}

    def _load(self) -> list[Entry]:
        try:
            if not self.path.is_file():
                raise ValueError("not a regular file")
            stored: dict[str, Any] = json.loads(self.path.read_text())
            if _exact(stored["version"], int) != _FORMAT_VERSION:
                raise ValueError(f"unknown ledger format version {stored['version']!r}")
            budget = (_number(stored["target_epsilon"]), _number(stored["delta"]), _exact(stored["unit"], str))
            history = [_entry(item) for item in _exact(stored["history"], list)]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Starting from an empty history here would silently hand the merchant a fresh budget.
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({exc}); refusing to start from ε = 0") from exc
        if budget != (self.target_epsilon, self.delta, self.unit):
            raise LedgerError(
                f"privacy ledger {self.path} was written for target_epsilon={budget[0]}, delta={budget[1]}, "
                f"unit={budget[2]!r}, but the config asks for target_epsilon={self.target_epsilon}, "
                f"delta={self.delta}, unit={self.unit!r}. A merchant's budget cannot change once it is being "
                f"spent; to start a new budget on purpose, delete {self.path} knowingly."
            )
        return history

    def _save(self, history: list[Entry]) -> None:
        """Writes a temp file beside the ledger, then renames it over, so a crash leaves old or new, never
        half. Only the lock's holder writes, so the temp file can have one fixed name: a writer killed
        mid-write leaves one, which the next write reuses, instead of a new one per kill."""
        stored = {
            "version": _FORMAT_VERSION,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "unit": self.unit,
            "history": [list(entry) for entry in history],
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(stored, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._history = history
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX); Windows cannot open dirs
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
