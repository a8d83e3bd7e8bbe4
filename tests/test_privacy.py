"""DP-SGD as a merchant runs it: what is clipped, what is noised, what is sampled, what is charged.

Every test runs the real path (`PrivateTraining` + Opacus on the tiny random Llama) and checks a
property the privacy guarantee rests on, rather than trusting that the flags were passed:
  - every per-sample gradient Opacus sums is clipped to max_grad_norm, and no trainable tensor escapes;
  - Gaussian noise of standard deviation noise_multiplier * max_grad_norm is really added;
  - the frozen backbone is bit-identical after DP training and Opacus leaves no hooks behind;
  - a privacy unit is a series (one unit per series), or any w days ("window"; "day" is w = 1): then
    any w consecutive days touch at most one training window;
  - σ "auto" spends the planned budget in exactly the planned steps, under the merchant's σ floor;
  - the sample rate charged to the ledger is the rate Opacus' Poisson loader samples with;
  - a spent budget stops training before a step, and the ledger never passes the target;
  - the ledger's ε is Opacus' RDP accountant's for the same (noise, rate, steps) history;
  - the noise and sampling are fresh every round and cannot be regenerated from the config.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

import shared.privacy as shared_privacy
from shared.adapter import adapter_state, shared_size, shared_state
from shared.config import ConfigError, PrivacyConfig
from shared.ledger import LedgerError, PrivacyLedger
from shared.model import pinball_loss
from shared.pipeline import ForecastPipeline
from shared.privacy import (
    MerchantPins,
    PinRefused,
    PrivateTraining,
    dp_learning_rate,
    noise_for,
    open_ledger,
    privacy_units,
    sample_rate,
    signal_to_noise,
    unit_strength,
)
from shared.train import fit
from shared.windows import WindowDataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]


def _dp(make_forecaster, tmp_path: Path, **overrides: Any):
    """A fresh tiny forecaster, its splits and config with DP on and the ledger under tmp_path."""
    settings = {"privacy.enabled": True, "privacy.ledger_dir": str(tmp_path / "ledgers"), "train.batch_size": 4}
    return make_forecaster(**{**settings, **overrides})


def _window_length(cfg) -> int:
    return cfg.data.context + cfg.data.horizon


def _session(cfg, splits, tmp_path: Path, merchant: str = "m0") -> PrivateTraining:
    return PrivateTraining.for_merchant(cfg, merchant, splits.train)


def _first_nonempty(batches) -> dict[str, torch.Tensor]:
    for batch in batches:  # Poisson sampling can draw an empty batch
        if len(batch["target"]) > 1:
            return batch
    raise AssertionError("unreachable")


def _backward_one_batch(model, cfg, splits, tmp_path: Path):
    """Wraps the model with Opacus, runs one forward/backward on a sampled batch; returns the pieces."""
    privacy = _session(cfg, splits, tmp_path)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    torch.manual_seed(0)
    wrapped, dp_optimizer, batches = privacy.attach(model, optimizer, splits.train)
    batch = _first_nonempty(batches)
    target = batch.pop("target")
    quantiles, scale = wrapped(**batch)
    pinball_loss(quantiles, target / scale, model.levels).mean().backward()
    return privacy, params, dp_optimizer, len(target)


def _per_sample_norms(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Each sample's gradient norm over all trainable tensors together, as Opacus' flat clipping computes it."""
    per_param = [p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=-1) for p in params]
    return torch.stack(per_param, dim=1).norm(2, dim=1)


# --- clipping and noise ------------------------------------------------------------------------------


