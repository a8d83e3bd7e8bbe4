"""The aggregation server's ServerApp: holds the global adapter, checkpoints it every round.

A restarted server finds `<out_dir>/checkpoint` and resumes at the round after the last one
saved; at the end it writes `<out_dir>/final_adapter` and `<out_dir>/summary.json`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from server.strategy import make_strategy
from shared.adapter import adapter_shapes, adapter_state, backbone_bytes, load_adapter, load_adapter_state, save_adapter
from shared.config import Config, config_from_run
from shared.local import build_model

log = logging.getLogger(__name__)
app = ServerApp()


def run_federation(grid: Grid, cfg: Config) -> dict[str, Any]:
    """All rounds still to run for this config; returns the run summary."""
    out = Path(cfg.federation.out_dir)
    checkpoint = out / "checkpoint"
    model = build_model(cfg)  # seeded: the same initial adapter as every merchant's
    history: list[dict[str, Any]] = []
    if (checkpoint / "meta.json").exists():
        history = load_adapter(model, checkpoint)["history"]
        log.info("resuming from %s after round %d", checkpoint, len(history))
    strategy = make_strategy(cfg, adapter_shapes(model), history)
    remaining = cfg.federation.num_rounds - len(history)
    started = time.time()

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            load_adapter_state(model, arrays.to_torch_state_dict())
            save_adapter(model, checkpoint, {"round": len(strategy.history), "history": strategy.history})
        return None

    if remaining > 0:
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(adapter_state(model)), num_rounds=remaining,
            timeout=cfg.federation.round_timeout_s, train_config=ConfigRecord({"local-steps": cfg.federation.local_steps}),
            evaluate_fn=after_round,
        )
    save_adapter(model, out / "final_adapter", {"round": len(strategy.history)})
    summary = {
        "rounds": len(strategy.history),
        "strategy": cfg.federation.strategy,
        "wall_s": time.time() - started,
        "adapter_bytes": sum(t.numel() * t.element_size() for t in adapter_state(model).values()),
        "backbone_bytes": backbone_bytes(model),
        "privacy": {"enabled": cfg.privacy.enabled, "unit": cfg.privacy.unit, "delta": cfg.privacy.delta, "target_epsilon": cfg.privacy.target_epsilon},
        "history": strategy.history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, config_from_run(context.run_config))
