"""What federation costs: bytes per merchant per round, seconds per round, memory of the whole simulation.

    .venv/bin/python -m benchmarks.federation [--merchants 4,20] [--rounds 2] [--local-steps 5] [--batch 8]
                                              [--backbone smollm2] [--set key=value ...]

For each merchant count N, one run of the real ServerApp and ClientApp through Flower's simulation
engine (simulations.federated.federate) on N synthetic merchants, in its own subprocess. A thread in
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
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.scaffold import ChildFailed, Monitor, Run, arguments, command, header, reply, run_child, side_by_side, write
from shared.config import parse_overrides

WORK = Path(tempfile.gettempdir()) / "shopcast_bench_federation"
TITLE = "Federation cost (Flower simulation, synthetic merchants)"
CHILD_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


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
    from shared.rundir import fresh_run_dir
    from simulations.federated import federate

    n = int(args.child)
    overrides = run_overrides(args, n)
    fresh_run_dir(WORK / f"n{n}")  # no resumed checkpoint, no spent ledgers
    cfg = load_config(args.config, overrides)
    started = time.time()
    summary = federate(cfg, n).summary
    reply(args, {"summary": summary, "simulate_s": time.time() - started})


def measured(n: int, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """One simulation of `n` merchants in a child process, its whole process tree sampled meanwhile."""
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with Monitor(interval=1.0, pss_every=5) as monitor:
        simulated = run_child("benchmarks.federation", argv, str(n), log=WORK / f"n{n}.log", timeout=args.timeout, env=CHILD_ENV)
    return digest(n, simulated, monitor.summary(), time.time() - started, monitor.peak_breakdown)


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
        "late": sum(len(r.get("late", [])) for r in history),
        "bytes_per_client_round": float(np.mean(sent)) if sent else float("nan"),
        "bytes_per_round_all_clients_up": float(np.mean([
            sum(float(m["bytes-sent"]) for m in r["merchants"].values() if "bytes-sent" in m) for r in history])),
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
    ("failed / rejected / late replies", lambda r: f"{r['failures']} / {r['rejected']} / {r.get('late', 'n/a')}"),
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
    return side_by_side("", [f"{r['merchants']} merchants" for r in results], [(label, [fn(r) for r in results]) for label, fn in ROWS])


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, config_default="configs/default.toml", children=True)
    parser.add_argument("--merchants", default="4,20", help="merchant counts, one simulation each")
    parser.add_argument("--rounds", type=int, default=2, help="federation rounds")
    parser.add_argument("--local-steps", type=int, default=5, help="training steps per merchant per round")
    parser.add_argument("--batch", type=int, default=8, help="train.batch_size")
    parser.add_argument("--backbone", default="", help="model.backbone (default: the config's, smollm2)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is abandoned")
    parser.add_argument("--name", default="federation")
    parser.add_argument("--render", help="rewrite the Markdown from a saved result JSON, running nothing")
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.render:
        rerender(Path(args.render), args.results)
        return

    results, notes = [], []
    with Run("benchmarks.federation", argv, monitor=False) as run:  # each child is monitored on its own
        for n in (int(x) for x in args.merchants.split(",")):
            try:
                results.append(measured(n, args, run.argv))
                print(f"[federation] {n} merchants: {results[-1]}", flush=True)
            except ChildFailed as failure:
                notes.append(f"{n} merchants: {failure}; see {WORK / f'n{n}.log'}")
                print(notes[-1], flush=True)
    extra, body = describe(args, run.info, results, notes)
    payload = {"benchmark": "federation", "args": vars(args), "command": run.command, "results": results, "notes": notes}
    run.save(args.name, TITLE, extra, body, payload, args.results)


def rerender(saved_json: Path, results: Path) -> None:
    """Rewrites a result's Markdown from its JSON (after a change of wording), running nothing."""
    saved = json.loads(saved_json.read_text())
    args = argparse.Namespace(**saved["args"])
    saved["command"] = saved.get("command") or (
        f".venv/bin/python -m benchmarks.federation --merchants {args.merchants} --rounds {args.rounds} "
        f"--local-steps {args.local_steps} --batch {args.batch}"
        + (f" --backbone {args.backbone}" if args.backbone else "")
        + "".join(f" --set {x}" for x in args.set) + f" --timeout {args.timeout:g}")
    extra, body = describe(args, saved["machine"], saved["results"], saved["notes"])
    markdown = header(TITLE, saved["machine"], {}, saved["wall_s"], extra, saved["command"]) + "\n" + body
    print(markdown)
    print(f"wrote {write(args.name, markdown, saved, results)}")


def describe(args: argparse.Namespace, info: dict[str, Any], results: list[dict[str, Any]], notes: list[str]) -> tuple[list[str], str]:
    """The header's extra lines and the table: the concurrent load is per run, as each child was monitored alone."""
    from shared.config import load_config

    cfg = load_config(args.config, run_overrides(args, 1))  # the settings shown do not depend on the merchant count
    priv = cfg.privacy
    load_lines = "; ".join(
        f"{r['merchants']} merchants: other processes {r['load_other_processes_cores_mean']} cores on average "
        f"(max {r['load_other_processes_cores_max']})"
        for r in results)
    dp = (f"on (unit {priv.unit}, noise {priv.noise_multiplier}, clip {priv.max_grad_norm}, target ε {priv.target_epsilon})"
          if priv.enabled else "off")
    extra = [
        f"concurrent load per run: {load_lines}",
        f"config: `{args.config}` + {run_overrides(args, 'N')}; backbone `{cfg.model.backbone}` ({cfg.model.llm_layers} blocks), "
        f"strategy {cfg.federation.strategy}, {args.rounds} rounds x {args.local_steps} local steps, batch {args.batch}, "
        f"DP {dp}",
        f"Flower simulation engine on Ray, 1 CPU per ClientApp (so about {info['nproc']} actors run at a time and "
        "merchants beyond that queue), seed 0, synthetic merchants (data.synthetic.n_merchants = N)",
        "bytes are tensor payload only (Flower/gRPC framing not counted); per-process RSS at the peak is in the JSON",
        "Ray starts the ClientApp actors at nice 15, so on a machine busy with other work they get the CPU last: round "
        "wall times are then dominated by waiting; the CPU-seconds row is the contention-independent cost",
        *notes,
    ]
    return extra, table(results) if results else "no run completed\n"


if __name__ == "__main__":
    command(main)