def test_every_per_sample_gradient_is_clipped_to_max_grad_norm(make_forecaster, tmp_path: Path) -> None:
    clip = 0.05  # well below the tiny model's raw per-sample norms, so clipping really acts
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"privacy.max_grad_norm": clip})
    privacy, params, dp_optimizer, batch_size = _backward_one_batch(model, cfg, splits, tmp_path)
    try:
        # no trainable tensor escapes clipping: Opacus holds all of them and has a per-sample grad for each
        assert {id(p) for p in dp_optimizer.params} == {id(p) for p in params}
        assert all(p.grad_sample is not None and p.grad_sample.shape[0] == batch_size for p in params)

        norms = _per_sample_norms(params)
        assert norms.max() > clip, "test is vacuous: no sample needed clipping"
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clip factor (opacus.optimizers.optimizer)
        clipped = norms * factor
        assert clipped.max() <= clip + 1e-6

        # ...and that factor is exactly what Opacus applied: its summed gradient is Σ_i factor_i g_i
        dp_optimizer.clip_and_accumulate()
        for p in params:
            expected = torch.einsum("i,i...->...", factor, p.grad_sample)
            torch.testing.assert_close(p.summed_grad, expected, rtol=1e-5, atol=1e-8)
        # the whole batch's clipped sum can exceed C only by summing up to one C per sample
        total = torch.sqrt(sum((p.summed_grad**2).sum() for p in params))
        assert total <= batch_size * clip + 1e-6
    finally:
        privacy.detach()


def test_gaussian_noise_of_the_calibrated_scale_is_added(make_forecaster, tmp_path: Path) -> None:
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"privacy.max_grad_norm": 0.05, "privacy.noise_multiplier": 1.3})
    privacy, params, dp_optimizer, _ = _backward_one_batch(model, cfg, splits, tmp_path)
    try:
        dp_optimizer.clip_and_accumulate()
        summed = [p.summed_grad.clone() for p in params]

        def noise_draw() -> torch.Tensor:
            for p in params:  # Opacus marks a used summed_grad so it cannot be noised twice; reset for a 2nd draw
                p.summed_grad.__dict__.pop("_processed", None)
            dp_optimizer.add_noise()  # p.grad = summed + N(0, (σC)^2), before the mean-reduction scaling
            return torch.cat([(p.grad - s).flatten() for p, s in zip(params, summed)])

        first, second = noise_draw(), noise_draw()
        sigma = privacy.noise_multiplier * cfg.privacy.max_grad_norm
        assert first.numel() > 10_000
        assert abs(first.std().item() / sigma - 1) < 0.05
        assert abs(first.mean().item()) < 5 * sigma / first.numel() ** 0.5
        assert not torch.equal(first, second)  # fresh noise on every step
        # after scaling, the step uses (clipped sum + noise) / expected batch size
        dp_optimizer.scale_grad()
        p, s = params[0], summed[0]
        torch.testing.assert_close(p.grad * dp_optimizer.expected_batch_size - s, second[: s.numel()].view_as(s))
    finally:
        privacy.detach()


def _train(make_forecaster, tmp_path: Path, dp: bool, seed: int, steps: int = 3) -> dict[str, torch.Tensor]:
    model, splits, cfg = _dp(make_forecaster, tmp_path / f"dp{dp}-seed{seed}", **{"train.seed": seed})
    privacy = _session(cfg, splits, tmp_path) if dp else None
    result = fit(model, splits.train, None, cfg.train, steps=steps, privacy=privacy)
    assert result.steps == steps and result.status == "ok"
    return adapter_state(model)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_dp_training_differs_from_plain_training_and_between_noise_draws(make_forecaster, tmp_path: Path) -> None:
    initial = adapter_state(make_forecaster()[0])
    dp_a = _train(make_forecaster, tmp_path / "a", dp=True, seed=0)
    dp_other_noise = _train(make_forecaster, tmp_path / "c", dp=True, seed=1)
    plain = _train(make_forecaster, tmp_path / "d", dp=False, seed=0)
    assert not _same(dp_a, initial)
    assert not _same(dp_a, plain)
    assert not _same(dp_a, dp_other_noise)


def _noise_of_each_step(monkeypatch) -> list[torch.Tensor]:
    """Records the Gaussian noise Opacus draws (first parameter of each step)."""
    import opacus.optimizers.optimizer as dp_optimizer_module

    drawn: list[torch.Tensor] = []
    original = dp_optimizer_module._generate_noise

    def spy(*args, **kwargs):
        noise = original(*args, **kwargs)
        drawn.append(noise.flatten()[:64].clone())
        return noise

    monkeypatch.setattr(dp_optimizer_module, "_generate_noise", spy)
    return drawn


