"""Config files layer over default.toml and over the file they name as `base`; mistakes are errors."""

from pathlib import Path

import pytest

from shared.config import PROJECT_ROOT, ConfigError, load_config


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
