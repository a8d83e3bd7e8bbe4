"""The one place configuration is read: TOML files in configs/ become typed, validated dataclasses.

A file names only what differs from the defaults below; an unknown key is an error, so a typo
cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.toml"


@dataclass(frozen=True)
class Columns:
    """Maps a merchant file's own column names onto the long schema."""

    merchant_id: str | None = "merchant_id"
    unique_id: str = "unique_id"
    ds: str = "ds"
    y: str = "y"
    known: tuple[str, ...] = ()
    observed: tuple[str, ...] = ()


@dataclass(frozen=True)
class SyntheticConfig:
    n_merchants: int = 4
    n_days: int = 540
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"
    path: str = ""
    freq: str = "D"
    horizon: int = 14
    context: int = 84
    stride: int = 1
    negative: str = "clip"
    fill: str = "zero"
    short_series: str = "error"
    columns: Columns = field(default_factory=Columns)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    max_series_per_merchant: int = 0  # 0 keeps all; presets use it to bound benchmark time
    merchants: tuple[str, ...] = ()  # a subset of merchant ids to keep; empty keeps all


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    freeze_a: bool = False


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "smollm2"
    llm_layers: int = 6
    variant: str = "llm"
    patch_len: int = 7
    patch_stride: int = 7
    d_patch: int = 32
    n_prototypes: int = 256
    reprogram_heads: int = 4
    reprogram_dim: int = 32
    d_ff: int = 32
    prompt: bool = True
    prompt_max_tokens: int = 40
    domain: str = "Daily unit sales of one product of an online shop."
    quantiles: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    nonnegative: bool = True
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    max_steps: int = 150
    eval_every: int = 25
    patience: int = 3
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    unit: str = "series"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float = 1.5
    max_grad_norm: float = 1.0
    ledger_dir: str = "runs/ledgers"


@dataclass(frozen=True)
class FederationConfig:
    num_merchants: int = 4
    num_rounds: int = 3
    local_steps: int = 10
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.05
    trim_beta: float = 0.2
    max_update_norm: float = 50.0
    weighting: str = "equal"  # equal | examples: how the mean weighs merchants (claimed example counts are unchecked)
    min_replies: int = 2
    round_timeout_s: float = 600.0
    out_dir: str = "runs/demo"
    # client-level DP (whole merchant protected, on top of the per-unit DP-SGD above); see docs/privacy.md
    client_dp: str = "off"  # off | server_fixed | server_adaptive | client_fixed
    client_dp_noise: float = 1.0  # noise multiplier z of the Gaussian mechanism on the averaged update
    client_dp_clip: float = 1.0  # L2 bound on one merchant's update (initial bound for server_adaptive)
    client_dp_delta: float = 1e-5
    client_dp_target_quantile: float = 0.5  # server_adaptive: share of updates the bound should leave unclipped
    client_dp_count_stddev: float = 0.0  # server_adaptive: noise on the clipped count; 0 = max(n / 20, z)
    # SecAgg+ (Flower's legacy workflow); see docs/secure-aggregation.md
    secagg: bool = False
    secagg_shares: float = 1.0  # share of the cohort each merchant's key is split among
    secagg_threshold: float = 0.67  # share of those shares needed to reconstruct a dropped merchant's mask
    secagg_clipping_range: float = 8.0  # every adapter value is clipped to [-range, range] before quantisation


@dataclass(frozen=True)
class BenchmarkConfig:
    """What a benchmark run compares (benchmarks/accuracy.py, benchmarks/etth1.py); training ignores it."""

    name: str = "synthetic"  # results go to benchmarks/results/<name>.md
    federated: bool = True  # the Flower simulation rows (non-DP, and DP when privacy.enabled)
    ablations: tuple[str, ...] = ("no_llm", "attention", "random_llm")  # trained like shopcast_centralised
    threads: int = 2
    test_stride: int = 1  # etth1: hours between test origins (the literature uses 1)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