def test_dp_noise_is_fresh_every_round_and_not_derivable_from_the_config(make_forecaster, tmp_path: Path, monkeypatch) -> None:
    drawn = _noise_of_each_step(monkeypatch)
    model, splits, cfg = _dp(make_forecaster, tmp_path)
    rounds = []
    for _ in range(2):  # two federated rounds of one merchant: same model object, same ledger
        drawn.clear()
        fit(model, splits.train, None, cfg.train, steps=2, privacy=_session(cfg, splits, tmp_path))
        rounds.append(list(drawn))
    drawn.clear()
    other_model, other_splits, other_cfg = _dp(make_forecaster, tmp_path / "replay")  # an adversary replaying the config
    fit(other_model, other_splits.train, None, other_cfg.train, steps=2, privacy=_session(other_cfg, other_splits, tmp_path / "replay"))
    replayed = list(drawn)
    assert not any(torch.equal(a, b) for a, b in zip(rounds[0], rounds[1])), "round 2 reuses round 1's noise"
    assert not any(torch.equal(a, b) for a, b in zip(rounds[0], replayed)), "the noise is reproducible from the config"


def test_frozen_backbone_is_bit_identical_after_dp_training(make_forecaster, tmp_path: Path) -> None:
    model, splits, cfg = _dp(make_forecaster, tmp_path)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    trainable = adapter_state(model)
    assert frozen, "the tiny model has no frozen backbone?"
    result = fit(model, splits.train, None, cfg.train, steps=3, privacy=_session(cfg, splits, tmp_path))
    assert result.status == "ok"
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
            assert param.grad is None, name
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert not _same(adapter_state(model), trainable)
    # Opacus is fully detached, so the same forecaster can serve the next round or merchant
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_dp_clips_and_noises_exactly_the_shared_part(make_forecaster, tmp_path: Path, monkeypatch) -> None:
    """With [model] shared, Opacus sees only the shared tensors: the noise covers d = shared_size
    numbers, not the whole adapter, and a shared layer's gradient still passes the frozen ones after it."""
    import opacus.optimizers.optimizer as dp_optimizer_module

    noised: list[int] = []
    original = dp_optimizer_module._generate_noise

    def count(std, reference, *args, **kwargs):
        noised.append(reference.numel())
        return original(std, reference, *args, **kwargs)

    monkeypatch.setattr(dp_optimizer_module, "_generate_noise", count)
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"model.shared": ["reprogram", "linear"]})
    before = adapter_state(model)
    result = fit(model, splits.train, None, cfg.train, steps=1, privacy=_session(cfg, splits, tmp_path))
    assert result.status == "ok" and sum(noised) == shared_size(model) < sum(t.numel() for t in before.values())
    after = adapter_state(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == set(shared_state(model)) and any(n.startswith("reprogram.") for n in moved), moved


def test_dp_steps_take_the_privacy_learning_rate(make_forecaster, tmp_path: Path) -> None:
    """Under DP, AdamW's steps (about lr per coordinate, mostly noise) follow [privacy] lr, not [train] lr."""
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"train.lr": 1e-2, "privacy.lr": 1e-6})
    before = adapter_state(model)
    result = fit(model, splits.train, None, cfg.train, steps=3, privacy=_session(cfg, splits, tmp_path))
    moved = max(float((after - before[name]).abs().max()) for name, after in adapter_state(model).items())
    # one AdamW step moves a coordinate at most (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr
    assert result.status == "ok" and 0 < moved <= 3 * 3.2 * 1e-6


