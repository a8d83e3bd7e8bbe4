"""What every benchmark script shares: the machine record, a load/memory monitor and the result writer.

Results go to benchmarks/results/<name>.md and <name>.json. Each file says which machine ran it,
how busy that machine was with other work while it ran (these runs share small CI-like boxes), the
config, the seed, the command and the wall time, so a number can be traced back and judged.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from shared.config import PROJECT_ROOT

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
        "git_dirty_files": len([l for l in _git("status", "--porcelain").splitlines() if l.strip()]),
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


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def load_line(load: dict[str, float], info: dict[str, Any]) -> str:
    if not load:
        return f"load average at start {info['loadavg_at_start']}"
    return (
        f"concurrent load: other processes used on average {load['other_processes_cores_mean']} of {info['nproc']} cores "
        f"(max {load['other_processes_cores_max']}), this benchmark {load['own_tree_cores_mean']}; "
        f"load average at start {info['loadavg_at_start']}, at end {info.get('loadavg_at_end')}"
    )


def header(title: str, info: dict[str, Any], load: dict[str, float], wall_s: float, extra: list[str], command: str | None = None) -> str:
    lines = [
        f"# {title}",
        "",
        f"- command: `{command or command_line()}`",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}, wall time {wall_s:.0f} s, commit {info['git_commit'][:10]}"
        f" ({info['git_dirty_files']} files modified/untracked in the working tree)",
        f"- machine: {info['nproc']} cores ({info['cpu_model']}), {info['memory_gib']} GiB RAM, torch {info['torch']} "
        f"with {info['torch_threads']} intra-op threads" + (f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU"),
        f"- {load_line(load, info)}",
        *(f"- {line}" for line in extra),
        "",
    ]
    return "\n".join(lines)


def write(name: str, markdown: str, payload: dict[str, Any], folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / f"{name}.md"
    md.write_text(markdown)
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return md


def finish_info(info: dict[str, Any]) -> dict[str, Any]:
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return info
