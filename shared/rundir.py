"""Run directories: a run starts empty, and only a directory a run made may be emptied.

A run must never resume another's checkpoint or spend another's ledger, so it starts from an empty
directory; but that directory's path comes from a config or a command line, where `""` or `"."`
is the checkout itself. So a run marks each directory it creates, and an existing one is emptied
only when it carries that mark, never when it is (or holds) the working directory, the project or
the home directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shared.config import PROJECT_ROOT, ConfigError

MARKER = ".shopcast-run"


class RunDirError(ConfigError):
    """A run directory that shopcast will not empty; a ConfigError, since its path comes from one."""


def _refuse_protected(path: str | Path, target: Path) -> None:
    """Emptying these, or a folder that holds one, would lose work that no run made."""
    for name, protected in (("the working directory", Path.cwd()), ("the project", PROJECT_ROOT), ("the home directory", Path.home())):
        protected = protected.resolve()
        if target == protected or target in protected.parents:
            relation = "is" if target == protected else "holds"
            raise RunDirError(f"run directory {str(path)!r} is {target}, which {relation} {name} ({protected}); choose a folder of its own")


def fresh_run_dir(path: str | Path) -> Path:
    """`path`, resolved, emptied if an earlier run made it, else created; marked as a run's either way.

    A directory that exists, holds files and lacks the mark is refused rather than emptied: it may
    be anything, and the mark is the only proof that a run made it.
    """
    target = Path(path).resolve()
    _refuse_protected(path, target)
    if target.exists() and not target.is_dir():
        raise RunDirError(f"run directory {target} exists and is not a directory")
    if (target / MARKER).is_file():
        shutil.rmtree(target)
    elif target.exists() and any(target.iterdir()):
        raise RunDirError(f"refusing to empty run directory {target}: it is not empty and has no {MARKER} file, so no "
                          "shopcast run made it; remove it yourself or choose another directory")
    target.mkdir(parents=True, exist_ok=True)
    (target / MARKER).write_text("made by a shopcast run, which may empty this directory when it runs again\n")
    return target
