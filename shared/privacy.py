"""DP-SGD for one merchant's local training: what is sampled, what is clipped, what is spent.

The protected unit decides the sampling. Windows overlap, so one day sits in up to L + H windows
and "one window" protects nothing meaningful:
  - "series": a whole product/customer series is the unit. Each step Poisson-samples series, and a
    sampled series contributes one window, hence one clipped gradient.
  - "day":    only non-overlapping windows are used, so each day lies in at most one training example
    and the per-example guarantee covers any single day (and the rest of its window).
The accountant is charged with the sampling rate of that unit, and the budget is reserved in the
merchant's ledger before the first step runs, so a crash can never leave steps unaccounted.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader

from shared.config import Config, ConfigError, PrivacyConfig
from shared.ledger import PrivacyLedger
from shared.windows import WindowDataset, Windows


def privacy_units(windows: Windows, unit: str, window_length: int) -> list[np.ndarray]:
    """Window indices grouped by protected unit (see the module docstring)."""
    if unit == "series":
        return [np.flatnonzero(windows.series == s) for s in np.unique(windows.series)]
    units: list[np.ndarray] = []
    for s in np.unique(windows.series):
        next_free = -np.inf
        for i in np.flatnonzero(windows.series == s)[np.argsort(windows.offset[windows.series == s])]:
            if windows.offset[i] >= next_free:
                units.append(np.array([i]))
                next_free = windows.offset[i] + window_length
    return units


def sample_rate(cfg: Config, train: Windows) -> float:
    """The probability with which each protected unit is Poisson-sampled per step, which is also
    what the merchant's ledger is charged: one expected batch of `batch_size` units (or all of them)."""
    return _rate(len(privacy_units(train, cfg.privacy.unit, cfg.data.context + cfg.data.horizon)), cfg.train.batch_size)


def _rate(units: int, batch_size: int) -> float:
    return 1.0 / int(np.ceil(units / min(batch_size, units)))


def noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier with which `steps` steps at `sample_rate` spend exactly `target_epsilon`
    (Opacus' RDP search), so a planned run ends on its budget instead of stopping short of its steps."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                      accountant="rdp"))


def open_ledger(cfg: PrivacyConfig, merchant: str) -> PrivacyLedger:
    """The merchant's own ledger file, kept on its disk across rounds and restarts."""
    path = Path(cfg.ledger_dir) / f"{merchant.replace('/', '_')}.json"
    return PrivacyLedger(path, cfg.target_epsilon, cfg.delta, cfg.unit)


@dataclass(frozen=True)
class MerchantPins:
    """What a merchant's own node config fixes, whatever the server's run config asks: the server may
    ask for less privacy spending, never more, and never for a fresh ledger.

    Node config keys (flower-supernode --node-config): `ledger-dir` (where its budget is kept),
    `require-dp` (DP-SGD even if the server turns it off), `max-epsilon` (the ledger's budget; the
    server's privacy.target_epsilon can only lower what a run may spend), `min-noise` (a floor on σ).
    """

    ledger_dir: str | None = None
    require_dp: bool = False
    max_epsilon: float | None = None
    min_noise: float = 0.0

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> MerchantPins:
        try:
            pins = cls(
                ledger_dir=str(node_config["ledger-dir"]) if "ledger-dir" in node_config else None,
                require_dp=_as_bool(node_config.get("require-dp", False)),
                max_epsilon=float(node_config["max-epsilon"]) if "max-epsilon" in node_config else None,
                min_noise=float(node_config.get("min-noise", 0.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node config: {exc}") from exc
        if pins.max_epsilon is not None and not (pins.max_epsilon > 0 and math.isfinite(pins.max_epsilon)):
            raise ConfigError(f"node config: max-epsilon must be a finite number > 0, got {pins.max_epsilon}")
        if not (pins.min_noise >= 0 and math.isfinite(pins.min_noise)):
            raise ConfigError(f"node config: min-noise must be a finite number >= 0, got {pins.min_noise}")
        return pins

    def apply(self, cfg: PrivacyConfig) -> tuple[PrivacyConfig, float]:
        """The privacy settings this merchant trains under, and the ε a run may spend up to."""
        budget = cfg.target_epsilon if self.max_epsilon is None else self.max_epsilon
        pinned = replace(cfg, enabled=cfg.enabled or self.require_dp, ledger_dir=self.ledger_dir or cfg.ledger_dir,
                         target_epsilon=budget, noise_multiplier=max(cfg.noise_multiplier, self.min_noise))
        return pinned, min(cfg.target_epsilon, budget)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"require-dp must be true or false, got {value!r}")


class PrivateTraining:
    """One DP training session: reserves budget, wraps model and optimiser with Opacus, unwraps."""

    def __init__(self, cfg: Config, ledger: PrivacyLedger, train: Windows, ceiling: float | None = None):
        self.cfg, self.ledger, self.ceiling = cfg.privacy, ledger, ceiling
        self.units = privacy_units(train, cfg.privacy.unit, cfg.data.context + cfg.data.horizon)
        self.sample_rate = _rate(len(self.units), cfg.train.batch_size)
        self._wrapped: GradSampleModule | None = None

    @classmethod
    def for_merchant(cls, cfg: Config, merchant: str, train: Windows, pins: MerchantPins | None = None) -> PrivateTraining:
        """The session of `merchant`, charged to its own ledger on its disk, under its own pins."""
        privacy, ceiling = (pins or MerchantPins()).apply(cfg.privacy)
        return cls(replace(cfg, privacy=privacy), open_ledger(privacy, merchant), train, ceiling)

    def reserve(self, planned_steps: int) -> int:
        """Records as many of `planned_steps` as the remaining budget allows; returns that number."""
        return self.ledger.reserve(self.cfg.noise_multiplier, self.sample_rate, planned_steps, self.ceiling)

    def attach(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: Windows
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Iterator[dict[str, torch.Tensor]]]:
        # Sampling and noise draw from a fresh secret seed: seeded from the (public) config they could
        # be regenerated and subtracted, and would repeat every round.
        secret = torch.Generator().manual_seed(secrets.randbits(63))
        dataset = WindowDataset(train, self.units, seed=secrets.randbits(128))
        dp_loader = DPDataLoader(dataset, sample_rate=self.sample_rate, generator=secret)
        dp_loader.collate_fn([dataset[0]])  # teaches Opacus the batch's dict layout, in case the first draw is empty
        engine = PrivacyEngine(accountant="rdp")
        model.train()
        wrapped, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=dp_loader, noise_multiplier=self.cfg.noise_multiplier,
            max_grad_norm=self.cfg.max_grad_norm, poisson_sampling=False, noise_generator=secret, grad_sample_mode="hooks",
        )
        self._wrapped = wrapped

        def batches() -> Iterator[dict[str, torch.Tensor]]:
            while True:
                yield from dp_loader

        return wrapped, dp_optimizer, batches()

    @staticmethod
    def noise_only_step(optimizer: torch.optim.Optimizer) -> None:
        """The step of an empty Poisson batch: the clipped sum is zero, the noise is not. Skipping it
        would run a different mechanism from the one the ledger charges for every planned step."""
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()

    def detach(self) -> None:
        """Removes Opacus' hooks so the same forecaster serves the next round or merchant."""
        if self._wrapped is not None:
            self._wrapped._close()
            self._wrapped = None

    def epsilon(self) -> float:
        return self.ledger.epsilon()
