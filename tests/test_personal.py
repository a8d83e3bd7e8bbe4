"""The personal part: only the output layers move, a refit that does not help on validation is not
kept, and what a merchant sends in a round does not depend on it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared.adapter import adapter_state, load_adapter_state, shared_parameters
from shared.config import with_overrides
from shared.personal import PERSONAL_LAYERS, personal_state
from shared.pipeline import ForecastPipeline
from shared.schema import prepare
from shared.synthetic import generate_merchants
from shared.train import evaluate_loss
from shared.windows import Splits


def _is_personal(name: str) -> bool:
    return name.split(".")[0] in PERSONAL_LAYERS


def _personal_names(pipeline: ForecastPipeline) -> set[str]:
    return {name for name, _ in pipeline.model.named_parameters() if _is_personal(name)}


@pytest.mark.slow  # ~25 s on 2 cores: refits and reruns
def test_personalise_moves_only_the_output_layers_and_keeps_what_helps(tiny_cfg, synthetic_table) -> None:
    """Without latest windows the rerun for the chosen steps retraces the refit exactly: the layers kept
    score on validation what the check measured."""
    pipeline = ForecastPipeline.from_config(tiny_cfg, synthetic_table)
    splits = _without_latest(pipeline.splits(synthetic_table))
    pipeline.fit(splits.train, steps=5)
    shared_before, device = adapter_state(pipeline.model), pipeline.device
    before, after, kept = pipeline.personalise(splits)
    shared_after = adapter_state(pipeline.model)
    moved = {k for k in shared_before if not torch.equal(shared_before[k], shared_after[k])}
    assert moved and all(_is_personal(k) for k in moved), moved
    assert kept > 0 and after < before
    assert np.isclose(evaluate_loss(pipeline.model, splits.val, device), after, rtol=1e-4)
    assert set(personal_state(pipeline.model)) == _personal_names(pipeline)


def _without_latest(splits: Splits) -> Splits:
    return dataclasses.replace(splits, latest=splits.latest.subset(np.arange(0)))


@pytest.mark.slow  # ~55 s on 2 cores
def test_the_refit_kept_learns_from_the_latest_windows_that_validation_did_not_choose_with(tiny_cfg, synthetic_table) -> None:
    """Validation chooses the steps and whether to keep the refit; the layers kept are then refitted
    with the latest windows too: their targets change the layers, not the choice."""
    pipeline = ForecastPipeline.from_config(tiny_cfg, synthetic_table)
    splits = pipeline.splits(synthetic_table)
    start = adapter_state(pipeline.model)
    kept = []
    for latest_target in (splits.latest.target, splits.latest.target * 3):
        changed = dataclasses.replace(splits, latest=dataclasses.replace(splits.latest, target=latest_target))
        load_adapter_state(pipeline.model, start)
        kept.append((pipeline.personalise(changed), personal_state(pipeline.model)))
    (choice, layers), (same_choice, other_layers) = kept
    assert choice == same_choice and choice[2] > 0
    assert any(not torch.equal(layers[k], other_layers[k]) for k in layers)


def test_a_refit_that_does_not_help_is_not_kept(tiny_cfg, synthetic_table) -> None:
    """With a learning rate that wrecks the output layers, validation never improves on step 0: the
    global adapter comes back unchanged."""
    cfg = with_overrides(tiny_cfg, {"train.personal_lr": 1e3, "train.personal_steps": 40})
    pipeline = ForecastPipeline.from_config(cfg, synthetic_table)
    splits = pipeline.splits(synthetic_table)
    start = adapter_state(pipeline.model)
    before, after, kept = pipeline.personalise(splits)
    assert kept == 0 and after == before
    end = adapter_state(pipeline.model)
    assert all(torch.equal(start[k], end[k]) for k in start)


@pytest.mark.slow  # ~30 s each on 2 cores
@pytest.mark.parametrize("shared", [["llm"], ["llm", "head"]])
def test_the_output_layers_refit_in_or_out_of_the_shared_part_and_it_stays_as_it_was(tiny_cfg, synthetic_table, shared) -> None:
    """Outside [model] shared the output layers are frozen for the federation: the refit still moves
    them (it trains copies and puts the result back) and leaves them frozen, so the next round trains
    and sends exactly what it did before."""
    pipeline = ForecastPipeline.from_config(with_overrides(tiny_cfg, {"model.shared": shared}), synthetic_table)
    sharing = set(shared_parameters(pipeline.model))
    start = adapter_state(pipeline.model)
    _, _, kept = pipeline.personalise(pipeline.splits(synthetic_table))
    end = adapter_state(pipeline.model)
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert kept > 0 and moved == _personal_names(pipeline), moved
    assert set(shared_parameters(pipeline.model)) == sharing


@pytest.mark.slow  # ~45 s on 2 cores
def test_several_refits_are_kept_as_the_average_of_their_output_layers(tiny_cfg, synthetic_table) -> None:
    """The output layers are linear in their features, so averaging the refits' weights averages their
    forecasts: with two refits the kept layers are the mean of the two refits made one at a time."""
    single = with_overrides(tiny_cfg, {"train.personal_refits": 1})
    pipeline = ForecastPipeline.from_config(single, synthetic_table)
    splits = pipeline.splits(synthetic_table)
    start = adapter_state(pipeline.model)
    alone = []
    for seed in (0, 1):
        pipeline.cfg = with_overrides(single, {"train.seed": seed})
        _, _, kept = pipeline.personalise(splits)
        assert kept > 0
        alone.append(personal_state(pipeline.model))
        load_adapter_state(pipeline.model, start)
    assert any(not torch.equal(alone[0][k], alone[1][k]) for k in alone[0])  # each refit its own batch order
    pipeline.cfg = with_overrides(single, {"train.personal_refits": 2})
    before, after, _ = pipeline.personalise(splits)
    assert after < before
    both = personal_state(pipeline.model)
    for name, value in both.items():
        torch.testing.assert_close(value, (alone[0][name] + alone[1][name]) / 2)


@pytest.mark.slow  # ~20 s on 2 cores
def test_merchants_refitted_together_get_what_each_gets_alone(tiny_cfg) -> None:
    """A simulation refits all its merchants in one batched refit (shared.personal.personal_fits): each
    must end where it would refitting alone on its own machine, and the global adapter stays as it was."""
    table = prepare(generate_merchants(n_merchants=3, n_days=240, seed=1), tiny_cfg.data, "synthetic")
    pipeline = ForecastPipeline.from_config(with_overrides(tiny_cfg, {"train.personal_refits": 2, "train.personal_steps": 400}), table)
    merchants = [pipeline.splits(table.for_merchant(m)) for m in table.merchants()]
    start = adapter_state(pipeline.model)
    together = pipeline.personal_fits(merchants)
    end = adapter_state(pipeline.model)
    assert all(torch.equal(start[k], end[k]) for k in start)
    assert sum(fit.steps > 0 for fit in together) >= 2
    for splits, fit in zip(merchants, together, strict=True):
        (alone,) = pipeline.personal_fits([splits])
        assert fit.steps == alone.steps and np.isclose(fit.before, alone.before) and np.isclose(fit.after, alone.after)
        for name, value in fit.state.items():
            torch.testing.assert_close(value, alone.state[name])
    first, second = (fit.state for fit in together[:2])
    assert any(not torch.equal(first[k], second[k]) for k in first)  # each merchant its own layers
