"""First accuracy table on real data: Walmart stores trained locally, against the usual baselines.

    .venv/bin/python -m benchmarks.walmart_local [--stores 1,2,3] [--depts 10] [--steps 100] [--threads 2] [--seed 0]

Each store is one merchant and trains its own adapter from the same initial one (simulations.compare
.local_only: fixed step budget, no early stopping, no DP), once per variant: the LLM forecaster
(`llm`) and its no-LLM ablation (`no_llm`, the same patches, reprogramming and head without the
frozen blocks). Seasonal naive, AutoETS, AutoTheta and per-store LightGBM are fitted on the same
histories (simulations.compare.baselines). All are scored on the same last `horizon` weeks of each
department: mean MASE / WQL, and the Chronos-style geometric mean relative to seasonal naive.
Needs ../shared/data/walmart_weekly (or SHOPCAST_SHARED_DATA); exits 0 with a message without it.
Writes benchmarks/results/walmart_local.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from benchmarks._common import Monitor, finish_info, header, machine, maxrss_mib, set_threads, write
from shared.presets import SHARED_DATA, preset_available

COLUMNS = ["model", "mase", "wql", "mase_gmean_rel", "wql_gmean_rel", "smape", "coverage_80", "seconds"]


def head_to_head(scores: dict[str, pd.DataFrame], model: str, others: list[str], metric: str = "wql") -> pd.DataFrame:
    """Share of series on which `model` beats each other contender (lower `metric`), and the median ratio."""
    keys = ["merchant_id", "unique_id"]
    mine = scores[model].set_index(keys)[metric]
    rows = []
    for other in others:
        theirs = scores[other].set_index(keys)[metric].reindex(mine.index)
        usable = mine.notna() & theirs.notna()
        ratio = (mine[usable] / theirs[usable]).replace([np.inf, -np.inf], np.nan).dropna()
        rows.append({"versus": other, "series": int(usable.sum()), f"{model} better ({metric})": float((mine[usable] < theirs[usable]).mean()),
                     f"median {metric} ratio": float(ratio.median()) if len(ratio) else float("nan")})
    return pd.DataFrame(rows)


def narrative(summary: pd.DataFrame, stores: pd.DataFrame, main: str, ablation: str) -> list[str]:
    """Plain sentences on where the forecaster loses, generated from the numbers."""
    s = summary.set_index("model")
    lines = []
    for metric in ("wql", "mase"):
        better = [m for m in s.index if m != main and s.loc[m, metric] < s.loc[main, metric]]
        rank = 1 + len(better)
        lines.append(
            f"Mean {metric.upper()}: {main} = {s.loc[main, metric]:.3f}, rank {rank} of {len(s)}"
            + (f"; beaten by {', '.join(f'{m} ({s.loc[m, metric]:.3f})' for m in sorted(better, key=lambda m: s.loc[m, metric]))}." if better else ".")
        )
    rel = s.loc[main, "wql_gmean_rel"]
    lines.append(f"Geometric-mean WQL relative to seasonal naive: {main} {rel:.3f} ({'better' if rel < 1 else 'worse'} than seasonal naive on the typical series), "
                 f"{ablation} {s.loc[ablation, 'wql_gmean_rel']:.3f}.")
    diff = s.loc[main, "wql"] - s.loc[ablation, "wql"]
    lines.append(f"LLM vs no-LLM ablation (same steps, same data): mean WQL {s.loc[main, 'wql']:.3f} vs {s.loc[ablation, 'wql']:.3f} "
                 f"({'the LLM helps' if diff < 0 else 'the LLM does not help'} here, difference {diff:+.3f}).")
    for store, group in stores.groupby("merchant_id"):
        g = group.set_index("model")["wql"]
        best = g.idxmin()
        lines.append(f"{store}: best mean WQL {best} ({g[best]:.3f}); {main} {g[main]:.3f}, {ablation} {g[ablation]:.3f}, seasonal naive {g['seasonal_naive']:.3f}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/walmart.toml")
    parser.add_argument("--stores", default="1,2,3")
    parser.add_argument("--depts", type=int, default=10, help="largest full-length departments kept per store")
    parser.add_argument("--steps", type=int, default=100, help="local training steps per store, the same for every variant")
    parser.add_argument("--variants", default="llm,no_llm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="dotted config override")
    parser.add_argument("--name", default="walmart_local")
    args = parser.parse_args()

    if not preset_available("walmart"):
        print(f"walmart_local: skipped, {SHARED_DATA / 'walmart_weekly'} (train.csv, features.csv) not found; "
              "set SHOPCAST_SHARED_DATA to the folder holding walmart_weekly/")
        sys.exit(0)

    from shared.config import load_config, parse_overrides
    from shared.local import build_model, load_table
    from shared.metrics import per_merchant, summarise, to_markdown
    from simulations.compare import Contest, baselines, local_only, merchant_splits

    set_threads(args.threads)
    info = machine()
    stores = [f"store_{int(s)}" for s in args.stores.split(",")]
    base: dict[str, Any] = {"data.merchants": stores, "data.max_series_per_merchant": args.depts, "model.seed": args.seed,
                            "train.seed": args.seed, "train.device": "cpu"} | parse_overrides(args.set)
    cfg = load_config(args.config, base)
    started = time.time()
    contest = Contest()
    variants = args.variants.split(",")
    timings: dict[str, Any] = {}
    with Monitor() as monitor:
        table = load_table(cfg)
        splits = None
        for variant in variants:
            vcfg = load_config(args.config, base | {"model.variant": variant})
            t = time.time()
            model = build_model(vcfg, table)
            splits = merchant_splits(table, vcfg, model)
            build = time.time() - t
            t = time.time()
            parts = []
            for merchant, s in splits.items():  # one store at a time: same as local_only over all, with progress
                parts.append(local_only(model, {merchant: s}, vcfg, args.steps))
                print(f"[walmart] {variant} {merchant}: {time.time() - t:.0f} s", flush=True)
            forecast = pd.concat(parts, ignore_index=True)
            seconds = time.time() - t
            contest.add(f"shopcast_{variant}", forecast, splits, vcfg, seconds)
            timings[variant] = {"build_s": build, "train_and_predict_s": seconds, "s_per_step": seconds / (args.steps * len(splits))}
            print(f"[walmart] {variant}: built in {build:.0f} s, {len(splits)} stores x {args.steps} steps + predict in {seconds:.0f} s", flush=True)
            del model
        baselines(contest, splits, cfg, table.known)
    wall = time.time() - started
    info = finish_info(info)

    summary = summarise(contest.scores)
    summary["seconds"] = summary["model"].map(contest.seconds)
    summary = summary[COLUMNS].sort_values("wql").reset_index(drop=True)
    stores_frame = per_merchant(contest.scores)
    by_store = stores_frame.pivot(index="model", columns="merchant_id", values="wql").reset_index()
    by_store.columns = ["model", *[f"WQL {c}" for c in by_store.columns[1:]]]
    by_store_mase = stores_frame.pivot(index="model", columns="merchant_id", values="mase").reset_index()
    by_store = by_store.merge(by_store_mase.rename(columns={c: f"MASE {c}" for c in by_store_mase.columns[1:]}), on="model")
    by_store = by_store.set_index("model").loc[summary["model"]].reset_index()
    main_name, ablation = f"shopcast_{variants[0]}", f"shopcast_{variants[1]}" if len(variants) > 1 else None
    others = [m for m in summary["model"] if m != main_name]
    h2h = head_to_head(contest.scores, main_name, others)
    lines = narrative(summary, stores_frame, main_name, ablation) if ablation else []

    series = table.frame.groupby("merchant_id")["unique_id"].nunique().to_dict()
    weeks = int(table.frame.groupby("unique_id").size().iloc[0])
    train_windows = {m: len(s.train) for m, s in splits.items()}
    extra = [
        f"config: `{args.config}` + {base}: context {cfg.data.context} weeks, horizon {cfg.data.horizon} weeks, batch "
        f"{cfg.train.batch_size}, lr {cfg.train.lr}, backbone `{cfg.model.backbone}` ({cfg.model.llm_layers} blocks), LoRA r={cfg.model.lora.r}",
        f"subset: stores {', '.join(stores)}; per store the {args.depts} full-length departments with the largest total sales "
        f"({series}); {weeks} weeks each; training windows per store {train_windows}",
        f"training: per-store local training (simulations.compare.local_only), {args.steps} steps per store for every variant, "
        f"no early stopping, no DP; seed {args.seed} (one seed: differences of a few percent are within seed noise)",
        f"test: the last {cfg.data.horizon} weeks of every department; validation weeks before them are unused here",
        f"peak RSS of the process: {maxrss_mib():.0f} MiB",
    ]
    markdown = "\n".join([
        header("Walmart, local training per store: forecaster vs ablation vs baselines", info, monitor.summary(), wall, extra),
        "## Accuracy over all departments (lower is better; *_gmean_rel: geometric mean of the ratio to seasonal naive)", "",
        to_markdown(summary),
        "## Per store (mean over its departments)", "",
        to_markdown(by_store),
        f"## {main_name} head to head (per department, WQL)", "",
        to_markdown(h2h),
        "## Where the forecaster loses", "",
        *(f"- {line}" for line in lines), "",
    ])
    print(markdown)
    payload = {
        "benchmark": "walmart_local", "args": vars(args), "config_overrides": base, "machine": info, "load": monitor.summary(),
        "wall_s": wall, "timings": timings, "summary": summary.to_dict(orient="records"), "per_store": stores_frame.to_dict(orient="records"),
        "head_to_head": h2h.to_dict(orient="records"),
        "per_series": {name: frame.to_dict(orient="records") for name, frame in contest.scores.items()},
    }
    print(f"wrote {write(args.name, markdown, payload)}")


if __name__ == "__main__":
    main()
