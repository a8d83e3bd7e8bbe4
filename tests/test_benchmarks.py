"""Small, fast versions of every benchmark, so the harness cannot rot; the full runs' results are committed.

Each runs the committed benchmark entry point on its committed config with the tiny backbone and a few
steps; presets whose files are absent are skipped. The CSV case is the "config only" promise: a shop
file with its own column names and weekly frequency is benchmarked without touching code.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fed_helpers import enter_task

from benchmarks import accuracy, etth1, personal_gate
from benchmarks.merchant_dp import noise_for_merchants, release_noise
from benchmarks.scaffold import ChildFailed, Run, run_child
from server.client_dp import client_epsilon
from shared import presets
from shared.adapter import adapter_state
from shared.config import PROJECT_ROOT
from shared.pipeline import ForecastPipeline
from shared.presets import preset_available
from shared.schema import DS, ID
from shared.train import TrainResult
from simulations.compare import Contest
from simulations.report import ACCURACY_COLUMNS, accuracy_summary, merchant_wql

CONFIGS = PROJECT_ROOT / "configs" / "benchmarks"
QUICK = ["model.backbone=tiny", "model.llm_layers=2", "federation.num_rounds=1", "federation.local_steps=3", "benchmark.threads=1"]
BASELINES = {"seasonal_naive", "AutoETS", "AutoTheta", "lightgbm_per_merchant", "lightgbm_pooled"}


def run_accuracy(config: Path | str, tmp_path: Path, extra: list[str]) -> dict:
    args = [str(config), "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work")]
    path = accuracy.main(args + [f"--set={s}" for s in QUICK + extra])
    assert path is not None and path.exists()
    name = path.stem
    assert (path.parent / f"{name}_accuracy.png").stat().st_size > 0 and (path.parent / f"{name}_forecasts.png").stat().st_size > 0
    assert "## Where shopcast loses" in path.read_text()
    return json.loads(path.with_suffix(".json").read_text())


def models(result: dict) -> set[str]:
    return {row["model"] for row in result["summary"]}


def record_fits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(steps run, whether the adapter moved) of every in-process ForecastPipeline.fit: a trained row's
    time or score cannot show that it was trained, these can."""
    fits: list[tuple[int, bool]] = []
    original = ForecastPipeline.fit

    def fit(self: ForecastPipeline, *args, **options) -> TrainResult:
        before = adapter_state(self.model)
        result = original(self, *args, **options)
        after = adapter_state(self.model)
        fits.append((result.steps, any(not torch.equal(before[n], after[n]) for n in before)))
        return result

    monkeypatch.setattr(ForecastPipeline, "fit", fit)
    return fits


@pytest.mark.slow  # a full benchmark run each: ~5-15 s on 2 cores
@pytest.mark.parametrize(
    ("dataset", "extra"),
    [
        ("synthetic", ["data.synthetic.n_merchants=2", "data.synthetic.n_days=200"]),
        ("walmart", ['data.merchants=["store_1","store_2"]', "data.max_series_per_merchant=2", 'benchmark.ablations=["no_llm"]']),
        ("online_retail", ['data.merchants=["Germany","France"]', "data.max_series_per_merchant=2", 'benchmark.ablations=["no_llm"]']),
    ],
)
def test_dataset_benchmark_runs_every_local_contender(dataset: str, extra: list[str], tmp_path: Path, monkeypatch) -> None:
    if dataset != "synthetic" and not preset_available(dataset):
        pytest.skip(f"{dataset} data not in SHOPCAST_SHARED_DATA")
    fits = record_fits(monkeypatch)
    result = run_accuracy(CONFIGS / f"{dataset}.toml", tmp_path, ["benchmark.federated=false", *extra])
    ablations = {f"ablation_{a}" for a in (["no_llm", "attention", "random_llm"] if dataset == "synthetic" else ["no_llm"])}
    assert models(result) == {"shopcast_local_only", "shopcast_centralised", *ablations, *BASELINES}
    assert all(np.isfinite(row["wql"]) for row in result["summary"])
    # local-only fits each of the 2 merchants, centralised and every ablation fit once: 3 steps per merchant each
    steps = [3, 3, 6] + [6] * len(ablations)
    assert fits == [(n, True) for n in steps], "a shopcast or ablation row was not trained"


def shop_csv(path: Path) -> Path:
    """Two shops' weekly units per SKU under column names no preset uses."""
    rng = np.random.default_rng(3)
    weeks = pd.date_range("2022-01-02", periods=70, freq="W-SUN")
    rows = []
    for shop in ("north", "south"):
        for sku in ("A1", "B2", "C3"):
            promo = (rng.random(len(weeks)) < 0.2).astype(int)
            level = rng.uniform(20, 80) * (1 + 0.3 * np.sin(2 * np.pi * np.arange(len(weeks)) / 52)) * (1 + 0.6 * promo)
            rows.append(pd.DataFrame({"shop": shop, "sku": f"{shop}-{sku}", "week_ending": weeks.strftime("%Y-%m-%d"),
                                      "units_sold": rng.poisson(level), "on_promo": promo, "footfall": rng.poisson(500, len(weeks))}))
    pd.concat(rows).to_csv(path, index=False)
    return path


