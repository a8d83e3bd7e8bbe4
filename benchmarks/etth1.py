"""ETTh1 at horizon 96 in the literature's protocol, beside the published Time-LLM / GPT4TS / PatchTST figures.

    .venv/bin/python -m benchmarks.etth1 [configs/benchmarks/etth1.toml] [--set key=value ...]

Protocol (Informer's, which Time-LLM, GPT4TS and PatchTST reuse): train / validation / test are the
first 12 / next 4 / next 4 months of hourly data; each channel is z-scored with its training part's
mean and std; the model reads 512 hours and forecasts 96; MSE and MAE of the point forecast (here the
median) are averaged over every test window and all 7 channels. Each variant (the forecaster and the
configured ablations) is trained on all channels with the same fixed number of steps; two baselines
that need no training are scored alongside: the last value repeated, and the last day repeated.
The published figures are quoted, not re-run. Skips (exit 0) without ../shared/data/ETT/ETTh1.csv.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.scaffold import Run, arguments, command, data_missing, maxrss_mib
from shared.config import Config, load_config, parse_overrides
from shared.metrics import to_markdown
from shared.pipeline import ForecastPipeline
from shared.sources import load_table
from shared.windows import PromptEncoder, Windows, calendar_features, series_windows, stack_windows

TRAIN_HOURS, VAL_HOURS, TEST_HOURS = 12 * 30 * 24, 4 * 30 * 24, 4 * 30 * 24
# Jin et al., "Time-LLM: Time Series Forecasting by Reprogramming Large Language Models", ICLR 2024,
# Table 1 (long-term forecasting, ETTh1, horizon 96, context 512); the GPT4TS (Zhou et al., NeurIPS 2023),
# PatchTST (Nie et al., ICLR 2023) and DLinear (Zeng et al., AAAI 2023) rows are as that table reports them.
PUBLISHED = [
    ("Time-LLM (LLaMA-7B, published)", 0.362, 0.392),
    ("PatchTST (published)", 0.370, 0.399),
    ("DLinear (published)", 0.375, 0.399),
    ("GPT4TS (GPT-2, published)", 0.376, 0.397),
]


def channel_arrays(cfg: Config) -> tuple[pd.DatetimeIndex, np.ndarray, list[str]]:
    """Dates, the [T, channels] values z-scored on the training part, and the channel names."""
    table = load_table(cfg)  # validated like any merchant file
    wide = table.frame.pivot(index="ds", columns="unique_id", values="y").sort_index()
    train = wide.iloc[:TRAIN_HOURS]
    scaled = (wide - train.mean()) / train.std(ddof=0)
    return pd.DatetimeIndex(wide.index), scaled.to_numpy(dtype=np.float32), list(wide.columns)


def windows(values: np.ndarray, dates: pd.DatetimeIndex, starts: list[int], cfg: Config, encode_prompts: PromptEncoder) -> Windows:
    """Windows of every channel starting at `starts` (calendar features and an always-open flag as the
    only known covariates)."""
    L, H = cfg.data.context, cfg.data.horizon
    is_open = np.ones(len(dates), dtype=np.float32)
    known = np.concatenate([calendar_features(dates, cfg.data.freq), is_open[:, None]], axis=1)
    no_observed = np.zeros((len(dates), 0), dtype=np.float32)
    stacked = stack_windows([series_windows(values[:, c], no_observed, known, is_open, dates, starts, L, H, c)
                             for c in range(values.shape[1])])
    stacked.prompt_ids, stacked.prompt_mask = encode_prompts(stacked.context)
    return stacked


def errors(point: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {"mse": float(np.mean((point - target) ** 2)), "mae": float(np.mean(np.abs(point - target)))}


def main(argv: list[str] | None = None) -> Path | None:
    parser = arguments(__doc__)
    parser.add_argument("config", nargs="?", default="configs/benchmarks/etth1.toml")
    args = parser.parse_args(argv)
    if data_missing("etth1", "etth1"):
        return None

    overrides = parse_overrides(args.set)
    cfg = load_config(args.config, overrides)
    L, H = cfg.data.context, cfg.data.horizon
    rows, seconds = [], {}
    with Run("benchmarks.etth1", argv, threads=cfg.benchmark.threads) as run:
        dates, values, channels = channel_arrays(cfg)
        train_starts = list(range(0, TRAIN_HOURS - L - H + 1, cfg.data.stride))
        test_first = TRAIN_HOURS + VAL_HOURS - L
        test_starts = list(range(test_first, TRAIN_HOURS + VAL_HOURS + TEST_HOURS - L - H + 1, cfg.benchmark.test_stride))
        for variant in ("llm", *cfg.benchmark.ablations):
            vcfg = load_config(args.config, overrides | {"model.variant": variant})
            t = time.time()
            pipeline = ForecastPipeline.from_config(vcfg)
            train, test = (windows(values, dates, s, vcfg, pipeline.encode_prompts) for s in (train_starts, test_starts))
            result = pipeline.fit(train, steps=vcfg.train.max_steps)
            quantiles = pipeline.quantiles(test)
            median = quantiles[..., list(vcfg.model.quantiles).index(0.5)]
            name = "shopcast" if variant == "llm" else f"ablation_{variant}"
            seconds[name] = time.time() - t
            rows.append({"model": name, **errors(median, test.target), "steps": result.steps, "seconds": seconds[name]})
            print(f"[etth1] {name}: {rows[-1]['mse']:.3f} MSE, {rows[-1]['mae']:.3f} MAE after {result.steps} steps, "
                  f"{seconds[name]:.0f} s", flush=True)
            del pipeline
        context = test.context
        rows.append({"model": "repeat last value", **errors(np.repeat(context[:, -1:], H, axis=1), test.target)})
        rows.append({"model": "repeat last day", **errors(np.tile(context[:, -24:], H // 24), test.target)})

    measured = pd.DataFrame(rows)
    published = pd.DataFrame([{"model": m, "mse": mse, "mae": mae} for m, mse, mae in PUBLISHED])
    table = pd.concat([measured, published], ignore_index=True).sort_values("mse").reset_index(drop=True)
    ours = measured.set_index("model")
    best_published = published.loc[published["mse"].idxmin()]
    verdict = [
        f"shopcast MSE {ours.loc['shopcast', 'mse']:.3f} / MAE {ours.loc['shopcast', 'mae']:.3f} vs the best published row "
        f"({best_published['model']}) {best_published['mse']:.3f} / {best_published['mae']:.3f}: "
        + ("shopcast is worse." if ours.loc["shopcast", "mse"] > best_published["mse"] else "shopcast is better."),
        *(f"shopcast vs {a}: MSE {ours.loc['shopcast', 'mse']:.3f} vs {ours.loc[a, 'mse']:.3f} "
          f"({'the LLM helps' if ours.loc['shopcast', 'mse'] < ours.loc[a, 'mse'] else 'the LLM does not help'})."
          for a in ours.index if a.startswith("ablation_")),
        "Not like for like: the published models use a 7B (Time-LLM) or 124M (GPT-2) backbone, all its blocks, tens of "
        "epochs over every hourly window and a GPU; here the first "
        f"{cfg.model.llm_layers} blocks of `{cfg.model.backbone}`, {cfg.train.max_steps} steps of batch {cfg.train.batch_size} "
        "on 2 CPU cores, and a quantile head scored on its median.",
    ]
    extra = [
        f"config: `{args.config}`, overrides {overrides}; seed {cfg.model.seed}; channels {channels}",
        f"training: windows starting every {cfg.data.stride} h of the first 12 months ({len(train_starts)} per channel), "
        f"{cfg.train.max_steps} steps of batch {cfg.train.batch_size}, lr {cfg.train.lr}, backbone `{cfg.model.backbone}` "
        f"({cfg.model.llm_layers} blocks), patches {cfg.model.patch_len}/{cfg.model.patch_stride}",
        f"test: {len(test_starts)} origins every {cfg.benchmark.test_stride} h over the last 4 months x {len(channels)} channels "
        "(the papers use every hour: same windows in expectation, more noise here)",
        f"peak RSS: {maxrss_mib():.0f} MiB", *(f"{name} took {s:.0f} s" for name, s in seconds.items()),
    ]
    body = "\n".join([
        "## MSE / MAE (lower is better; `published` rows are quoted from the Time-LLM paper, not re-run)", "",
        to_markdown(table),
        "## Reading it", "",
        *(f"- {line}" for line in verdict), "",
    ])
    return run.save(cfg.benchmark.name, "ETTh1, horizon 96: MSE / MAE on z-scored data next to published figures", extra, body,
                    {"benchmark": cfg.benchmark.name, "config": args.config, "overrides": overrides, "rows": table.to_dict("records")},
                    args.results)


if __name__ == "__main__":
    command(main)
