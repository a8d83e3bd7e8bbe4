"""Merchant-level DP for a platform of many small shops: accuracy against ε, wall time and memory.

    .venv/bin/python -m benchmarks.merchant_dp [--merchants 200] [--rounds 3] [--local-steps 5] [--epsilons 1,4,8]

The protected unit is a whole merchant: DP-FedAvg with adaptive clipping ([federation] client_dp =
"server_adaptive", server/client_dp.py). Every merchant is asked every round, so there is no
amplification by sampling; the server's accountant composes the plain Gaussian mechanism over rounds,
and the noise on the mean shrinks as 1/N (McMahan et al. 2018). For each ε the update noise z is
the one whose `--rounds` releases spend ε (bisection on server.client_dp.client_epsilon, counting the
clipped-count noise adaptive clipping also releases). One run without client-level DP and the untrained
initial adapter are the references.

A cheap configuration, as this size allows: the tiny random Llama backbone, N synthetic shops of
`--days` days with `--series` products each, unit-level DP-SGD off (the merchant-level mechanism
alone). Each run is the real ServerApp and ClientApp in Flower's simulation engine, in this process,
with the whole process tree (driver, Ray, actors) sampled by benchmarks.scaffold.Monitor. Reported
per run: gmean WQL relative to seasonal naive over every merchant's test window, the ε the server
recorded, the share of each noised step the server kept, wall time, peak tree PSS. Writes <results>/merchant_dp.md and .json.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.scaffold import Monitor, Run, arguments, command, quiet
from server.client_dp import adaptive_release_noise, client_epsilon, count_stddev
from shared.config import PROJECT_ROOT, FederationConfig, load_config, parse_overrides
from shared.metrics import to_markdown
from shared.pipeline import ForecastPipeline
from shared.rundir import fresh_run_dir
from shared.sources import load_table
from simulations.compare import Contest, add_federated, add_seasonal_naive, merchant_splits
from simulations.federated import federate
from simulations.report import accuracy_summary


def release_noise(z: float, merchants: int) -> float:
    """The noise multiplier of one adaptive-clipping release with update noise z, as the server accounts it."""
    return adaptive_release_noise(z, count_stddev(replace(FederationConfig(), client_dp_noise=z), merchants))


def noise_for_merchants(epsilon: float, rounds: int, merchants: int, delta: float) -> float:
    """The z whose `rounds` releases spend `epsilon`: ε falls as z grows, so a bisection finds it."""
    low, high = 0.05, 1000.0
    for _ in range(60):
        mid = (low * high) ** 0.5
        if client_epsilon([release_noise(mid, merchants)] * rounds, delta) > epsilon:
            low = mid
        else:
            high = mid
    return high


CONFIG = PROJECT_ROOT / "configs" / "default.toml"


def main(argv: list[str] | None = None) -> Path:
    parser = arguments(__doc__)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--days", type=int, default=160, help="days of history per shop (context + 3 horizons at least)")
    parser.add_argument("--series", type=int, default=3, help="products per shop")
    parser.add_argument("--epsilons", default="1,4,8")
    args = parser.parse_args(argv)
    quiet(progress=True)
    n = args.merchants
    base = {"model.backbone": "tiny", "model.llm_layers": 2, "data.synthetic.n_merchants": n, "data.synthetic.n_days": args.days,
            "data.max_series_per_merchant": args.series, "federation.num_merchants": n, "federation.num_rounds": args.rounds,
            "federation.local_steps": args.local_steps, "federation.min_replies": n // 2,
            "privacy.enabled": False} | parse_overrides(args.set)
    cfg = load_config(CONFIG, base)
    out = fresh_run_dir(Path(cfg.federation.out_dir) / "merchant_dp")
    contest, rows = Contest(), []
    with Run("benchmarks.merchant_dp", argv, monitor=False) as run:
        table = load_table(cfg)
        pipeline = ForecastPipeline.from_config(cfg, table)
        splits = merchant_splits(pipeline, table)
        add_seasonal_naive(contest, splits, cfg)
        # what every merchant starts from (no base fits the tiny backbone: the seeded init, the window's
        # mean with a modest band): the reference a DP run should not fall below, as the base is elsewhere
        contest.add("initial_adapter", pipeline.forecast_merchants(splits), splits, cfg, 0.0)
        for epsilon in [None, *(float(e) for e in args.epsilons.split(","))]:
            label = "federated" if epsilon is None else f"merchant_dp_eps{epsilon:g}"
            extra: dict[str, Any] = {"federation.out_dir": str(out / label)}
            z = 0.0
            if epsilon is not None:
                z = noise_for_merchants(epsilon, args.rounds, n, cfg.federation.client_dp_delta)
                extra |= {"federation.client_dp": "server_adaptive", "federation.client_dp_noise": z}
            started = time.time()
            with Monitor() as monitor:
                federated = federate(load_config(CONFIG, base | extra), n)
            wall, summary = time.time() - started, federated.summary
            add_federated(contest, label, federated, pipeline, splits, wall)
            releases = [r["client_dp"] for r in summary["history"] if "client_dp" in r]
            replies = [len(r.get("merchants", {})) for r in summary["history"]]
            load = monitor.summary()
            rows.append({"run": label, "target epsilon": epsilon or float("inf"), "z": z,
                         "epsilon recorded": releases[-1]["epsilon"] if releases else float("inf"),
                         "step kept (mean)": float(np.mean([r["step"] for r in releases])) if releases else 1.0,
                         "replies per round (min)": min(replies) if replies else 0, "wall s": wall,
                         "peak tree PSS MiB": load.get("peak_tree_pss_mib"), "peak tree RSS MiB": load.get("peak_tree_rss_mib")})
            print(f"[merchant_dp] {rows[-1]}", flush=True)
    summary_table = accuracy_summary(contest).set_index("model")
    runs = pd.DataFrame(rows)
    runs["wql_gmean_rel"] = runs["run"].map(summary_table["wql_gmean_rel"])
    runs["mase_gmean_rel"] = runs["run"].map(summary_table["mase_gmean_rel"])
    body = "\n".join([
        f"## {n} merchants: accuracy vs merchant-level ε (gmean relative to seasonal naive, lower is better)", "", to_markdown(runs),
        "\n## Every contender", "", to_markdown(summary_table.reset_index()),
    ])
    extra_lines = [f"{n} synthetic shops x {args.series} products x {args.days} days; tiny backbone; {args.rounds} rounds x "
                   f"{args.local_steps} local steps, every merchant every round; client_dp server_adaptive, δ "
                   f"{cfg.federation.client_dp_delta}; unit-level DP-SGD off; overrides {base}",
                   "step kept: the share s²/(1 + s²) of each noised mean's step the server applies, s = n·√R/(z·√d) "
                   "(server/client_dp.py); initial_adapter: the seeded init every merchant starts from, never trained"]
    payload = {"args": vars(args) | {"results": str(args.results)}, "runs": rows,
               "summary": summary_table.reset_index().to_dict(orient="records")}
    return run.save("merchant_dp", f"Merchant-level DP with {n} merchants", extra_lines, body, payload, args.results)


if __name__ == "__main__":
    command(main)
