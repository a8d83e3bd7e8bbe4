"""`make demo` end to end on the tiny backbone: the report the README promises, with every section filled.

Runs `simulations.demo.main` as `make demo` does (two Flower simulations, without and with DP, then
the local contenders and baselines) on 2 merchants, 1 round of 2 local steps, and checks only the
files it writes, so the report's internals may change freely.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from shared.config import PROJECT_ROOT
from simulations.demo import main

pytestmark = [
    pytest.mark.slow,  # two Flower simulations (mostly Ray start-up): ~90 s in all on 2 cores
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order:UserWarning"),
]

MERCHANTS = {"shop_00", "shop_01"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table_after(text: str, marker: str) -> list[dict[str, str]]:
    """The first markdown table after the first line containing `marker`, as one dict per row."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, body = rows[0], rows[2:]  # rows[1] is the |---| rule
    return [dict(zip(header, row)) for row in body]


def column(rows: list[dict[str, str]], *names: str) -> list[str]:
    """The first column whose header contains one of `names`."""
    key = next(k for k in rows[0] if any(n in k for n in names))
    return [row[key] for row in rows]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        main(config=PROJECT_ROOT / "configs" / "tiny.toml", set_=[
            f"federation.out_dir={out}", "data.synthetic.n_merchants=2", "data.synthetic.n_days=160", "data.stride=7",
            "federation.num_rounds=1", "federation.local_steps=2", "privacy.enabled=true",
        ])
    finally:  # main() reconfigures the root logger (basicConfig(force=True)); later tests get theirs back
        root.handlers[:] = handlers
        root.setLevel(level)
    return out


def test_accuracy_table_ranks_shopcast_against_seasonal_naive(demo_out):
    text = (demo_out / "report.md").read_text()
    overall = {row["model"]: row for row in table_after(text, "## Accuracy")}
    assert {"seasonal_naive", "shopcast_federated", "shopcast_federated_dp"} <= set(overall), sorted(overall)
    assert {"AutoETS", "AutoTheta", "lightgbm_per_merchant"} <= set(overall), sorted(overall)  # today's tools
    for model, row in overall.items():
        assert math.isfinite(float(row["mase"])) and float(row["mase"]) > 0, (model, row)
    assert float(overall["seasonal_naive"]["mase_gmean_rel"]) == pytest.approx(1.0)  # the reference row
    per_merchant = table_after(text, "## Per merchant")
    assert set(column(per_merchant, "merchant")) == MERCHANTS


def test_privacy_section_gives_epsilon_per_merchant(demo_out):
    text = (demo_out / "report.md").read_text()
    assert "DP is **off**" not in text
    spent = table_after(text, "ε spent by each merchant")
    assert set(column(spent, "merchant")) == MERCHANTS
    assert all(0 < float(eps) <= 8.0 for eps in column(spent, "epsilon", "ε")), spent  # default budget: ε ≤ 8


def test_traffic_section_gives_bytes_sent_per_round(demo_out):
    text = (demo_out / "report.md").read_text()
    rounds = table_after(text, "## Traffic")
    assert [int(r) for r in column(rounds, "round")] == [1]
    assert all(float(b) > 0 for b in column(rounds, "bytes")), rounds
    assert all(float(s) > 0 for s in column(rounds, "wall")), rounds


def test_report_json_and_plots(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    assert {"seasonal_naive", "shopcast_federated_dp"} <= {row["model"] for row in report["overall"]}
    for name in ("accuracy.png", "forecasts.png"):
        data = (demo_out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name
        assert f"]({name})" in (demo_out / "report.md").read_text()  # and the report shows it
