"""The personal part: the forecaster's output layers refitted on one merchant's own windows.

Merchants differ (a trade supplier's Mondays, a web shop's Sundays); one shared adapter averages
them. After the federation each merchant refits the output layers (the flatten head and the linear
path) of the global adapter on its own windows. They stay on the merchant's disk and are never sent,
so they need no DP noise: DP covers what leaves the shop (docs/privacy.md). Only the output layers
move, so the frozen LLM and the shared adapter run once per window to give their features, and the
refit itself is a small linear problem: thousands of steps cost seconds. Early stopping on the
merchant's validation window, counting the global adapter as step 0, means the refit is kept only
where it measures better there.

A shop with a few years of weekly sales has a few hundred overlapping windows and one validation
window per series, so one refit depends on its batch order and where it happened to stop: on Walmart
four seeds of the same refit scored 0.84 to 0.90 (gmean WQL rel.). Several refits (their own seeds
and window draws) are averaged instead. The output layers are linear in the features they read, so
the average of their weights is the average of their raw outputs: an ensemble at the cost of one
model, kept in the same two layers.

Validation only chooses: how many steps each refit takes, and whether the merchant keeps the refit at
all. The refits kept are then rerun for their chosen steps on the training windows plus the latest
ones, whose targets reach into the validation horizon, as a merchant's own LightGBM learns from its
whole history: those days, the closest to the forecast, would otherwise never be learnt from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.config import TrainConfig
from shared.model import Encoded, Forecaster, pinball_loss
from shared.windows import Splits, Windows

PERSONAL_LAYERS = ("head", "linear", "per_step")

# A loop's range wrapped to report it, `stage` naming what the loop does (the CLI passes tqdm: a refit
# on a busy CPU takes many minutes); it must yield the range's numbers unchanged.
Progress = Callable[[range, str], Iterable[int]]


def no_progress(steps: range, stage: str) -> Iterable[int]:
    return steps


def personal_state(model: Forecaster) -> dict[str, torch.Tensor]:
    """The personal part's tensors by name, copied (for saving, and to tell it apart from the shared adapter)."""
    return {f"{layer}.{name}": t.detach().clone() for layer in PERSONAL_LAYERS for name, t in getattr(model, layer).state_dict().items()}


@torch.no_grad()
def _features(model: Forecaster, windows: Windows, progress: Progress = no_progress, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """What the output layers read, per window: computed once, as nothing before them changes."""
    model.eval()
    device = model.levels.device
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in (*Encoded._fields, "target", "open")}
    horizon = windows.target.shape[1]
    for start in progress(range(0, len(windows), batch_size), "personal refit: window features"):
        index = np.arange(start, min(start + batch_size, len(windows)))
        inputs = {k: v.to(device) for k, v in windows.tensors(index).items()}
        values = {**model.encode(**inputs)._asdict(), "open": inputs["open"][:, -horizon:],
                  "target": torch.as_tensor(windows.target[index], dtype=torch.float32, device=device)}
        for key, value in values.items():
            parts[key].append(value.float())
    return {k: torch.cat(v) for k, v in parts.items()}


def _window_losses(model: Forecaster, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B]: the output layers' pinball loss of each window whose features are `f`."""
    quantiles, unit = model.outputs(Encoded(*(f[key] for key in Encoded._fields)))
    return pinball_loss(quantiles, f["target"] / unit, model.levels, f["open"])


@dataclass
class PersonalFit:
    """One merchant's output layers after its refit (by parameter name: the global ones where the refit
    did not beat them on validation), with its validation loss before and after (of the refits the
    check chose, before their rerun with the latest windows) and the mean step its refits were kept at
    (0: not kept, or nothing to learn or judge from)."""

    state: dict[str, torch.Tensor]
    before: float
    after: float
    steps: int


def personalise(model: Forecaster, splits: Splits, cfg: TrainConfig, progress: Progress = no_progress) -> tuple[float, float, int]:
    """Refits the output layers in place on the merchant's training windows (at most
    cfg.personal_windows of them, drawn evenly) cfg.personal_refits times, each with its own batch
    order and stopped at its best step on the validation windows, and averages them; the average is
    kept only if it beats the global adapter there, and then rerun with the latest windows added.
    Returns (val loss before, after (of the refits validation chose), mean steps the refits kept)."""
    (fit,) = personal_fits(model, [splits], cfg, progress)
    use_personal(model, fit)
    return fit.before, fit.after, fit.steps