def test_dp_learning_rate_shrinks_with_the_signal_to_noise() -> None:
    """s²/(1 + s²) of the plain rate: all of it without noise, half at s = 1, next to none where the
    steps would be noise (a Walmart merchant's whole adapter at ε = 8, s ≈ 0.02)."""
    assert dp_learning_rate(2e-3, 1e4) == pytest.approx(2e-3, rel=1e-6)
    assert dp_learning_rate(2e-3, 1.0) == pytest.approx(1e-3)
    assert dp_learning_rate(2e-3, 0.02) < 1e-6
    rates = [dp_learning_rate(2e-3, s) for s in (0.0, 0.01, 0.1, 1.0, 10.0)]
    assert rates[0] == 0.0 and rates == sorted(rates) and len(set(rates)) == len(rates)


def test_auto_dp_steps_move_the_adapter_by_the_planned_rate(make_forecaster, tmp_path: Path) -> None:
    """Under [privacy] lr = "auto" the session's rate comes from its own plan (units, σ, planned steps,
    q) and the d numbers DP trains; fit steps at it: a larger shared part gets a smaller rate."""
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"train.lr": 1e-2, "privacy.lr": "auto"})
    session = _session(cfg, splits, tmp_path)
    d = shared_size(model)
    s = signal_to_noise(len(session.units), d, session.noise_multiplier, session.planned_steps, session.sample_rate)
    rate = session.learning_rate(cfg.train.lr, d)
    assert rate == pytest.approx(dp_learning_rate(1e-2, s)) and 0 < rate < 1e-2
    assert session.learning_rate(cfg.train.lr, 100 * d) < rate
    before = adapter_state(model)
    assert fit(model, splits.train, None, cfg.train, steps=3, privacy=session).status == "ok"
    moved = max(float((after - before[name]).abs().max()) for name, after in adapter_state(model).items())
    assert 0 < moved <= 3 * 3.2 * rate  # AdamW: at most ~3.2 lr per coordinate per step


# --- privacy units and sampling ------------------------------------------------------------------------


def test_series_unit_is_one_unit_per_series(tiny_model_and_splits, tiny_cfg) -> None:
    _, splits = tiny_model_and_splits
    train = splits.train
    units = privacy_units(train, "series", _window_length(tiny_cfg))
    assert len(units) == len(np.unique(train.series))
    for unit in units:
        assert len(np.unique(train.series[unit])) == 1
    assert sorted(np.concatenate(units).tolist()) == list(range(len(train)))  # every window, exactly once


@pytest.mark.parametrize("unit, w", [("day", 1), ("window", 7), ("window", 17)])
def test_any_w_consecutive_days_touch_at_most_one_training_window(tiny_model_and_splits, tiny_cfg, unit: str, w: int) -> None:
    _, splits = tiny_model_and_splits
    train, length = splits.train, _window_length(tiny_cfg)
    units = privacy_units(train, unit, length, w)
    assert all(len(u) == 1 for u in units)
    chosen = np.concatenate(units)
    assert len(set(chosen.tolist())) == len(chosen)
    for s in np.unique(train.series):
        offsets = np.sort(train.offset[chosen][train.series[chosen] == s])
        assert len(offsets) >= 2, "test is vacuous: a series needs two units"
        assert (np.diff(offsets) >= length + w - 1).all(), "two units of one series are closer than a gap of w - 1 days"
        stretches = np.arange(offsets[-1] + length)[:, None]  # the first days of every w-day stretch
        touched = (offsets <= stretches + w - 1) & (stretches <= offsets + length - 1)
        assert touched.sum(axis=1).max() == 1
        # greedy from the first window (stride 1 here): as many units as that spacing fits in the training span
        assert len(offsets) == train.offset[train.series == s].max() // (length + w - 1) + 1


def test_a_one_day_window_is_the_day_unit(tiny_model_and_splits, tiny_cfg) -> None:
    _, splits = tiny_model_and_splits
    day = privacy_units(splits.train, "day", _window_length(tiny_cfg))
    window = privacy_units(splits.train, "window", _window_length(tiny_cfg), 1)
    assert [u.tolist() for u in window] == [u.tolist() for u in day]


