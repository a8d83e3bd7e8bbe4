"""The scaffold every benchmark script stands on, so that each script keeps only what it measures.

`arguments` gives the options they share, `quiet` their logging, `Run` the record of a run (the
machine, a load/memory monitor, wall time) and its result files, `run_child` a measurement in a
fresh process. Results go to benchmarks/results/<name>.md and <name>.json. Each file says which
machine ran it, how busy that machine was with other work while it ran (these runs share small
CI-like boxes), the config, the seed, the command and the wall time, so a number can be traced back
and judged.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from shared import presets
from shared.config import PROJECT_ROOT, Config, ConfigError, load_config, parse_overrides

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def set_threads(n: int) -> None:
    """Pins torch's intra-op threads (and inter-op where still allowed)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op
        pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": len([line for line in _git("status", "--porcelain").splitlines() if line.strip()]),
    }
    return info


def maxrss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024


class Monitor:
    """Samples, in a thread, this process tree's CPU and memory and the whole machine's CPU.

    `other_cores` is how many cores' worth of work *other* processes (other benchmarks, test runs)
    did meanwhile: machine busy cores minus this tree's. Peak tree RSS sums the resident sets of the
    driver and every descendant (Ray actors included), so pages they share (libraries, Ray's object
    store) count more than once: an upper bound. Peak tree PSS (proportional set size, shared pages
    split between their users) is sampled less often and is the better estimate of real memory.
    """

    def __init__(self, interval: float = 0.5, pss_every: int = 6):
        self.interval, self.pss_every = interval, pss_every
        self.root = psutil.Process()
        self.samples: list[dict[str, float]] = []
        self.peak_tree_rss = 0.0
        self.peak_tree_pss = 0.0
        self.peak_single_rss = 0.0
        self.peak_processes = 0
        self.peak_breakdown: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return [self.root]

    def _tree_cpu(self, procs: list[psutil.Process]) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _breakdown(procs: list[psutil.Process]) -> list[tuple[str, float]]:
        """(process title, RSS MiB) of each process in the tree, largest first."""
        rows = []
        for p in procs:
            try:
                cmd = p.cmdline()
                title = (cmd[0] if len(cmd) == 1 else " ".join(cmd[:3])) if cmd else p.name()
                rows.append((title[:60], round(p.memory_info().rss / 2**20, 1)))
            except psutil.Error:
                pass
        return sorted(rows, key=lambda r: -r[1])

    def _run(self) -> None:
        psutil.cpu_percent(None)
        last_time, last_cpu = time.time(), self._tree_cpu(self._tree())
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            procs = self._tree()
            now, cpu = time.time(), self._tree_cpu(procs)
            machine_busy = psutil.cpu_percent(None) / 100 * (os.cpu_count() or 1)
            own = max(0.0, (cpu - last_cpu) / max(now - last_time, 1e-6))
            last_time, last_cpu = now, cpu
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            tree_rss = sum(rss) / 2**20
            if tree_rss > self.peak_tree_rss:
                self.peak_breakdown = self._breakdown(procs)
            self.peak_tree_rss = max(self.peak_tree_rss, tree_rss)
            self.peak_single_rss = max(self.peak_single_rss, max(rss, default=0) / 2**20)
            self.peak_processes = max(self.peak_processes, len(procs))
            if n % self.pss_every == 0:
                pss = 0
                for p in procs:
                    try:
                        pss += p.memory_full_info().pss
                    except (psutil.Error, AttributeError):
                        pass
                self.peak_tree_pss = max(self.peak_tree_pss, pss / 2**20)
            self.samples.append({"t": now, "machine_busy_cores": machine_busy, "own_cores": own, "tree_rss_mib": tree_rss})

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        busy = [s["machine_busy_cores"] for s in self.samples]
        own = [s["own_cores"] for s in self.samples]
        other = [max(0.0, b - o) for b, o in zip(busy, own)]
        return {
            "samples": len(self.samples),
            "machine_busy_cores_mean": round(sum(busy) / len(busy), 2),
            "own_tree_cores_mean": round(sum(own) / len(own), 2),
            "own_tree_cpu_s": round(sum(own) * self.interval, 1),
            "other_processes_cores_mean": round(sum(other) / len(other), 2),
            "other_processes_cores_max": round(max(other), 2),
            "peak_tree_rss_mib": round(self.peak_tree_rss, 1),
            "peak_tree_pss_mib": round(self.peak_tree_pss, 1),
            "peak_single_process_rss_mib": round(self.peak_single_rss, 1),
            "peak_processes": self.peak_processes,
        }


def command_line(module: str, argv: list[str]) -> str:
    """How to repeat a run from the repository root, as the first line of its result file says."""
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", module, *argv])


def load_line(load: dict[str, float], info: dict[str, Any]) -> str:
    if not load:
        return f"load average at start {info['loadavg_at_start']}"
    return (
        f"concurrent load: other processes used on average {load['other_processes_cores_mean']} of {info['nproc']} cores "
        f"(max {load['other_processes_cores_max']}), this benchmark {load['own_tree_cores_mean']}; "
        f"load average at start {info['loadavg_at_start']}, at end {info.get('loadavg_at_end')}"
    )


def header(title: str, info: dict[str, Any], load: dict[str, float], wall_s: float, extra: list[str], command: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}, wall time {wall_s:.0f} s, commit {info['git_commit'][:10]}"
        f" ({info['git_dirty_files']} files modified/untracked in the working tree)",
        f"- machine: {info['nproc']} cores ({info['cpu_model']}), {info['memory_gib']} GiB RAM, torch {info['torch']} "
        f"with {info['torch_threads']} intra-op threads" + (f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU"),
        f"- {load_line(load, info)}",
        *(f"- {line}" for line in extra),
        "",
    ]
    return "\n".join(lines)


