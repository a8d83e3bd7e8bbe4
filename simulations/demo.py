"""The main job: a federated, DP simulation of several merchants, judged against today's tools.

    python -m simulations.demo [--config configs/default.toml] [--set key=value ...]

Runs Flower's simulation engine (one SuperNode per merchant), then on the very same splits:
local-only and centralised shopcast, seasonal naive, ETS, Theta and per-merchant LightGBM; writes
report.md / report.json / accuracy.png / forecasts.png under federation.out_dir.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import typer

from shared.adapter import load_adapter
from shared.config import load_config, parse_overrides
from shared.local import build_model, load_table
from simulations.compare import Contest, baselines, centralised, local_only, merchant_splits, model_forecast
from simulations.federated import simulate
from simulations.report import write_report

log = logging.getLogger("shopcast.demo")


def main(
    config: Path = typer.Option(Path("configs/default.toml"), help="TOML config; keys not set fall back to configs/default.toml"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set federation.num_rounds=2"),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = parse_overrides(set_)
    cfg = load_config(config, overrides)
    out = Path(cfg.federation.out_dir)
    shutil.rmtree(out, ignore_errors=True)  # a demo starts fresh: no resumed checkpoint, no spent ledgers
    overrides |= {"privacy.ledger_dir": str(out / "ledgers")}
    cfg = load_config(config, overrides)
    table = load_table(cfg)
    merchants = table.merchants()

    runs = {"shopcast_federated": {"privacy.enabled": False}}
    if cfg.privacy.enabled:
        runs["shopcast_federated_dp"] = {"privacy.enabled": True}
    summaries, seconds = {}, {}
    for name, extra in runs.items():
        run_overrides = overrides | extra | {"federation.out_dir": str(out / name)}
        started = time.time()
        summaries[name] = simulate(load_config(config, run_overrides), config, run_overrides, len(merchants))
        seconds[name] = time.time() - started

    model = build_model(cfg)
    splits = merchant_splits(table, cfg, model)
    contest = Contest()
    for name in runs:
        load_adapter(model, out / name / "final_adapter")
        contest.add(name, model_forecast(model, splits, cfg), splits, cfg, seconds[name])
    steps = cfg.federation.num_rounds * cfg.federation.local_steps
    for name, train in (("shopcast_local_only", local_only), ("shopcast_centralised", centralised)):
        t = time.time()
        total = steps if train is local_only else steps * len(merchants)
        contest.add(name, train(model, splits, cfg, total), splits, cfg, time.time() - t)
    baselines(contest, splits, cfg, table.known)

    context = {
        "title": f"{len(merchants)} merchants, {cfg.data.source} data, backbone {cfg.model.backbone} ({cfg.model.llm_layers} blocks)",
        "description": (
            f"{cfg.federation.num_rounds} rounds of {cfg.federation.strategy}, {cfg.federation.local_steps} local steps per round, "
            f"horizon {cfg.data.horizon}, context {cfg.data.context}. Local-only: each merchant alone with the same "
            f"{steps} steps; centralised: all data pooled, {steps * len(merchants)} steps (non-private upper bound). "
            f"Federated wall time: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}. Config: {config}, overrides {overrides}."
        ),
        "highlight": list(runs)[-1],
        "merchants": merchants,
    }
    report = write_report(out, contest, summaries[list(runs)[-1]], context, table.frame)
    print(report.read_text())
    print(f"report: {report}")


if __name__ == "__main__":
    typer.run(main)