def test_a_window_ledger_refuses_a_run_with_another_w(tmp_path: Path) -> None:
    """ε spent protecting any 7 days is no budget for protecting any 14: the ledger is kept per w."""
    cfg = PrivacyConfig(unit="window", window_days=7, ledger_dir=str(tmp_path))
    open_ledger(cfg, "m0").record(1.0, 0.1, 3)
    assert open_ledger(cfg, "m0").history == [(1.0, 0.1, 3)]
    for other in (replace(cfg, window_days=14), replace(cfg, unit="day")):
        with pytest.raises(LedgerError, match="unit='window-7'"):
            open_ledger(other, "m0")


@pytest.mark.parametrize("unit", ["series", "window", "day"])
def test_ledger_is_charged_the_rate_opacus_samples_with(make_forecaster, tmp_path: Path, monkeypatch, unit: str) -> None:
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"privacy.unit": unit, "train.batch_size": 3})
    privacy = _session(cfg, splits, tmp_path)
    created: list[DPDataLoader] = []

    class Spy(DPDataLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(shared_privacy, "DPDataLoader", Spy)
    result = fit(model, splits.train, None, cfg.train, steps=2, privacy=privacy)
    assert result.status == "ok" and len(created) == 1
    loader = created[0]
    n_units = len(privacy_units(splits.train, unit, _window_length(cfg), cfg.privacy.window_days))
    assert len(loader.dataset) == n_units  # Opacus samples units, not windows
    assert loader.sample_rate == privacy.sample_rate == sample_rate(cfg, splits.train)
    assert privacy.ledger.history == [(privacy.noise_multiplier, loader.sample_rate, 2)]

    # Poisson sampling of units: each batch holds distinct units, on average rate * units of them
    sizes, rng = [], torch.Generator().manual_seed(0)
    loader = DataLoader(WindowDataset(splits.train, privacy.units), batch_size=3)
    sampler = DPDataLoader.from_data_loader(loader, generator=rng).batch_sampler
    for _, indices in zip(range(400), sampler):
        assert len(set(indices)) == len(indices)
        sizes.append(len(indices))
    expected = privacy.sample_rate * n_units
    assert abs(np.mean(sizes) - expected) < 4 * np.sqrt(expected / 400) + 0.05


def test_a_units_window_does_not_depend_on_which_other_units_were_sampled(splits_of_series) -> None:
    """Neighbouring datasets D and D + one unit: with the same secret seed, every unit of D contributes
    the same windows whether or not the extra unit is drawn in between (one clipped gradient apart)."""
    train, units = splits_of_series
    d, d_plus = WindowDataset(train, units[:-1], seed=1234), WindowDataset(train, units, seed=1234)
    extra = len(units) - 1
    for step in range(20):
        for unit in range(extra):
            if step % 2:
                d_plus[extra]  # the extra unit is sampled before this one in D + 1 only
            np.testing.assert_array_equal(d[unit]["target"].numpy(), d_plus[unit]["target"].numpy())


@pytest.fixture
def splits_of_series(tiny_model_and_splits):
    _, splits = tiny_model_and_splits
    units = privacy_units(splits.train, "series", 0)
    assert len(units) >= 3 and all(len(u) > 1 for u in units), "test is vacuous: units need several windows each"
    return splits.train, units


def test_an_empty_poisson_batch_still_takes_a_noised_step(make_forecaster, tmp_path: Path, monkeypatch) -> None:
    """The ledger charges every planned step as a Gaussian release, so an empty batch must release noise too."""
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"privacy.noise_multiplier": 1.0})
    before = adapter_state(model)

    class Empty(DPDataLoader):  # every draw empty: only the noise can move the adapter
        def __init__(self, dataset, sample_rate, generator):
            super().__init__(dataset, sample_rate=1e-12, generator=generator)

    monkeypatch.setattr(shared_privacy, "DPDataLoader", Empty)
    result = fit(model, splits.train, None, cfg.train, steps=2, privacy=_session(cfg, splits, tmp_path))
    assert result.status == "ok" and result.steps == 2
    moved = [name for name, tensor in adapter_state(model).items() if not torch.equal(tensor, before[name])]
    assert moved == list(before), "some tensors got no noise on an empty batch"


