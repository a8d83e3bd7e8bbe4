"""The accuracy benchmark of one dataset, driven by its config: every contender on the same splits.

    .venv/bin/python -m benchmarks.accuracy configs/benchmarks/walmart.toml [--seeds 0,1,2] [--set key=value ...]

Contenders (simulations.compare.run_contest): shopcast federated through Flower's simulation engine
without and with DP-SGD, local-only (each merchant alone, the same steps), centralised (all data
pooled, steps x merchants: the non-private upper bound), the ablations trained exactly like
centralised (`no_llm`: the LLM removed; `attention`: one attention layer instead; `random_llm`: the
same blocks with random weights), seasonal naive, AutoETS, AutoTheta, LightGBM per merchant and
pooled. Any CSV is benchmarkable with a config only (`[data] source = "file"`, its column mapping,
frequency and horizon). A preset whose files are absent is skipped with a message (exit 0).
With several --seeds (model and train seeds; the data stay the same) the whole contest runs once per
seed: the tables are the first seed's, and a "Seeds" table gives every trained row's mean and spread.

Writes <results>/<name>.md, .json, <name>_accuracy.png and <name>_forecasts.png, where <name> is
[benchmark] name and <results> is benchmarks/results unless --results says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.scaffold import Run, arguments, command, dataset_config, maxrss_mib, quiet
from shared.config import PROJECT_ROOT
from shared.metrics import to_markdown
from shared.plots import bar_chart, fan_chart
from simulations.compare import ContestRun, run_contest
from simulations.report import accuracy_summary, dp_spent, merchant_wql

SHOPCAST_ROWS = ("shopcast_federated_dp", "shopcast_federated", "shopcast_local_only", "shopcast_centralised")
BASELINE_ROWS = ("seasonal_naive", "AutoETS", "AutoTheta", "lightgbm_per_merchant", "lightgbm_pooled")


def head_to_head(scores: dict[str, pd.DataFrame], model: str, others: list[str], metric: str = "wql") -> pd.DataFrame:
    """Share of series on which `model` beats each other contender (lower `metric`), and the median ratio."""
    keys = ["merchant_id", "unique_id"]
    mine = scores[model].set_index(keys)[metric]
    rows = []
    for other in others:
        theirs = scores[other].set_index(keys)[metric].reindex(mine.index)
        usable = mine.notna() & theirs.notna()
        ratio = (mine[usable] / theirs[usable]).replace([np.inf, -np.inf], np.nan).dropna()
        rows.append({"versus": other, "series": int(usable.sum()),
                     f"{model} better ({metric})": float((mine[usable] < theirs[usable]).mean()),
                     f"median {metric} ratio": float(ratio.median()) if len(ratio) else float("nan")})
    return pd.DataFrame(rows)


def where_shopcast_loses(summary: pd.DataFrame) -> list[str]:
    """Plain sentences, generated from the numbers, on who beats each shopcast row and whether the LLM
    earns its cost (shopcast_centralised against the ablations trained the same way)."""
    s = summary.set_index("model")
    lines = []
    for row in (r for r in SHOPCAST_ROWS if r in s.index):
        for metric in ("wql", "mase"):
            better = sorted((m for m in s.index if m != row and s.loc[m, metric] < s.loc[row, metric]), key=lambda m: s.loc[m, metric])
            lines.append(f"{row}, mean {metric.upper()} {s.loc[row, metric]:.3f}: rank {1 + len(better)} of {len(s)}"
                         + (f"; loses to {', '.join(f'{m} ({s.loc[m, metric]:.3f})' for m in better)}." if better else "; best of all."))
    if "shopcast_centralised" in s.index:
        mine = s.loc["shopcast_centralised", "wql"]
        for ablation in (a for a in s.index if a.startswith("ablation_")):
            theirs = s.loc[ablation, "wql"]
            verdict = ("no clear difference (under 2%, within one seed's noise)" if abs(mine - theirs) < 0.02 * theirs
                       else "the pretrained LLM helps" if mine < theirs else "the pretrained LLM does not help")
            lines.append(f"LLM vs {ablation} (same data, same steps): mean WQL {mine:.3f} vs {theirs:.3f}, "
                         f"{verdict} ({mine - theirs:+.3f}).")
    return lines


def seed_table(summaries: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each row's gmean ratios to seasonal naive (rows that
    do not train, the baselines, are the same for every seed and left out)."""
    stacked = pd.concat([s.assign(seed=seed) for seed, s in summaries.items()])
    trained = stacked[~stacked["model"].isin(BASELINE_ROWS)]
    table = trained.groupby("model", sort=False).agg(
        wql_gmean_rel=("wql_gmean_rel", "mean"), wql_gmean_rel_sd=("wql_gmean_rel", "std"),
        mase_gmean_rel=("mase_gmean_rel", "mean"), mase_gmean_rel_sd=("mase_gmean_rel", "std"),
        wql=("wql", "mean"), seeds=("seed", "count"),
    )
    return table.sort_values("wql_gmean_rel").reset_index()


