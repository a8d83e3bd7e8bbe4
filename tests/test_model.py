"""The forecaster on the tiny backbone: shapes, non-crossing quantiles, a frozen backbone, the adapter
(what moves, how it is saved, what the server refuses), the ablations and the precision paths."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from peft import PeftModel

from shared.adapter import (
    AdapterMismatch,
    adapter_shapes,
    adapter_state,
    check_update,
    load_adapter,
    load_adapter_state,
    save_adapter,
    shared_shapes,
    shared_size,
    shared_state,
)
from shared.backbone import load_pretrained, truncated_backbone
from shared.config import ConfigError
from shared.model import (
    MIN_SPREAD,
    AttentionBlock,
    Forecaster,
    mean_abs_scale,
    monotone_quantiles,
    pinball_loss,
    seasonal_lag_index,
    step_features,
    step_spread,
)
from shared.pipeline import ForecastPipeline
from shared.train import autocast, evaluate_loss, fit, predict, resolve_device

CPU = torch.device("cpu")
# Softmax is invariant to a bias on the keys (it adds the same q.b to every score), so this tensor's
# gradient is zero up to rounding; it is trainable but cannot be required to move.
ZERO_GRADIENT: set[str] = set()


def _batch(windows, n: int = 5) -> dict[str, torch.Tensor]:
    return windows.tensors(np.arange(min(n, len(windows))))


def _is_lora_b(name: str) -> bool:
    return "lora_B" in name


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every non-trainable parameter and buffer, cloned."""
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def _assert_monotone(quantiles: torch.Tensor | np.ndarray) -> None:
    q = torch.as_tensor(quantiles)
    assert torch.isfinite(q).all()
    assert (q.diff(dim=-1) >= 0).all(), "quantiles cross"


@pytest.fixture(scope="module")
def trained(make_forecaster):
    """A tiny forecaster trained 30 steps, with snapshots of its frozen and trainable tensors from before."""
    model, splits, cfg = make_forecaster()
    frozen, adapter = _frozen(model), adapter_state(model)
    shared_copy = _frozen(load_pretrained("tiny")[0])  # the process-wide pretrained model it was cut from
    result = fit(model, splits.train, splits.val, cfg.train, steps=30)
    return model, splits, cfg, (frozen, shared_copy), adapter, result


# --- shapes and quantiles -------------------------------------------------------------------------


def test_forward_and_predict_shapes(tiny_model_and_splits, tiny_cfg):
    model, splits = tiny_model_and_splits
    B, H, Q = 5, tiny_cfg.data.horizon, len(tiny_cfg.model.quantiles)
    quantiles, scale = model(**_batch(splits.train, B))
    assert quantiles.shape == (B, H, Q) and quantiles.dtype == torch.float32
    assert scale.shape == (B, 1) and (scale > 0).all()
    batch = _batch(splits.train, B)
    sales = model.predict(**batch)
    assert sales.shape == (B, H, Q) and (sales >= 0).all()
    is_open = batch["open"][:, -H:, None]
    assert (is_open == 0).any(), "the batch should hold a closed day (Easter at a shop that closes)"
    torch.testing.assert_close(sales, (quantiles * scale.unsqueeze(-1) * is_open).clamp_min(0))
    for windows in (splits.test, splits.future):
        out = predict(model, windows, CPU, batch_size=4)  # several batches
        assert isinstance(out, np.ndarray) and out.shape == (len(windows), H, Q)


def test_mean_abs_scale_and_pinball():
    x = torch.tensor([[1.0, -3.0, 2.0], [0.0, 0.0, 0.0]])
    assert torch.equal(mean_abs_scale(x), torch.tensor([[2.0], [1.0]]))  # all-zero window -> 1
    levels = torch.tensor([0.1, 0.5, 0.9])
    pred = torch.zeros(1, 1, 3)
    # target above every quantile: loss = level * 2; below: (1 - level) * 2
    assert pinball_loss(pred, torch.tensor([[2.0]]), levels).item() == pytest.approx(2 * (0.1 + 0.5 + 0.9) / 3)
    assert pinball_loss(pred, torch.tensor([[-2.0]]), levels).item() == pytest.approx(2 * (0.9 + 0.5 + 0.1) / 3)
    assert pinball_loss(torch.randn(4, 7, 3), torch.randn(4, 7), levels).shape == (4,)  # per window, for DP