def side_by_side(corner: str, columns: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A Markdown table of one row per measure and one column per run (numbers right-aligned): runs
    of different sizes or variants read best next to each other."""
    lines = [(f"| {corner} | " if corner else "| | ") + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n"


def write(name: str, markdown: str, payload: dict[str, Any], folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / f"{name}.md"
    md.write_text(markdown)
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return md


def arguments(doc: str, *, config_default: str | None = None, children: bool = False) -> argparse.ArgumentParser:
    """The options all benchmarks share, so that each script adds only its own; `doc` is the script's
    docstring, whose first paragraph describes it. `children`: the hidden options run_child passes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if config_default is not None:
        parser.add_argument("--config", default=config_default)
    parser.add_argument("--set", action="append", default=[], help="dotted config override, e.g. train.batch_size=32 (repeatable)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the result files")
    if children:
        parser.add_argument("--child", help=argparse.SUPPRESS)
        parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return parser


def quiet(*, progress: bool) -> None:
    """Drops the warnings Opacus repeats at every DP step. With `progress`, INFO log lines with times
    (forced: Ray's import has already given the root logger a handler, which would hide them); without,
    shared.train's per-step lines are silenced too, as the script prints its own progress."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Optimal order")
    warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook")
    if progress:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    else:
        logging.getLogger("shared.train").setLevel(logging.ERROR)


def data_missing(preset: str, benchmark: str) -> bool:
    """Whether the public files of `preset` are absent, saying so: without them a benchmark is skipped
    (exit 0), not failed, since they live beside the checkout and not every machine has them."""
    if presets.preset_available(preset):
        return False
    folder, files = presets.FILES[preset]
    print(f"{benchmark}: skipped, {', '.join(files)} not found under {presets.SHARED_DATA / folder}; "
          f"set SHOPCAST_SHARED_DATA to the folder holding {folder}/")
    return True


def dataset_config(path: str | Path, settings: list[str], suffix: str = "") -> tuple[dict[str, Any], Config, str] | None:
    """A dataset benchmark's --set overrides, its config under them and its result name (benchmark.name,
    then `_suffix`); None, saying so, where the preset's public files are absent."""
    overrides = parse_overrides(settings)
    cfg = load_config(path, overrides)
    name = f"{cfg.benchmark.name}_{suffix}" if suffix else cfg.benchmark.name
    if cfg.data.source in presets.FILES and data_missing(cfg.data.source, name):
        return None
    return overrides, cfg, name


class Run:
    """One benchmark run: `with Run(...) as run:` around what is measured, then `run.save(...)`.

    Entering sets the torch threads (before machine() records them) and starts the load monitor;
    leaving stops it and takes the wall time, so every result file is traced the same way. `argv` is
    what the script parsed (None: this process's), kept for the command line and for children.
    `monitor=False` where each child is monitored on its own instead.
    """

    def __init__(self, module: str, argv: list[str] | None, *, threads: int | None = None, monitor: bool = True):
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.command = command_line(module, self.argv)
        self.threads = threads
        self.monitor = Monitor() if monitor else None
        self.info: dict[str, Any] = {}
        self.wall = 0.0
        self._started = 0.0

    def __enter__(self) -> Run:
        if self.threads is not None:
            set_threads(self.threads)
        self.info = machine()
        self._started = time.time()
        if self.monitor:
            self.monitor.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.monitor:
            self.monitor.__exit__(*exc)
        self.wall = time.time() - self._started
        self.info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    @property
    def load(self) -> dict[str, float]:
        return self.monitor.summary() if self.monitor else {}

    def save(self, name: str, title: str, extra: list[str], body: str, payload: dict[str, Any], results: Path = RESULTS) -> Path:
        """Prints and writes <results>/<name>.md (the traced header, `extra` lines, then `body`) and
        <name>.json (`payload` plus the machine, load and wall time)."""
        markdown = header(title, self.info, self.load, self.wall, extra, self.command) + "\n" + body
        print(markdown)
        path = write(name, markdown, {**payload, "machine": self.info, "load": self.load, "wall_s": self.wall}, results)
        print(f"wrote {path}; benchmark {name} took {self.wall:.0f} s ({self.wall / 60:.1f} min) wall")
        return path


class ChildFailed(RuntimeError):
    """A child run exited non-zero, timed out or replied nothing."""


def run_child(module: str, argv: list[str], child: str, *, log: Path | None = None, timeout: float | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `python -m module *argv --child CHILD` in a fresh process and returns what it replied.

    A fresh process per measurement keeps one's peak memory, threads and Ray cluster out of the next.
    Its output goes to `log` when given, else to this terminal. The child answers with reply().
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    command = [sys.executable, "-m", module, *argv, "--child", child, "--child-out", str(out)]
    print(f"[{module}] {' '.join(command[2:])}" + (f" (log {log})" if log else ""), flush=True)
    started = time.time()
    try:
        with open(log, "w") if log else contextlib.nullcontext() as stream:
            rc: int | str = subprocess.run(command, cwd=PROJECT_ROOT, env=os.environ | {"TQDM_DISABLE": "1"} | (env or {}),
                                           stdout=stream, stderr=subprocess.STDOUT if log else None, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    try:
        if rc != 0 or not out.stat().st_size:
            raise ChildFailed(f"run failed ({rc}) after {time.time() - started:.0f} s")
        return json.loads(out.read_text())
    finally:
        out.unlink()


def reply(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """A child's answer to run_child."""
    args.child_out.write_text(json.dumps(result, default=float))


def command(main: Callable[[], Any]) -> None:
    """Runs a benchmark's main as a shell command: a configuration mistake (a bad --set, an output
    folder no run made) is one line and exit code 2, not a traceback."""
    try:
        main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
