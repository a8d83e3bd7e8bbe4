"""DP-SGD for one merchant's local training: what is sampled, what is clipped, what is spent.

The protected unit decides the sampling. Windows overlap, so one day sits in up to L + H windows
and "one window" of them protects nothing meaningful:
  - "series": a whole product/customer series is the unit. Each step Poisson-samples series, and a
    sampled series contributes one window, hence one clipped gradient.
  - "window": any w = window_days consecutive days of a series. Only windows that are apart by their
    length plus a gap of w - 1 days are used, so any w consecutive days touch at most one training
    example, and the per-example guarantee covers them (and the rest of that example's window).
  - "day":    the w = 1 case of "window": non-overlapping windows, each day in at most one example.
The accountant is charged with the sampling rate of that unit, and the budget is reserved in the
merchant's ledger before the first step runs, so a crash can never leave steps unaccounted.

σ is either the configured number or, with noise_multiplier = "auto", the one with which the planned
run (every round's local steps) at the merchant's own sampling rate ends on its ε, never past it; a
merchant's min-noise pin floors it either way.
"""

from __future__ import annotations

import functools
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


def privacy_units(windows: Windows, unit: str, window_length: int, window_days: int = 1) -> list[np.ndarray]:
    """Window indices grouped by protected unit (see the module docstring). `window_days` is the w of
    the "window" unit; a "day" is w = 1, so both go through the same spacing."""
    if unit == "series":
        return [np.flatnonzero(windows.series == s) for s in np.unique(windows.series)]
    spacing = window_length + (window_days if unit == "window" else 1) - 1
    return [np.array([i]) for s in np.unique(windows.series) for i in _spaced(windows, s, spacing)]


def _spaced(windows: Windows, series: int, spacing: int) -> list[int]:
    """The series' windows whose offsets are at least `spacing` apart, greedily from its first one,
    which keeps the most windows such a spacing allows."""
    members = np.flatnonzero(windows.series == series)
    chosen: list[int] = []
    next_free = -np.inf
    for i in members[np.argsort(windows.offset[members], kind="stable")]:
        if windows.offset[i] >= next_free:
            chosen.append(int(i))
            next_free = windows.offset[i] + spacing
    return chosen


def merchant_units(cfg: Config, train: Windows) -> list[np.ndarray]:
    """A merchant's protected units under cfg.privacy (unit, window_days)."""
    return privacy_units(train, cfg.privacy.unit, cfg.data.context + cfg.data.horizon, cfg.privacy.window_days)


def sample_rate(cfg: Config, train: Windows) -> float:
    """The probability with which each protected unit is Poisson-sampled per step, which is also
    what the merchant's ledger is charged: one expected batch of `batch_size` units (or all of them)."""
    return _rate(len(merchant_units(cfg, train)), cfg.train.batch_size)


def _rate(units: int, batch_size: int) -> float:
    return 1.0 / int(np.ceil(units / min(batch_size, units)))


@functools.lru_cache(maxsize=64)
def noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier with which `steps` steps at `sample_rate` spend `target_epsilon` to within
    Opacus' search tolerance (0.01), never more (its RDP search), so a planned run ends on its budget
    instead of stopping short of its steps. Cached: the search takes seconds at sampling rates near 1/2,
    and every round of a merchant asks again with the same plan."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                      accountant="rdp"))


def federated_steps(cfg: Config) -> int:
    """The DP steps a merchant's federated run plans: every merchant is asked every round (docs/privacy.md,
    section 6), and each round takes `local_steps`."""
    return cfg.federation.num_rounds * cfg.federation.local_steps


