"""What federation costs: bytes per merchant per round, seconds per round, memory of the whole simulation.

    .venv/bin/python -m benchmarks.federation [--merchants 4,20] [--rounds 2] [--local-steps 5] [--batch 8]
                                              [--backbone smollm2] [--set key=value ...]

For each merchant count N, one run of the real ServerApp and ClientApp through Flower's simulation
engine (simulations.federated.simulate) on N synthetic merchants, in its own subprocess. A thread in
this process samples the subprocess and all its descendants (driver, Ray's raylet and GCS, the
ClientApp actors) with psutil: summed RSS (an upper bound: shared pages count once per process),
summed PSS (shared pages split; the better estimate) and the largest single process. Bytes come
from the server's summary.json: each reply's `bytes-sent` (the adapter tensors a merchant uploads;
the global adapter it downloads is the same tensors again), against the full backbone, which never
travels. Seconds per round are the server's per-round training phase (`wall_s` in the history:
from sending the global adapter to aggregating the replies); the whole run's wall time also holds
Ray's start, each actor's backbone load and the federated evaluation after every round.
Synthetic data only, so it always runs. Writes benchmarks/results/federation.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import Monitor, command_line, finish_info, header, machine, write
from shared.config import PROJECT_ROOT, parse_overrides

WORK = Path(tempfile.gettempdir()) / "shopcast_bench_federation"


def run_overrides(args: argparse.Namespace, n: int) -> dict[str, Any]:
    out = WORK / f"n{n}"
    values = {
        "data.synthetic.n_merchants": n, "federation.num_merchants": n, "federation.num_rounds": args.rounds,
        "federation.local_steps": args.local_steps, "train.batch_size": args.batch, "train.device": "cpu",
        "federation.out_dir": str(out / "federated"), "privacy.ledger_dir": str(out / "ledgers"),
    }
    if args.backbone:
        values["model.backbone"] = args.backbone
    return values | parse_overrides(args.set)


def child(args: argparse.Namespace) -> None:
    """One simulation, in this process (a fresh Ray cluster per run)."""
    from shared.config import load_config
    from simulations.federated import simulate

    n = args.child
    overrides = run_overrides(args, n)
    shutil.rmtree(WORK / f"n{n}", ignore_errors=True)  # fresh: no resumed checkpoint, no spent ledgers
    cfg = load_config(args.config, overrides)
    started = time.time()
    summary = simulate(cfg, args.config, overrides, n)
    Path(args.child_out).write_text(json.dumps({"summary": summary, "simulate_s": time.time() - started}, default=float))


def digest(n: int, run: dict[str, Any], load: dict[str, Any], wall: float, breakdown: list) -> dict[str, Any]:
    summary = run["summary"]
    history = summary["history"]
    sent = [float(m["bytes-sent"]) for r in history for m in r["merchants"].values() if "bytes-sent" in m]
    replies = [len([m for m in r["merchants"].values() if "bytes-sent" in m]) for r in history]
    round_s = [float(r["wall_s"]) for r in history]
    eval_wql = [float(m["eval-wql"]) for m in history[-1]["merchants"].values() if "eval-wql" in m] if history else []
    epsilons = [float(m["epsilon"]) for m in history[-1]["merchants"].values() if "epsilon" in m] if history else []
    actors = sum(1 for title, _ in breakdown if "ClientAppActor" in title)
    return {
        "merchants": n,
        "rounds": summary["rounds"],
        "replies_per_round": replies,
        "failures": sum(len(r.get("failures", [])) for r in history),
        "rejected": sum(len(r.get("rejected", [])) for r in history),
        "bytes_per_client_round": float(np.mean(sent)) if sent else float("nan"),
        "bytes_per_round_all_clients_up": float(np.mean([sum(float(m["bytes-sent"]) for m in r["merchants"].values() if "bytes-sent" in m) for r in history])),
        "adapter_bytes": summary["adapter_bytes"],
        "backbone_bytes": summary["backbone_bytes"],
        "round_train_s": round_s,
        "round_train_s_mean": float(np.mean(round_s)) if round_s else float("nan"),
        "server_wall_s": summary["wall_s"],
        "simulate_s": run["simulate_s"],
        "process_wall_s": wall,
        "final_eval_wql_mean": float(np.mean(eval_wql)) if eval_wql else None,
        "final_epsilon_max": max(epsilons) if epsilons else None,
        "privacy": summary.get("privacy"),
        "actors_at_peak": actors,
        "peak_breakdown_mib": breakdown,
        **{f"load_{k}": v for k, v in load.items()},
    }


ROWS = [
    ("rounds run / replies per round", lambda r: f"{r['rounds']} / {r['replies_per_round']}"),
    ("failed or rejected replies", lambda r: f"{r['failures']} / {r['rejected']}"),
    ("upload per merchant per round (bytes-sent, MiB)", lambda r: f"{r['bytes_per_client_round'] / 2**20:.3f}"),
    ("download per merchant per round (same tensors, MiB)", lambda r: f"{r['adapter_bytes'] / 2**20:.3f}"),
    ("full backbone, fp32 (MiB; never travels)", lambda r: f"{r['backbone_bytes'] / 2**20:.1f}"),
    ("upload / backbone", lambda r: f"{r['bytes_per_client_round'] / r['backbone_bytes']:.3%}"),
    ("upload of all merchants per round (MiB)", lambda r: f"{r['bytes_per_round_all_clients_up'] / 2**20:.2f}"),
    ("seconds per round, training phase (mean)", lambda r: f"{r['round_train_s_mean']:.0f}"),
    ("seconds per round, each", lambda r: ", ".join(f"{s:.0f}" for s in r["round_train_s"])),
    ("server wall time (s; rounds + evaluation)", lambda r: f"{r['server_wall_s']:.0f}"),
    ("whole simulation wall time (s; + Ray start, backbone loads)", lambda r: f"{r['simulate_s']:.0f}"),
    ("ClientApp actors (at peak memory)", lambda r: f"{r['actors_at_peak']}"),
    ("processes in the tree (peak)", lambda r: f"{r['load_peak_processes']}"),
    ("peak tree RSS, summed (MiB; upper bound)", lambda r: f"{r['load_peak_tree_rss_mib']:.0f}"),
    ("peak tree PSS, summed (MiB)", lambda r: f"{r['load_peak_tree_pss_mib']:.0f}"),
    ("largest single process RSS (MiB)", lambda r: f"{r['load_peak_single_process_rss_mib']:.0f}"),
    ("CPU-seconds used by the simulation's processes", lambda r: f"{r['load_own_tree_cores_mean'] * r['process_wall_s']:.0f}"),
    ("other processes' CPU meanwhile (cores, mean)", lambda r: f"{r['load_other_processes_cores_mean']:.2f}"),
    ("mean holdout WQL after the last round", lambda r: "n/a" if r["final_eval_wql_mean"] is None else f"{r['final_eval_wql_mean']:.3f}"),
    ("largest ε spent by a merchant", lambda r: "n/a (no DP)" if r["final_epsilon_max"] is None else f"{r['final_epsilon_max']:.2f}"),
]


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| | " + " | ".join(f"{r['merchants']} merchants" for r in results) + " |", "|---|" + "---:|" * len(results)]
    lines += [f"| {label} | " + " | ".join(fn(r) for r in results) + " |" for label, fn in ROWS]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--merchants", default="4,20")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backbone", default="", help="model.backbone (default: the config's, smollm2)")
    parser.add_argument("--set", action="append", default=[], help="dotted config override, e.g. privacy.enabled=false")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is abandoned")
    parser.add_argument("--name", default="federation")
    parser.add_argument("--render", help="rewrite the Markdown from a saved result JSON, running nothing")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        saved_args = argparse.Namespace(**saved["args"])
        command = saved.get("command") or (
            f".venv/bin/python -m benchmarks.federation --merchants {saved_args.merchants} --rounds {saved_args.rounds} "
            f"--local-steps {saved_args.local_steps} --batch {saved_args.batch}"
            + (f" --backbone {saved_args.backbone}" if saved_args.backbone else "")
            + "".join(f" --set {x}" for x in saved_args.set) + f" --timeout {saved_args.timeout:g}")
        saved["command"] = command
        markdown = render(saved_args, saved["machine"], saved["results"], saved["notes"], saved["wall_s"], command)
        print(markdown)
        print(f"wrote {write(saved_args.name, markdown, saved)}")
        return


    info = machine()
    results, notes = [], []
    started = time.time()
    for n in (int(x) for x in args.merchants.split(",")):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            child_out = f.name
        log = WORK / f"n{n}.log"
        WORK.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "benchmarks.federation", *sys.argv[1:], "--child", str(n), "--child-out", child_out]
        env = os.environ | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        print(f"[federation] {n} merchants (log {log})", flush=True)
        t = time.time()
        with Monitor(interval=1.0, pss_every=5) as monitor, open(log, "w") as out:
            try:
                rc = subprocess.run(command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.time() - t
        if rc != 0 or not Path(child_out).stat().st_size:
            notes.append(f"{n} merchants: run failed ({rc}) after {wall:.0f} s; see {log}")
            print(notes[-1], flush=True)
            continue
        run = json.loads(Path(child_out).read_text())
        os.unlink(child_out)
        results.append(digest(n, run, monitor.summary(), wall, monitor.peak_breakdown))
        print(f"[federation] {n} merchants: {results[-1]}", flush=True)
    wall = time.time() - started
    info = finish_info(info)
    markdown = render(args, info, results, notes, wall)
    print(markdown)
    payload = {"benchmark": "federation", "args": vars(args), "command": command_line(), "machine": info, "wall_s": wall,
               "results": results, "notes": notes}
    print(f"wrote {write(args.name, markdown, payload)}")


def render(args: argparse.Namespace, info: dict[str, Any], results: list[dict[str, Any]], notes: list[str], wall: float,
           command: str | None = None) -> str:
    from shared.config import load_config

    cfg = load_config(args.config, run_overrides(args, 0))
    priv = cfg.privacy
    extra = [
        f"config: `{args.config}` + {run_overrides(args, 'N')}; backbone `{cfg.model.backbone}` ({cfg.model.llm_layers} blocks), "
        f"strategy {cfg.federation.strategy}, {args.rounds} rounds x {args.local_steps} local steps, batch {args.batch}, "
        f"DP {'on (unit ' + priv.unit + f', noise {priv.noise_multiplier}, clip {priv.max_grad_norm}, target ε {priv.target_epsilon})' if priv.enabled else 'off'}",
        f"Flower simulation engine on Ray, 1 CPU per ClientApp (so about {info['nproc']} actors run at a time and "
        "merchants beyond that queue), seed 0, synthetic merchants (data.synthetic.n_merchants = N)",
        "bytes are tensor payload only (Flower/gRPC framing not counted); per-process RSS at the peak is in the JSON",
        "Ray starts the ClientApp actors at nice 15, so on a machine busy with other work they get the CPU last: round "
        "wall times are then dominated by waiting; the CPU-seconds row is the contention-independent cost",
        *notes,
    ]
    load_lines = "; ".join(
        f"{r['merchants']} merchants: other processes {r['load_other_processes_cores_mean']} cores on average (max {r['load_other_processes_cores_max']})"
        for r in results)
    markdown = header("Federation cost (Flower simulation, synthetic merchants)", info, {}, wall,
                      [f"concurrent load per run: {load_lines}", *extra], command)
    return markdown + ("\n" + table(results) if results else "\nno run completed\n")


if __name__ == "__main__":
    main()
