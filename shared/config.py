"""The one place configuration is read: TOML files in configs/ become typed, validated dataclasses.

Each key has one home, its field below: type, bounds (`Ge`, `Literal`, a `Rule`) and default together.
configs/default.toml documents the same values for a reader (loading it checks they agree);
a file names only what differs. An unknown key is an error, so a typo cannot silently fall back to a
default, and a bad value is one line naming the key, what it is and what is allowed, not a traceback
deep in training. The sections are pydantic dataclasses, so `dataclasses.replace` validates too.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import numbers
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from annotated_types import Ge, Gt, Le, Len, Lt
from pydantic import AfterValidator, BeforeValidator, ConfigDict, GetCoreSchemaHandler, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.toml"


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A check beyond a field's type and bounds, with the words an error shows for it."""

    allowed: str
    test: Callable[[Any], bool]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return AfterValidator(self._check).__get_pydantic_core_schema__(source, handler)

    def _check(self, value: Any) -> Any:
        if not self.test(value):
            raise ValueError(self.allowed)
        return value


def _is_encoding(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


# TOML and JSON have lists, not tuples; a tuple keeps a frozen config hashable (functools.lru_cache keys).
_LIST_AS_TUPLE = BeforeValidator(lambda value: tuple(value) if isinstance(value, list) else value)

Count = Annotated[int, Ge(1)]
AtLeastZero = Annotated[int, Ge(0)]
Positive = Annotated[float, Gt(0)]
NonNegative = Annotated[float, Ge(0)]
OpenUnit = Annotated[float, Gt(0), Lt(1)]
Share = Annotated[float, Gt(0), Le(1)]
NotEmpty = Annotated[str, Len(1)]
Character = Annotated[str, Len(1, 1)]
Names = Annotated[tuple[str, ...], _LIST_AS_TUPLE]
AutoOrPositive = Annotated[float | Literal["auto"], Rule('either "auto" or a number above 0',
                                                        lambda value: value == "auto" or value > 0)]
Variant = Literal["llm", "no_llm", "attention", "random_llm"]
Quantiles = Annotated[tuple[float, ...], _LIST_AS_TUPLE,
                      Rule("increasing, each strictly between 0 and 1, one of them 0.5",
                           lambda qs: 0.5 in qs and list(qs) == sorted(set(qs)) and all(0 < q < 1 for q in qs))]

# Strict: TOML's `true` is no count, 2.5 no integer and "8" no number (an integer is still a float);
# no inf or nan, which would surface only as a diverged run.
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
_Section = TypeVar("_Section")


def _section(cls: type[_Section]) -> type[_Section]:
    """A frozen, validating config section whose every construction (a loaded file, `dataclasses.replace`)
    fails as one ConfigError line naming the dotted key, never a multi-line ValidationError."""
    cls = pydantic_dataclass(frozen=True, config=_STRICT)(cls)
    validating_init = cls.__init__

    @functools.wraps(validating_init)
    def __init__(self: Any, *args: Any, **values: Any) -> None:
        try:
            validating_init(self, *args, **values)
        except ValidationError as error:
            raise _one_line(cls, error, values) from None

    cls.__init__ = __init__
    return cls


@_section
class Columns:
    """Maps a merchant file's own column names onto the long schema. A covariate `Column=level` is the
    0/1 indicator of one level of a categorical column (e.g. "StateHoliday=a"); unmapped columns are ignored.
    Known covariates are read by what they mean, not by where they are listed: a pretrained base learnt
    promotions in one slot and holidays in the next, so each role's columns are summed into its slot
    (shared.schema.known_channels) and the other known covariates follow in name order.
    These defaults are a merchant file's (required columns only); the synthetic data's are SYNTHETIC_COLUMNS."""

    merchant_id: str | None = "merchant_id"
    unique_id: NotEmpty = "unique_id"
    ds: NotEmpty = "ds"
    y: NotEmpty = "y"
    promo: Names = ()  # promotions: 0/1 flags or markdown amounts
    holiday: Names = ()  # holidays: flags, or the levels of a holiday code
    known: Names = ()  # any other covariate known ahead; order does not matter
    observed: Names = ()
    open: str = ""  # a 0/1 column, 1 = the shop sold that day; "" = always open
    description: str = ""  # a text column naming each series' product; it picks a new product's analogues

    def __post_init__(self) -> None:
        _check_listed_once(self)


COVARIATE_LISTS = ("promo", "holiday", "known", "observed")


def _check_listed_once(columns: Columns) -> None:
    """A covariate in two lists (or twice in one) would be read twice, once under each meaning."""
    seen: dict[str, str] = {}
    for kind in COVARIATE_LISTS:
        for name in getattr(columns, kind):
            if name in seen:
                raise ConfigError(f"[data.columns] {name!r} is listed in {seen[name]} and in {kind}; list each column once")
            seen[name] = kind


SYNTHETIC_COLUMNS = Columns(promo=("promo",), holiday=("holiday",), observed=("visits",), open="open")


@_section
class SyntheticConfig:
    n_merchants: Count = 4
    n_days: Count = 540
    seed: AtLeastZero = 0


@_section
class DataConfig:
    source: Literal["synthetic", "file", "walmart", "online_retail", "etth1"] = "synthetic"
    path: str = ""
    freq: NotEmpty = "D"
    horizon: Count = 14
    context: Count = 84
    stride: Count = 1
    negative: Literal["keep", "flag", "clip", "error"] = "clip"
    fill: Literal["zero", "ffill", "error"] = "zero"
    short_series: Literal["error", "drop", "pad", "analogues"] = "error"
    analogues: Count = 3  # short_series = "analogues": how many of the shop's products stand in for a new one
    sep: Character = ","  # CSV only, as are decimal and encoding: ";" and "," for a European spreadsheet export
    decimal: Character = "."
    encoding: Annotated[str, Rule('a text encoding Python knows, e.g. "utf-8", "latin-1" or "cp1252"', _is_encoding)] = "utf-8"
    # strftime, e.g. "%d.%m.%Y"; "auto" infers one format for the whole column
    date_format: Annotated[str, Rule('"auto" or a strftime format such as "%d.%m.%Y"',
                                     lambda value: value == "auto" or "%" in value)] = "auto"
    max_abs_value: Positive = 1e9  # a sale or covariate beyond it is an error naming its cell, never trained on
    columns: Columns = field(default_factory=lambda: SYNTHETIC_COLUMNS)  # source = "file" starts from Columns() (load_config)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    max_series_per_merchant: AtLeastZero = 0  # 0 keeps all; presets use it to bound benchmark time
    merchants: Names = ()  # a subset of merchant ids to keep; empty keeps all

    def __post_init__(self) -> None:
        if self.decimal == self.sep:
            raise ConfigError(f'[data] decimal = {self.decimal!r} is also sep; a ";"-separated export has decimal = ","')


@_section
class LoraConfig:
    r: Count = 8
    alpha: Annotated[int, Gt(0)] = 16
    dropout: Annotated[float, Ge(0), Lt(1)] = 0.0
    targets: Annotated[Names, Len(1)] = ("q_proj", "v_proj")
    freeze_a: bool = False


@_section
class ModelConfig:
    backbone: NotEmpty = "smollm2"
    llm_layers: Count = 2  # and at most the backbone's depth, known once it is loaded (shared/backbone.py)
    variant: Variant = "llm"
    patch_len: Count = 7
    patch_stride: Count = 7
    d_patch: Count = 32
    n_prototypes: Count = 256
    reprogram_heads: Count = 4
    reprogram_dim: Count = 32
    d_ff: Count = 32
    prompt: bool = True
    prompt_max_tokens: Count = 16
    domain: str = "Daily unit sales of one product of an online shop."
    quantiles: Quantiles = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    nonnegative: bool = True
    seed: AtLeastZero = 0
    # Covariate slots: promotions, holidays, then the other known covariates by name ([data.columns],
    # shared.schema.known_channels); the observed ones in the order listed; the rest are zeros, so one
    # adapter (a pretrained base) fits shops with different covariates. 0: exactly as many as the data has.
    known_slots: AtLeastZero = 12
    observed_slots: AtLeastZero = 2
    # The pretrained base adapter (server.pretrain) every run starts from: "auto" (a shipped one under
    # shared/base/ that fits, else none), a folder holding one adapter per variant (llm/, no_llm/; relative
    # to the project root; it must fit), or "" (the seeded init).
    base: str = "auto"
    # The shared part: parameter-name prefixes of the adapter tensors the federation trains and moves
    # ("linear", "head", "llm" for LoRA, "reprogram.query", ...); the rest stay at the base's values.
    # Empty: every adapter tensor. A prefix under no trainable tensor is an error once the model is built
    # (shared/model.py). Under DP-SGD fewer numbers d trained means less noise (docs/privacy.md, section 5).
    shared: Names = ()
    lora: LoraConfig = field(default_factory=LoraConfig)


@_section
class TrainConfig:
    lr: Positive = 2e-4
    weight_decay: NonNegative = 0.0
    batch_size: Count = 8
    max_steps: Count = 150
    eval_every: AtLeastZero = 25  # 0 turns early stopping off
    patience: Count = 3
    seed: AtLeastZero = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    personalise: Literal["none", "output"] = "output"  # refit the output layers on the merchant's own windows (shared.personal), never sent
    personal_steps: Count = 3000
    personal_lr: Positive = 3e-4
    personal_windows: Count = 2048  # the most training windows it is refitted on (their features are computed once)
    personal_refits: Count = 4  # refits, each its own batch order, averaged (shared.personal)


@_section
class PrivacyConfig:
    enabled: bool = True
    unit: Literal["series", "window", "day"] = "series"  # docs/privacy.md, section 2
    window_days: Count = 7  # w of the "window" unit: any w consecutive days of a series are protected
    target_epsilon: Positive = 8.0
    delta: OpenUnit = 1e-5
    noise_multiplier: AutoOrPositive = "auto"  # "auto": the σ with which the planned run ends on target_epsilon
    max_grad_norm: Positive = 1.0
    # The DP steps' rate. "auto": [train] lr x s²/(1 + s²), s the run's signal-to-noise estimate
    # (shared.privacy.dp_learning_rate): where noise outweighs signal, a step of train.lr is mostly a
    # random walk away from the base, so the step shrinks with s. Or a fixed number.
    lr: AutoOrPositive = "auto"
    ledger_dir: NotEmpty = "runs/ledgers"


@_section
class FederationConfig:
    num_merchants: Count = 4
    num_rounds: Count = 3
    local_steps: Count = 10
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"] = "fedavg"
    proximal_mu: NonNegative = 0.01
    server_lr: Positive = 0.05
    trim_beta: Annotated[float, Ge(0), Lt(0.5)] = 0.2
    max_update_norm: Positive = 50.0
    # each update clipped to this multiple of the round's median update norm; 0 = off
    median_norm_clip: Annotated[float, Rule("0 (off) or at least 1", lambda value: value == 0 or value >= 1)] = 3.0
    weighting: Literal["equal", "examples"] = "equal"  # how the mean weighs merchants (claimed example counts are unchecked)
    min_replies: Count = 2
    round_timeout_s: Positive = 600.0
    out_dir: NotEmpty = "runs/demo"
    # client-level DP (whole merchant protected, on top of the per-unit DP-SGD above); see docs/privacy.md
    client_dp: Literal["off", "server_fixed", "server_adaptive", "client_fixed"] = "off"
    # noise multiplier z of the Gaussian mechanism on the averaged update; > 0 once client_dp is on (server/client_dp.py)
    client_dp_noise: NonNegative = 1.0
    client_dp_clip: Positive = 1.0  # L2 bound on one merchant's update (initial bound for server_adaptive)
    client_dp_delta: OpenUnit = 1e-5
    client_dp_target_quantile: Annotated[float, Ge(0), Le(1)] = 0.5  # server_adaptive: share of updates the bound should leave unclipped
    client_dp_count_stddev: NonNegative = 0.0  # server_adaptive: noise on the clipped count; 0 = max(n / 20, z)
    # SecAgg+ (Flower's legacy workflow); see docs/secure-aggregation.md
    secagg: bool = False
    secagg_shares: Share = 1.0  # share of the cohort each merchant's key is split among
    secagg_threshold: Share = 0.67  # share of those shares needed to reconstruct a dropped merchant's mask
    secagg_clipping_range: Positive = 8.0  # every adapter value is clipped to [-range, range] before quantisation


@_section
class BenchmarkConfig:
    """What a benchmark run compares (benchmarks/accuracy.py, benchmarks/etth1.py); training ignores it."""

    name: NotEmpty = "synthetic"  # results go to benchmarks/results/<name>.md
    federated: bool = True  # the Flower simulation rows (non-DP, and DP when privacy.enabled)
    # trained like shopcast_centralised
    ablations: Annotated[tuple[Literal["no_llm", "attention", "random_llm"], ...], _LIST_AS_TUPLE] = ("no_llm", "attention", "random_llm")
    threads: Count = 2  # torch threads in a benchmark, and the ETS/LightGBM baselines' worker processes
    test_stride: Count = 1  # etth1: hours between test origins (the literature uses 1)


@_section
class PretrainConfig:
    """The base adapter's central pretraining (server/pretrain.py); other runs ignore it."""

    shops: AtLeastZero = 120  # synthetic retail-prior shops (shared.prior); 0: the public presets alone
    # presets added without their benchmark merchants or last two horizons
    public: Annotated[tuple[Literal["walmart", "online_retail"], ...], _LIST_AS_TUPLE] = ()
    # The prior's known covariates, each given to the config's [data.columns] role of its name (promo,
    # holiday); a role left out is zeros in the prior. Its observed ones fill the observed slots in order;
    # "" leaves a slot to the public presets alone. The prior's promotions and visits drive its sales, so
    # a role or slot whose covariate means something else (Walmart's markdown dollars, temperature) must not get them.
    prior_known: Annotated[tuple[Literal["promo", "holiday"], ...], _LIST_AS_TUPLE] = ("promo", "holiday")
    prior_observed: Annotated[tuple[Literal["visits", ""], ...], _LIST_AS_TUPLE] = ("visits",)
    windows_per_shop: Count = 256  # training windows drawn from each shop
    stride: AtLeastZero = 0  # steps between a series' training windows; 0: one horizon (targets that never overlap)
    validation_shops: Count = 8  # prior shops held out for the loss curve
    steps: Count = 3000
    checkpoint_every: Count = 250
    batch_size: Count = 32
    lr: Positive = 2e-3
    seed: AtLeastZero = 0
    out: NotEmpty = "shared/base/daily"


@_section
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        """The keys of different sections that constrain each other."""
        m, d = self.model, self.data
        if d.context < m.patch_len:
            raise ConfigError(f"[data] context ({d.context}) must hold one patch ({m.patch_len})")
        if (d.context - m.patch_len) % m.patch_stride:
            raise ConfigError("[data] context - patch_len must be a multiple of patch_stride so patches tile the context")
        if d.horizon % m.patch_len:
            raise ConfigError(f"[data] horizon ({d.horizon}) must be a multiple of patch_len ({m.patch_len})")


_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "nothing"}
_BOUNDS = {Ge: ("ge", "at least"), Gt: ("gt", "above"), Le: ("le", "at most"), Lt: ("lt", "below")}