def privacy_lines(run: ContestRun) -> list[str]:
    """ε spent per merchant in the DP federation (from each merchant's ledger via the server summary) and traffic."""
    lines = []
    for name, summary in run.summaries.items():
        bytes_up = [m.get("bytes-sent", 0) for e in summary["history"] for m in e["merchants"].values()]
        lines.append(f"{name}: adapter {summary['adapter_bytes']:,} bytes per message vs {summary['backbone_bytes']:,} bytes of backbone; "
                     f"{sum(bytes_up):,} bytes uploaded by all merchants over {len(summary['history'])} rounds.")
        if summary["privacy"]["enabled"]:
            spent = dp_spent(summary, run.table.merchants())
            p = summary["privacy"]
            lines.append(f"{name}: protected unit {p['unit']}, δ = {p['delta']:g}, budget ε ≤ {p['target_epsilon']:g}; ε spent (DP steps "
                         f"trained of {run.steps} planned) per merchant: "
                         + ", ".join(f"{r.merchant} {r.epsilon:.2f} ({r.steps})" for r in spent.itertuples()) + ".")
    return lines


def describe(run: ContestRun, config: str, overrides: dict[str, Any], seeds: list[int]) -> list[str]:
    cfg, table = run.cfg, run.table
    frame = table.frame
    series = frame.groupby("merchant_id")["unique_id"].nunique()
    lengths = frame.groupby("unique_id").size()
    merchants = len(series)
    return [
        f"config: `{config}`, overrides {overrides}; seeds: model {cfg.model.seed}, train {cfg.train.seed}, data {cfg.data.synthetic.seed} "
        "(DP sampling and noise draw fresh secret randomness)"
        + (f"; the contest ran once per model/train seed {seeds}, see Seeds" if len(seeds) > 1 else
           "; one seed, so differences of a few percent are noise"),
        f"data: source `{cfg.data.source}`{f' ({cfg.data.path})' if cfg.data.path else ''}, frequency {table.freq}, {merchants} merchants, "
        f"{int(series.sum())} series ({', '.join(f'{m}: {n}' for m, n in series.items())}), {lengths.min()}-{lengths.max()} steps each",
        f"task: context {cfg.data.context}, horizon {cfg.data.horizon}; test = the last {cfg.data.horizon} steps of every series, "
        f"known covariates {list(table.known)}, observed covariates {list(table.observed)}; quantile levels {list(cfg.model.quantiles)}",
        f"shopcast: backbone `{cfg.model.backbone}` ({cfg.model.llm_layers} blocks), "
        f"LoRA r={cfg.model.lora.r} on {list(cfg.model.lora.targets)}, "
        f"batch {cfg.train.batch_size}, lr {cfg.train.lr}; {run.steps} steps per merchant (federated: {cfg.federation.num_rounds} rounds x "
        f"{cfg.federation.local_steps} of {cfg.federation.strategy}; local-only: {run.steps} alone); centralised and ablations: "
        f"{run.steps * merchants} steps on the pooled windows; DP: σ = {cfg.privacy.noise_multiplier}, clip {cfg.privacy.max_grad_norm}",
        f"peak RSS of the driver process: {maxrss_mib():.0f} MiB",
    ]