def signal_to_noise(units: int, dims: int, sigma: float, steps: int, sample_rate: float) -> float:
    """An upper estimate of how far a whole DP-SGD run's summed update stands out of its noise: the
    number to read beside ε, since ε alone does not say whether the run can still learn anything.

    Signal: each step sums the clipped gradients of the Poisson-sampled units, q·N in expectation,
    each of norm at most C, so by the triangle inequality the expected sum over T steps has norm at
    most T·q·N·C. It reaches that only if every clipped gradient has norm C and all of them point the
    same way for the whole run, the best case for learning; real gradients disagree and shrink.
    Noise: each step adds N(0, σ²C²·I_d), so T steps add N(0, T·σ²C²·I_d), whose norm concentrates at
    σ·C·√(T·d) for large d. The ratio is q·N·√T / (σ·√d); C cancels.

    At full batch (q = 1) T Gaussian steps at σ are (α, T·α/2σ²)-RDP (the Gaussian mechanism and RDP
    composition, Mironov 2017, "Rényi Differential Privacy"), exactly one Gaussian step at σ/√T. So the
    σ that spends a given ε grows as √T and the ratio becomes N/(σ₁·√d), whatever T, with σ₁ the σ of
    one step: at ε = 8, δ = 1e-5 (Opacus' RDP conversion) 1/σ₁ ≈ 1.57, the bound 1.57·N/√d of issue 13.
    With sampling (q < 1) only q·N ≈ batch_size units add to a step; the lower σ that amplification
    allows makes up part of that, not all (the table in docs/privacy.md, section 5).
    """
    return sample_rate * units * math.sqrt(steps) / (sigma * math.sqrt(dims))


def dp_learning_rate(base_lr: float, signal_to_noise: float) -> float:
    """The rate of a DP run whose signal-to-noise estimate is s: base_lr · s² / (1 + s²).

    Why: T steps of size η on an L-smooth loss move the weights by η·(T·g + √T·ξ), g the mean
    gradient and ξ one step's noise; the expected decrease ηT|g|² - (L/2)·η²·(T²|g|² + T|ξ|²) is
    largest at η = s²/(1 + s²) / (L·T), with s = √T·|g|/|ξ| the run's signal-to-noise. Without noise
    (s → ∞) that is the rate a plain run takes, base_lr; with s = 0.02 (a Walmart merchant's ten
    series against the whole adapter at ε = 8) it is 0.04% of it: the steps would be noise, so the
    shared part stays at the pretrained base, and accuracy comes from the base and the personal part,
    which is never sent and never noised. With s = 1 (hundreds of units, or a small shared part)
    it is half. s is an upper estimate (signal_to_noise), so the rate is too.
    """
    ratio = signal_to_noise * signal_to_noise
    return base_lr * ratio / (1.0 + ratio)


def ledger_unit(cfg: PrivacyConfig) -> str:
    """The unit a merchant's ledger is kept for. A "window" names its w: ε spent protecting any 7 days
    says little about any 28, so a ledger begun under one w refuses a run under another."""
    return f"window-{cfg.window_days}" if cfg.unit == "window" else cfg.unit


def unit_strength(unit: str) -> float:
    """How much a ledger unit (ledger_unit's spelling) protects, for ordering them: any w consecutive days
    (a "day" is w = 1) protect more the larger w is, and a whole series protects every run of its days.
    Steps charged at a stronger unit's sampling rate are a valid, conservative charge for a weaker one:
    a weaker unit's data sits in at most one stronger unit, so it is sampled no more often."""
    if unit == "series":
        return math.inf
    if unit == "day":
        return 1
    days = unit.removeprefix("window-")
    if days != unit and days.isdigit() and int(days) >= 1:
        return int(days)
    raise ValueError(f"privacy-unit must be series, day or window-<days>, got {unit!r}")


def open_ledger(cfg: PrivacyConfig, merchant: str, pins: MerchantPins | None = None) -> PrivacyLedger:
    """The merchant's own ledger file, kept on its disk across rounds and restarts, at its pinned δ and unit."""
    path = Path(cfg.ledger_dir) / f"{merchant.replace('/', '_')}.json"
    return PrivacyLedger(path, cfg.target_epsilon, *(pins or MerchantPins()).ledger_terms(cfg))


class PinRefused(ValueError):
    """The run config asks a merchant for less privacy than its node config pins."""


DEFAULT_MAX_LOCAL_STEPS = 1000  # 20x the most any shipped config asks a round (50); far fewer than 10^7
PIN_KEYS = ("ledger-dir", "require-dp", "max-epsilon", "min-noise", "max-delta", "privacy-unit", "max-local-steps")


