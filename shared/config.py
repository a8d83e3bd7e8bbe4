"""The one place configuration is read: TOML files in configs/ become typed, validated dataclasses.

A file names only what differs from the defaults below; an unknown key is an error, so a typo
cannot silently fall back to a default. Every key is checked against its field's type and against
its rule in `RULES`, so a bad value is one line naming the key here, not a traceback deep in
training.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import numbers
import os
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.toml"


@dataclass(frozen=True)
class Columns:
    """Maps a merchant file's own column names onto the long schema. A covariate `Column=level` is the
    0/1 indicator of one level of a categorical column (e.g. "StateHoliday=a"); unmapped columns are ignored.
    Known covariates are read by what they mean, not by where they are listed: a pretrained base learnt
    promotions in one slot and holidays in the next, so each role's columns are summed into its slot
    (shared.schema.known_channels) and the other known covariates follow in name order."""

    merchant_id: str | None = "merchant_id"
    unique_id: str = "unique_id"
    ds: str = "ds"
    y: str = "y"
    promo: tuple[str, ...] = ()  # promotions: 0/1 flags or markdown amounts
    holiday: tuple[str, ...] = ()  # holidays: flags, or the levels of a holiday code
    known: tuple[str, ...] = ()  # any other covariate known ahead; order does not matter
    observed: tuple[str, ...] = ()
    open: str = ""  # a 0/1 column, 1 = the shop sold that day; "" = always open
    description: str = ""  # a text column naming each series' product; it picks a new product's analogues


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
    analogues: int = 3  # short_series = "analogues": how many of the shop's products stand in for a new one
    sep: str = ","  # CSV only, as are decimal and encoding: ";" and "," for a European spreadsheet export
    decimal: str = "."
    encoding: str = "utf-8"
    date_format: str = "auto"  # strftime, e.g. "%d.%m.%Y"; "auto" infers one format for the whole column
    max_abs_value: float = 1e9  # a sale or covariate beyond it is an error naming its cell, never trained on
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
    # Covariate slots: promotions, holidays, then the other known covariates by name ([data.columns],
    # shared.schema.known_channels); the observed ones in the order listed; the rest are zeros, so one
    # adapter (a pretrained base) fits shops with different covariates. 0: exactly as many as the data has.
    known_slots: int = 0
    observed_slots: int = 0
    # The pretrained base adapter (server.pretrain) every run starts from: "auto" (a shipped one under
    # shared/base/ that fits, else none), a folder holding one adapter per variant (llm/, no_llm/; relative
    # to the project root; it must fit), or "" (the seeded init).
    base: str = ""
    # The shared part: parameter-name prefixes of the adapter tensors the federation trains and moves
    # ("linear", "head", "llm" for LoRA, "reprogram.query", ...); the rest stay at the base's values.
    # Empty: every adapter tensor. A prefix under no trainable tensor is an error once the model is built
    # (shared/model.py). Under DP-SGD fewer numbers d trained means less noise (docs/privacy.md, section 5).
    shared: tuple[str, ...] = ()
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    max_steps: int = 150
    eval_every: int = 25
    patience: int = 3
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    personalise: str = "output"  # refit the output layers on the merchant's own windows (shared.personal), never sent; or "none"
    personal_steps: int = 3000
    personal_lr: float = 3e-4
    personal_windows: int = 2048  # the most training windows it is refitted on (their features are computed once)
    personal_refits: int = 4  # refits, each its own batch order, averaged (shared.personal)


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    unit: str = "series"  # series | window | day (docs/privacy.md, section 2)
    window_days: int = 7  # w of the "window" unit: any w consecutive days of a series are protected
    target_epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float | str = "auto"  # "auto": the σ with which the planned run ends on target_epsilon
    max_grad_norm: float = 1.0
    # The DP steps' rate. "auto": [train] lr x s²/(1 + s²), s the run's signal-to-noise estimate
    # (shared.privacy.dp_learning_rate): where noise outweighs signal, a step of train.lr is mostly a
    # random walk away from the base, so the step shrinks with s. Or a fixed number.
    lr: float | str = "auto"
    ledger_dir: str = "runs/ledgers"

    def __post_init__(self) -> None:
        # The loader turns an integer into a float for plain float fields only, and σ and lr may also be
        # "auto": without this, `noise_multiplier = 2` would stay an int and read as 2, not 2.0, in errors and logs.
        for name in ("noise_multiplier", "lr"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))


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
    median_norm_clip: float = 3.0  # each update clipped to this multiple of the round's median update norm; 0 = off
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
    threads: int = 2  # torch threads in a benchmark, and the ETS/LightGBM baselines' worker processes
    test_stride: int = 1  # etth1: hours between test origins (the literature uses 1)


@dataclass(frozen=True)
class PretrainConfig:
    """The base adapter's central pretraining (server/pretrain.py); other runs ignore it."""

    shops: int = 120  # synthetic retail-prior shops (shared.prior); 0: the public presets alone
    public: tuple[str, ...] = ()  # presets added without their benchmark merchants or last two horizons
    # The prior's known covariates, each given to the config's [data.columns] role of its name (promo,
    # holiday); a role left out is zeros in the prior. Its observed ones fill the observed slots in order;
    # "" leaves a slot to the public presets alone. The prior's promotions and visits drive its sales, so
    # a role or slot whose covariate means something else (Walmart's markdown dollars, temperature) must not get them.
    prior_known: tuple[str, ...] = ("promo", "holiday")
    prior_observed: tuple[str, ...] = ("visits",)
    windows_per_shop: int = 256  # training windows drawn from each shop
    stride: int = 0  # steps between a series' training windows; 0: one horizon (targets that never overlap)
    validation_shops: int = 8  # prior shops held out for the loss curve
    steps: int = 3000
    checkpoint_every: int = 250
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    out: str = "shared/base/daily"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


