"""The aggregation server's ServerApp: holds the global adapter, checkpoints it every round.

Rounds send, check and aggregate only the adapter's shared part ([model] shared; shared/adapter.py);
checkpoints and the final adapter hold the whole adapter, so each reloads on its own.

A restarted server resumes from the newest usable checkpoint under `<out_dir>` (server/checkpoint.py)
at the round after it, with the strategy's own state restored; at the end it writes
`<out_dir>/final_adapter` and `<out_dir>/summary.json`.

With federation.secagg the rounds run through Flower's legacy SecAgg+ workflow instead of
`strategy.start` (see docs/secure-aggregation.md); client-level DP wraps the strategy inside
`make_strategy` (docs/privacy.md).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from server.checkpoint import StrategyState, load_checkpoint, restore_strategy_state, save_checkpoint, strategy_state
from server.secagg import SecAggAggregation, secagg_workflow
from server.strategy import make_strategy
from shared.adapter import adapter_shapes, backbone_bytes, shared_shapes, shared_size
from shared.config import Config
from shared.handoff import run_config
from shared.pipeline import ForecastPipeline
from shared.privacy import ledger_unit

log = logging.getLogger(__name__)
app = ServerApp()


def run_federation(grid: Grid, cfg: Config) -> dict[str, Any]:
    """All rounds still to run for this config; returns the run summary."""
    out = Path(cfg.federation.out_dir)
    # seeded, from the base, frozen outside the shared part: the same model as every merchant's
    pipeline = ForecastPipeline.from_config(cfg)
    strategy = resumed_strategy(cfg, pipeline, out)
    remaining = cfg.federation.num_rounds - len(strategy.history)
    started = time.time()

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            pipeline.load_shared_state(arrays.to_torch_state_dict())
            save_checkpoint(out, pipeline.model, strategy.history, strategy_state(strategy))
        return None

    if remaining > 0 and cfg.federation.secagg:
        run_secagg(grid, cfg, pipeline, strategy.history, remaining, out)
    elif remaining > 0:
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(pipeline.shared_state()), num_rounds=remaining,
            timeout=cfg.federation.round_timeout_s, train_config=ConfigRecord({"local-steps": cfg.federation.local_steps}),
            evaluate_fn=after_round,
        )
    pipeline.save(out / "final_adapter", {"round": len(strategy.history)})
    summary = {
        "rounds": len(strategy.history),
        "strategy": cfg.federation.strategy,
        "wall_s": time.time() - started,
        "adapter_bytes": pipeline.shared_bytes(),  # of one message, each way: the shared part
        "shared_size": shared_size(pipeline.model),  # the numbers that train and travel: d under DP-SGD
        "backbone_bytes": backbone_bytes(pipeline.model),
        "privacy": {"enabled": cfg.privacy.enabled, "unit": ledger_unit(cfg.privacy), "delta": cfg.privacy.delta,
                    "target_epsilon": cfg.privacy.target_epsilon},
        "history": strategy.history,
    }
    fed = cfg.federation
    released = [r["client_dp"] for r in strategy.history if "client_dp" in r]
    summary["client_level"] = {
        "client_dp": fed.client_dp, "secagg": fed.secagg, "noise_multiplier": fed.client_dp_noise if fed.client_dp != "off" else None,
        "clip": fed.client_dp_clip if fed.client_dp != "off" else None, "delta": fed.client_dp_delta if fed.client_dp != "off" else None,
        "epsilon": released[-1]["epsilon"] if released else None, "noised_rounds": len(released),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def resumed_strategy(cfg: Config, pipeline: ForecastPipeline, out: Path) -> FedAvg:
    """The config's strategy, carrying on from the newest usable checkpoint under `out` if there is one
    (its adapter goes into `pipeline`), so the next round is the one an uninterrupted run would have run."""
    shared = shared_shapes(pipeline.model)
    resumed = load_checkpoint(out, adapter_shapes(pipeline.model), shared)
    if resumed is None:
        return make_strategy(cfg, shared)
    pipeline.restore(resumed.adapter)
    log.info("resuming from %s after round %d", resumed.directory, len(resumed.history))
    strategy = make_strategy(cfg, shared, resumed.history)
    restore_strategy_state(strategy, resumed.strategy)
    return strategy


def run_secagg(grid: Grid, cfg: Config, pipeline: ForecastPipeline, history: list[dict[str, Any]], num_rounds: int, out: Path) -> None:
    """`num_rounds` rounds through SecAggPlusWorkflow: the server only ever sees the merchants' mean adapter.

    Flower 1.41 has SecAgg+ for the legacy workflow API only (a `LegacyContext` around a legacy
    strategy, driven by `DefaultWorkflow`); the merchants need `client.mods.client_privacy_mod`.
    """

    def after_round(server_round: int, arrays: dict[str, Any]) -> None:
        pipeline.load_shared_state({k: torch.from_numpy(v) for k, v in arrays.items()})
        save_checkpoint(out, pipeline.model, history, StrategyState())  # the legacy FedAvg keeps nothing across rounds

    initial = {k: v.numpy() for k, v in pipeline.shared_state().items()}
    strategy = SecAggAggregation(cfg, initial, history, after_round)
    # the workflow keeps its state in a Context; the Grid API gives run_federation none, and it needs no more
    context = LegacyContext(
        context=Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=num_rounds, round_timeout=cfg.federation.round_timeout_s),
        strategy=strategy,
    )
    DefaultWorkflow(fit_workflow=secagg_workflow(cfg))(grid, context)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, run_config(context.run_config))
