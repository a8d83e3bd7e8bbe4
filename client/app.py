"""The merchant's ClientApp: trains the shared adapter on data that never leaves this process.

What a reply carries is exactly the shared part of the adapter ([model] shared; shared/adapter.py)
and a few scalars (loss, counts, ε, bytes). The model is built as the server builds it
(`ForecastPipeline.from_config`: frozen outside the shared part, the base loaded), so both expect the
same tensors and hold the same frozen values.
In simulation the merchant is chosen by the node's partition id; in deployment the SuperNode's
node config points at the merchant's own file: `data-path="/srv/shop/sales.csv"`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from functools import lru_cache, wraps

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.mods import client_privacy_mod
from shared.adapter import FEDERATION_ROUND, AdapterMismatch
from shared.config import Config, with_overrides
from shared.handoff import run_config
from shared.pipeline import ForecastPipeline
from shared.privacy import MerchantPins
from shared.schema import SeriesTable
from shared.sources import load_table, merchant_of_partition, one_merchant
from shared.windows import Splits

log = logging.getLogger(__name__)
# error codes a merchant replies with instead of an adapter
BUDGET_EXHAUSTED = 901  # its privacy budget is spent
ADAPTER_REJECTED = 902  # the global adapter it received is malformed
DIVERGED = 903  # training produced a non-finite adapter (sent to nobody; the budget it spent stays spent)
BAD_INSTRUCTION = 904  # the server's round config asks for something it will not do


@lru_cache(maxsize=2)
def _pipeline(cfg: Config) -> ForecastPipeline:
    """One forecaster (frozen backbone + adapter) per process, reused for every merchant and round: a
    round loads only the shared part into it, the rest of the adapter stays at the base's values."""
    return ForecastPipeline.from_config(cfg)


@lru_cache(maxsize=1)
def _simulated_table(cfg: Config) -> SeriesTable:
    """Every simulated merchant's table, read once per process: a worker serves many merchants, and
    building the whole table again for each of them cost seconds apiece (100 merchants: minutes)."""
    return load_table(cfg)


@lru_cache(maxsize=None)
def _merchant(cfg: Config, partition_id: int, data_path: str | None, name: str | None) -> tuple[str, Splits]:
    """The merchant's validated windows; built once per process and merchant, kept in memory.

    With its own file (deployment) a merchant is the file's only merchant, or the one its node
    config names: a file holding several is never trained on as if it held one.
    """
    if data_path is None:
        table = _simulated_table(cfg)
        merchant = merchant_of_partition(table.merchants(), partition_id)
    else:
        merchant, table = one_merchant(load_table(with_overrides(cfg, {"data.source": "file", "data.path": data_path})), name)
    return merchant, _pipeline(cfg).splits(table.for_merchant(merchant))


def _setup(msg: Message, context: Context) -> tuple[ForecastPipeline, str, Splits]:
    cfg = run_config(context.run_config)
    node = context.node_config
    data_path, name = node.get("data-path"), node.get("merchant")
    merchant, splits = _merchant(cfg, int(node.get("partition-id", 0)), None if data_path is None else str(data_path),
                                 None if name is None else str(name))
    pipeline = _pipeline(cfg)
    pipeline.load_shared_state(msg.content["arrays"].to_torch_state_dict())
    return pipeline, merchant, splits


def _identity(context: Context) -> dict[str, int]:
    """The simulation partition (or operator-given) id, for per-merchant reporting; without it the
    server keys the merchant by its node id."""
    return {"partition-id": int(context.node_config["partition-id"])} if "partition-id" in context.node_config else {}


def _finite(metrics: dict[str, float | int]) -> MetricRecord:
    """The reply's scalars without undefined ones (a loss over no non-empty batch, a score over no
    scorable series): the server's schema takes finite numbers only."""
    return MetricRecord({k: v for k, v in metrics.items() if math.isfinite(v)})