def test_monotone_quantiles_never_cross_on_random_raw_outputs():
    torch.manual_seed(0)
    raw = torch.randn(64, 14, 9) * 50  # huge, unordered raw outputs
    q = monotone_quantiles(raw, 4, torch.ones(64, 1))
    _assert_monotone(q)
    assert torch.equal(q[..., 4], raw[..., 4])  # the median is passed through


def test_band_gaps_are_in_units_of_the_contexts_step_spread():
    series = torch.tensor([[1.0, 1.1, 0.9, 1.0, 0.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    is_open = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0], [1.0] * 6])
    # pairs with a closed day (the drop to 0 and the jump back) do not count; a flat series gets the floor
    assert torch.allclose(step_spread(series, is_open), torch.tensor([[0.4 / 3], [MIN_SPREAD]]))
    raw = torch.zeros(2, 1, 3)
    unit = torch.tensor([[1.0], [10.0]])
    q = monotone_quantiles(raw, 1, unit)
    width = q[:, 0, 2] - q[:, 0, 0]
    assert torch.allclose(width[1], 10 * width[0])  # the same raw outputs, a band ten times as wide


def test_each_horizon_step_reads_its_own_latest_seasonal_lags():
    # a daily context of 21 days ending at t = index 20: step 1 (t + 1) shares its weekday with t - 6 (index 14), step 7
    # with t (20), step 8 again with t - 6 (14); their earlier cycles lie 7 and 14 days before
    lags, exists = seasonal_lag_index(context=21, horizon=8, season=7)
    assert lags[:, 0].tolist() == [14, 15, 16, 17, 18, 19, 20, 14]
    assert lags[0].tolist() == [14, 7, 0] and exists.all()
    lags, exists = seasonal_lag_index(context=10, horizon=7, season=7)  # 10 days hold a second cycle for the last 3 weekdays only
    assert lags[:, 0].tolist() == [3, 4, 5, 6, 7, 8, 9] and lags[4:, 1].tolist() == [0, 1, 2]
    assert exists[:, 1].tolist() == [False] * 4 + [True] * 3
    lags, _ = seasonal_lag_index(context=5, horizon=3, season=52)  # a season longer than the context: the last steps
    assert lags[:, 0].tolist() == [4, 4, 4]


def test_a_closed_seasonal_lag_is_stood_in_for_by_the_weekday_profile():
    series = torch.tensor([[2.0, 4.0, 0.0, 6.0]])  # season 2: step 1 reads index 2 (closed), then index 0
    is_open = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    promo = torch.tensor([[[1.0]]])  # one known covariate at the single horizon step
    lags, exists = seasonal_lag_index(context=4, horizon=1, season=2)
    features = step_features(series, is_open, promo, lags, exists.float(), recent=2)
    latest, second, profile, level, flag, lifted = features[0, 0].tolist()
    assert profile == 2.0 and latest == 2.0  # the closed 0 is no sale: the open same-phase day stands in
    assert second == 2.0 and level == 6.0  # the recent level counts open days only
    assert flag == 1.0 and lifted == 2.0  # the promotion alone and times the profile


def test_the_per_step_path_alone_can_be_seasonal_naive(make_forecaster):
    """With every other output layer at zero and weight 1 on the latest seasonal lag, the median is
    exactly last week's same weekday (scaled back): the structure a shop's few windows only have to
    weight, not to learn step by step."""
    model, splits, _ = make_forecaster(**{"data.columns.open": ""})
    with torch.no_grad():
        for layer in (model.head, model.linear):
            layer.weight.zero_()
            layer.bias.zero_()
        model.linear.bias.view(model.shape.horizon, -1)[:, model.mid] = 0.0
        model.per_step.weight.zero_()
        model.per_step.weight[:, 0] = 1.0
    batch = _batch(splits.test, 3)
    sales = model.predict(**batch)
    context = batch["context"]
    days = torch.arange(1, model.shape.horizon + 1)
    expected = context[:, context.shape[1] - 1 + days - 7 * torch.ceil(days / 7).long()]
    torch.testing.assert_close(sales[..., model.mid], expected.clamp_min(0), rtol=1e-4, atol=1e-3)


