"""Local training of the shared part of the adapter on one merchant's windows, with or without DP-SGD.

The same loop serves the local CLI, each federated round and the centralised baseline; what differs
is only how batches are drawn (uniform windows, or Poisson-sampled privacy units under DP) and how
long it runs (early stopping locally, a fixed number of steps in a round).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from shared.adapter import load_shared_state, shared_parameters, shared_size, shared_state
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


def _in_order(windows: Windows, device: torch.device, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Consecutive batches of windows (indices, model inputs on `device`), for evaluation and prediction."""
    for start in range(0, len(windows), batch_size):
        index = np.arange(start, min(start + batch_size, len(windows)))
        yield index, {k: v.to(device) for k, v in windows.tensors(index).items()}


@torch.no_grad()
def window_losses(model: Forecaster, windows: Windows, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Each window's pinball loss, in order: a membership-inference audit ranks series by them."""
    model.eval()
    losses = [model.loss(torch.as_tensor(windows.target[index], dtype=torch.float32, device=device), **inputs).cpu()
              for index, inputs in _in_order(windows, device, batch_size)]
    return torch.cat(losses) if losses else torch.zeros(0)


def evaluate_loss(model: Forecaster, windows: Windows, device: torch.device, batch_size: int = 64) -> float:
    losses = window_losses(model, windows, device, batch_size)
    return float(losses.mean()) if len(losses) else float("nan")


@torch.no_grad()
def predict(model: Forecaster, windows: Windows, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Quantile forecasts [N, H, Q] in the series' own units."""
    model.eval()
    out = [model.predict(**inputs).cpu().numpy() for _, inputs in _in_order(windows, device, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.shape.horizon, len(model.cfg.quantiles)))


def _uniform_batches(train: Windows, cfg: TrainConfig, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of windows drawn uniformly with replacement: the non-private sampling."""
    dataset = WindowDataset(train)
    sampler = RandomSampler(dataset, replacement=True, num_samples=steps * cfg.batch_size)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)
    while True:
        yield from loader


@dataclass
class _EarlyStopping:
    """Keeps the shared part (all that trains) with the best validation loss; says stop after `patience` evaluations without gain."""

    patience: int
    best_loss: float = float("inf")
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals: int = 0

    def should_stop(self, model: Forecaster, val_loss: float) -> bool:
        if val_loss < self.best_loss - 1e-6:
            self.best_loss, self.best_state, self.bad_evals = val_loss, shared_state(model), 0
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.patience


def _train_step(step_model: torch.nn.Module, model: Forecaster, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, precision: str) -> float:
    """One optimiser step on a non-empty batch; its mean pinball loss."""
    step_model.train()
    optimizer.zero_grad(set_to_none=True)
    target = batch.pop("target")
    with autocast(target.device, precision):
        quantiles, scale = step_model(**batch)  # through Opacus' wrapper under DP
        losses = pinball_loss(quantiles, target / scale, model.levels, batch["open"][:, -target.shape[1] :])
    scaler.scale(losses.mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    return losses.detach().mean().item()


def fit(
    model: Forecaster,
    train: Windows,
    val: Windows | None,
    cfg: TrainConfig,
    steps: int | None = None,
    privacy: PrivateTraining | None = None,
    proximal_mu: float = 0.0,
    on_step: Callable[[int], None] | None = None,
    seed: int | None = None,
) -> TrainResult:
    """Trains the adapter's shared part in place (shared.adapter; the rest stays frozen); `steps` fixes
    the length (federated rounds), else early stopping.
    `seed` (default cfg.seed) fixes which windows are drawn: a federated round passes its own, or every
    round would redraw the same batches.

    FedProx's pull towards the round's starting adapter is applied after each optimiser step, as a
    data-independent correction, so it composes with DP-SGD without touching per-sample gradients.
    """
    device = next(model.parameters()).device
    if len(train) == 0:
        raise ValueError("no training window: every series is too short (or closed) to learn from; forecast with a shared adapter instead")
    torch.manual_seed(cfg.seed if seed is None else seed)
    params = list(shared_parameters(model).values())
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    lr = cfg.lr if privacy is None else privacy.learning_rate(cfg.lr, shared_size(model))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    total = steps if steps is not None else cfg.max_steps
    stopping = _EarlyStopping(cfg.patience) if steps is None and val is not None and cfg.eval_every > 0 and privacy is None else None
    precision = cfg.precision
    if privacy is not None:
        total = privacy.reserve(total)
        if total == 0:
            return TrainResult(0, float("nan"), float("nan"), epsilon=privacy.epsilon(), status="budget_exhausted")
        if precision != "fp32":
            log.warning("DP-SGD runs in fp32: Opacus' per-sample gradients fail under autocast (opacus #740)")
            precision = "fp32"
        step_model, optimizer, batches = privacy.attach(model, optimizer, train)
    else:
        step_model, batches = model, _uniform_batches(train, cfg, total)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")
    recent: list[float] = []
    history: list[dict[str, float]] = []
    done = 0
    try:
        for done in range(1, total + 1):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            if len(batch["target"]):
                recent.append(_train_step(step_model, model, batch, optimizer, scaler, precision))
            else:  # an empty Poisson batch, only under DP
                optimizer.zero_grad(set_to_none=True)
                privacy.noise_only_step(optimizer)
            if anchor:
                with torch.no_grad():
                    for p, a in zip(params, anchor):
                        p.sub_(lr * proximal_mu * (p - a))
            if on_step is not None:
                on_step(done)
            if stopping is not None and done % cfg.eval_every == 0:
                val_loss = evaluate_loss(model, val, device)
                history.append({"step": done, "train_loss": float(np.mean(recent)), "val_loss": val_loss})
                if stopping.should_stop(model, val_loss):
                    log.info("early stop at step %d (best val %.4f)", done, stopping.best_loss)
                    break
    finally:
        if privacy is not None:
            privacy.detach()
    if stopping is not None and stopping.best_state is not None:
        load_shared_state(model, stopping.best_state)
        val_loss = stopping.best_loss
    else:
        val_loss = evaluate_loss(model, val, device) if val is not None else float("nan")
    train_loss = float(np.mean(recent[-max(1, cfg.eval_every) :])) if recent else float("nan")
    return TrainResult(done, train_loss, val_loss, history, privacy.epsilon() if privacy else None)
