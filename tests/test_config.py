"""Config files layer over default.toml and over the file they name as `base`; mistakes are errors."""

import dataclasses
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import numpy as np
import pytest
from annotated_types import Ge, Gt, Le, Lt

from shared.backbone import truncated_backbone
from shared.config import DEFAULT_CONFIG, PROJECT_ROOT, Columns, Config, ConfigError, Rule, load_config, parse_overrides, with_overrides


def test_benchmark_config_inherits_its_dataset_config() -> None:
    cfg = load_config(PROJECT_ROOT / "configs" / "benchmarks" / "walmart.toml")
    assert cfg.data.source == "walmart" and cfg.data.freq == "W-FRI"  # from walmart.toml
    assert cfg.data.merchants == ("store_1", "store_2", "store_3", "store_4", "store_5")  # its own
    assert cfg.model.backbone == "smollm2"  # from default.toml
    assert cfg.benchmark.name == "walmart"


def test_a_file_overrides_its_base_and_an_override_beats_both(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('[data]\nhorizon = 21\ncontext = 70\n')
    (tmp_path / "child.toml").write_text('base = "base.toml"\n[data]\nhorizon = 7\n')
    cfg = load_config(tmp_path / "child.toml", {"data.context": 63})
    assert (cfg.data.horizon, cfg.data.context) == (7, 63)


def test_bases_that_name_each_other_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="name each other"):
        load_config(tmp_path / "a.toml")


def test_missing_base_and_broken_toml_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "orphan.toml").write_text('base = "gone.toml"\n')
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "orphan.toml")
    (tmp_path / "broken.toml").write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


def test_an_ablation_must_be_a_known_variant_other_than_llm() -> None:
    with pytest.raises(ConfigError, match="ablations"):
        load_config(overrides={"benchmark.ablations": ["no_llm", "llm"]})
    with pytest.raises(ConfigError, match="ablations"):
        load_config(overrides={"benchmark.ablations": ["bigger_llm"]})


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "configs").rglob("*.toml")), ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_shipped_config_loads(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize("override, shown", [
    ("train.lr=abc", "[train] lr = 'abc'"),
    ("train.lr=0", "[train] lr = 0"),
    ("train.lr=true", "[train] lr = True"),
    ("train.batch_size=0", "[train] batch_size = 0"),
    ("train.batch_size=2.5", "[train] batch_size = 2.5"),
    ("train.weight_decay=-0.1", "[train] weight_decay = -0.1"),
    ("privacy.noise_multiplier=0", "[privacy] noise_multiplier = 0"),
    ("privacy.noise_multiplier=inf", "[privacy] noise_multiplier = inf"),
    ("privacy.noise_multiplier=nan", "[privacy] noise_multiplier = nan"),
    ("privacy.max_grad_norm=0", "[privacy] max_grad_norm = 0"),
    ("privacy.delta=1", "[privacy] delta = 1"),
    ("privacy.target_epsilon=inf", "[privacy] target_epsilon = inf"),
    ("federation.num_rounds=0", "[federation] num_rounds = 0"),
    ("federation.local_steps=0", "[federation] local_steps = 0"),
    ("federation.min_replies=0", "[federation] min_replies = 0"),
    ("federation.round_timeout_s=0", "[federation] round_timeout_s = 0"),
    ("federation.max_update_norm=-1", "[federation] max_update_norm = -1"),
    ("federation.secagg=1", "[federation] secagg = 1"),
    ("federation.strategy='fedsgd'", "[federation] strategy = 'fedsgd'"),
    ("model.llm_layers=0", "[model] llm_layers = 0"),
    ("model.quantiles=[0.1, 0.9]", "[model] quantiles = [0.1, 0.9]"),
    ("model.lora.r=0", "[model.lora] r = 0"),
    ("model.lora.targets=[]", "[model.lora] targets = []"),
    ("data.columns.known=[1]", "[data.columns] known = [1]"),
    ("data.synthetic.n_days=-5", "[data.synthetic] n_days = -5"),
    ("data.horizon=0", "[data] horizon = 0"),
    ("data.sep=';;'", "[data] sep = ';;'"),
    ("data.decimal=''", "[data] decimal = ''"),
    ("data.encoding='klingon'", "[data] encoding = 'klingon'"),
    ("data.max_abs_value=0", "[data] max_abs_value = 0"),
])
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(override: str, shown: str) -> None:
    """The value is shown as written (0, not 0.0; a TOML list as a list), so the line points at the user's text."""
    with pytest.raises(ConfigError) as error:
        load_config(overrides=parse_overrides([override]))
    message = str(error.value)
    assert message.startswith(f"{shown}: expected ") and "\n" not in message, message


def test_a_decimal_mark_that_is_also_the_separator_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^\[data\] decimal = ';' is also sep; [^\n]*$"):
        load_config(overrides={"data.sep": ";", "data.decimal": ";"})
    assert load_config(overrides={"data.sep": ";", "data.decimal": ","}).data.decimal == ","


def test_a_value_where_a_table_belongs_and_an_unknown_key_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"^\[train\] is a table of keys, not 5$"):
        load_config(overrides={"train": 5})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr'\] in \[top level\]"):
        load_config(overrides={"lr": 0.1})