@dataclass(frozen=True)
class MerchantPins:
    """What a merchant's own node config fixes, whatever the server's run config asks: the server may
    ask for more privacy and less spending, never the reverse, and never for a fresh ledger.

    Node config keys (flower-supernode --node-config): `ledger-dir` (where its budget is kept),
    `require-dp` (DP-SGD even if the server turns it off), `max-epsilon` (the ledger's budget; the
    server's privacy.target_epsilon can only lower what a run may spend), `min-noise` (a floor on σ),
    `max-delta` (the ledger's δ; a run asking a larger one is refused), `privacy-unit` (the ledger's
    unit; a run protecting a weaker one is refused, see `unit_strength`), `max-local-steps` (the most
    steps one round may reserve). Setting any of them pins δ and the unit too (1e-5 and "series" unless
    given), and a node with its own data-path must then name its merchant, which names its ledger.
    """

    ledger_dir: str | None = None
    require_dp: bool = False
    max_epsilon: float | None = None
    min_noise: float = 0.0
    max_delta: float | None = None  # None, like unit: not pinned, the run config's (as in the simulation)
    unit: str | None = None
    max_local_steps: int = DEFAULT_MAX_LOCAL_STEPS

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> MerchantPins:
        pinned = any(key in node_config for key in PIN_KEYS)
        try:
            pins = cls(
                ledger_dir=str(node_config["ledger-dir"]) if "ledger-dir" in node_config else None,
                require_dp=_as_bool(node_config.get("require-dp", False)),
                max_epsilon=float(node_config["max-epsilon"]) if "max-epsilon" in node_config else None,
                min_noise=float(node_config.get("min-noise", 0.0)),
                max_delta=float(node_config.get("max-delta", 1e-5)) if pinned else None,
                unit=str(node_config.get("privacy-unit", "series")) if pinned else None,
                max_local_steps=_as_count(node_config.get("max-local-steps", DEFAULT_MAX_LOCAL_STEPS)),
            )
            if pins.unit is not None:
                unit_strength(pins.unit)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node config: {exc}") from exc
        if pins.max_epsilon is not None and not (pins.max_epsilon > 0 and math.isfinite(pins.max_epsilon)):
            raise ConfigError(f"node config: max-epsilon must be a finite number > 0, got {pins.max_epsilon}")
        if not (pins.min_noise >= 0 and math.isfinite(pins.min_noise)):
            raise ConfigError(f"node config: min-noise must be a finite number >= 0, got {pins.min_noise}")
        if pins.max_delta is not None and not 0 < pins.max_delta < 1:
            raise ConfigError(f"node config: max-delta must be a number in (0, 1), got {pins.max_delta}")
        if pinned and "data-path" in node_config and "merchant" not in node_config:
            raise ConfigError("node config: a merchant with privacy pins must name itself (merchant=...): its ledger is named "
                              "after it, and otherwise the name comes from data columns that the server's run config chooses")
        return pins

    def ledger_terms(self, cfg: PrivacyConfig) -> tuple[float, str]:
        """The δ and unit the ledger is kept at: the pinned ones, which a run cannot change (it may only
        ask for more privacy, whose steps the ledger charges conservatively), else the run config's."""
        return (cfg.delta if self.max_delta is None else self.max_delta,
                ledger_unit(cfg) if self.unit is None else self.unit)

    def check_privacy(self, cfg: PrivacyConfig) -> None:
        """Raises PinRefused when `cfg` asks for a larger δ or a weaker unit than pinned."""
        if self.max_delta is not None and cfg.delta > self.max_delta:
            raise PinRefused(f"the run asks for privacy.delta {cfg.delta:g}, above this merchant's max-delta {self.max_delta:g}")
        if self.unit is not None and unit_strength(ledger_unit(cfg)) < unit_strength(self.unit):
            raise PinRefused(f"the run protects a {ledger_unit(cfg)!r}, less than this merchant's privacy-unit {self.unit!r} "
                             f"(day < window-<w>, growing with w < series)")

    def check_round(self, cfg: Config) -> None:
        """Raises PinRefused, before any budget is reserved, when a round's config asks for less privacy
        than pinned or for more local steps than one round may reserve (each reserves its steps up front)."""
        self.check_privacy(cfg.privacy)
        if cfg.federation.local_steps > self.max_local_steps:
            raise PinRefused(f"the run asks for {cfg.federation.local_steps} local steps a round, above this "
                             f"merchant's max-local-steps {self.max_local_steps}")

    def apply(self, cfg: PrivacyConfig) -> tuple[PrivacyConfig, float]:
        """The privacy settings this merchant trains under, and the ε a run may spend up to; PinRefused
        if the run asks for less privacy than pinned. The σ floor is not folded in here: it must floor
        the σ that "auto" picks, which `PrivateTraining` decides."""
        self.check_privacy(cfg)
        budget = cfg.target_epsilon if self.max_epsilon is None else self.max_epsilon
        pinned = replace(cfg, enabled=cfg.enabled or self.require_dp, ledger_dir=self.ledger_dir or cfg.ledger_dir,
                         target_epsilon=budget)
        return pinned, min(cfg.target_epsilon, budget)