# --- budget and accounting -------------------------------------------------------------------------------


def test_spent_budget_stops_training_before_any_step(make_forecaster, tmp_path: Path) -> None:
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"privacy.target_epsilon": 3.0})
    privacy = _session(cfg, splits, tmp_path)
    ledger, sigma = privacy.ledger, privacy.noise_multiplier
    affordable = ledger.affordable_steps(sigma, privacy.sample_rate, 10_000)
    assert 0 < affordable < 10_000
    ledger.record(sigma, privacy.sample_rate, affordable)
    spent, history, before = ledger.epsilon(), ledger.history, adapter_state(model)

    result = fit(model, splits.train, None, cfg.train, steps=3, privacy=_session(cfg, splits, tmp_path))
    assert result.status == "budget_exhausted"
    assert result.steps == 0
    assert result.epsilon == spent <= cfg.privacy.target_epsilon
    assert _same(adapter_state(model), before)  # not one noisy step was taken
    reopened = open_ledger(cfg.privacy, "m0")  # what is on disk, as a restarted client sees it
    assert reopened.history == history and reopened.epsilon() <= cfg.privacy.target_epsilon


def test_spending_from_an_earlier_run_still_cuts_the_planned_steps(make_forecaster, tmp_path: Path) -> None:
    """σ "auto" is planned for a fresh budget; what an earlier run left on the ledger still counts."""
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"federation.num_rounds": 1, "federation.local_steps": 4})
    privacy = _session(cfg, splits, tmp_path)
    sigma, rate = privacy.noise_multiplier, privacy.sample_rate
    privacy.ledger.record(sigma, rate, 2)  # an earlier run, under the same σ
    affordable = privacy.ledger.affordable_steps(sigma, rate, 4)
    assert 0 < affordable < 4
    result = fit(model, splits.train, None, cfg.train, steps=4, privacy=privacy)
    assert result.status == "ok" and result.steps == affordable
    assert privacy.ledger.epsilon() <= cfg.privacy.target_epsilon
    assert open_ledger(cfg.privacy, "m0").history == [(sigma, rate, 2 + affordable)]


@pytest.mark.parametrize("pins, planned, rounds", [
    (MerchantPins(), None, [2, 2]),  # the federation's plan, num_rounds x local_steps, one session per round
    (MerchantPins(max_epsilon=2.0), None, [2, 2]),  # a merchant's lower budget is what σ aims at
    (MerchantPins(), 3, [3]),  # a plan given outright (a local run's max_steps), not the federation's 2 x 2
], ids=["federated", "pinned-budget", "given-plan"])
def test_auto_noise_spends_the_planned_budget_in_all_the_planned_steps(
    make_forecaster, tmp_path: Path, pins: MerchantPins, planned: int | None, rounds: list[int]
) -> None:
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"federation.num_rounds": 2, "federation.local_steps": 2})
    assert cfg.privacy.noise_multiplier == "auto"
    for steps in rounds:
        privacy = PrivateTraining.for_merchant(cfg, "m0", splits.train, pins, planned_steps=planned)
        result = fit(model, splits.train, None, cfg.train, steps=steps, privacy=privacy)
        assert result.status == "ok" and result.steps == steps, "the ledger cut a planned step"
    assert privacy.planned_steps == sum(rounds)
    assert privacy.ledger.history == [(privacy.noise_multiplier, privacy.sample_rate, sum(rounds))]
    limit = min(cfg.privacy.target_epsilon, pins.max_epsilon or np.inf)
    assert limit - 0.01 <= result.epsilon <= limit  # Opacus' search tolerance below the budget, never above


def test_the_min_noise_pin_floors_the_auto_noise(tiny_model_and_splits, tiny_cfg, tmp_path: Path) -> None:
    _, splits = tiny_model_and_splits
    cfg = replace(tiny_cfg, privacy=replace(tiny_cfg.privacy, ledger_dir=str(tmp_path)))
    auto = PrivateTraining.for_merchant(cfg, "m0", splits.train).noise_multiplier
    assert auto == noise_for(cfg.privacy.target_epsilon, cfg.privacy.delta, sample_rate(cfg, splits.train),
                             cfg.federation.num_rounds * cfg.federation.local_steps)
    for floor in (auto / 2, auto * 2):
        pinned = PrivateTraining.for_merchant(cfg, "m0", splits.train, MerchantPins(min_noise=floor))
        assert pinned.noise_multiplier == max(auto, floor)