def _leaves(cls: type, section: str = "") -> dict[str, Any]:
    """Every key of the config, dotted, with its annotation (bounds and rules included)."""
    keys: dict[str, Any] = {}
    for name, hint in get_type_hints(cls, include_extras=True).items():
        key = f"{section}.{name}" if section else name
        keys.update(_leaves(hint, key) if dataclasses.is_dataclass(hint) else {key: hint})
    return keys


def test_default_toml_documents_the_codes_defaults() -> None:
    """default.toml is what a merchant reads; the fields are what runs: every key it sets has the field's default."""
    assert load_config(DEFAULT_CONFIG) == Config()


def test_an_edited_default_toml_is_one_line_not_silently_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edited = tmp_path / "default.toml"
    edited.write_text(DEFAULT_CONFIG.read_text().replace("llm_layers = 2 ", "llm_layers = 6 "))
    monkeypatch.setattr("shared.config.DEFAULT_CONFIG", edited)
    with pytest.raises(ConfigError, match=r"^default.toml sets model.llm_layers = 6, but it only documents the defaults "
                                          r"\(here 2\); [^\n]*$"):
        load_config(edited)


def _numeric(hint: Any) -> bool:
    base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    return base in (int, float) or float in get_args(base)


def _bounded(hint: Any) -> bool:
    return get_origin(hint) is Annotated and any(isinstance(extra, (Ge, Gt, Le, Lt, Rule)) for extra in get_args(hint)[1:])


def test_every_number_has_a_bound() -> None:
    """No count, rate or budget is left to fail deep in a run: each numeric field carries a bound or a rule."""
    unbounded = [key for key, hint in _leaves(Config).items() if _numeric(hint) and not _bounded(hint)]
    assert not unbounded, f"give these fields a bound (Ge, Gt, ...) in shared/config.py: {unbounded}"


def test_llm_layers_deeper_than_the_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^\[model\] llm_layers = 5, but backbone 'tiny' has 4 blocks; expected 1 to 4$"):
        truncated_backbone("tiny", 5)


@pytest.mark.parametrize("key", ["noise_multiplier", "lr"])
def test_noise_and_dp_rate_are_auto_by_default_or_a_number(key: str) -> None:
    assert getattr(load_config().privacy, key) == "auto"
    value = getattr(load_config(overrides=parse_overrides([f"privacy.{key}=2"])).privacy, key)
    assert isinstance(value, float) and value == 2.0


@pytest.mark.parametrize("override, allowed", [
    ("privacy.noise_multiplier=loud", '"auto" or a number above 0'),
    ("privacy.noise_multiplier=-1", '"auto" or a number above 0'),
    ("privacy.lr=fast", '"auto" or a number above 0'),
    ("privacy.lr=0", '"auto" or a number above 0'),
    ("privacy.window_days=0", "an integer, at least 1"),
    ("privacy.window_days=2.5", "an integer, at least 1"),
    ("privacy.unit='week'", "['day', 'series', 'window']"),
])
def test_a_bad_privacy_unit_or_noise_is_one_line_saying_what_is_allowed(override: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(overrides=parse_overrides([override]))
    message = str(error.value)
    assert message.startswith(f"[privacy] {override.split('=')[0].removeprefix('privacy.')} = "), message
    assert allowed in message and "\n" not in message, message


def test_a_file_mapping_starts_from_the_required_columns_only(tmp_path: Path) -> None:
    """The synthetic default's covariates and open flag are not a merchant's: a file's [data.columns]
    names what its file has, nothing is inherited but merchant_id, unique_id, ds and y."""
    mine = tmp_path / "mine.toml"
    mine.write_text('[data]\nsource = "file"\npath = "sales.csv"\n[data.columns]\nunique_id = "Store"\npromo = ["Promo"]\n')
    assert load_config(mine).data.columns == Columns(unique_id="Store", promo=("Promo",))
    assert load_config(None, {"data.source": "file", "data.path": "sales.csv"}).data.columns == Columns()
    synthetic = load_config().data.columns
    assert (synthetic.promo, synthetic.holiday, synthetic.open) == (("promo",), ("holiday",), "open")


def test_a_covariate_listed_twice_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^\[data.columns\] 'promo' is listed in promo and in known; list each column once$"):
        load_config(None, {"data.columns.known": ["promo"]})


def test_replace_validates_like_a_file() -> None:
    """A variant built in code (dataclasses.replace) gets the same checks and the same one line as a loaded file."""
    with pytest.raises(ConfigError, match=r"^\[model\] llm_layers = 0: expected an integer, at least 1$"):
        dataclasses.replace(load_config().model, llm_layers=0)
    with pytest.raises(ConfigError, match=r"^\[data\] horizon \(10\) must be a multiple of patch_len \(7\)$"):
        cfg = load_config()
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, horizon=10))


def test_lists_become_tuples_and_numpy_numbers_plain_ones_so_a_config_hashes() -> None:
    cfg = with_overrides(load_config(), {"train.batch_size": np.int64(4), "model.shared": ["head"]})
    assert cfg.train.batch_size == 4 and type(cfg.train.batch_size) is int and cfg.model.shared == ("head",)
    assert hash(cfg) == hash(with_overrides(load_config(), {"train.batch_size": 4, "model.shared": ("head",)}))
