"""What each install carries: every library a part of the code imports is declared where that part is
installed from, and a merchant's `pip install .` carries none of the research harness's libraries.

Static (the imports are read, not run), so a lazy import inside a function counts too and the check
costs no import of torch or Flower.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCAL = {"client", "server", "shared", "simulations", "benchmarks", "tests", "conftest", "fed_helpers"}
# the research harness: the baselines shopcast is benchmarked against, the simulations and the benchmarks
RESEARCH_CODE = ("shared/baselines.py", "simulations", "benchmarks")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def distributions(top: str) -> set[str]:
    """The installed distributions that provide top-level module `top` (by its own name when none is found)."""
    return {canonical(d) for d in _owners().get(top, [top])}


@cache
def _owners() -> dict[str, list[str]]:
    return packages_distributions()


def declared(*extras: str) -> set[str]:
    """The distributions [project] dependencies and the named extras list, without versions or extras."""
    requirements = PROJECT["dependencies"] + [r for extra in extras for r in PROJECT["optional-dependencies"][extra]]
    return {canonical(re.split(r"[\[<>=!~;\s]", r, maxsplit=1)[0]) for r in requirements}


def is_research(path: Path) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == part or relative.startswith(f"{part}/") for part in RESEARCH_CODE)


def files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def merchant_files() -> list[Path]:
    """What a merchant's client, a server operator and a deployed app run."""
    return [p for p in files("client", "server", "shared") if not is_research(p)]


def imports(path: Path) -> set[str]:
    """Every absolute module name the file imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def undeclared(paths: list[Path], allowed: set[str]) -> dict[str, list[str]]:
    """Third-party top-level modules these files import whose distribution `allowed` does not name."""
    missing: dict[str, list[str]] = {}
    for path in paths:
        for top in {name.split(".")[0] for name in imports(path)} - LOCAL - set(sys.stdlib_module_names):
            if not distributions(top) & allowed:
                missing.setdefault(top, []).append(path.relative_to(ROOT).as_posix())
    return missing


@pytest.mark.parametrize(("paths", "extras"), [
    pytest.param(merchant_files, (), id="merchant runtime: the dependencies alone"),
    pytest.param(lambda: [p for p in files("shared", "simulations", "benchmarks") if is_research(p)], ("research",), id="research"),
    pytest.param(lambda: files("tests"), ("research", "dev"), id="tests"),
])
def test_every_imported_library_is_declared_where_its_code_is_installed_from(paths, extras: tuple[str, ...]) -> None:
    assert undeclared(paths(), declared(*extras)) == {}


def test_the_merchant_runtime_imports_no_research_code_or_research_only_library() -> None:
    research_only = declared("research") - declared()
    found = {(path.relative_to(ROOT).as_posix(), name) for path in merchant_files() for name in imports(path)
             if name.split(".")[0] in {"simulations", "benchmarks"} or name == "shared.baselines"
             or distributions(name.split(".")[0]) & research_only}
    assert found == set()