@pytest.mark.slow  # ~50 s on 2 cores: two Flower simulations
def test_any_shop_csv_is_benchmarked_by_a_config_alone(tmp_path: Path) -> None:
    csv = shop_csv(tmp_path / "shops.csv")
    config = tmp_path / "shops.toml"
    config.write_text(f'''
base = "{PROJECT_ROOT / 'configs' / 'tiny.toml'}"
[data]
source = "file"
path = "{csv}"
freq = "W-SUN"
context = 16
horizon = 4
[data.columns]
merchant_id = "shop"
unique_id = "sku"
ds = "week_ending"
y = "units_sold"
known = ["on_promo"]
observed = ["footfall"]
open = ""
[model]
patch_len = 4
patch_stride = 4
domain = "Weekly units sold of one product of a shop."
[benchmark]
name = "shops"
ablations = ["no_llm"]
''')
    result = run_accuracy(config, tmp_path, [])  # federated with and without DP, through Flower's simulation
    assert models(result) == {"shopcast_federated", "shopcast_federated_dp", "shopcast_federated_personal",
                              "shopcast_federated_dp_personal", "shopcast_local_only", "shopcast_centralised", "ablation_no_llm",
                              *BASELINES}
    assert {row["merchant_id"] for row in result["per_series"]["shopcast_federated_dp"]} == {"north", "south"}
    assert result["federation"]["shopcast_federated_dp"]["privacy"]["enabled"]
    text = (tmp_path / "results" / "shops.md").read_text()
    assert "per merchant: north" in text and "frequency W-SUN" in text


def test_a_missing_preset_is_skipped_with_a_message(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(presets, "SHARED_DATA", tmp_path)
    assert accuracy.main([str(CONFIGS / "walmart.toml"), "--results", str(tmp_path)]) is None
    assert etth1.main([str(CONFIGS / "etth1.toml"), "--results", str(tmp_path)]) is None
    assert "skipped" in capsys.readouterr().out and not list(tmp_path.iterdir())


@pytest.mark.slow  # ~7 s on 2 cores: a full benchmark run
@pytest.mark.skipif(not preset_available("etth1"), reason="ETTh1 not in SHOPCAST_SHARED_DATA")
def test_etth1_benchmark_sets_measured_rows_beside_published_ones(tmp_path: Path) -> None:
    quick = ["model.backbone=tiny", "model.llm_layers=2", "train.max_steps=3", "benchmark.test_stride=480", "benchmark.threads=1"]
    path = etth1.main([str(CONFIGS / "etth1.toml"), "--results", str(tmp_path), *[f"--set={s}" for s in quick]])
    rows = {row["model"]: row for row in json.loads(path.with_suffix(".json").read_text())["rows"]}
    assert {"shopcast", "ablation_no_llm", "ablation_attention", "repeat last value", "repeat last day"} <= set(rows)
    assert rows["Time-LLM (LLaMA-7B, published)"]["mse"] == pytest.approx(0.362)
    assert all(np.isfinite(r["mse"]) and 0 < r["mae"] for r in rows.values())


def test_a_run_is_traced_in_its_result_files(tmp_path: Path) -> None:
    started = time.time()
    with Run("benchmarks.example", ["--set", "a=1"]) as run:
        time.sleep(1.2)  # the load monitor samples every 0.5 s
    elapsed = time.time() - started
    path = run.save("example", "Example", ["extra line"], "body\n", {"numbers": [1]}, tmp_path)
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# Example", "", "- command: `.venv/bin/python -m benchmarks.example --set a=1`"]
    assert [line.split(":")[0] for line in lines[3:6]] == ["- date", "- machine", "- concurrent load"]
    assert lines[6:] == ["- extra line", "", "body"]
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved["numbers"] == [1] and saved["load"]["samples"] >= 1 and "loadavg_at_end" in saved["machine"]
    assert 1.2 <= saved["wall_s"] <= elapsed  # the block's own time: not zero, not the process's


def test_a_failed_child_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(ChildFailed, match=r"run failed \(1\)"):
        run_child("benchmarks.no_such_script", [], "x", log=tmp_path / "child.log")
    assert "No module named" in (tmp_path / "child.log").read_text()


def test_accuracy_tables_lead_with_the_best_and_keep_every_column() -> None:
    def scores(wql: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"merchant_id": ["a", "b"], "unique_id": ["a/1", "b/1"], "mase": [1.0, 2.0], "smape": [10.0, 20.0],
                             "wql": wql, "coverage_80": [0.8, 0.7], "coverage_90": [0.9, 0.8]})

    contest = Contest(scores={"seasonal_naive": scores([0.2, 0.4]), "shopcast": scores([0.1, 0.3])},
                      seconds={"seasonal_naive": 0.1, "shopcast": 5.0})
    summary = accuracy_summary(contest)
    assert list(summary.columns) == ACCURACY_COLUMNS and list(summary["model"]) == ["shopcast", "seasonal_naive"]
    assert summary.loc[0, "wql_gmean_rel"] == pytest.approx(np.sqrt(0.5 * 0.75)) and summary.loc[0, "seconds"] == 5.0
    merchants = merchant_wql(contest, summary["model"])
    assert list(merchants.columns) == ["model", "WQL a", "WQL b"] and merchants.loc[0].tolist() == ["shopcast", 0.1, 0.3]


