"""Personal refits: how much one merchant's refit of its output layers depends on its batch order,
and what averaging several buys ([train] personal_refits, shared.personal).

    .venv/bin/python -m benchmarks.personal_refits configs/benchmarks/walmart.toml   # also synthetic.toml, online_retail.toml
                     [--refits 1,4] [--seeds 0,1,2]

Every row starts from the shipped base (no federation, so the only randomness is the refit's own) and
refits each merchant's output layers on its windows, `refits` times averaged, under train seeds
`seeds`; the spread over seeds is what one merchant would see from one run to the next. Scored on the
test horizon beside seasonal naive and per-merchant LightGBM. Writes
<results>/<benchmark.name>_personal_refits.md and .json.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.scaffold import Run, arguments, command, dataset_config, quiet
from shared.config import with_overrides
from shared.metrics import to_markdown
from shared.pipeline import ForecastPipeline
from shared.sources import load_table
from simulations.compare import Contest, add_lightgbm, add_seasonal_naive, merchant_splits, personalised
from simulations.report import accuracy_summary


def main(argv: list[str] | None = None) -> Path | None:
    parser = arguments(__doc__)
    parser.add_argument("config", help="dataset config, e.g. configs/benchmarks/walmart.toml")
    parser.add_argument("--refits", default="1,4", help="comma-separated personal_refits to compare")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train seeds")
    args = parser.parse_args(argv)
    quiet(progress=True)
    if (loaded := dataset_config(args.config, args.set, "personal_refits")) is None:
        return None
    overrides, cfg, name = loaded
    refits, seeds = [int(k) for k in args.refits.split(",")], [int(s) for s in args.seeds.split(",")]
    table = load_table(cfg)
    rows = []
    with Run("benchmarks.personal_refits", argv, threads=cfg.benchmark.threads) as run:
        pipeline = ForecastPipeline.from_config(cfg, table)
        if pipeline.base is None:
            raise SystemExit("no shipped base adapter fits this config; pretrain one (python -m server.pretrain)")
        splits = merchant_splits(pipeline, table)
        contest = Contest()
        for k in refits:
            for seed in seeds:
                refitting = ForecastPipeline.from_config(with_overrides(cfg, {"train.personal_refits": k, "train.seed": seed}), table)
                contest.add(f"refits_{k}_seed_{seed}", personalised(refitting, splits), splits, cfg, 0.0)
        add_seasonal_naive(contest, splits, cfg)
        history = pd.concat([s.history_before_test() for s in splits.values()])
        add_lightgbm(contest, splits, cfg, table.known, history)
        summary = accuracy_summary(contest).set_index("model")
        for k in refits:
            mine = summary.loc[[f"refits_{k}_seed_{seed}" for seed in seeds]]
            rows.append({"personal_refits": k, "wql_gmean_rel": mine["wql_gmean_rel"].mean(),
                         "wql_gmean_rel_sd": mine["wql_gmean_rel"].std(),
                         "wql_gmean_rel_min": mine["wql_gmean_rel"].min(), "wql_gmean_rel_max": mine["wql_gmean_rel"].max(),
                         "mase_gmean_rel": mine["mase_gmean_rel"].mean(), "coverage_80": mine["coverage_80"].mean()})
    spread = pd.DataFrame(rows)
    print(spread.to_string(), flush=True)
    references = summary.loc[[m for m in summary.index if not m.startswith("refits_")]].reset_index()
    extra = [f"config: `{args.config}`, overrides {overrides}; base: the shipped one that fits; personal_refits {refits}, "
             f"train seeds {seeds}; {cfg.train.personal_steps} steps per refit at lr {cfg.train.personal_lr}"]
    body = "\n".join([
        f"## From the base, each merchant's output layers refitted: mean, spread and range over seeds {seeds}", "", to_markdown(spread),
        "## References on the same test horizon", "", to_markdown(references),
        "## Every row", "", to_markdown(summary.reset_index()),
    ])
    payload = {"config": args.config, "overrides": overrides, "refits": refits, "seeds": seeds,
               "spread": spread.to_dict(orient="records"), "summary": summary.reset_index().to_dict(orient="records")}
    return run.save(name, f"Personal refits `{cfg.benchmark.name}`: one refit's spread over seeds, and averaging several",
                    extra, body, payload, args.results)


if __name__ == "__main__":
    command(main)