def _proximal_mu(msg: Message, lr: float) -> float:
    """FedProx's μ from the round config, checked before any budget is spent: the pull p ← p − lr·μ·(p − p₀)
    is a contraction only for 0 ≤ lr·μ ≤ 1; beyond that it makes the adapter oscillate and overflow."""
    mu = msg.content["config"].get("proximal-mu", 0.0)
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not (math.isfinite(mu) and 0 <= mu * lr <= 1):
        raise ValueError(f"proximal-mu {mu!r} must be a finite number with 0 <= lr·mu <= 1 (lr {lr})")
    return float(mu)


def _round_seed(msg: Message, base: int) -> int:
    """The config's seed plus the round's number, so each round draws fresh batches."""
    config = msg.content["config"]
    number = config.get(FEDERATION_ROUND, config.get("server-round", 0))
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"round number {number!r} must be a non-negative integer")
    return base + number


def _decline(msg: Message, code: int, reason: str) -> Message:
    log.warning(reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _declines_a_bad_adapter(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Replies to a received adapter that does not fit this model (AdapterMismatch, raised while `_setup`
    loads it) with an Error, for train and evaluate alike: raising instead ends the merchant's process."""

    @wraps(handler)
    def replying(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except AdapterMismatch as exc:
            return _decline(msg, ADAPTER_REJECTED, f"received adapter rejected: {exc}")

    return replying


@_declines_a_bad_adapter
def train(msg: Message, context: Context) -> Message:
    pins = MerchantPins.from_node_config(context.node_config)
    pipeline, merchant, splits = _setup(msg, context)
    cfg = pipeline.cfg
    try:
        mu, round_seed = _proximal_mu(msg, cfg.train.lr), _round_seed(msg, cfg.train.seed)
        pins.check_round(cfg)
    except ValueError as exc:
        return _decline(msg, BAD_INSTRUCTION, f"merchant {merchant}: {exc}")
    privacy = pipeline.private_training(merchant, splits.train, pins)
    result = pipeline.fit(splits.train, steps=cfg.federation.local_steps, privacy=privacy, proximal_mu=mu, seed=round_seed)
    if result.status == "budget_exhausted":
        return _decline(msg, BUDGET_EXHAUSTED, f"merchant {merchant}: privacy budget spent (ε={result.epsilon:.3f} of "
                                               f"{privacy.ledger.target_epsilon}); declining to train")
    state = pipeline.shared_state()
    if not all(torch.isfinite(t).all() for t in state.values()):
        return _decline(msg, DIVERGED, f"merchant {merchant}: training diverged to a non-finite adapter; nothing sent"
                                       + (f" (ε {result.epsilon:.3f} spent)" if result.epsilon is not None else ""))
    metrics = {
        "train-loss": result.train_loss,
        "num-examples": len(splits.train),
        "steps": result.steps,
        "bytes-sent": pipeline.shared_bytes(),
        **_identity(context),
    }
    if result.epsilon is not None:
        metrics.update({"epsilon": result.epsilon, "delta": privacy.ledger.delta})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": _finite(metrics)}), reply_to=msg)


@_declines_a_bad_adapter
def evaluate(msg: Message, context: Context) -> Message:
    """Holdout metrics on the merchant's last horizon (the test split), as means over its series."""
    pipeline, _, splits = _setup(msg, context)
    scores = pipeline.score(splits)
    metrics = {
        "mase": float(np.nanmean(scores["mase"])),
        "wql": float(np.nanmean(scores["wql"])),
        "coverage-80": float(np.nanmean(scores["coverage_80"])),
        "num-examples": len(splits.series_ids),
        **_identity(context),
    }
    return Message(RecordDict({"metrics": _finite(metrics)}), reply_to=msg)


def make_app(mods: Sequence[Mod] = (client_privacy_mod,)) -> ClientApp:
    """The ClientApp wrapped in `mods`, outermost first. The default applies the run config's
    client-side clipping and SecAgg+ masking; a test that records what leaves puts its recorder
    outside that mod."""
    client = ClientApp(mods=list(mods))
    client.train()(train)
    client.evaluate()(evaluate)
    return client


app = make_app()
