"""The personal part: the forecaster's output layers refitted on one merchant's own windows.

Merchants differ (a trade supplier's Mondays, a web shop's Sundays); one shared adapter averages
them. After the federation each merchant refits the output layers (the flatten head and the linear
path) of the global adapter on its own windows. They stay on the merchant's disk and are never sent,
so they need no DP noise: DP covers what leaves the shop (docs/privacy.md). Only the output layers
move, so the frozen LLM and the shared adapter run once per window to give their features, and the
refit itself is a small linear problem: hundreds of steps cost seconds. Early stopping on the
merchant's validation window, counting the global adapter as step 0, means the refit is kept only
where it measures better there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from shared.config import TrainConfig
from shared.model import Forecaster, pinball_loss
from shared.windows import Windows

PERSONAL_LAYERS = ("head", "linear")


def personal_parameters(model: Forecaster) -> list[torch.nn.Parameter]:
    return [p for layer in PERSONAL_LAYERS for p in getattr(model, layer).parameters()]


def personal_state(model: Forecaster) -> dict[str, torch.Tensor]:
    """The personal part's tensors by name, copied (for saving, and to tell it apart from the shared adapter)."""
    return {f"{layer}.{name}": t.detach().clone() for layer in PERSONAL_LAYERS for name, t in getattr(model, layer).state_dict().items()}


@contextlib.contextmanager
def _trainable(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Lets the output layers learn even where [model] shared keeps them out of the federation (frozen
    at the base's values), then restores their flags, so the next round trains and sends exactly the
    shared part again."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


@torch.no_grad()
def _features(model: Forecaster, windows: Windows, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """What the output layers read, per window: computed once, as nothing before them changes."""
    model.eval()
    device = model.levels.device
    parts: dict[str, list[torch.Tensor]] = {"tokens": [], "linear_input": [], "scale": [], "spread": [], "target": [], "open": []}
    for start in range(0, len(windows), batch_size):
        index = np.arange(start, min(start + batch_size, len(windows)))
        inputs = {k: v.to(device) for k, v in windows.tensors(index).items()}
        tokens, linear_input, scale, spread = model.encode(**inputs)
        horizon = windows.target.shape[1]
        for key, value in (("tokens", tokens), ("linear_input", linear_input), ("scale", scale), ("spread", spread),
                           ("target", torch.as_tensor(windows.target[index], dtype=torch.float32, device=device)),
                           ("open", inputs["open"][:, -horizon:])):
            parts[key].append(value.float())
    return {k: torch.cat(v) for k, v in parts.items()}


def _loss(model: Forecaster, f: dict[str, torch.Tensor], index: torch.Tensor | slice) -> torch.Tensor:
    quantiles, unit = model.outputs(f["tokens"][index], f["linear_input"][index], f["scale"][index], f["spread"][index])
    return pinball_loss(quantiles, f["target"][index] / unit, model.levels, f["open"][index]).mean()


def personalise(model: Forecaster, train: Windows, val: Windows, cfg: TrainConfig) -> tuple[float, float, int]:
    """Refits the output layers in place on `train` (at most cfg.personal_windows of them, drawn evenly);
    keeps the state with the lowest loss on `val`. Returns (val loss before, after, steps kept)."""
    rng = np.random.default_rng(cfg.seed)
    if len(train) == 0 or len(val) == 0:  # a shop too new to have a window to learn or judge from
        return float("nan"), float("nan"), 0
    if len(train) > cfg.personal_windows:
        train = train.subset(np.sort(rng.choice(len(train), cfg.personal_windows, replace=False)))
    fit_on, judge_on = _features(model, train), _features(model, val)
    params = personal_parameters(model)
    with _trainable(params):
        return _refit(model, params, fit_on, judge_on, cfg)


def _refit(model: Forecaster, params: list[torch.nn.Parameter], fit_on: dict[str, torch.Tensor], judge_on: dict[str, torch.Tensor],
           cfg: TrainConfig) -> tuple[float, float, int]:
    """AdamW on the output layers over the precomputed features, judged every personal_steps / 20 steps;
    the best state judged (step 0 included) is put back."""
    optimizer = torch.optim.AdamW(params, lr=cfg.personal_lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    batch = max(cfg.batch_size, 32)
    every = max(1, cfg.personal_steps // 20)
    with torch.no_grad():
        before = best = _loss(model, judge_on, slice(None)).item()
    best_state, best_step = [p.detach().clone() for p in params], 0
    for step in range(1, cfg.personal_steps + 1):
        index = torch.randint(len(fit_on["target"]), (batch,), generator=generator).to(model.levels.device)
        optimizer.zero_grad(set_to_none=True)
        _loss(model, fit_on, index).backward()
        optimizer.step()
        if step % every == 0:
            with torch.no_grad():
                now = _loss(model, judge_on, slice(None)).item()
            if now < best - 1e-6:
                best, best_state, best_step = now, [p.detach().clone() for p in params], step
    with torch.no_grad():
        for p, kept in zip(params, best_state, strict=True):
            p.copy_(kept)
    return before, best, best_step
