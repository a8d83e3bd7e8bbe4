"""What a small DP-trained part buys: federated-DP accuracy against ε and against the shared part's size d.

    .venv/bin/python -m benchmarks.dp_shared configs/benchmarks/synthetic.toml
                     [--epsilons 1,4,8] [--parts "all;llm;linear"] [--sweep llm] [--at 8]

Every run is the real federation (simulations.federated.federate: Flower's simulation engine, the
ServerApp and ClientApp) from the shipped base, with DP-SGD at the config's unit and σ "auto": each
merchant's accountant picks the σ with which its planned rounds x local steps end on ε. The shared
part ([model] shared) is what trains, travels and is noised; the rest of the adapter keeps the base's
values. Each final adapter is scored as it is and after every merchant's personal refit of the output
layers (shared.personal, never sent, so never noised), on the same splits as the references: the same
federation without DP (whole adapter), local-only training from the base, the base alone and seasonal
naive. Grid: every part of --parts at ε = --at, and the --sweep part at every ε of --epsilons.

Beside ε: d (the shared part's size), the median over merchants of σ and of the signal-to-noise
estimate shared.privacy.signal_to_noise (units, d, σ, steps, q) and of the DP steps' learning rate
(shared.privacy.dp_learning_rate of that estimate under [privacy] lr = "auto"). Writes <results>/<name>_dp_shared.md and .json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.scaffold import Run, arguments, command, dataset_config, quiet
from shared.config import Config, load_config
from shared.metrics import to_markdown
from shared.pipeline import ForecastPipeline
from shared.privacy import dp_learning_rate, federated_steps, merchant_units, noise_for, sample_rate, signal_to_noise
from shared.rundir import fresh_run_dir
from shared.sources import load_table
from shared.windows import Splits
from simulations.compare import Contest, add_federated, add_seasonal_naive, local_only, merchant_splits
from simulations.federated import federate
from simulations.report import accuracy_summary


def part_overrides(part: str) -> dict[str, Any]:
    """`all` is the whole adapter; otherwise comma-separated prefixes of [model] shared."""
    return {"model.shared": [] if part == "all" else part.split(",")}


def noise_plan(cfg: Config, splits: dict[str, Splits], d: int) -> dict[str, float]:
    """Median over merchants of the σ "auto" picks, of the signal-to-noise estimate it leaves and of
    the DP steps' learning rate (under [privacy] lr = "auto", set by that estimate)."""
    sigmas, ratios, rates = [], [], []
    steps = federated_steps(cfg)
    for s in splits.values():
        q = sample_rate(cfg, s.train)
        units = len(merchant_units(cfg, s.train))
        sigma = noise_for(cfg.privacy.target_epsilon, cfg.privacy.delta, q, steps)
        sigmas.append(sigma)
        ratios.append(signal_to_noise(units, d, sigma, steps, q))
        rates.append(dp_learning_rate(cfg.train.lr, ratios[-1]) if cfg.privacy.lr == "auto" else cfg.privacy.lr)
    return {"sigma": float(np.median(sigmas)), "signal_to_noise": float(np.median(ratios)), "dp_lr": float(np.median(rates))}