def use_personal(model: Forecaster, fit: PersonalFit) -> None:
    """Puts a merchant's refitted output layers into the model (by parameter name)."""
    _load(model, fit.state)


MERCHANTS_AT_ONCE = 8  # their features, about 11 MB per merchant at the defaults, are held together


def personal_fits(model: Forecaster, merchants: Sequence[Splits], cfg: TrainConfig,
                  progress: Progress = no_progress) -> list[PersonalFit]:
    """`personalise` for several merchants (their windows) from the same global adapter,
    which the model keeps. In a federation each merchant refits on its own machine; a simulation runs
    them all on one, where the refit's many small steps cost mostly per-step overhead: up to
    MERCHANTS_AT_ONCE merchants' refits take each step as one batched step, each exactly as it would
    run alone (its own window draw, batch orders and early stops)."""
    fits = []
    for start in range(0, len(merchants), MERCHANTS_AT_ONCE):
        fits += _fits(model, merchants[start : start + MERCHANTS_AT_ONCE], cfg, progress)
    return fits


def _fits(model: Forecaster, merchants: Sequence[Splits], cfg: TrainConfig, progress: Progress) -> list[PersonalFit]:
    global_state = personal_state(model)
    fits = [PersonalFit(global_state, float("nan"), float("nan"), 0) for _ in merchants]
    learning = [i for i, s in enumerate(merchants) if len(s.train) and len(s.val)]  # a shop too new keeps the global layers
    if not learning:
        return fits
    fit_on, judge_on, with_latest = [], [], []
    for i in learning:
        train, latest = merchants[i].train, merchants[i].latest
        if len(train) > cfg.personal_windows:
            rng = np.random.default_rng(cfg.seed)
            train = train.subset(np.sort(rng.choice(len(train), cfg.personal_windows, replace=False)))
        fit_on.append(_features(model, train, progress))
        judge_on.append(_features(model, merchants[i].val, progress))
        newest = _features(model, latest, progress) if len(latest) else {key: value[:0] for key, value in fit_on[-1].items()}
        with_latest.append({key: torch.cat([value, newest[key]]) for key, value in fit_on[-1].items()})
    refits, steps = _refit(model, fit_on, cfg, progress, judge_on=judge_on)
    mine = [slice(k * cfg.personal_refits, (k + 1) * cfg.personal_refits) for k in range(len(learning))]
    losses = []
    for k in range(len(learning)):
        before, after = (_judge(model, state, judge_on[k]) for state in (global_state, _mean(refits, mine[k])))
        if after >= before:
            steps[mine[k]], after = 0, before  # the merchant keeps the global layers
        losses.append((before, after))
    _load(model, global_state)  # the rerun starts where the refits did
    rerun, _ = _refit(model, with_latest, cfg, progress, stop_at=steps)
    for k, i in enumerate(learning):
        fits[i] = PersonalFit(_mean(rerun, mine[k]), *losses[k], round(float(steps[mine[k]].float().mean())))
    return fits


def _mean(refits: dict[str, torch.Tensor], mine: slice) -> dict[str, torch.Tensor]:
    """One merchant's refits (`mine` of the stacked copies) averaged."""
    return {name: refit[mine].mean(dim=0) for name, refit in refits.items()}


@torch.no_grad()
def _judge(model: Forecaster, state: dict[str, torch.Tensor], features: dict[str, torch.Tensor]) -> float:
    """The mean validation loss with the output layers `state` (left in the model)."""
    _load(model, state)
    return _window_losses(model, features).mean().item()


@torch.no_grad()
def _load(model: Forecaster, state: dict[str, torch.Tensor]) -> None:
    for name, value in state.items():
        model.get_parameter(name).copy_(value)


