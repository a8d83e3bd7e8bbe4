"""Pretrains the base adapter centrally on public and synthetic retail series: the starting point of
every local, federated and DP run (`[model] base`).

    .venv/bin/python -m server.pretrain [--config configs/pretrain_daily.toml] [--set pretrain.steps=3000 ...]

Public pretraining, then private fine-tuning (Li et al. 2022, Yu et al. 2022): what every shop has
in common (weekly rhythm, promotions, holidays, closed days) is learnt once, from data no merchant
owns, so a merchant's few (or noisy) steps only adapt it. The corpus is the synthetic retail prior
(shared.prior) in the config's covariate roles and slots, plus the `public` presets without the merchants a
benchmark scores and without any series' last two horizons (validation and test), so no benchmark's
test period is ever seen. A few prior shops are held out for the loss curve.

Training runs in chunks of `checkpoint_every` steps; after each the adapter and the loss curve are
written under `<out>/<variant>/`, so a run stopped at any point resumes from its last chunk (AdamW
restarts its moments at each chunk). The end writes the adapter, its loss curve and a model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from shared.adapter import load_adapter
from shared.config import PROJECT_ROOT, Config, ConfigError, load_config, parse_overrides, with_overrides
from shared.pipeline import ForecastPipeline
from shared.presets import RETAIL_COUNTRIES, load_online_retail, load_walmart
from shared.prior import retail_prior
from shared.schema import DS, ID, MERCHANT, SeriesTable, prepare, role_names
from shared.train import evaluate_loss
from shared.windows import Windows, concat_windows

PROGRESS = "progress.json"


def in_slots(frame: pd.DataFrame, cfg: Config, roles: Mapping[str, str], observed: list[str], is_open: str | None) -> pd.DataFrame:
    """A corpus frame with its covariates renamed onto the config's: the corpus column `roles` names for a
    role (promo, holiday) under the first of the config's columns of that role, so it lands in that role's
    slot; its observed covariates slot by slot (its first becomes the config's first, ...); every column
    it lacks or names "" zeros; and the open flag under the config's name (dropped where the config has none)."""
    columns = cfg.data.columns
    out = frame[[MERCHANT, ID, DS, "y"]].copy()
    for name in (*role_names(columns), *columns.known):
        out[name] = 0.0
    for role, mine in roles.items():
        if getattr(columns, role):
            out[getattr(columns, role)[0]] = frame[mine].to_numpy()
    for i, name in enumerate(columns.observed):
        out[name] = frame[observed[i]].to_numpy() if i < len(observed) and observed[i] else 0.0
    if columns.open:
        out[columns.open] = frame[is_open].to_numpy() if is_open else 1.0
    return out.rename(columns={"y": columns.y, MERCHANT: columns.merchant_id or MERCHANT, ID: columns.unique_id, DS: columns.ds})


def _without_last_horizons(frame: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """Each series without its last two horizons: the validation and test steps a benchmark scores."""
    return frame[frame.groupby(ID).cumcount(ascending=False) >= 2 * horizon]


def public_frames(cfg: Config) -> list[pd.DataFrame]:
    """The `public` presets, in the config's slots, without the benchmark's merchants and last horizons."""
    frames = []
    if "online_retail" in cfg.pretrain.public:
        others = ("Spain", "Netherlands", "Belgium", "Switzerland", "Portugal", "Australia", "Norway", "Italy")
        assert not set(others) & set(RETAIL_COUNTRIES)
        raw = _without_last_horizons(load_online_retail(others, 8), cfg.data.horizon)
        frames.append(in_slots(raw, cfg, {}, ["n_invoices"], "open"))
    if "walmart" in cfg.pretrain.public:
        stores = tuple(range(6, 46))  # every store but the five the benchmark scores
        raw = _without_last_horizons(load_walmart(stores, 10), cfg.data.horizon)
        frames.append(in_slots(raw, cfg, {"promo": "markdown", "holiday": "is_holiday"}, ["temperature", "fuel_price"], None))
    return frames


def corpus(cfg: Config) -> tuple[SeriesTable, SeriesTable]:
    """(training shops, held-out prior shops) as validated tables."""
    p = cfg.pretrain
    weekly = cfg.data.freq.upper().startswith("W")
    prior = in_slots(retail_prior(p.shops + p.validation_shops, p.seed, weekly=weekly), cfg, {role: role for role in p.prior_known},
                     list(p.prior_observed), "open")
    merchant_column = cfg.data.columns.merchant_id or MERCHANT
    held_out = prior[merchant_column].isin(sorted(prior[merchant_column].unique())[-p.validation_shops:])
    data = cfg.data
    train = prepare(pd.concat([prior[~held_out], *public_frames(cfg)], ignore_index=True), data, "pretraining corpus")
    return train, prepare(prior[held_out].reset_index(drop=True), data, "pretraining validation")


def corpus_windows(pipeline: ForecastPipeline, table: SeriesTable, per_shop: int, seed: int) -> tuple[Windows, Windows]:
    """(training windows: at most `per_shop` per shop, drawn at random; every shop's validation windows)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for merchant in tqdm(table.merchants(), desc="cutting windows", unit="shop"):
        splits = pipeline.splits(table.for_merchant(merchant))
        pick = rng.choice(len(splits.train), min(per_shop, len(splits.train)), replace=False)
        train.append(splits.train.subset(np.sort(pick)))
        val.append(splits.val)
    return concat_windows(train), concat_windows(val)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def model_card(cfg: Config, progress: dict, train: SeriesTable, validation: SeriesTable) -> str:
    m, p = cfg.model, cfg.pretrain
    curve = "\n".join(f"| {h['step']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {h['seconds']:.0f} |" for h in progress["history"])
    return f"""# Base adapter `{m.variant}` ({cfg.data.freq}, context {cfg.data.context}, horizon {cfg.data.horizon})

Pretrained by `python -m server.pretrain {progress['command']}` at commit {progress['commit']}; {progress['steps']} steps of
batch {p.batch_size}, lr {p.lr}, {progress['seconds'] / 60:.1f} min on {progress['machine']}.

- model: backbone `{m.backbone}` ({m.llm_layers} blocks), variant `{m.variant}`, LoRA r={m.lora.r} on {list(m.lora.targets)},
  patches {m.patch_len}/{m.patch_stride}, prompt {m.prompt_max_tokens if m.prompt else 0} tokens, known slots {m.known_slots},
  observed slots {m.observed_slots}, quantiles {list(m.quantiles)}
- corpus: {train.frame[MERCHANT].nunique()} shops, {train.frame[ID].nunique()} series, {len(train.frame):,} steps
  ({p.shops} synthetic retail-prior shops drawn, shared/prior.py, seed {p.seed}, those shorter than context + 3 horizons dropped; \
public: {list(p.public) or 'none'}, without the
  merchants a benchmark scores and without every series' last two horizons); {p.windows_per_shop} training windows per shop
- validation: {validation.frame[ID].nunique()} series of {p.validation_shops} held-out prior shops (their validation windows)

| step | train loss (last chunk) | validation loss | seconds |
|---:|---:|---:|---:|
{curve}
"""


def pretrain(cfg: Config, command: str) -> Path:
    """Runs (or resumes) the pretraining of cfg.model.variant; returns the adapter's folder."""
    cfg = with_overrides(cfg, {"model.base": "", "train.batch_size": cfg.pretrain.batch_size, "train.lr": cfg.pretrain.lr,
                               "data.short_series": "drop", "data.stride": cfg.pretrain.stride or cfg.data.horizon})
    out = (PROJECT_ROOT / cfg.pretrain.out / cfg.model.variant).resolve()
    train_table, validation_table = corpus(cfg)
    pipeline = ForecastPipeline.from_config(cfg, train_table)
    train, _ = corpus_windows(pipeline, train_table, cfg.pretrain.windows_per_shop, cfg.pretrain.seed)
    _, val = corpus_windows(pipeline, validation_table, 1, cfg.pretrain.seed)
    progress = {"steps": 0, "seconds": 0.0, "history": [], "command": command}
    if (out / PROGRESS).exists():
        progress = json.loads((out / PROGRESS).read_text())
        load_adapter(pipeline.model, out)
        tqdm.write(f"resuming {out} at step {progress['steps']}")
    total, chunk = cfg.pretrain.steps, cfg.pretrain.checkpoint_every
    with tqdm(total=total, initial=progress["steps"], desc=f"pretraining {cfg.model.variant}", unit="step") as bar:
        while progress["steps"] < total:
            started = time.time()
            steps = min(chunk, total - progress["steps"])
            result = pipeline.fit(train, steps=steps, seed=cfg.pretrain.seed + progress["steps"], on_step=lambda _: bar.update(1))
            progress["steps"] += steps
            progress["seconds"] += time.time() - started
            progress["history"].append({"step": progress["steps"], "train_loss": result.train_loss,
                                        "val_loss": evaluate_loss(pipeline.model, val, pipeline.device), "seconds": progress["seconds"]})
            bar.set_postfix(val=f"{progress['history'][-1]['val_loss']:.4f}")
            pipeline.save(out, {"pretrained": {k: v for k, v in progress.items() if k != "history"}})
            (out / PROGRESS).write_text(json.dumps(progress, indent=1))
    progress.update(commit=_commit(), machine=f"{len(os.sched_getaffinity(0))} cores")
    (out / "MODEL_CARD.md").write_text(model_card(cfg, progress, train_table, validation_table))
    (out / PROGRESS).write_text(json.dumps(progress, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "pretrain_daily.toml"))
    parser.add_argument("--set", action="append", default=[], help="dotted override, e.g. pretrain.steps=500 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    cfg = load_config(args.config, parse_overrides(args.set))
    command = " ".join(["--config", args.config, *(f"--set {s}" for s in args.set)])
    print(f"base adapter written to {pretrain(cfg, command)}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