def test_forecaster_quantiles_never_cross_on_random_inputs(tiny_model_and_splits):
    model, splits = tiny_model_and_splits
    torch.manual_seed(0)
    inputs = _batch(splits.train, 8)
    inputs["context"] = torch.rand_like(inputs["context"]) * 1000 * (torch.rand(8, 1) > 0.3)  # incl. all-zero windows
    inputs["observed"] = torch.randn_like(inputs["observed"]) * 100
    inputs["known"] = torch.randn_like(inputs["known"])
    quantiles, scale = model(**inputs)
    _assert_monotone(quantiles)
    _assert_monotone(model.predict(**inputs))
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_quantiles_never_cross_after_training(trained):
    model, splits, *_ = trained
    for windows in (splits.train.subset(np.arange(0, len(splits.train), 7)), splits.val, splits.test, splits.future):
        _assert_monotone(predict(model, windows, CPU))
        with torch.no_grad():
            _assert_monotone(model(**windows.tensors())[0])


# --- what trains and what does not ----------------------------------------------------------------


def test_backbone_bit_identical_after_training(trained):
    model, _, _, (frozen_before, shared_before), _, result = trained
    assert result.steps == 30
    frozen_after = _frozen(model)
    assert frozen_after.keys() == frozen_before.keys()
    names = " ".join(frozen_before)
    assert "base_layer.weight" in names and "embed_tokens.weight" in names and "mlp" in names
    changed = [n for n in frozen_before if not torch.equal(frozen_before[n], frozen_after[n])]
    assert not changed, f"frozen tensors changed: {changed[:5]}"
    # only adapter tensors are trainable
    assert set(adapter_state(model)) == {n for n, p in model.named_parameters() if p.requires_grad}
    # and the process-wide pretrained model other forecasters are cut from is untouched too
    shared_after = _frozen(load_pretrained("tiny")[0])
    assert all(torch.equal(shared_before[n], shared_after[n]) for n in shared_before)


def test_every_adapter_tensor_moves(trained):
    model, _, _, _, before, _ = trained
    after = adapter_state(model)
    assert after.keys() == before.keys()
    lora_b = [n for n in before if _is_lora_b(n)]
    assert len(lora_b) == 2 * len(model.cfg.lora.targets)  # 2 blocks x (q_proj, v_proj)
    for name in lora_b:
        assert torch.count_nonzero(before[name]) == 0, f"{name} should start at zero"
        assert torch.count_nonzero(after[name]) > 0, f"{name} is still zero after training"
    assert any("lora_A" in n for n in before)  # A trains too unless freeze_a
    unmoved = [n for n in before if n not in ZERO_GRADIENT and torch.equal(before[n], after[n])]
    assert not unmoved, f"adapter tensors that did not train: {unmoved}"


def test_no_gradient_reaches_frozen_parameters(tiny_model_and_splits):
    model, splits = tiny_model_and_splits
    model.zero_grad(set_to_none=True)
    try:
        target = torch.as_tensor(splits.train.target[:4])
        model.loss(target, **_batch(splits.train, 4)).mean().backward()
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(dict(model.named_parameters())[n].grad is None for n in frozen)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        model.zero_grad(set_to_none=True)


# --- the adapter on disk --------------------------------------------------------------------------