@dataclass(frozen=True)
class Rule:
    """What a key allows beyond its type: the words an error shows, and the test behind them."""

    allowed: str
    test: Callable[[Any], bool]


def _one_of(*choices: str) -> Rule:
    return Rule(f"one of {sorted(choices)}", lambda value: value in choices)


_COUNT = Rule("at least 1", lambda value: value >= 1)
_NON_NEGATIVE = Rule("at least 0", lambda value: value >= 0)
_POSITIVE = Rule("above 0", lambda value: value > 0)
_OPEN_UNIT = Rule("strictly between 0 and 1", lambda value: 0 < value < 1)
_AUTO_OR_POSITIVE = Rule('either "auto" or a number above 0', lambda value: value == "auto" if isinstance(value, str) else value > 0)
_SHARE = Rule("above 0 and at most 1", lambda value: 0 < value <= 1)
_NOT_EMPTY = Rule("not empty", lambda value: len(value) > 0)
_CHARACTER = Rule("one character", lambda value: len(value) == 1)
_VARIANTS = ("llm", "no_llm", "attention", "random_llm")


def _is_encoding(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


# What each key allows beyond its type, dotted as on the command line. Every number has a rule
# (tests/test_config.py checks), so no count, rate or budget is left to fail deep in a run.
RULES: dict[str, Rule] = {
    "data.source": _one_of("synthetic", "file", "walmart", "online_retail", "etth1"),
    "data.freq": _NOT_EMPTY,
    "data.horizon": _COUNT,
    "data.context": _COUNT,
    "data.stride": _COUNT,
    "data.negative": _one_of("keep", "flag", "clip", "error"),
    "data.fill": _one_of("zero", "ffill", "error"),
    "data.short_series": _one_of("error", "drop", "pad", "analogues"),
    "data.analogues": _COUNT,
    "data.max_series_per_merchant": _NON_NEGATIVE,
    "data.sep": _CHARACTER,
    "data.decimal": _CHARACTER,
    "data.encoding": Rule('a text encoding Python knows, e.g. "utf-8", "latin-1" or "cp1252"', _is_encoding),
    "data.date_format": Rule('"auto" or a strftime format such as "%d.%m.%Y"', lambda value: value == "auto" or "%" in value),
    "data.max_abs_value": _POSITIVE,
    "data.columns.unique_id": _NOT_EMPTY,
    "data.columns.ds": _NOT_EMPTY,
    "data.columns.y": _NOT_EMPTY,
    "data.synthetic.n_merchants": _COUNT,
    "data.synthetic.n_days": _COUNT,
    "data.synthetic.seed": _NON_NEGATIVE,
    "model.backbone": _NOT_EMPTY,
    "model.llm_layers": _COUNT,  # and at most the backbone's depth, known once it is loaded (shared/backbone.py)
    "model.variant": _one_of(*_VARIANTS),
    "model.patch_len": _COUNT,
    "model.patch_stride": _COUNT,
    "model.d_patch": _COUNT,
    "model.n_prototypes": _COUNT,
    "model.reprogram_heads": _COUNT,
    "model.reprogram_dim": _COUNT,
    "model.d_ff": _COUNT,
    "model.prompt_max_tokens": _COUNT,
    "model.quantiles": Rule("increasing, each strictly between 0 and 1, one of them 0.5",
                            lambda qs: 0.5 in qs and list(qs) == sorted(set(qs)) and all(0 < q < 1 for q in qs)),
    "model.seed": _NON_NEGATIVE,
    "model.known_slots": _NON_NEGATIVE,
    "pretrain.shops": _NON_NEGATIVE,
    "pretrain.public": Rule("preset names among walmart, online_retail", lambda names: set(names) <= {"walmart", "online_retail"}),
    "pretrain.prior_known": Rule('roles among "promo", "holiday"', lambda names: set(names) <= {"promo", "holiday"}),
    "pretrain.prior_observed": Rule('names among "visits", ""', lambda names: set(names) <= {"visits", ""}),
    "pretrain.windows_per_shop": _COUNT,
    "pretrain.stride": _NON_NEGATIVE,
    "pretrain.validation_shops": _COUNT,
    "pretrain.steps": _COUNT,
    "pretrain.checkpoint_every": _COUNT,
    "pretrain.batch_size": _COUNT,
    "pretrain.lr": _POSITIVE,
    "pretrain.seed": _NON_NEGATIVE,
    "pretrain.out": _NOT_EMPTY,
    "model.observed_slots": _NON_NEGATIVE,
    "model.lora.r": _COUNT,
    "model.lora.alpha": _POSITIVE,
    "model.lora.dropout": Rule("at least 0 and below 1", lambda value: 0 <= value < 1),
    "model.lora.targets": _NOT_EMPTY,
    "train.lr": _POSITIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.batch_size": _COUNT,
    "train.max_steps": _COUNT,
    "train.eval_every": _NON_NEGATIVE,  # 0 turns early stopping off
    "train.patience": _COUNT,
    "train.seed": _NON_NEGATIVE,
    "train.device": _one_of("auto", "cpu", "cuda"),
    "train.precision": _one_of("fp32", "bf16", "fp16"),
    "train.personalise": _one_of("none", "output"),
    "train.personal_steps": _COUNT,
    "train.personal_lr": _POSITIVE,
    "train.personal_windows": _COUNT,
    "train.personal_refits": _COUNT,
    "privacy.unit": _one_of("series", "window", "day"),
    "privacy.window_days": _COUNT,
    "privacy.target_epsilon": _POSITIVE,
    "privacy.delta": _OPEN_UNIT,
    "privacy.noise_multiplier": _AUTO_OR_POSITIVE,
    "privacy.max_grad_norm": _POSITIVE,
    "privacy.lr": _AUTO_OR_POSITIVE,
    "privacy.ledger_dir": _NOT_EMPTY,
    "federation.num_merchants": _COUNT,
    "federation.num_rounds": _COUNT,
    "federation.local_steps": _COUNT,
    "federation.strategy": _one_of("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"),
    "federation.proximal_mu": _NON_NEGATIVE,
    "federation.server_lr": _POSITIVE,
    "federation.trim_beta": Rule("at least 0 and below 0.5", lambda value: 0 <= value < 0.5),
    "federation.max_update_norm": _POSITIVE,
    "federation.median_norm_clip": Rule("0 (off) or at least 1", lambda value: value == 0 or value >= 1),
    "federation.weighting": _one_of("equal", "examples"),
    "federation.min_replies": _COUNT,
    "federation.round_timeout_s": _POSITIVE,
    "federation.out_dir": _NOT_EMPTY,
    "federation.client_dp": _one_of("off", "server_fixed", "server_adaptive", "client_fixed"),
    "federation.client_dp_noise": _NON_NEGATIVE,  # > 0 once client_dp is on (server/client_dp.py)
    "federation.client_dp_clip": _POSITIVE,
    "federation.client_dp_delta": _OPEN_UNIT,
    "federation.client_dp_target_quantile": Rule("between 0 and 1", lambda value: 0 <= value <= 1),
    "federation.client_dp_count_stddev": _NON_NEGATIVE,
    "federation.secagg_shares": _SHARE,
    "federation.secagg_threshold": _SHARE,
    "federation.secagg_clipping_range": _POSITIVE,
    "benchmark.name": _NOT_EMPTY,
    "benchmark.ablations": Rule(f"each one of {list(_VARIANTS[1:])}", lambda value: set(value) <= set(_VARIANTS[1:])),
    "benchmark.threads": _COUNT,
    "benchmark.test_stride": _COUNT,
}

_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "nothing"}
_NUMBERS = {int: numbers.Integral, float: numbers.Real}


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _is_a(hint: Any, value: Any) -> bool:
    """Whether `value` has the annotated type. A bool is no number here (TOML's `true` is no count)
    and a float must be finite (inf or nan would surface only as a diverged run)."""
    if get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_is_a(get_args(hint)[0], item) for item in value)
    if isinstance(hint, types.UnionType):
        return any(_is_a(option, value) for option in get_args(hint))
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, hint)


