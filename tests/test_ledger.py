"""The privacy ledger: Opacus' ε, persisted across restarts, and never one step over the target."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant

from shared.ledger import BudgetExceeded, LedgerError, PrivacyLedger

# Opacus' advice to widen the α grid; the ledger must use the default grid to match the engine.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")

DELTA = 1e-5


def _ledger(path: Path, target: float = 8.0, delta: float = DELTA, unit: str = "series") -> PrivacyLedger:
    return PrivacyLedger(path, target_epsilon=target, delta=delta, unit=unit)


@pytest.mark.parametrize(
    "segments",
    [
        [(1.1, 0.02, 30), (1.1, 0.02, 20), (0.9, 0.05, 10), (1.1, 0.02, 5)],  # merge, switch, switch back
        [(0.7, 0.3, 3), (2.5, 0.01, 200)],
    ],
)
def test_epsilon_matches_opacus_accountant(tmp_path: Path, segments: list[tuple[float, float, int]]) -> None:
    ledger = _ledger(tmp_path / "m.json", target=1e6)
    accountant = RDPAccountant()
    for noise, rate, steps in segments:
        ledger.record(noise, rate, steps)
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    assert ledger.history == accountant.history
    assert ledger.epsilon() == accountant.get_epsilon(DELTA)  # bit for bit, not approximately
    assert ledger.accountant().get_epsilon(DELTA) == ledger.epsilon()


def test_empty_ledger_has_spent_nothing_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    ledger = _ledger(path, target=3.0)
    assert ledger.epsilon() == 0.0
    assert ledger.remaining() == 3.0
    assert ledger.to_metrics() == {"epsilon": 0.0, "delta": DELTA, "target_epsilon": 3.0}
    ledger.record(1.0, 0.1, 0)
    assert not path.exists()


def test_ledger_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledgers" / "m.json"  # the directory is created on first write
    first = _ledger(path)
    first.record(1.0, 0.05, 40)
    first.record(1.2, 0.05, 10)

    second = _ledger(path)
    assert second.history == first.history
    assert second.epsilon() == first.epsilon()
    second.record(1.2, 0.05, 5)  # continues the last entry, as Opacus would
    assert _ledger(path).history == [(1.0, 0.05, 40), (1.2, 0.05, 15)]
    assert sorted(p.name for p in path.parent.iterdir()) == [".m.json.lock", "m.json"]  # no temp file left behind


@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
def test_accountant_resumes_a_privacy_engine(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "m.json")
    ledger.record(1.0, 0.05, 25)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = ledger.accountant().history
    assert engine.get_epsilon(DELTA) == ledger.epsilon()


def test_refused_record_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    ledger = _ledger(path, target=1.0)
    n = ledger.affordable_steps(2.0, 0.05, 10_000)
    assert 0 < n < 10_000
    ledger.record(2.0, 0.05, n)
    before = path.read_bytes()
    with pytest.raises(BudgetExceeded, match=r"m\.json.*target 1") as refused:
        ledger.record(2.0, 0.05, 1)
    assert refused.value.spent == ledger.epsilon() <= 1.0 < refused.value.would_be
    assert ledger.history == [(2.0, 0.05, n)]
    assert path.read_bytes() == before


@pytest.mark.parametrize("changed", [{"target": 9.0}, {"target": 7.0}, {"delta": 1e-6}, {"unit": "day"}])
def test_budget_change_on_reload_is_an_error(tmp_path: Path, changed: dict) -> None:
    path = tmp_path / "m.json"
    _ledger(path).record(1.0, 0.05, 10)
    with pytest.raises(LedgerError, match="delete"):
        _ledger(path, **changed)


@pytest.mark.parametrize("content", ["", "{not json", '{"version": 1}', '{"version": 2, "history": []}'])
def test_unreadable_ledger_is_an_error_not_a_fresh_budget(tmp_path: Path, content: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(LedgerError, match="refusing to start from"):
        _ledger(path)


@pytest.mark.parametrize("args", [(0.0, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, -1), (float("nan"), 0.1, 1)])
def test_invalid_step_arguments_are_rejected(tmp_path: Path, args: tuple[float, float, int]) -> None:
    ledger = _ledger(tmp_path / "m.json")
    with pytest.raises(ValueError):
        ledger.record(*args)
    with pytest.raises(ValueError):
        ledger.affordable_steps(*args)


@st.composite
def _schedules(draw: st.DrawFn) -> tuple[float, list[tuple[float, float, int, bool]]]:
    """A target and rounds of (noise, rate, planned steps, restart first); pairs repeat so entries merge."""
    target = draw(st.floats(0.5, 10.0))
    pairs = draw(st.lists(st.tuples(st.floats(0.6, 3.0), st.floats(0.01, 0.5)), min_size=1, max_size=3))
    rounds = draw(
        st.lists(st.tuples(st.sampled_from(pairs), st.integers(0, 2000), st.booleans()), min_size=1, max_size=6)
    )
    return target, [(noise, rate, planned, restart) for (noise, rate), planned, restart in rounds]


@settings(deadline=None, max_examples=30)
@given(schedule=_schedules())
def test_budget_is_never_exceeded_by_a_single_step(
    tmp_path_factory: pytest.TempPathFactory, schedule: tuple[float, list[tuple[float, float, int, bool]]]
) -> None:
    target, rounds = schedule
    path = tmp_path_factory.mktemp("ledger") / "m.json"
    ledger = _ledger(path, target=target)
    for noise, rate, planned, restart in rounds:
        if restart:
            ledger = _ledger(path, target=target)
        n = ledger.affordable_steps(noise, rate, planned)
        assert 0 <= n <= planned
        ledger.record(noise, rate, n)
        assert ledger.epsilon() <= target
        if n < planned:
            history = ledger.history
            with pytest.raises(BudgetExceeded):
                ledger.record(noise, rate, 1)
            assert ledger.history == history


# --- two processes on one merchant's ledger ---------------------------------------------------------------


def _spend_after_barrier(path: str, barrier, outcomes) -> None:
    """A second client process: decides what it can afford, waits until the other has decided too, records."""
    ledger = _ledger(Path(path))
    n = ledger.affordable_steps(1.0, 0.05, 10_000)
    barrier.wait()
    try:
        ledger.record(1.0, 0.05, n)
        outcomes.put(("recorded", n))
    except BudgetExceeded:
        outcomes.put(("refused", n))


def _reserve(path: str, outcomes) -> None:
    outcomes.put(_ledger(Path(path)).reserve(1.0, 0.05, 10_000))


def _processes(target, args_of) -> list:
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=target, args=args_of(context)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return procs


def test_two_processes_cannot_spend_the_same_budget(tmp_path: Path) -> None:
    """Both read the ledger, both find the whole budget affordable; only the first may record it
    (before the lock, both did: the file showed ε 7.99 while 11.77 had been spent)."""
    path = tmp_path / "m.json"
    outcomes, barrier = multiprocessing.get_context("fork").Queue(), multiprocessing.get_context("fork").Barrier(2)
    _processes(_spend_after_barrier, lambda _: (str(path), barrier, outcomes))
    results = sorted(outcomes.get(timeout=10)[0] for _ in range(2))
    assert results == ["recorded", "refused"]
    assert _ledger(path).epsilon() <= 8.0


def test_concurrent_reservations_add_up_to_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    outcomes = multiprocessing.get_context("fork").Queue()
    _processes(_reserve, lambda _: (str(path), outcomes))
    reserved = [outcomes.get(timeout=10) for _ in range(2)]
    alone = _ledger(tmp_path / "alone.json").affordable_steps(1.0, 0.05, 10_000)
    assert sum(reserved) == alone and min(reserved) == 0
    assert _ledger(path).history == [(1.0, 0.05, alone)]


def test_an_infinite_noise_multiplier_is_refused_at_once(tmp_path: Path) -> None:
    """σ = inf would make steps free in name and sent the ε computation into minutes of work."""
    path = tmp_path / "m.json"
    with pytest.raises(ValueError, match="noise_multiplier"):
        _ledger(path).reserve(float("inf"), 0.05, 10)
    _ledger(path).record(1.0, 0.05, 1)
    path.write_text(path.read_text().replace("1.0,", "Infinity,", 1))
    with pytest.raises(LedgerError, match="refusing to start from"):
        _ledger(path)


# --- hand-edited files, folders of the wrong kind, writers killed mid-write (issue 33, item 6) -------------


def _stored(history: str) -> str:
    return f'{{"version": 1, "target_epsilon": 8.0, "delta": {DELTA}, "unit": "series", "history": {history}}}'


@pytest.mark.parametrize("history", ["[[1.0, 0.05, true]]", '[[1.0, 0.05, "40"]]', "[[1.0, 0.05, 40.0]]", '[["1.0", 0.05, 40]]',
                                     "[[true, 0.05, 40]]", "[[1.0, 0.05]]", "[[1.0, 1e309, 40]]", '{"a": 1}'])
def test_a_hand_edited_entry_of_the_wrong_type_is_refused(tmp_path: Path, history: str) -> None:
    """`steps: true` read as 1 step and `"40"` as 40: a hand edit could rewrite the spending unnoticed."""
    path = tmp_path / "m.json"
    path.write_text(_stored(history))
    with pytest.raises(LedgerError, match="refusing to start from"):
        _ledger(path)


@pytest.mark.parametrize("edit", [('"version": 1', '"version": true'), ('"target_epsilon": 8.0', '"target_epsilon": "8.0"'),
                                  (f'"delta": {DELTA}', f'"delta": [{DELTA}]')])
def test_a_hand_edited_budget_field_of_the_wrong_type_is_refused(tmp_path: Path, edit: tuple[str, str]) -> None:
    """`"version": true` passed as version 1 (True == 1)."""
    path = tmp_path / "m.json"
    path.write_text(_stored("[[1.0, 0.05, 40]]").replace(*edit))
    with pytest.raises(LedgerError, match="refusing to start from"):
        _ledger(path)


def _make_ledger_dir_a_file(tmp_path: Path) -> Path:
    (tmp_path / "ledgers").write_text("not a folder")
    return tmp_path / "ledgers" / "m.json"


def _make_ledger_a_folder(tmp_path: Path) -> Path:
    (tmp_path / "m.json").mkdir()
    return tmp_path / "m.json"


def _make_lock_a_folder(tmp_path: Path) -> Path:
    (tmp_path / ".m.json.lock").mkdir()
    return tmp_path / "m.json"


@pytest.mark.parametrize("make", [_make_ledger_dir_a_file, _make_ledger_a_folder, _make_lock_a_folder])
def test_a_ledger_path_of_the_wrong_kind_is_one_ledger_error(tmp_path: Path, make) -> None:
    path = make(tmp_path)
    with pytest.raises(LedgerError) as error:
        _ledger(path).reserve(1.0, 0.05, 10)
    assert "\n" not in str(error.value) and str(path.parent) in str(error.value)


def _killed_while_writing(path: str) -> None:
    """Spends, and is killed -9 between writing the new ledger and renaming it over the old one."""
    import os
    import signal

    os.replace = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
    _ledger(Path(path)).record(1.0, 0.05, 10)


def test_a_writer_killed_mid_write_leaves_no_temp_files_behind(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    _ledger(path).record(1.0, 0.05, 10)
    for _ in range(3):
        _processes(_killed_while_writing, lambda _: (str(path),))
    assert _ledger(path).history == [(1.0, 0.05, 10)]  # the killed writers recorded nothing
    _ledger(path).record(1.0, 0.05, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.json.lock", "m.json"]