def test_adapter_save_load_round_trip(trained, tmp_path):
    model = trained[0]
    saved = adapter_state(model)
    assert any(_is_lora_b(n) and torch.count_nonzero(t) > 0 for n, t in saved.items())
    directory = save_adapter(model, tmp_path / "adapter", meta={"round": 3})
    assert (directory / "adapter.safetensors").is_file() and (directory / "lora").is_dir()
    with torch.no_grad():  # perturb every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    assert not all(torch.equal(saved[n], t) for n, t in adapter_state(model).items())
    meta = load_adapter(model, directory)
    assert meta["round"] == 3 and meta["model"]["backbone"] == "tiny" and meta["shape"]["horizon"] == model.shape.horizon
    loaded = adapter_state(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(saved[n], loaded[n]) for n in saved)


def test_lora_folder_loads_with_peft_onto_a_fresh_backbone(trained, tmp_path):
    model = trained[0]
    save_adapter(model, tmp_path / "adapter")
    blocks, _ = truncated_backbone("tiny", model.cfg.llm_layers)
    peft_model = PeftModel.from_pretrained(blocks, str(tmp_path / "adapter" / "lora"))
    ours = {n: p for n, p in model.llm.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert ours and ours.keys() == theirs.keys()
    assert any(torch.count_nonzero(p) for n, p in ours.items() if _is_lora_b(n))
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # and the base weights under them are the same pretrained blocks
    base = {n: p for n, p in model.llm.named_parameters() if "lora_" not in n}
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name


def test_check_update_rejects_wrong_keys_shapes_and_non_finite(tiny_model_and_splits):
    model, _ = tiny_model_and_splits
    good, expected = adapter_state(model), adapter_shapes(model)
    check_update(good, expected)  # the model's own state passes
    name = "head.weight"

    missing = {k: v for k, v in good.items() if k != name}
    with pytest.raises(AdapterMismatch, match="missing.*head.weight"):
        check_update(missing, expected)
    with pytest.raises(AdapterMismatch, match="unexpected.*surprise"):
        check_update({**good, "surprise": torch.zeros(1)}, expected)
    with pytest.raises(AdapterMismatch, match=r"head.weight: shape .* expected"):
        check_update({**good, name: torch.zeros(3, 3)}, expected)
    with pytest.raises(AdapterMismatch, match=r"head.weight: shape"):
        check_update({**good, name: good[name].flatten()}, expected)  # same numel, wrong shape
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        poisoned = good[name].clone()
        poisoned[0, 0] = bad_value
        with pytest.raises(AdapterMismatch, match="head.weight: non-finite"):
            check_update({**good, name: poisoned}, expected)


def test_load_adapter_state_checks_everything_before_copying(tiny_model_and_splits):
    model, _ = tiny_model_and_splits
    before = adapter_state(model)
    update = {n: t + 1.0 for n, t in before.items()}
    last = list(update)[-1]
    update[last] = torch.full_like(update[last], float("nan"))  # only the last tensor is bad
    with pytest.raises(AdapterMismatch):
        load_adapter_state(model, update)
    after = adapter_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "a rejected update was partly applied"


# --- learning -------------------------------------------------------------------------------------


def test_loss_falls_on_a_weekly_seasonal_series(seasonal_table, make_forecaster):
    pinned = {"train.batch_size": 16, "train.lr": 2e-3, "train.weight_decay": 0.0, "train.seed": 0, "model.seed": 0}
    no_covariates = {"data.columns.known": [], "data.columns.observed": [], "data.columns.open": ""}
    model, splits, cfg = make_forecaster(seasonal_table, **no_covariates, **pinned)
    initial = evaluate_loss(model, splits.val, CPU)
    fit(model, splits.train, None, cfg.train, steps=80)
    final = evaluate_loss(model, splits.val, CPU)
    assert final < 0.6 * initial, (initial, final)
    # and it learned the season, not just the level: it beats the best seasonality-blind forecast,
    # each window's own empirical quantiles held flat over the horizon
    context, target = torch.as_tensor(splits.val.context), torch.as_tensor(splits.val.target)
    scale = mean_abs_scale(context)
    flat = torch.quantile(context / scale, model.levels, dim=1).T[:, None, :].expand(-1, target.shape[1], -1)
    blind = pinball_loss(flat, target / scale, model.levels).mean().item()
    assert final < blind, (final, blind)


# --- ablations and LoRA variants ------------------------------------------------------------------


@pytest.fixture
def fresh_shared_embedding():
    """The process-wide pretrained embedding as a fresh process has it (trainable, like any new module),
    before an earlier test's forecaster froze it, so freezing is checked whatever ran first."""
    embedding = load_pretrained("tiny")[0].embed_tokens
    embedding.requires_grad_(True)
    yield embedding
    embedding.requires_grad_(False)


@pytest.mark.parametrize("variant", ["no_llm", "attention", "random_llm"])
def test_ablation_variants_build_run_and_train(make_forecaster, fresh_shared_embedding, variant):
    model, splits, cfg = make_forecaster(**{"model.variant": variant})
    if variant == "no_llm":
        assert model.llm is None and not model.uses_prompt and splits.train.prompt_ids.shape[1] == 0
    elif variant == "attention":
        assert isinstance(model.llm, AttentionBlock) and not any("lora" in n for n in adapter_state(model))
    else:  # random_llm: the same blocks with random weights, LoRA on top
        assert model.lora_model() is not None
        pretrained, _ = truncated_backbone("tiny", 2)
        ours = dict(model.llm.named_parameters())
        q = "base_model.model.layers.0.self_attn.q_proj.base_layer.weight"
        assert ours[q].shape == pretrained.layers[0].self_attn.q_proj.weight.shape
        assert not torch.equal(ours[q], pretrained.layers[0].self_attn.q_proj.weight)
    state = adapter_state(model)
    assert not any("embed_tokens" in n or "base_layer" in n for n in state), "backbone tensors in the adapter"
    assert not any(p.requires_grad for p in model.embed_tokens.parameters())
    quantiles, scale = model(**_batch(splits.train, 3))
    assert quantiles.shape == (3, cfg.data.horizon, len(cfg.model.quantiles)) and scale.shape == (3, 1)
    before = adapter_state(model)
    result = fit(model, splits.train, splits.val, cfg.train, steps=3)
    assert result.steps == 3 and np.isfinite(result.train_loss) and np.isfinite(result.val_loss)
    after = adapter_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    _assert_monotone(predict(model, splits.test, CPU))


def test_ffa_lora_freezes_a(make_forecaster):
    model, splits, cfg = make_forecaster(**{"model.lora.freeze_a": True})
    state = shared_state(model)
    assert not any("lora_A" in n for n in state) and any(_is_lora_b(n) for n in state)
    assert any("lora_A" in n for n in adapter_state(model))  # frozen, but part of the adapter a file holds
    lora_a = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    assert lora_a and not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    # A is initialised from the seed, so every merchant has the same fixed A
    twin, _, _ = make_forecaster(**{"model.lora.freeze_a": True})
    assert all(torch.equal(lora_a[n], p) for n, p in twin.named_parameters() if "lora_A" in n)
    fit(model, splits.train, None, cfg.train, steps=5)
    assert all(torch.equal(lora_a[n], p) for n, p in model.named_parameters() if "lora_A" in n)
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if _is_lora_b(n))
    assert shared_state(model).keys() == state.keys()