def main(argv: list[str] | None = None) -> Path | None:
    parser = arguments(__doc__)
    parser.add_argument("config", help="a dataset config, e.g. configs/benchmarks/synthetic.toml")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--parts", default="all;llm;linear", help="';'-separated shared parts (comma-separated prefixes, or all)")
    parser.add_argument("--sweep", default="llm", help="the part run at every ε")
    parser.add_argument("--at", type=float, default=8.0, help="the ε every part is run at")
    args = parser.parse_args(argv)
    quiet(progress=True)
    config = args.config
    if (loaded := dataset_config(config, args.set, "dp_shared")) is None:
        return None
    overrides, cfg, name = loaded
    out = fresh_run_dir(Path(cfg.federation.out_dir) / "dp_shared")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    grid = [(part, args.at) for part in args.parts.split(";")] + [(args.sweep, e) for e in epsilons if e != args.at]
    contest, rows = Contest(), []
    with Run("benchmarks.dp_shared", argv, threads=cfg.benchmark.threads) as run:
        table = load_table(cfg)
        pipeline = ForecastPipeline.from_config(cfg, table)
        splits = merchant_splits(pipeline, table)
        if pipeline.base is not None:
            contest.add("shopcast_zero_shot", pipeline.forecast_merchants(splits), splits, cfg, 0.0)
        started = time.time()
        contest.add("shopcast_local_only", local_only(pipeline, splits, federated_steps(cfg)), splits, cfg, time.time() - started)
        add_seasonal_naive(contest, splits, cfg)
        runs = [("shopcast_federated", "all", None)] + [(f"dp_eps{e:g}_{part.replace(',', '+')}", part, e) for part, e in grid]
        for label, part, epsilon in runs:
            extra = part_overrides(part) | {"federation.out_dir": str(out / label), "privacy.ledger_dir": str(out / label / "ledgers"),
                                            "privacy.enabled": epsilon is not None}
            if epsilon is not None:
                extra["privacy.target_epsilon"] = epsilon
            run_cfg = load_config(config, overrides | extra)
            started = time.time()
            federated = federate(run_cfg, len(splits))
            d = federated.summary["shared_size"]
            add_federated(contest, label, federated, pipeline, splits, time.time() - started, personal=True)
            plan = (noise_plan(run_cfg, splits, d) if epsilon is not None
                    else {"sigma": 0.0, "signal_to_noise": float("inf"), "dp_lr": cfg.train.lr})
            rows.append({"run": label, "shared": part, "d": d, "epsilon": epsilon or float("inf"), **plan})
            print(f"[dp_shared] {label}: d {d}, {plan}", flush=True)
    summary = accuracy_summary(contest).set_index("model")
    table_rows = pd.DataFrame(rows)
    table_rows["dp_lr"] = table_rows["dp_lr"].map(lambda rate: f"{rate:.2g}")  # 1e-6 and below would print as 0.000
    table_rows["wql_gmean_rel"] = table_rows["run"].map(summary["wql_gmean_rel"])
    table_rows["wql_gmean_rel_personal"] = table_rows["run"].map(lambda r: summary.loc[f"{r}_personal", "wql_gmean_rel"])
    by_epsilon = table_rows[(table_rows["shared"] == args.sweep) | (table_rows["epsilon"] == float("inf"))].sort_values("epsilon")
    by_size = table_rows[(table_rows["epsilon"] == args.at) | (table_rows["epsilon"] == float("inf"))].sort_values("d")
    references = summary.loc[[m for m in ("shopcast_local_only", "shopcast_zero_shot", "seasonal_naive") if m in summary.index],
                             ["wql_gmean_rel"]].reset_index()
    body = "\n".join([
        f"## Accuracy vs ε (shared part `{args.sweep}`; gmean WQL relative to seasonal naive, lower is better)", "",
        to_markdown(by_epsilon),
        f"\n## Accuracy vs the DP-trained part's size d (ε = {args.at:g})", "", to_markdown(by_size),
        "\n## References on the same splits", "", to_markdown(references),
        "\n## Every contender", "", to_markdown(summary.reset_index()),
    ])
    extra_lines = [
        f"config `{config}`, overrides {overrides}; {len(splits)} merchants; {cfg.federation.num_rounds} rounds x "
        f"{cfg.federation.local_steps} local steps; DP unit {cfg.privacy.unit}, δ {cfg.privacy.delta}, σ \"auto\"; "
        f"base {pipeline.base}; personal: {cfg.train.personalise} ({cfg.train.personal_steps} steps)",
        "signal_to_noise: the upper estimate q·N·√T / (σ·√d) of shared.privacy.signal_to_noise (docs/privacy.md, section 5); "
        f"dp_lr: the DP steps' rate ([privacy] lr = {cfg.privacy.lr!r}; \"auto\": train.lr {cfg.train.lr:g} x s²/(1 + s²))",
    ]
    payload = {"config": config, "overrides": overrides, "runs": rows, "summary": summary.reset_index().to_dict(orient="records")}
    return run.save(name, f"DP on a small shared part `{cfg.benchmark.name}`", extra_lines, body, payload, args.results)


if __name__ == "__main__":
    command(main)
