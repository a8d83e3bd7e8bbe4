"""What DP-SGD costs a federation: accuracy against ε on Walmart, and DP vs non-DP step time.

    .venv/bin/python -m benchmarks.dp_accuracy [--stores 1,2,3] [--depts 15] [--rounds 3] [--local-steps 20]
                                                [--layers 6] [--epsilons 1,4,8] [--baselines all|naive]

Each store is a merchant (its `--depts` largest full-length departments are its series). The real
ServerApp and ClientApp run through Flower's simulation engine (simulations.federated.federate),
once without DP and once per ε with DP-SGD at the series level (privacy.target_epsilon = ε). Every
merchant trains `rounds x local-steps` steps in all; the noise multiplier is chosen with opacus'
get_noise_multiplier(ε, δ, q, rounds x local-steps, accountant="rdp"), q being the sample rate the
merchant's ledger is charged (shared.privacy.PrivateTraining: one unit per series), so the planned
steps spend the whole budget and each merchant's ledger ends at ε. The final global adapter of each
run is scored on the same last `horizon` weeks of every department (simulations.compare:
merchant_splits, Contest), next to the untrained initial adapter, seasonal naive
and (with --baselines all) AutoETS, AutoTheta and per-store LightGBM: mean MASE / WQL and their
geometric means relative to seasonal naive.

Step time, DP-SGD vs non-DP: quoted from benchmarks.speed's results (benchmarks/results/speed_*.json)
when they exist; otherwise fwd + bwd + AdamW is timed here on identical batches of Walmart windows,
without and with DP-SGD (Opacus through PrivateTraining.attach), for this run's block count and 6.

Needs ../shared/data/walmart_weekly (or SHOPCAST_SHARED_DATA); exits 0 with a message without it.
Writes benchmarks/results/dp_accuracy.md and .json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.scaffold import RESULTS, Run, arguments, command, data_missing, maxrss_mib, quiet
from benchmarks.speed import dp_vs_nondp

WORK = Path(tempfile.gettempdir()) / "shopcast_bench_dp_accuracy"


def step_times(cfg, table, layers: int, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    """Median fwd+bwd+AdamW step on identical batches of one merchant's windows, non-DP vs DP-SGD."""
    import torch

    from shared.config import with_overrides
    from shared.ledger import PrivacyLedger
    from shared.pipeline import ForecastPipeline
    from shared.privacy import PrivateTraining

    cfg = with_overrides(cfg, {"model.llm_layers": layers, "privacy.enabled": True, "privacy.noise_multiplier": 1.0})
    pipeline = ForecastPipeline.from_config(cfg, table)
    model = pipeline.model
    train = pipeline.splits(table.for_merchant(table.merchants()[0])).train
    B = cfg.train.batch_size
    rng = np.random.default_rng(seed)
    batches = [rng.choice(len(train), size=B, replace=False) for _ in range(warmup + steps)]
    with tempfile.TemporaryDirectory() as ledgers:
        private = PrivateTraining(cfg, PrivacyLedger(Path(ledgers) / "t.json", 8.0, cfg.privacy.delta, cfg.privacy.unit), train)
        (nondp, _), (dp, _) = dp_vs_nondp(model, private, train, batches, cfg.train, torch.device("cpu"), warmup)
    return {"llm_layers": layers, "batch_size": B, "steps": steps, "warmup": warmup, "step_s_nondp": float(np.median(nondp)),
            "step_s_dp": float(np.median(dp)), "dp_over_nondp": float(np.median(dp) / np.median(nondp)),
            "step_s_nondp_all": nondp, "step_s_dp_all": dp,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def speed_results() -> list[dict[str, Any]]:
    """benchmarks.speed's DP / non-DP step times for the LLM forecaster, from every speed_*.json it has written here."""
    found = []
    for path in sorted(RESULTS.glob("speed_*.json")):
        try:
            data = json.loads(path.read_text())
            llm = data["results"]["llm"]
            keys = ("step_s_nondp", "step_s_dp", "dp_over_nondp", "step_cpu_s_nondp", "step_cpu_s_dp", "dp_over_nondp_cpu")
            found.append({
                "file": f"benchmarks/results/{path.name}", "threads": data.get("args", {}).get("threads"),
                "device": llm.get("device"), "overrides": data.get("overrides"), "sequence_tokens": llm.get("sequence_tokens"),
                "load": data.get("load", {}).get("other_processes_cores_mean"),
                "by_batch": {b: {k: r.get(k) for k in keys} for b, r in llm["by_batch"].items()},
            })
        except (KeyError, ValueError, TypeError, AttributeError):
            continue
    return found


def speed_table(found: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for f in found:
        for batch, r in f["by_batch"].items():
            rows.append({"source": f"`{f['file']}`", "device": f["device"], "torch threads": f["threads"], "batch": batch,
                         "non-DP s/step": r["step_s_nondp"], "DP s/step": r["step_s_dp"], "DP / non-DP (wall)": r["dp_over_nondp"],
                         "DP / non-DP (CPU time)": r.get("dp_over_nondp_cpu"), "other processes' cores": f["load"],
                         "overrides": str(f["overrides"])})
    return pd.DataFrame(rows)


def digest(summary: dict[str, Any]) -> dict[str, Any]:
    """Per-merchant steps, ε and failures from the server's summary.json."""
    history = summary.get("history", [])
    steps: dict[str, int] = {}
    eps: dict[str, float] = {}
    for r in history:
        for pid, m in r.get("merchants", {}).items():
            if "steps" in m:
                steps[pid] = steps.get(pid, 0) + int(m["steps"])
            if "epsilon" in m:
                eps[pid] = float(m["epsilon"])
    return {"rounds": summary.get("rounds"), "steps_per_merchant": steps, "epsilon_per_merchant": eps,
            "failures": sum(len(r.get("failures", [])) for r in history), "rejected": sum(len(r.get("rejected", [])) for r in history),
            "round_train_s": [float(r["wall_s"]) for r in history if "wall_s" in r],
            "eval_wql_by_round": [r.get("aggregated", {}).get("eval-wql") for r in history]}


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__, config_default="configs/walmart.toml")
    parser.add_argument("--stores", default="1,2,3")
    parser.add_argument("--depts", type=int, default=15, help="largest full-length departments kept per store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=6, help="backbone blocks kept (the config's 6; 2 if 6 do not fit your time budget)")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--baselines", default="all", choices=["all", "naive"])
    parser.add_argument("--timing-layers", default="auto",
                        help="block counts to time DP vs non-DP steps for here, e.g. 2,6; auto: none when benchmarks.speed "
                             "results exist (they are quoted), else this run's count and 6; '' skips")
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="dp_accuracy")
    args = parser.parse_args(argv)
    if data_missing("walmart", "dp_accuracy"):
        return
    quiet(progress=False)

    from shared.config import load_config, parse_overrides
    from shared.metrics import per_merchant, to_markdown
    from shared.pipeline import ForecastPipeline
    from shared.privacy import noise_for, sample_rate
    from shared.rundir import fresh_run_dir
    from shared.sources import load_table
    from simulations.compare import Contest, add_federated, baselines, merchant_splits
    from simulations.federated import federate
    from simulations.report import accuracy_summary, merchant_wql

    stores = [f"store_{int(s)}" for s in args.stores.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    planned = args.rounds * args.local_steps
    base: dict[str, Any] = {
        "data.merchants": stores, "data.max_series_per_merchant": args.depts, "model.llm_layers": args.layers,
        "model.seed": args.seed, "train.seed": args.seed, "train.device": "cpu", "federation.num_merchants": len(stores),
        "federation.num_rounds": args.rounds, "federation.local_steps": args.local_steps, "federation.min_replies": len(stores),
    } | parse_overrides(args.set)
    cfg = load_config(args.config, base)
    default_layers = load_config(args.config).model.llm_layers
    contest = Contest()
    runs: dict[str, dict[str, Any]] = {}
    with Run("benchmarks.dp_accuracy", argv, threads=args.threads) as run:
        table = load_table(cfg)
        pipeline = ForecastPipeline.from_config(cfg, table)
        initial = pipeline.state()
        splits = merchant_splits(pipeline, table)
        rates = {m: sample_rate(cfg, s.train) for m, s in splits.items()}  # what each merchant's ledger is charged
        q = max(rates.values())  # one noise multiplier for all: the one the most-sampled merchant needs
        print(f"[dp_accuracy] {len(splits)} stores, series {table.frame.groupby('merchant_id')['unique_id'].nunique().to_dict()}, "
              f"sample rates {rates}, {planned} planned steps per merchant", flush=True)

        settings: list[tuple[str, dict[str, Any], dict[str, Any]]] = [("shopcast_federated", {"privacy.enabled": False}, {})]
        for eps in epsilons:
            t = time.time()
            sigma = noise_for(eps, cfg.privacy.delta, q, planned)
            settings.append((f"shopcast_federated_dp_eps{eps:g}", {"privacy.enabled": True, "privacy.target_epsilon": eps,
                                                                   "privacy.noise_multiplier": sigma},
                             {"epsilon_target": eps, "noise_multiplier": sigma, "sample_rate": q, "noise_search_s": time.time() - t}))
        for name, extra, meta in settings:
            out = fresh_run_dir(WORK / name)  # no resumed checkpoint, no spent ledgers
            overrides = base | extra | {"federation.out_dir": str(out / "federated"), "privacy.ledger_dir": str(out / "ledgers")}
            t = time.time()
            federated = federate(load_config(args.config, overrides), len(stores))
            seconds = time.time() - t
            add_federated(contest, name, federated, pipeline, splits, seconds)
            runs[name] = {**meta, "simulate_s": seconds, **digest(federated.summary)}
            print(f"[dp_accuracy] {name}: {seconds:.0f} s, {runs[name]}", flush=True)
        pipeline.restore(initial)
        contest.add("shopcast_untrained", pipeline.forecast_merchants(splits), splits, cfg, 0.0)
        t = time.time()
        if args.baselines == "all":
            baselines(contest, splits, cfg, table.known)
        else:
            from shared.baselines import seasonal_naive
            from shared.metrics import season_for

            history = pd.concat([s.history_before_test() for s in splits.values()])
            forecast = seasonal_naive(history, cfg.data.horizon, season_for(table.freq), cfg.model.quantiles, freq=table.freq)
            contest.add("seasonal_naive", forecast, splits, cfg, time.time() - t)
        baselines_s = time.time() - t
        del pipeline
        speed = speed_results()
        timing_layers = args.timing_layers
        if timing_layers == "auto":
            timing_layers = "" if speed else f"{args.layers},6"
        timings = []
        for layers in [int(x) for x in timing_layers.split(",") if x]:
            timings.append(step_times(cfg, table, layers, args.timing_steps, 2, args.seed))
            print(f"[dp_accuracy] step time {layers} blocks: {timings[-1]['step_s_nondp']:.3f} s non-DP, "
                  f"{timings[-1]['step_s_dp']:.3f} s DP", flush=True)

    summary = accuracy_summary(contest)
    by_store = merchant_wql(contest, summary["model"])

    s = summary.set_index("model")
    privacy_rows = []
    for name, r in runs.items():
        eps_values = list(r["epsilon_per_merchant"].values())
        privacy_rows.append({
            "model": name, "target ε": r.get("epsilon_target", float("inf")), "noise σ": r.get("noise_multiplier", 0.0),
            "sample rate q": r.get("sample_rate", float("nan")),
            "ε spent (max over stores)": max(eps_values) if eps_values else float("inf"),
            "steps per store": ", ".join(str(v) for v in r["steps_per_merchant"].values()), "failures": r["failures"],
            "WQL": s.loc[name, "wql"], "MASE": s.loc[name, "mase"], "WQL gmean rel": s.loc[name, "wql_gmean_rel"],
            "MASE gmean rel": s.loc[name, "mase_gmean_rel"], "simulate s": r["simulate_s"],
        })
    privacy_table = pd.DataFrame(privacy_rows)
    timing_table = pd.DataFrame([{k: v for k, v in t.items() if not k.endswith("_all")} for t in timings])

    nondp = s.loc["shopcast_federated"]
    lines = [(f"Non-DP federated: WQL {nondp['wql']:.3f}, MASE {nondp['mase']:.3f} (gmean rel. to seasonal naive: WQL "
             f"{nondp['wql_gmean_rel']:.3f}, MASE {nondp['mase_gmean_rel']:.3f}); seasonal naive WQL {s.loc['seasonal_naive', 'wql']:.3f}, "
             f"MASE {s.loc['seasonal_naive', 'mase']:.3f}; untrained adapter WQL {s.loc['shopcast_untrained', 'wql']:.3f}.")]
    for eps in epsilons:
        name = f"shopcast_federated_dp_eps{eps:g}"
        lines.append(f"DP ε = {eps:g}: WQL {s.loc[name, 'wql']:.3f} ({s.loc[name, 'wql'] / nondp['wql'] - 1:+.1%} vs non-DP), MASE "
                     f"{s.loc[name, 'mase']:.3f} ({s.loc[name, 'mase'] / nondp['mase'] - 1:+.1%}); "
                     f"gmean rel. WQL {s.loc[name, 'wql_gmean_rel']:.3f}.")
    extra = [
        f"config: `{args.config}` + {base}: context {cfg.data.context} weeks, horizon {cfg.data.horizon} weeks, batch "
        f"{cfg.train.batch_size}, lr {cfg.train.lr}, backbone `{cfg.model.backbone}` truncated to {cfg.model.llm_layers} blocks"
        + (f" (fewer than the config's {default_layers}, to keep the whole run within 30 minutes on 2 busy cores)"
           if cfg.model.llm_layers < default_layers else " (the config's own)") + f", LoRA r={cfg.model.lora.r}",
        (f"data: stores {', '.join(stores)}, per store the {args.depts} full-length departments with the largest total sales; "
        f"training windows per store {({m: len(sp.train) for m, sp in splits.items()})}; test = the last {cfg.data.horizon} weeks"),
        (f"federation: simulations.federated.federate (Flower simulation engine, real ServerApp/ClientApp), {cfg.federation.strategy}, "
        f"{args.rounds} rounds x {args.local_steps} local steps = {planned} steps per store, all stores every round"),
        (f"DP: DP-SGD per store, unit = {cfg.privacy.unit} (one clipped window per Poisson-sampled series per step), max_grad_norm "
        f"{cfg.privacy.max_grad_norm}, δ = {cfg.privacy.delta:g}; sample rate q = 1/ceil(series / batch) = {q:.3f}; noise from "
        f"get_noise_multiplier(ε, δ, q, {planned}, 'rdp') so the planned steps spend the whole budget; each store's own ledger"),
        (f"seed {args.seed} (one seed; a single run per setting, so differences of a few percent are noise); baselines and "
        f"scoring in {baselines_s:.0f} s; peak RSS of this process {maxrss_mib():.0f} MiB (the Ray workers are separate processes)"),
    ]
    speed_lines = []
    if speed:
        speed_lines = [("From benchmarks.speed, reused here rather than measured again (synthetic data, configs/default.toml plus "
                       "the overrides shown: 6-block SmolLM2 unless overridden, context 84 days; fixed batches, Opacus through "
                       "PrivateTraining.attach; see each file for its load):"), "",
                       to_markdown(speed_table(speed))]
    body = "\n".join([
        "## Accuracy vs ε (federated, same split; lower is better)", "",
        *(f"- {line}" for line in lines), "",
        to_markdown(privacy_table),
        "## All contenders (mean over departments; *_gmean_rel: geometric mean of the ratio to seasonal naive)", "",
        to_markdown(summary),
        "## Per store (mean WQL over its departments)", "",
        to_markdown(by_store),
        "## DP-SGD vs non-DP step time (fwd + bwd + AdamW on identical batches, median)", "",
        *speed_lines,
        *(["Measured here on Walmart windows:", "", to_markdown(timing_table)] if len(timing_table) else []),
        "Timings on a 2-core machine shared with other work (see the load line above); the ratio is steadier than the seconds.", "",
    ])
    payload = {
        "benchmark": "dp_accuracy", "args": vars(args), "config_overrides": base,
        "sample_rates": rates, "runs": runs, "summary": summary.to_dict(orient="records"),
        "privacy_table": privacy_table.to_dict(orient="records"), "per_store": per_merchant(contest.scores).to_dict(orient="records"),
        "step_times": timings, "speed_benchmark": speed,
        "per_series": {name: frame.to_dict(orient="records") for name, frame in contest.scores.items()},
    }
    run.save(args.name, "DP-SGD in the federation: accuracy vs ε on Walmart, and step time", extra, body, payload, args.results)


if __name__ == "__main__":
    command(main)