def main(argv: list[str] | None = None) -> Path | None:
    parser = arguments(__doc__)
    parser.add_argument("config", help="dataset config, e.g. configs/benchmarks/walmart.toml")
    parser.add_argument("--work", type=Path, default=None, help="folder for checkpoints and ledgers (default runs/benchmarks/<name>)")
    parser.add_argument("--seeds", default="0", help="comma-separated model/train seeds; the contest runs once per seed")
    args = parser.parse_args(argv)
    quiet(progress=True)

    if (loaded := dataset_config(args.config, args.set)) is None:
        return None
    overrides, cfg, _ = loaded
    bench = cfg.benchmark
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work or PROJECT_ROOT / "runs" / "benchmarks" / bench.name
    runs: dict[int, ContestRun] = {}
    with Run("benchmarks.accuracy", argv, threads=bench.threads) as bench_run:
        for seed in seeds:
            seeded = overrides | ({"model.seed": seed, "train.seed": seed} if len(seeds) > 1 else {})
            runs[seed] = run_contest(args.config, seeded, work if len(seeds) == 1 else work / f"seed_{seed}",
                                     ablations=bench.ablations, federated=bench.federated, pooled_lightgbm=True)
    run = runs[seeds[0]]
    scores = run.contest.scores
    summary = accuracy_summary(run.contest)
    spread = seed_table({seed: accuracy_summary(r.contest) for seed, r in runs.items()}) if len(seeds) > 1 else None
    merchants = merchant_wql(run.contest, summary["model"])
    main_row = next(r for r in SHOPCAST_ROWS if r in scores)
    h2h = head_to_head(scores, main_row, [m for m in summary["model"] if m != main_row])
    args.results.mkdir(parents=True, exist_ok=True)
    bar_chart(summary, "wql_gmean_rel", args.results / f"{bench.name}_accuracy.png",
              f"{bench.name}: WQL relative to seasonal naive (geometric mean, lower is better)", reference=1.0)
    with_actuals = run.contest.forecasts[main_row].merge(run.table.frame[["unique_id", "ds", "y"]], on=["unique_id", "ds"])
    fan_chart(run.table.frame, with_actuals, args.results / f"{bench.name}_forecasts.png",
              f"{main_row}: median and 80% band on the test horizon, actuals dashed")
    body = "\n".join([
        "## Accuracy over all series (lower is better; `*_gmean_rel`: geometric mean of the ratio to seasonal naive; "
        "`coverage_80` / `coverage_90`: share of actuals inside the 10%-90% / 5%-95% band, 0.8 / 0.9 is ideal; "
        "`wql`: mean pinball loss over all the quantile levels / sum |y|)",
        "", to_markdown(summary),
        "`seconds`: training and forecasting wall time of each row (federated rows include Flower's simulation start-up).", "",
        *([f"## Seeds {seeds}: mean and standard deviation of every trained row (the table above is seed {seeds[0]}'s)", "",
           to_markdown(spread), ""] if spread is not None else []),
        "## Where shopcast loses", "",
        *(f"- {line}" for line in where_shopcast_loses(summary)), "",
        "## Per merchant (mean WQL over its series)", "",
        to_markdown(merchants),
        f"## {main_row} head to head (per series, WQL)", "",
        to_markdown(h2h),
        "## Privacy and traffic", "",
        *(f"- {line}" for line in privacy_lines(run) or ["no federated rows in this run"]), "",
        f"![accuracy]({bench.name}_accuracy.png)", "",
        f"![forecasts]({bench.name}_forecasts.png)", "",
    ])
    payload = {
        "benchmark": bench.name, "config": args.config, "overrides": overrides,
        "summary": summary.to_dict(orient="records"), "seeds": seeds,
        "seed_summaries": {seed: accuracy_summary(r.contest).to_dict(orient="records") for seed, r in runs.items()},
        "per_merchant": merchants.to_dict(orient="records"),
        "head_to_head": h2h.to_dict(orient="records"), "federation": run.summaries,
        "per_series": {name: frame.to_dict(orient="records") for name, frame in scores.items()},
    }
    return bench_run.save(bench.name, f"Accuracy benchmark `{bench.name}`: shopcast vs ablations vs today's tools",
                          describe(run, args.config, overrides, seeds), body, payload, args.results)


if __name__ == "__main__":
    command(main)