def test_a_federation_result_renders_again_from_its_json(tmp_path: Path) -> None:
    """--render rewrites the Markdown from the committed JSON alone (it once sized a config for 0 merchants and failed)."""
    from benchmarks.federation import rerender

    rerender(PROJECT_ROOT / "benchmarks" / "results" / "federation_100.json", tmp_path)
    text = (tmp_path / "federation_100.md").read_text()
    assert "| | 100 merchants |" in text and "| rounds run / replies per round | 3 / [100, 100, 95] |" in text


def test_seed_table_averages_the_trained_rows_and_leaves_out_the_baselines() -> None:
    def summary(federated: float) -> pd.DataFrame:
        return pd.DataFrame({"model": ["shopcast_federated", "seasonal_naive"], "wql": [0.3, 0.4], "mase": [0.8, 1.0],
                             "wql_gmean_rel": [federated, 1.0], "mase_gmean_rel": [federated + 0.1, 1.0]})

    table = accuracy.seed_table({0: summary(0.70), 1: summary(0.80), 2: summary(0.90)}).set_index("model")
    assert list(table.index) == ["shopcast_federated"] and table.loc["shopcast_federated", "seeds"] == 3
    assert table.loc["shopcast_federated", "wql_gmean_rel"] == pytest.approx(0.8)
    assert table.loc["shopcast_federated", "wql_gmean_rel_sd"] == pytest.approx(0.1)
    assert table.loc["shopcast_federated", "mase_gmean_rel"] == pytest.approx(0.9)


@pytest.mark.slow  # ~18 s on 2 cores: two contests
def test_local_only_and_centralised_do_not_start_where_a_federation_ended(monkeypatch, tmp_path: Path) -> None:
    """run_contest loaded each federated adapter into its pipeline and then trained local-only and
    centralised from whatever was loaded last. With a stand-in federation that ends on a far-off
    adapter, those rows must equal the ones of a contest without federated rows."""
    from shared.pipeline import ForecastPipeline
    from simulations import compare

    def far_off_federation(cfg, num_merchants, **_):
        pipeline = ForecastPipeline.from_config(cfg)
        pipeline.restore({k: v + 1.0 for k, v in pipeline.state().items()})
        return compare.FederatedRun({}, pipeline.save(Path(cfg.federation.out_dir) / "final_adapter"))

    monkeypatch.setattr(compare, "federate", far_off_federation)
    overrides = {"model.backbone": "tiny", "model.llm_layers": 2, "federation.num_rounds": 1, "federation.local_steps": 2,
                 "data.synthetic.n_merchants": 2, "data.synthetic.n_days": 200, "train.personalise": "none"}
    rows = {}
    for federated in (True, False):
        run = compare.run_contest(PROJECT_ROOT / "configs" / "tiny.toml", overrides, tmp_path / f"work_{federated}", federated=federated)
        rows[federated] = run.contest.scores
    assert "shopcast_federated" in rows[True]
    for name in ("shopcast_local_only", "shopcast_centralised"):
        pd.testing.assert_frame_equal(rows[True][name], rows[False][name])


def test_merchant_level_noise_spends_the_target_epsilon_over_the_rounds() -> None:
    for epsilon, merchants in ((1.0, 200), (8.0, 200), (8.0, 10)):
        z = noise_for_merchants(epsilon, 3, merchants, 1e-5)
        spent = client_epsilon([release_noise(z, merchants)] * 3, 1e-5)
        assert spent <= epsilon and spent == pytest.approx(epsilon, rel=1e-3)
        assert client_epsilon([release_noise(0.9 * z, merchants)] * 3, 1e-5) > epsilon  # less noise spends more


def test_an_earlier_origin_cuts_every_series_by_the_same_steps(synthetic_table) -> None:
    cut = personal_gate.earlier_origin(synthetic_table, 14)
    before, after = (t.frame.groupby(ID)[DS].agg(["max", "size"]) for t in (synthetic_table, cut))
    assert (after["size"] == before["size"] - 14).all()
    assert (after["max"] == before["max"] - pd.Timedelta(days=14)).all()


@pytest.mark.parametrize("module", sorted(p.stem for p in (PROJECT_ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"))
def test_every_benchmark_imports(module: str) -> None:
    """A benchmark no test runs still must not break on a rename elsewhere (attack.py once imported a
    function the facade had renamed)."""
    importlib.import_module(f"benchmarks.{module}")


def test_one_in_bound_attacker_moves_the_mean_far_less_with_the_median_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.attack import measure

    enter_task(monkeypatch)
    rows = measure(merchants=3, rounds=4, dims=16, honest_norm=0.003, seed=0, overrides={})
    steady = next(r for r in rows if r["attack"] == "steady" and r["norm"] == "old ceiling")
    assert steady["new guard"] < 0.01 * steady["old guard"]
    assert steady["new guard"] < 10 * steady["honest_moved"]