def _allowed(hint: Any) -> str:
    """What an annotation allows, in the words of an error: "an integer, at least 1"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        limits = [words for extra in args[1:] if (words := _limit(extra))]
        return _allowed(args[0]) + (f", {' and '.join(limits)}" if limits else "")
    if origin is Literal:
        return json.dumps(args[0]) if len(args) == 1 else f"one of {sorted(args)}"
    if origin is tuple:
        return f"a list, each item {_allowed(args[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_allowed(option) for option in args)
    return "a table of keys" if dataclasses.is_dataclass(hint) else _KINDS[hint]


def _limit(extra: Any) -> str | None:
    """The words of one bound or rule attached to a field; None for what is no limit (a list's coercion)."""
    if isinstance(extra, Rule):
        return extra.allowed
    if isinstance(extra, Len):
        return "one character" if extra.max_length == 1 else "not empty"
    bound = _BOUNDS.get(type(extra))
    return f"{bound[1]} {getattr(extra, bound[0])}" if bound else None


@functools.cache
def _section_names() -> dict[type, str]:
    """Each section class's dotted name ("" for the whole config), as errors and overrides spell it."""
    names: dict[type, str] = {}

    def visit(cls: type, name: str) -> None:
        names[cls] = name
        for key, hint in get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                visit(hint, _key(name, key))

    visit(Config, "")
    return names


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _one_line(cls: type, error: ValidationError, given: Mapping[str, Any]) -> ConfigError:
    """pydantic's report as today's one line: unknown keys, else the first bad key with its value as
    given and what its field allows, else a cross-key check's own ConfigError."""
    section = _section_names().get(cls, cls.__name__)
    problems = error.errors()
    unknown = sorted(str(p["loc"][0]) for p in problems if p["type"] == "unexpected_keyword_argument")
    if unknown:
        allowed = sorted(f.name for f in dataclasses.fields(cls))
        return ConfigError(f"unknown key(s) {unknown} in [{section or 'top level'}]; allowed: {allowed}")
    first = problems[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    name = str(first["loc"][0])
    hint = get_type_hints(cls, include_extras=True)[name]
    return ConfigError(f"[{section}] {name} = {given.get(name, first['input'])!r}: expected {_allowed(hint)}")


def _build(cls: type, values: Any, section: str) -> Any:
    """`cls` from one table of a config, its sub-tables first; `section` is its dotted name ("" for the whole config)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}] is a table of keys, not {values!r}")
    tables = {name: hint for name, hint in get_type_hints(cls).items() if dataclasses.is_dataclass(hint)}
    return cls(**{name: _build(tables[name], value, _key(section, name)) if name in tables else value
                  for name, value in values.items()})


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _plain(value: Any) -> Any:
    """A numpy scalar (a benchmark's computed override) as the Python number a strict field takes."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turns {"train.lr": 0.1} into {"train": {"lr": 0.1}}."""
    nested: dict[str, Any] = {}
    for dotted_key, value in overrides.items():
        *parents, leaf = dotted_key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _plain(value)
    return nested


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


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A file's own keys over those of the file its top-level `base` names (relative to it), recursively:
    a benchmark config says "walmart.toml, but only these stores" without repeating walmart.toml.
    default.toml, as a file or a base, adds nothing: its values are the fields' defaults."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config files name each other as base: {' -> '.join(map(str, (*seen, path)))}")
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    if path == DEFAULT_CONFIG:
        _check_documented(raw, path)
        return {}
    base = raw.pop("base", None)
    return raw if base is None else _merge(_read_layers(path.parent / base, (*seen, path)), raw)


def _leaves(table: Mapping[str, Any], section: str = "") -> dict[str, Any]:
    """A nested table's values by dotted key, a list as the tuple a config holds."""
    leaves: dict[str, Any] = {}
    for name, value in table.items():
        key = _key(section, name)
        leaves.update(_leaves(value, key) if isinstance(value, Mapping) else {key: tuple(value) if isinstance(value, list) else value})
    return leaves


def _check_documented(documented: dict[str, Any], path: Path) -> None:
    """default.toml shows a reader the defaults; runs take them from the fields above. An edit there would
    change nothing, silently, so a value that is not the field's default is an error saying what works."""
    defaults = _leaves(dataclasses.asdict(Config()))
    for key, value in _leaves(documented).items():
        if key not in defaults or defaults[key] != value:
            raise ConfigError(f"{path.name} sets {key} = {value!r}, but it only documents the defaults "
                              f"(here {defaults.get(key, 'no such key')!r}); "
                              f"set it in your own config file or with {key}=... on the command line")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The defaults, then `path` (if given, over the files it names as `base`), then dotted `overrides`."""
    mine = _read_layers(Path(path)) if path is not None else {}
    mine = _merge(mine, _dotted(overrides or {}))
    defaults = dataclasses.asdict(Config())
    if isinstance(mine.get("data"), dict) and mine["data"].get("source") == "file":
        defaults["data"]["columns"] = dataclasses.asdict(Columns())  # the synthetic data's column names are not the merchant's
    return _build(Config, _merge(defaults, mine), "")


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """`cfg` with dotted `overrides` on top, validated like a loaded file: a variant of a run's config
    (an ablation, an adapter's own model settings) without going back to the files it came from."""
    return _build(Config, _merge(dataclasses.asdict(cfg), _dotted(overrides)), "")
