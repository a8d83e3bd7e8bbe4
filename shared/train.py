"""Local training of the adapter on one merchant's windows, with or without DP-SGD.

The same loop serves the local CLI, each federated round and the centralised baseline; what differs
is only how batches are drawn (uniform windows, or Poisson-sampled privacy units under DP) and how
long it runs (early stopping locally, a fixed number of steps in a round).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from shared.adapter import adapter_state, load_adapter_state
from shared.config import TrainConfig
from shared.model import Forecaster, pinball_loss
from shared.privacy import PrivateTraining
from shared.windows import WindowDataset, Windows

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass only; trainable tensors stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    epsilon: float | None = None
    status: str = "ok"


@torch.no_grad()
def evaluate_loss(model: Forecaster, windows: Windows, device: torch.device, batch_size: int = 64) -> float:
    model.eval()
    losses = []
    for start in range(0, len(windows), batch_size):
        index = np.arange(start, min(start + batch_size, len(windows)))
        inputs = {k: v.to(device) for k, v in windows.tensors(index).items()}
        target = torch.as_tensor(windows.target[index], dtype=torch.float32, device=device)
        losses.append(model.loss(target, **inputs).cpu())
    return float(torch.cat(losses).mean()) if losses else float("nan")


@torch.no_grad()
def predict(model: Forecaster, windows: Windows, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Quantile forecasts [N, H, Q] in the series' own units."""
    model.eval()
    out = []
    for start in range(0, len(windows), batch_size):
        index = np.arange(start, min(start + batch_size, len(windows)))
        out.append(model.predict(**{k: v.to(device) for k, v in windows.tensors(index).items()}).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.shape.horizon, len(model.cfg.quantiles)))


def _infinite(loader: DataLoader):
    while True:
        yield from loader


def fit(
    model: Forecaster,
    train: Windows,
    val: Windows | None,
    cfg: TrainConfig,
    steps: int | None = None,
    privacy: PrivateTraining | None = None,
    proximal_mu: float = 0.0,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Trains the adapter in place; `steps` fixes the length (federated rounds), else early stopping.

    FedProx's pull towards the round's starting adapter is applied after each optimiser step, as a
    data-independent correction, so it composes with DP-SGD without touching per-sample gradients.
    """
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = steps if steps is not None else cfg.max_steps
    early_stopping = steps is None and val is not None and cfg.eval_every > 0 and privacy is None
    precision = cfg.precision
    if privacy is not None:
        total = privacy.reserve(total)
        if total == 0:
            return TrainResult(0, float("nan"), float("nan"), epsilon=privacy.epsilon(), status="budget_exhausted")
        if precision != "fp32":
            log.warning("DP-SGD runs in fp32: Opacus' per-sample gradients fail under autocast (opacus #740)")
            precision = "fp32"
        step_model, optimizer, batches = privacy.attach(model, optimizer, train, cfg)
    else:
        dataset = WindowDataset(train, seed=cfg.seed)
        sampler = RandomSampler(dataset, replacement=True, num_samples=total * cfg.batch_size)
        batches = _infinite(DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler))
        step_model = model
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")
    best_val, best_state, bad_evals, recent, history = float("inf"), None, 0, [], []
    done = 0
    try:
        for done in range(1, total + 1):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            step_model.train()
            optimizer.zero_grad(set_to_none=True)
            target = batch.pop("target")
            # An empty Poisson batch (DP only) touches no data: its step is skipped, not noised. Whether
            # a batch is empty depends on the sampling alone, so nothing about the data is revealed.
            if len(target):
                with autocast(device, precision):
                    quantiles, scale = step_model(**batch)  # through Opacus' wrapper under DP
                    losses = pinball_loss(quantiles, target / scale, model.levels)
                scaler.scale(losses.mean()).backward()
                recent.append(losses.detach().mean().item())
                scaler.step(optimizer)
                scaler.update()
            if anchor:
                with torch.no_grad():
                    for p, a in zip(params, anchor):
                        p.sub_(cfg.lr * proximal_mu * (p - a))
            if on_step is not None:
                on_step(done)
            if early_stopping and done % cfg.eval_every == 0:
                val_loss = evaluate_loss(model, val, device)
                history.append({"step": done, "train_loss": float(np.mean(recent)), "val_loss": val_loss})
                if val_loss < best_val - 1e-6:
                    best_val, best_state, bad_evals = val_loss, adapter_state(model), 0
                else:
                    bad_evals += 1
                    if bad_evals >= cfg.patience:
                        log.info("early stop at step %d (best val %.4f)", done, best_val)
                        break
    finally:
        if privacy is not None:
            privacy.detach()
    if best_state is not None:
        load_adapter_state(model, best_state)
    val_loss = best_val if best_state is not None else (evaluate_loss(model, val, device) if val is not None else float("nan"))
    train_loss = float(np.mean(recent[-max(1, cfg.eval_every) :])) if recent else float("nan")
    return TrainResult(done, train_loss, val_loss, history, privacy.epsilon() if privacy else None)