def _as_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max-local-steps must be a whole number >= 1, got {value!r}")
    return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"require-dp must be true or false, got {value!r}")


class PrivateTraining:
    """One DP training session: reserves budget, wraps model and optimiser with Opacus, unwraps.

    `noise_multiplier` is the σ of every step of the session, decided once at construction: the
    configured number, or with "auto" the σ that spends the ε the run may reach (the ledger's budget,
    or the lower ceiling) over `planned_steps` (by default the federated plan) at this merchant's own
    sampling rate; never below `min_noise`. It is planned for a fresh budget: whatever an earlier run
    left on the ledger, `reserve` still cuts the steps to what the ledger allows.
    """

    def __init__(self, cfg: Config, ledger: PrivacyLedger, train: Windows, ceiling: float | None = None, *,
                 min_noise: float = 0.0, planned_steps: int | None = None):
        self.cfg, self.ledger, self.ceiling = cfg.privacy, ledger, ceiling
        self.units = merchant_units(cfg, train)
        self.sample_rate = _rate(len(self.units), cfg.train.batch_size)
        self.planned_steps = federated_steps(cfg) if planned_steps is None else planned_steps
        self.noise_multiplier = max(self._planned_noise(), min_noise)
        self._wrapped: GradSampleModule | None = None

    def _planned_noise(self) -> float:
        if self.cfg.noise_multiplier != "auto":
            return float(self.cfg.noise_multiplier)
        # at the run's δ, which is at most the ledger's: a run asking for a smaller δ gets the larger σ it asks for
        return noise_for(self.ledger.limit(self.ceiling), self.cfg.delta, self.sample_rate, self.planned_steps)

    @classmethod
    def for_merchant(cls, cfg: Config, merchant: str, train: Windows, pins: MerchantPins | None = None,
                     planned_steps: int | None = None) -> PrivateTraining:
        """The session of `merchant`, charged to its own ledger on its disk, under its own pins."""
        pins = pins or MerchantPins()
        privacy, ceiling = pins.apply(cfg.privacy)
        return cls(replace(cfg, privacy=privacy), open_ledger(privacy, merchant, pins), train, ceiling,
                   min_noise=pins.min_noise, planned_steps=planned_steps)

    def learning_rate(self, base_lr: float, dims: int) -> float:
        """The DP steps' rate for `dims` DP-trained numbers: [privacy] lr, or under "auto"
        dp_learning_rate of this session's signal-to-noise estimate (its units, σ, planned steps, q)."""
        if self.cfg.lr != "auto":
            return float(self.cfg.lr)
        ratio = signal_to_noise(len(self.units), dims, self.noise_multiplier, self.planned_steps, self.sample_rate)
        return dp_learning_rate(base_lr, ratio)

    def reserve(self, steps: int) -> int:
        """Records as many of this round's `steps` as the remaining budget allows; returns that number."""
        return self.ledger.reserve(self.noise_multiplier, self.sample_rate, steps, self.ceiling)

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
            module=model, optimizer=optimizer, data_loader=dp_loader, noise_multiplier=self.noise_multiplier,
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
