"""Accuracy per CPU-second of the LLM path: how much prompt, how many blocks, which patches.

    .venv/bin/python -m benchmarks.llm_path [--config configs/benchmarks/synthetic.toml] [--steps 400]
                                            [--variants all|NAME,NAME] [--seeds 0] [--name llm_path]

Per window the prompt is most of the LLM's input (40 of 54 tokens by default) and the LLM's blocks
are most of the compute, so each is a knob on cost. Every variant trains the same pooled
(centralised) model for the same number of steps on one thread, in a fresh process, and reports:
training windows per CPU-second of `fit` (process CPU time, so other work on the machine barely
moves it), inference windows per CPU-second, and the test gmean WQL / MASE relative to seasonal
naive on every series of the config's data. Writes <results>/<name>.md and .json.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.scaffold import Run, arguments, command, quiet, reply, run_child, set_threads
from shared.config import load_config, parse_overrides
from shared.metrics import summarise
from shared.pipeline import ForecastPipeline
from shared.sources import load_table
from shared.train import predict
from shared.windows import concat_windows
from simulations.compare import Contest, add_seasonal_naive, merchant_splits

# name -> config overrides: L<blocks>, then the prompt (40 tokens: domain text and statistics, as today, which the
# speed benchmark measured at 11.5 training windows per CPU-second; stats16: its last 16 tokens, the window's
# statistics; noprompt), and patches 14/7: patch length 14, stride 7 (today 7/7)
VARIANTS: dict[str, dict[str, Any]] = {
    "L6-prompt40": {"model.llm_layers": 6, "model.prompt_max_tokens": 40},
    "L6-stats16": {"model.llm_layers": 6, "model.prompt_max_tokens": 16},
    "L6-noprompt": {"model.llm_layers": 6, "model.prompt": False},
    "L4-stats16": {"model.llm_layers": 4, "model.prompt_max_tokens": 16},
    "L2-prompt40": {"model.llm_layers": 2, "model.prompt_max_tokens": 40},
    "L2-stats16": {"model.llm_layers": 2, "model.prompt_max_tokens": 16},
    "L2-noprompt": {"model.llm_layers": 2, "model.prompt": False},
    "L2-stats16-patch14": {"model.llm_layers": 2, "model.prompt_max_tokens": 16,
                           "model.patch_len": 14, "model.patch_stride": 7},
    "no-llm": {"model.variant": "no_llm"},
}


def measure(args: Any) -> dict[str, Any]:
    """One variant and seed in this process: pooled training, then the test scores."""
    set_threads(1)
    name, seed = args.child.rsplit("#", 1)
    overrides = parse_overrides(args.set) | VARIANTS[name] | {"model.seed": int(seed), "train.seed": int(seed), "train.device": "cpu"}
    cfg = load_config(args.config, overrides)
    table = load_table(cfg)
    pipeline = ForecastPipeline.from_config(cfg, table)
    splits = merchant_splits(pipeline, table)
    cpu = time.process_time()
    pipeline.fit(concat_windows([s.train for s in splits.values()]), steps=args.steps)
    train_cpu = time.process_time() - cpu
    tests = concat_windows([s.test for s in splits.values()])
    cpu = time.process_time()
    predict(pipeline.model, tests, pipeline.device)
    infer_cpu = time.process_time() - cpu
    contest = Contest()
    contest.add("model", pipeline.forecast_merchants(splits), splits, cfg, train_cpu)
    add_seasonal_naive(contest, splits, cfg)
    summary = summarise(contest.scores).set_index("model").loc["model"]
    model = pipeline.model
    return {
        "train_windows_per_cpu_s": args.steps * cfg.train.batch_size / train_cpu,
        "infer_windows_per_cpu_s": len(tests) / infer_cpu,
        "train_cpu_s": train_cpu,
        "wql_gmean_rel": float(summary["wql_gmean_rel"]),
        "mase_gmean_rel": float(summary["mase_gmean_rel"]),
        "wql": float(summary["wql"]),
        "tokens": int(model.n_patches + model.n_future + (cfg.model.prompt_max_tokens if model.uses_prompt else 0)),
        "trainable": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
    }


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """One row per variant: means over seeds (spread in brackets when there are several)."""
    def cell(rows: list[dict[str, Any]], key: str, fmt: str) -> str:
        values = np.array([r[key] for r in rows], dtype=float)
        text = format(values.mean(), fmt)
        return text + (f" (±{values.std(ddof=1):{fmt}})" if len(values) > 1 else "")

    columns = [("tokens", "d"), ("trainable", ",d"), ("train_windows_per_cpu_s", ".1f"), ("infer_windows_per_cpu_s", ".1f"),
               ("wql_gmean_rel", ".3f"), ("mase_gmean_rel", ".3f"), ("wql", ".3f")]
    lines = ["| variant | " + " | ".join(k for k, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, rows in results.items():
        cells = [str(rows[0][k]) if f == "d" else f"{rows[0][k]:{f}}" if f == ",d" else cell(rows, k, f) for k, f in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, config_default="configs/benchmarks/synthetic.toml", children=True)
    parser.add_argument("--steps", type=int, default=400, help="pooled training steps of every variant")
    parser.add_argument("--variants", default="all", help="comma-separated names of VARIANTS, or all")
    parser.add_argument("--seeds", default="0", help="comma-separated model/train seeds")
    parser.add_argument("--name", default="llm_path")
    args = parser.parse_args(argv)
    if args.child:
        quiet(progress=False)
        reply(args, measure(args))
        return
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    with Run("benchmarks.llm_path", argv, threads=1) as run:
        for name in names:
            results[name] = []
            for seed in seeds:
                results[name].append(run_child("benchmarks.llm_path", run.argv, f"{name}#{seed}"))
                print(f"[llm_path] {name} seed {seed}: {results[name][-1]}", flush=True)
    extra = [
        f"config: `{args.config}` + {parse_overrides(args.set)}; every variant: {args.steps} steps of the pooled (centralised) "
        f"model on every merchant's training windows, 1 torch thread, fresh process; seeds {seeds} (model and train)",
        "windows per CPU-second: training windows (steps x batch) / process CPU time of `fit`; inference: test windows / "
        "CPU time of `predict`; `tokens`: the LLM's input length per window (prompt + patches + horizon tokens)",
        "accuracy: every series' test window, gmean over series of the ratio to seasonal naive (lower is better)",
    ]
    payload = {"benchmark": "llm_path", "args": vars(args), "variants": {n: VARIANTS[n] for n in names}, "results": results}
    run.save(args.name, "The LLM path: accuracy per CPU-second", extra, table(results), payload, args.results)


if __name__ == "__main__":
    command(main)
