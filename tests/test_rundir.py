"""A run empties only a directory a run made, and never the working directory, the project or home.

Each test runs from a scratch working directory, so a broken helper could only harm tmp_path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.config import PROJECT_ROOT, ConfigError
from shared.rundir import MARKER, fresh_run_dir


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Scratch working and home directories, both marked as if a run had made them, both holding work."""
    for name in ("work", "home", "work/runs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MARKER).write_text("")
        (tmp_path / name / "notes.txt").write_text("keep me")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "work")
    return Path.cwd()


@pytest.mark.parametrize("path, refused_as", [
    ("", "is the working directory"), (".", "is the working directory"), ("..", "holds the working directory"),
    ("/", "holds the working directory"), ("~", "is the home directory"),
])
def test_the_working_directory_home_and_their_parents_are_refused_even_when_marked(cwd: Path, path: str, refused_as: str) -> None:
    with pytest.raises(ConfigError, match=refused_as):
        fresh_run_dir(Path(path).expanduser())
    assert (cwd / "notes.txt").read_text() == (cwd.parent / "home" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("path", [PROJECT_ROOT, PROJECT_ROOT.parent])
def test_the_project_and_its_parents_are_refused(cwd: Path, path: Path) -> None:
    with pytest.raises(ConfigError, match="choose a folder of its own"):
        fresh_run_dir(path)
    assert (PROJECT_ROOT / "configs" / "default.toml").exists()


def test_an_unmarked_directory_with_files_is_refused_and_kept(cwd: Path) -> None:
    (cwd / "theirs").mkdir()
    (cwd / "theirs" / "data.csv").write_text("y\n1\n")
    with pytest.raises(ConfigError, match=f"theirs: it is not empty and has no {re.escape(MARKER)} file"):
        fresh_run_dir("theirs")
    assert (cwd / "theirs" / "data.csv").exists()


def test_a_file_is_refused(cwd: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        fresh_run_dir("notes.txt")


def test_a_new_or_empty_directory_is_made_and_marked(cwd: Path) -> None:
    (cwd / "empty").mkdir()
    for name in ("empty", "runs/new"):
        assert fresh_run_dir(name) == cwd / name
        assert [p.name for p in (cwd / name).iterdir()] == [MARKER]


def test_a_marked_directory_is_emptied_and_stays_marked(cwd: Path) -> None:
    assert fresh_run_dir("runs") == cwd / "runs"
    assert [p.name for p in (cwd / "runs").iterdir()] == [MARKER]