@pytest.mark.parametrize("steps", [1, 30, 300])
def test_full_batch_signal_to_noise_at_epsilon_8_is_the_rdp_bound(steps: int) -> None:
    """At q = 1, T steps at σ are one Gaussian step at σ/√T, so σ "auto" grows as √T and the ratio
    is about 1.57·N/√d whatever T (issue 13): 0.31 for 20 units and 10,000 trainable numbers."""
    sigma = noise_for(8.0, 1e-5, 1.0, steps)
    assert signal_to_noise(20, 10_000, sigma, steps, 1.0) == pytest.approx(1.57 * 20 / 100, rel=0.02)


def test_ledger_epsilon_after_dp_rounds_equals_opacus_rdp_accountant(make_forecaster, tmp_path: Path) -> None:
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"privacy.target_epsilon": 1e4})
    accountant = RDPAccountant()
    for steps in (2, 3):  # two rounds on the same merchant ledger, as federation runs them
        privacy = _session(cfg, splits, tmp_path)
        result = fit(model, splits.train, None, cfg.train, steps=steps, privacy=privacy)
        assert result.steps == steps
        for _ in range(steps):
            accountant.step(noise_multiplier=privacy.noise_multiplier, sample_rate=privacy.sample_rate)
        assert result.epsilon == accountant.get_epsilon(cfg.privacy.delta)  # bit for bit
    ledger = PrivacyLedger(Path(cfg.privacy.ledger_dir) / "m0.json", cfg.privacy.target_epsilon, cfg.privacy.delta, cfg.privacy.unit)
    assert ledger.history == accountant.history
    assert ledger.epsilon() == accountant.get_epsilon(cfg.privacy.delta)


def test_dp_training_does_not_use_validation_early_stopping(make_forecaster, tmp_path: Path) -> None:
    """Early stopping would choose the stopping point from the data without charging the ledger for it."""
    model, splits, cfg = _dp(make_forecaster, tmp_path, **{"train.max_steps": 4, "train.eval_every": 1, "train.patience": 1})
    result = fit(model, splits.train, splits.val, cfg.train, privacy=_session(cfg, splits, tmp_path))
    assert result.steps == 4 and result.history == []


# --- what the merchant pins, whatever the server asks ------------------------------------------------------


def test_the_merchants_node_config_pins_its_budget_against_the_server(make_forecaster, tmp_path: Path) -> None:
    """A run config with a fresh ledger_dir, DP off, target_epsilon 100 and a tiny σ gets none of them
    past a merchant that pinned its ledger, DP, its ε ceiling and a σ floor."""
    model, splits, cfg = make_forecaster(**{"privacy.enabled": False, "privacy.ledger_dir": str(tmp_path / "server-chosen"),
                                             "privacy.target_epsilon": 100.0, "privacy.noise_multiplier": 0.1})
    pins = MerchantPins.from_node_config({"ledger-dir": str(tmp_path / "mine"), "require-dp": True, "max-epsilon": 2, "min-noise": 20.0})
    session = ForecastPipeline(cfg, model.shape).private_training("m0", splits.train, pins)
    assert session is not None and session.noise_multiplier == 20.0
    assert session.ledger.path.parent == tmp_path / "mine" and session.ledger.target_epsilon == 2.0 and session.ceiling == 2.0
    # the server may still ask for less: the run stops at its lower ceiling, the ledger's budget stays the merchant's
    lower = replace(cfg, privacy=replace(cfg.privacy, target_epsilon=0.5))
    session = ForecastPipeline(lower, model.shape).private_training("m0", splits.train, pins)
    assert session.ceiling == 0.5 and session.ledger.target_epsilon == 2.0
    assert session.reserve(10_000) > 0 and 0 < session.epsilon() <= 0.5


