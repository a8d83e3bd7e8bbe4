"""The personal part's check against its outcome: does the validation horizon that decides whether a
merchant keeps its refit (shared.personal) say what the refit then does on the test horizon?

    .venv/bin/python -m benchmarks.personal_gate configs/benchmarks/walmart.toml   # also synthetic.toml, online_retail.toml

From the shipped base (no federation, so the rows are reproducible from a checkout), each merchant
refits its output layers as `shopcast forecast` does; its mean pinball loss on the validation horizon
and on the test horizon is measured before and after (on validation, of the refits the check chose:
the layers kept are then rerun with the latest windows, validation's among them). A refit the check rejects changes nothing. A
check worth its name keeps refits whose test loss falls; where validation and test disagree in sign,
the shop's recent past misled it. Writes <results>/<benchmark.name>_personal_gate.md and .json.

`--origins N` repeats it N times, each with every series cut one horizon shorter: whether a loss on
the test horizon is the refit's habit or that horizon's own surprise. The base was pretrained without
each benchmark's last two horizons only, so from origin 2 on the test horizon is one it has seen:
its loss there is lower than it would be on unseen days, and the refit's change is understated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.scaffold import Run, arguments, command, dataset_config, quiet
from shared.metrics import to_markdown
from shared.pipeline import ForecastPipeline
from shared.schema import DS, ID, SeriesTable
from shared.sources import load_table
from simulations.compare import merchant_splits


def earlier_origin(table: SeriesTable, steps: int) -> SeriesTable:
    """The table with each series' last `steps` rows dropped: the same shops seen `steps` periods ago."""
    frame = table.frame
    return dataclasses.replace(table, frame=frame[frame.groupby(ID).cumcount(ascending=False) >= steps].reset_index(drop=True))


def main(argv: list[str] | None = None) -> Path | None:
    parser = arguments(__doc__)
    parser.add_argument("config", help="dataset config, e.g. configs/benchmarks/walmart.toml")
    parser.add_argument("--origins", type=int, default=1, help="test origins, each one horizon before the last (1: the benchmark's own)")
    args = parser.parse_args(argv)
    if args.origins < 1:
        parser.error("--origins must be at least 1")
    quiet(progress=True)
    if (loaded := dataset_config(args.config, args.set, "personal_gate")) is None:
        return None
    overrides, cfg, name = loaded
    table = load_table(cfg)
    rows = []
    with Run("benchmarks.personal_gate", argv, threads=cfg.benchmark.threads) as run:
        pipeline = ForecastPipeline.from_config(cfg, table)
        if pipeline.base is None:
            raise SystemExit("no shipped base adapter fits this config; pretrain one (python -m server.pretrain)")
        base = pipeline.state()
        for origin in range(args.origins):
            seen = earlier_origin(table, origin * cfg.data.horizon)
            for merchant, s in merchant_splits(pipeline, seen).items():
                pipeline.restore(base)
                test_before = pipeline.loss(s.test)
                # the refits the check chose, before the rerun with the latest windows
                val_before, val_after, steps = pipeline.personalise(s)
                test_after = pipeline.loss(s.test)
                rows.append({"origin": origin, "test_ends": str(s.test_actuals()[DS].max().date()), "merchant": merchant,
                             "train_windows": len(s.train), "val_windows": len(s.val), "kept": steps > 0, "steps": steps,
                             "val_change": val_after / val_before - 1, "test_change": test_after / test_before - 1,
                             "val_before": val_before, "test_before": test_before})
    per_merchant = pd.DataFrame(rows)
    tally = pd.DataFrame([tally_row(origin, group) for origin, group in per_merchant.groupby("origin")])
    print(per_merchant.to_string(), "\n", tally.to_string(), flush=True)
    extra = [f"config: `{args.config}`, overrides {overrides}; base: the shipped one that fits; "
             f"{cfg.train.personal_refits} refits x {cfg.train.personal_steps} steps at lr {cfg.train.personal_lr}, "
             f"train seed {cfg.train.seed}; "
             f"{args.origins} origin(s), one horizon ({cfg.data.horizon} steps) apart; "
             "loss: the model's mean pinball loss over the quantile levels, in the window's scale"]
    body = "\n".join([
        "## Refits the check kept, and what they did on the test horizon (origin k: every series cut k horizons shorter)", "",
        to_markdown(tally),
        "## Per merchant (`*_change`: relative change of the loss after the refit; 0 where the check rejected it)", "",
        to_markdown(per_merchant),
    ])
    payload = {"config": args.config, "overrides": overrides, "origins": args.origins, "tally": tally.to_dict(orient="records"),
               "per_merchant": per_merchant.to_dict(orient="records")}
    return run.save(name, f"Personal part `{cfg.benchmark.name}`: its validation check against its test outcome",
                    extra, body, payload, args.results)


def tally_row(origin: int, per_merchant: pd.DataFrame) -> dict[str, object]:
    kept = per_merchant[per_merchant["kept"]]
    return {
        "origin": origin, "test_ends": per_merchant["test_ends"].max(), "merchants": len(per_merchant), "kept": len(kept),
        "kept_and_test_better": int((kept["test_change"] < 0).sum()),
        "kept_and_test_worse": int((kept["test_change"] > 0).sum()),
        "mean_test_change_kept": float(kept["test_change"].mean()) if len(kept) else np.nan,
    }


if __name__ == "__main__":
    command(main)
