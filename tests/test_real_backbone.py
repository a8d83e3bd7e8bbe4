"""The real default backbone: SmolLM2-135M from the GGUF that pip installed, loaded offline, with
gradients reaching LoRA and nothing else of the LLM. Skipped where the GGUF is not installed."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from shared.backbone import load_pretrained, smollm2_gguf
from shared.config import load_config
from shared.pipeline import ForecastPipeline
from shared.schema import prepare
from shared.synthetic import generate_merchants

pytestmark = pytest.mark.slow

try:
    GGUF = smollm2_gguf()
except FileNotFoundError as exc:  # pragma: no cover - depends on the installation
    pytest.skip(f"SmolLM2 GGUF not installed: {exc}", allow_module_level=True)


def _no_network(*args, **kwargs):
    raise AssertionError(f"the backbone tried to open a network connection: {args}")


@pytest.fixture(scope="module")
def real():
    """A forecaster on the first 2 SmolLM2 blocks, built with the hub offline and sockets blocked."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time, so patch it too
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        threads = torch.get_num_threads()
        torch.set_num_threads(min(2, os.cpu_count() or 1))  # 135M parameters: threads help here
        try:
            cfg = load_config(overrides={"model.backbone": "smollm2", "model.llm_layers": 2})
            table = prepare(generate_merchants(n_merchants=1, n_days=200, seed=0), cfg.data, "synthetic")
            pipeline = ForecastPipeline.from_config(cfg, table)  # from the shipped daily base: it fits 2 blocks
            assert pipeline.base is not None and pipeline.base.name == "llm"
            yield cfg, pipeline.model, pipeline.splits(table)
        finally:
            torch.set_num_threads(threads)


def test_loads_offline_from_the_installed_gguf(real):
    cfg, model, splits = real
    assert GGUF.is_file() and GGUF.stat().st_size > 50e6
    full, tokenizer = load_pretrained("smollm2")
    assert full.config.hidden_size == 576 and full.config.num_hidden_layers == 30
    assert model.lora_model() is not None and model.lora_model().base_model.model.config.num_hidden_layers == 2
    # a real vocabulary: the prompt is words, not bytes
    ids = tokenizer(["Daily unit sales"], add_special_tokens=False)["input_ids"][0]
    assert 0 < len(ids) < len("Daily unit sales")
    assert splits.train.prompt_ids.shape[1] == cfg.model.prompt_max_tokens
    assert splits.train.prompt_mask.sum(1).min() > 0


def test_forward_and_backward_reach_lora_only(real):
    cfg, model, splits = real
    index = np.arange(4)
    inputs = splits.train.tensors(index)
    target = torch.as_tensor(splits.train.target[index])
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        quantiles, scale = model(**inputs)
        assert quantiles.shape == (4, cfg.data.horizon, len(cfg.model.quantiles)) and scale.shape == (4, 1)
        assert torch.isfinite(quantiles).all() and (quantiles.diff(dim=-1) >= 0).all()
        loss = model.loss(target, **inputs).mean()
        assert torch.isfinite(loss)
        loss.backward()
        params = dict(model.named_parameters())
        lora_b = [n for n in params if "lora_B" in n]
        assert len(lora_b) == 2 * len(cfg.model.lora.targets)
        for name in lora_b:
            grad = params[name].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        frozen = [n for n, p in params.items() if not p.requires_grad]
        assert any("base_layer" in n for n in frozen) and any("embed_tokens" in n for n in frozen)
        assert all(params[n].grad is None for n in frozen), "a gradient reached the frozen backbone"
        assert all(p.grad is not None for p in params.values() if p.requires_grad)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