@pytest.mark.parametrize("node_config", [{"max-epsilon": float("inf")}, {"max-epsilon": -1}, {"min-noise": float("nan")},
                                         {"require-dp": "yes"}, {"max-epsilon": "lots"}, {"max-delta": 1.0},
                                         {"max-delta": float("nan")}, {"privacy-unit": "week"}, {"privacy-unit": "window-0"},
                                         {"max-local-steps": 0}, {"max-local-steps": "10"}, {"max-local-steps": True}])
def test_a_bad_pin_is_a_config_error(node_config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="node config"):
        MerchantPins.from_node_config(node_config)


def test_units_are_ordered_by_what_they_protect() -> None:
    assert (unit_strength("day") == unit_strength("window-1") < unit_strength("window-7") < unit_strength("window-28")
            < unit_strength("series"))


@pytest.mark.parametrize(("asked", "refused"), [({"unit": "day"}, True), ({"unit": "window", "window_days": 3}, True),
                                                ({"unit": "window", "window_days": 14}, False), ({"unit": "series"}, False),
                                                ({"delta": 2e-5}, True), ({"delta": 1e-6}, False)])
def test_the_run_may_ask_for_more_privacy_than_pinned_never_less(asked: dict, refused: bool) -> None:
    pins = MerchantPins.from_node_config({"privacy-unit": "window-7", "max-delta": 1e-5})
    asking = replace(PrivacyConfig(), **{"unit": "window", **asked})
    if refused:
        with pytest.raises(PinRefused):
            pins.apply(asking)
    else:
        pins.apply(asking)


def test_any_pin_pins_delta_and_the_unit_too() -> None:
    """δ and the unit were not pinned at all: a node pinning only its ε took δ 0.5 and unit "day" from the server."""
    pins = MerchantPins.from_node_config({"max-epsilon": 2})
    assert (pins.max_delta, pins.unit) == (1e-5, "series")
    assert (MerchantPins.from_node_config({"partition-id": 0}).max_delta, MerchantPins().unit) == (None, None)  # the simulation


def test_a_round_may_reserve_only_so_many_steps(tiny_cfg) -> None:
    """local_steps = 10^7 reserved ε 5.3 of 8 up front in one round."""
    huge = replace(tiny_cfg, federation=replace(tiny_cfg.federation, local_steps=10**7))
    with pytest.raises(PinRefused, match="max-local-steps"):
        MerchantPins().check_round(huge)
    MerchantPins().check_round(tiny_cfg)


def test_a_pinned_ledger_keeps_its_delta_and_unit_whatever_more_privacy_a_run_asks(tiny_model_and_splits, tiny_cfg,
                                                                                    tmp_path: Path) -> None:
    """The ledger is kept at the pinned δ and unit: a run asking a smaller δ or a stronger unit charges its
    steps (at its own, lower sampling rate: a conservative charge) into that ledger, not into a new one."""
    _, splits = tiny_model_and_splits
    pins = MerchantPins.from_node_config({"ledger-dir": str(tmp_path), "privacy-unit": "day"})
    sessions = []
    for asked in ({"unit": "day"}, {"unit": "series", "delta": 1e-6}, {"unit": "window", "window_days": 7}):
        cfg = replace(tiny_cfg, privacy=replace(tiny_cfg.privacy, **asked))
        sessions.append(PrivateTraining.for_merchant(cfg, "m0", splits.train, pins))
        assert sessions[-1].reserve(2) == 2
    ledger = PrivacyLedger(tmp_path / "m0.json", tiny_cfg.privacy.target_epsilon, 1e-5, "day")
    assert {s.ledger.path for s in sessions} == {ledger.path} and sum(steps for *_, steps in ledger.history) == 6
    smaller_delta = sessions[1]
    assert smaller_delta.noise_multiplier == noise_for(ledger.limit(smaller_delta.ceiling), 1e-6, smaller_delta.sample_rate,
                                                       smaller_delta.planned_steps)