class _OutputLoss(torch.nn.Module):
    """The output layers' loss per window, as a module call: torch.func swaps in one stacked copy of
    their weights per refit, so all refits take each step as one batched step. It holds the model's
    own output layers (the same objects), not the model, so each call walks three modules rather than
    the LLM's hundreds."""

    def __init__(self, model: Forecaster) -> None:
        super().__init__()
        for layer in PERSONAL_LAYERS:
            self.add_module(layer, getattr(model, layer))
        self.window_losses = functools.partial(_window_losses, model)  # the model is no submodule: the LLM stays out of the walk

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.window_losses(features)


def _refit(model: Forecaster, fit_on: list[dict[str, torch.Tensor]], cfg: TrainConfig, progress: Progress, *,
           judge_on: list[dict[str, torch.Tensor]] | None = None, stop_at: torch.Tensor | None = None
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """cfg.personal_refits refits per merchant (the features it fits on), all at once and as separate
    as if run one after another: each has its own copy of the output layers (stacked on dim 0, merchant
    by merchant), its own batch order (a generator seeded cfg.seed + r, r its number within its
    merchant's) and its own stop, and AdamW's update is per element. One batched step of four refits
    costs about half of four single ones; AdamW's fused kernel (one pass over the weights, the same
    update up to rounding) saves a fifth more. AdamW on the precomputed features. With `judge_on`,
    each refit is judged on its merchant's every personal_steps / 20 steps and keeps its best state
    judged (step 0 included); with `stop_at` [copies], each keeps its state at that step (0: as it began).
    Returns those states by parameter name [merchants x R, ...] and the step each was taken at."""
    refits, device = cfg.personal_refits, model.levels.device
    count = refits * len(fit_on)
    call = _OutputLoss(model)
    stacked = {name: p.detach().expand(count, *p.shape).clone().requires_grad_(True) for name, p in call.named_parameters()}
    fit_all = {key: torch.cat([f[key] for f in fit_on]) for key in fit_on[0]}
    windows = [len(f["target"]) for f in fit_on]  # each merchant's, at its offset in fit_all
    sizes = np.repeat(windows, refits).tolist()
    offsets = torch.as_tensor(np.repeat(np.cumsum([0, *windows[:-1]]), refits), device=device)

    def one(weights: dict[str, torch.Tensor], features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(call, weights, (features,))

    def judged() -> torch.Tensor:
        """[copies]: each refit's mean loss over its own merchant's validation windows."""
        return (torch.func.vmap(one, in_dims=(0, None))(stacked, judge_all) * judged_by).sum(dim=1)

    if judge_on is not None:
        judge_all = {key: torch.cat([f[key] for f in judge_on]) for key in judge_on[0]}
        judged_by = torch.block_diag(*[torch.ones(1, len(f["target"])) / len(f["target"]) for f in judge_on])
        judged_by = judged_by.repeat_interleave(refits, dim=0).to(device)
        with torch.no_grad():
            best = judged()
    optimizer = torch.optim.AdamW(list(stacked.values()), lr=cfg.personal_lr, weight_decay=cfg.weight_decay, fused=True)
    generators = [torch.Generator(device="cpu").manual_seed(cfg.seed + c % refits) for c in range(count)]
    batch = max(cfg.batch_size, 32)
    every = max(1, cfg.personal_steps // 20)
    best_state = {name: value.detach().clone() for name, value in stacked.items()}
    best_step = torch.zeros(count, dtype=torch.long)
    last = cfg.personal_steps if stop_at is None else int(stop_at.max())
    stage = "personal refit: steps" if stop_at is None else "personal refit: rerun with the latest windows"
    for step in progress(range(1, last + 1), stage):
        draws = torch.stack([torch.randint(size, (batch,), generator=g) for size, g in zip(sizes, generators, strict=True)])
        index = draws.to(device) + offsets[:, None]
        optimizer.zero_grad(set_to_none=True)
        batched = {key: value[index] for key, value in fit_all.items()}
        torch.func.vmap(one)(stacked, batched).mean(dim=1).sum().backward()
        optimizer.step()
        if stop_at is not None:
            keep = (stop_at == step).to(device)
        elif step % every == 0:
            with torch.no_grad():
                now = judged()
                keep = now < best - 1e-6
                best = torch.where(keep, now, best)
        else:
            continue
        with torch.no_grad():
            for name, value in stacked.items():
                best_state[name][keep] = value[keep]
        best_step[keep.cpu()] = step
    return best_state, best_step