def _kind(hint: Any) -> str:
    if get_origin(hint) is tuple:
        return f"a list, each item {_kind(get_args(hint)[0])}"
    if isinstance(hint, types.UnionType):
        return " or ".join(_kind(option) for option in get_args(hint))
    return _KINDS[hint]


def _coerce(hint: Any, value: Any) -> Any:
    """Other spellings of a field's type: a TOML or JSON array for a tuple, an integer for a float,
    a numpy scalar (a benchmark's computed override) for a Python number."""
    if get_origin(hint) is tuple and isinstance(value, list):
        return tuple(_coerce(get_args(hint)[0], item) for item in value)
    if hint in _NUMBERS and isinstance(value, _NUMBERS[hint]) and not isinstance(value, bool):
        return hint(value)
    return value


def _build(cls: type, values: Any, section: str) -> Any:
    """`cls` from one table of a config; `section` is its dotted name ("" for the whole config)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}] is a table of keys, not {values!r}")
    hints = get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in [{section or 'top level'}]; allowed: {sorted(hints)}")
    return cls(**{
        name: _build(hints[name], value, _key(section, name)) if dataclasses.is_dataclass(hints[name]) else _coerce(hints[name], value)
        for name, value in values.items()
    })


def _check_keys(node: Any, section: str) -> None:
    """Each key against its field's type and its rule: one line naming the first bad key, its value
    and what is allowed."""
    hints = get_type_hints(type(node))
    for f in dataclasses.fields(node):
        hint, value, key = hints[f.name], getattr(node, f.name), _key(section, f.name)
        rule = RULES.get(key)
        if dataclasses.is_dataclass(hint):
            _check_keys(value, key)
        elif not _is_a(hint, value) or (rule is not None and not rule.test(value)):
            allowed = _kind(hint) + (f", {rule.allowed}" if rule else "")
            raise ConfigError(f"[{section}] {f.name} = {value!r}: expected {allowed}")


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
    """Every key on its own, then the keys that constrain each other."""
    _check_keys(cfg, "")
    m, d = cfg.model, cfg.data
    if d.context < m.patch_len:
        raise ConfigError(f"[data] context ({d.context}) must hold one patch ({m.patch_len})")
    if (d.context - m.patch_len) % m.patch_stride:
        raise ConfigError("[data] context - patch_len must be a multiple of patch_stride so patches tile the context")
    if d.horizon % m.patch_len:
        raise ConfigError(f"[data] horizon ({d.horizon}) must be a multiple of patch_len ({m.patch_len})")
    if d.decimal == d.sep:
        raise ConfigError(f'[data] decimal = {d.decimal!r} is also sep; a ";"-separated export has decimal = ","')
    _check_listed_once(d.columns)
    return cfg


COVARIATE_LISTS = ("promo", "holiday", "known", "observed")


def _check_listed_once(columns: Columns) -> None:
    """A covariate in two lists (or twice in one) would be read twice, once under each meaning."""
    seen: dict[str, str] = {}
    for kind in COVARIATE_LISTS:
        for name in getattr(columns, kind):
            if name in seen:
                raise ConfigError(f"[data.columns] {name!r} is listed in {seen[name]} and in {kind}; list each column once")
            seen[name] = kind


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
    defaults = tomllib.loads(DEFAULT_CONFIG.read_text())
    mine = _read_layers(Path(path)) if path is not None and Path(path).resolve() != DEFAULT_CONFIG else {}
    mine = _merge(mine, _dotted(overrides or {}))
    if mine.get("data", {}).get("source") == "file":
        del defaults["data"]["columns"]  # the synthetic data's column names are not the merchant's
    return validate(_build(Config, _merge(defaults, mine), ""))


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """`cfg` with dotted `overrides` on top, validated like a loaded file: a variant of a run's config
    (an ablation, an adapter's own model settings) without going back to the files it came from."""
    return validate(_build(Config, _merge(dataclasses.asdict(cfg), _dotted(overrides)), ""))