# --- the shared part ------------------------------------------------------------------------------


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def test_only_the_shared_part_trains_and_the_adapter_stays_whole(make_forecaster):
    shared = ("linear", "reprogram.query")
    model, splits, cfg = make_forecaster(**{"model.shared": list(shared)})
    whole, _, _ = make_forecaster()
    assert adapter_shapes(model) == adapter_shapes(whole)  # what a file holds does not depend on what trains
    assert set(shared_state(model)) == {"linear.weight", "linear.bias", "reprogram.query.weight", "reprogram.query.bias"}
    assert shared_size(model) == sum(math.prod(s) for s in shared_shapes(model).values()) < shared_size(whole)
    before = adapter_state(model)
    fit(model, splits.train, None, cfg.train, steps=3)
    after = adapter_state(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == set(shared_state(model)), moved


def test_ffa_lora_narrows_the_shared_part_too(make_forecaster):
    model, _, _ = make_forecaster(**{"model.shared": ["llm", "head"], "model.lora.freeze_a": True})
    names = set(shared_state(model))
    assert {"head.weight", "head.bias"} < names and all(n.startswith("head.") or _is_lora_b(n) for n in names)


@pytest.mark.parametrize("overrides, unmatched", [
    ({"model.shared": ["linear", "heads"]}, "heads"),  # a prefix is matched at dots: "head" holds no "heads"
    ({"model.shared": ["reprogram.key.bias"]}, "reprogram.key.bias"),  # the key projection has no bias
    ({"model.shared": ["llm"], "model.variant": "no_llm"}, "llm"),
    ({"model.shared": ["llm.base_model.model.layers.0.self_attn.q_proj.lora_A"], "model.lora.freeze_a": True}, "lora_A"),
])
def test_a_shared_prefix_under_no_trainable_tensor_is_one_line_naming_the_key(make_forecaster, overrides, unmatched):
    with pytest.raises(ConfigError) as error:
        make_forecaster(**overrides)
    message = str(error.value)
    assert message.startswith("[model] shared = [") and unmatched in message and "'linear'" in message and "\n" not in message, message


def test_an_adapter_trained_with_a_small_shared_part_reloads_whole(make_forecaster, tiny_cfg, tmp_path):
    """from_adapter loads no base: the file alone must bring back the frozen tensors, at the base's
    values, not at the seeded init a fresh model has."""
    model, splits, cfg = make_forecaster(**{"model.shared": ["linear"]})
    torch.manual_seed(0)
    base = {n: t + 0.01 * torch.randn_like(t) for n, t in adapter_state(model).items()}  # stands in for a pretrained base
    load_adapter_state(model, base)
    fit(model, splits.train, None, cfg.train, steps=3)
    save_adapter(model, tmp_path / "adapter")
    reloaded = ForecastPipeline.from_adapter(tmp_path / "adapter", tiny_cfg).model  # tiny_cfg shares every tensor
    assert reloaded.cfg.shared == ("linear",) and set(shared_state(reloaded)) == {"linear.weight", "linear.bias"}
    state = adapter_state(reloaded)
    assert state.keys() == base.keys()
    assert all(torch.equal(state[n], base[n]) for n in state if not n.startswith("linear.")), "a frozen tensor is not the base's"
    assert all(torch.equal(state[n], t) for n, t in adapter_state(model).items())
    assert not torch.equal(state["linear.weight"], base["linear.weight"])


# --- devices, precision, configuration errors -----------------------------------------------------


def test_bf16_autocast_runs_on_cpu(make_forecaster):
    model, splits, cfg = make_forecaster(**{"train.precision": "bf16"})
    assert cfg.train.precision == "bf16"
    before = adapter_state(model)
    result = fit(model, splits.train, splits.val, cfg.train, steps=2)
    assert result.steps == 2 and np.isfinite(result.train_loss) and np.isfinite(result.val_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # master weights stay fp32
    # the path really is bf16: linear layers compute in bfloat16 under autocast; quantiles come out float32
    seen = []
    handle = model.to_ff.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    try:
        with torch.no_grad(), autocast(CPU, "bf16"):
            quantiles, _ = model(**_batch(splits.val, 2))
    finally:
        handle.remove()
    assert seen == [torch.bfloat16] and quantiles.dtype == torch.float32
    after = adapter_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_cpu_only_runner_resolves_auto_to_cpu():
    if torch.cuda.is_available():
        pytest.skip("this runner has a GPU")
    assert resolve_device("auto").type == "cpu"


def test_llm_layers_outside_the_backbone_raises(tiny_cfg, tiny_model_and_splits):
    """Deeper than the backbone is known only once it is loaded; 0 is the config's own error (tests/test_config.py)."""
    model, _ = tiny_model_and_splits
    cfg = dataclasses.replace(tiny_cfg.model, llm_layers=5)
    with pytest.raises(ValueError, match=r"llm_layers = 5, but backbone 'tiny' has 4 blocks"):
        Forecaster(cfg, model.shape)