_CHOICES = {
    ("data", "source"): {"synthetic", "file", "walmart", "online_retail", "etth1"},
    ("data", "negative"): {"keep", "flag", "clip", "error"},
    ("data", "fill"): {"zero", "ffill", "error"},
    ("data", "short_series"): {"error", "drop"},
    ("model", "variant"): {"llm", "no_llm", "attention", "random_llm"},
    ("train", "device"): {"auto", "cpu", "cuda"},
    ("train", "precision"): {"fp32", "bf16", "fp16"},
    ("privacy", "unit"): {"series", "day"},
    ("federation", "strategy"): {"fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"},
    ("federation", "weighting"): {"equal", "examples"},
    ("federation", "client_dp"): {"off", "server_fixed", "server_adaptive", "client_fixed"},
}


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in [{where}]; allowed: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            kwargs[name] = float(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turns {"train.lr": 0.1} into {"train": {"lr": 0.1}}."""
    nested: dict[str, Any] = {}
    for dotted_key, value in overrides.items():
        *parents, leaf = dotted_key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def validate(cfg: Config) -> Config:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"[{section}] {key} = {value!r}; choose one of {sorted(allowed)}")
    m, d = cfg.model, cfg.data
    if 0.5 not in m.quantiles or list(m.quantiles) != sorted(set(m.quantiles)):
        raise ConfigError(f"[model] quantiles must be increasing and include 0.5, got {m.quantiles}")
    if not all(0.0 < q < 1.0 for q in m.quantiles):
        raise ConfigError(f"[model] quantiles must lie in (0, 1), got {m.quantiles}")
    if d.context < m.patch_len or d.horizon < 1:
        raise ConfigError(f"[data] context ({d.context}) must hold one patch ({m.patch_len}) and horizon must be >= 1")
    if (d.context - m.patch_len) % m.patch_stride:
        raise ConfigError("[data] context - patch_len must be a multiple of patch_stride so patches tile the context")
    if d.horizon % m.patch_len:
        raise ConfigError(f"[data] horizon ({d.horizon}) must be a multiple of patch_len ({m.patch_len})")
    unknown_ablations = set(cfg.benchmark.ablations) - _CHOICES[("model", "variant")] - {"llm"}
    if unknown_ablations or "llm" in cfg.benchmark.ablations:
        raise ConfigError(f"[benchmark] ablations {sorted(cfg.benchmark.ablations)}: choose among no_llm, attention, random_llm")
    if not 0.0 < cfg.privacy.delta < 1.0 or cfg.privacy.target_epsilon <= 0:
        raise ConfigError("[privacy] needs 0 < delta < 1 and target_epsilon > 0")
    return cfg


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Command-line `key=value` pairs; values are read as TOML (numbers, booleans, lists), else as text."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = text
    return overrides


def config_from_run(run_config: Mapping[str, Any]) -> Config:
    """The config a Flower app runs with: `config` from the run config (flwr run), else from
    SHOPCAST_CONFIG, plus dotted overrides from SHOPCAST_OVERRIDES (JSON) that a simulation driver
    sets before it starts the engine, whose Python API passes no run config to the apps."""
    path = run_config.get("config") or os.environ.get("SHOPCAST_CONFIG")
    overrides = json.loads(os.environ.get("SHOPCAST_OVERRIDES", "{}"))
    return load_config(PROJECT_ROOT / path if path and not Path(path).is_absolute() else path, overrides)


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A file's own keys over those of the file its top-level `base` names (relative to it), recursively:
    a benchmark config says "walmart.toml, but only these stores" without repeating walmart.toml."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config files name each other as base: {' -> '.join(map(str, (*seen, path)))}")
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    base = raw.pop("base", None)
    if base is None or (path.parent / base).resolve() == DEFAULT_CONFIG:
        return raw
    return _merge(_read_layers(path.parent / base, (*seen, path)), raw)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Reads the defaults, then `path` (if given, over the files it names as `base`), then dotted `overrides`."""
    raw = tomllib.loads(DEFAULT_CONFIG.read_text())
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG:
        raw = _merge(raw, _read_layers(Path(path)))
    raw = _merge(raw, _dotted(overrides or {}))
    return validate(_build(Config, raw, "config"))


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """`cfg` with dotted `overrides` on top, validated like a loaded file: a variant of a run's config
    (an ablation, an adapter's own model settings) without going back to the files it came from."""
    return validate(_build(Config, _merge(dataclasses.asdict(cfg), _dotted(overrides)), "config"))
