"""The privacy audit's statistics on hand-made scores, and a tiny end-to-end audit on the tiny backbone.

The full audit (benchmarks/privacy_audit.py) takes tens of minutes; here every number it reports is
computed correctly where the answer is known by hand, and a small audit through the real training
paths (non-DP and DP-SGD with a ledger) must catch a non-DP model that memorised its members.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.privacy_audit import (
    CANARY_PREFIX,
    attack_metrics,
    canary_frame,
    dp_tpr_bound,
    exposure,
    roc_auc,
    run_audit,
    summarise_runs,
    tpr_at_fpr,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]


def test_auc_of_separable_reversed_and_constant_scores():
    members, nonmembers = np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0, 3.0, 4.0])
    assert roc_auc(members, nonmembers) == 1.0
    assert roc_auc(nonmembers, members) == 0.0
    assert roc_auc(np.ones(4), np.ones(7)) == 0.5  # ties count one half


def test_auc_matches_pair_counting_and_sklearn():
    # pairs (member > non-member): 0.8 beats both, 0.4 beats 0.1 only, 0.5 ties 0.5 -> (2 + 1 + 1 + 0.5) / 6
    members, nonmembers = np.array([0.8, 0.4, 0.5]), np.array([0.5, 0.1])
    assert roc_auc(members, nonmembers) == pytest.approx(4.5 / 6)
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 1, 40).round(1), rng.normal(0, 1, 55).round(1)  # rounding makes ties
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    assert roc_auc(pos, neg) == pytest.approx(sklearn.roc_auc_score(labels, np.r_[pos, neg]))


def test_tpr_at_fpr_respects_the_fpr_limit_and_its_resolution():
    members, nonmembers = np.array([10.0, 9.0, 2.55, 1.0]), np.arange(10, dtype=float) / 10 + 2.0  # non-members 2.0 .. 2.9
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.5  # 10 and 9 lie above every non-member
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.5  # 1% < 1/10: same as FPR 0
    assert tpr_at_fpr(members, nonmembers, 0.10) == 0.5  # admitting 2.9 gains no member
    assert tpr_at_fpr(members, nonmembers, 0.39) == 0.5
    assert tpr_at_fpr(members, nonmembers, 0.40) == 0.75  # threshold 2.55 admits 2.6 .. 2.9
    assert tpr_at_fpr(members, nonmembers, 0.99) == 0.75
    assert tpr_at_fpr(members, nonmembers, 1.0) == 1.0
    assert tpr_at_fpr(np.array([5.0, 6.0]), np.array([1.0, 2.0]), 0.01) == 1.0  # separable: all members at FPR 0
    metrics = attack_metrics(np.array([9.0, 8.0, 1.0, 0.0]), np.array([0, 1]), np.array([2, 3]))
    assert metrics == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_10pct_fpr": 1.0}


def test_exposure_is_log2_n_for_the_lowest_loss_and_zero_for_the_highest():
    heldout = np.arange(1, 64, dtype=float)  # 63 held-out canaries, N = 64 candidates
    assert exposure(0.5, heldout) == (6.0, 1.0)
    assert exposure(100.0, heldout) == (0.0, 64.0)
    bits, rank = exposure(31.5, heldout)  # 31 held-out losses below it
    assert rank == 32.0 and bits == pytest.approx(1.0)


def test_dp_bound():
    assert dp_tpr_bound(1.0, 0.0, 0.1) == pytest.approx(np.e * 0.1)  # TPR <= e^eps FPR + delta is the tighter one here
    assert dp_tpr_bound(1.0, 0.0, 0.5) == pytest.approx(1 - np.exp(-1) * 0.5)  # and 1 - e^-eps (1 - delta - FPR) here
    assert dp_tpr_bound(0.0, 0.0, 0.1) == pytest.approx(0.1)
    assert dp_tpr_bound(8.0, 1e-5, 0.1) == pytest.approx(1 - np.exp(-8) * (0.9 - 1e-5))  # nearly vacuous


def test_canaries_are_constant_with_spikes():
    import pandas as pd

    frame = canary_frame(3, pd.date_range("2024-01-01", periods=200, freq="D"), seed=1)
    assert frame["unique_id"].str.startswith(CANARY_PREFIX).all() and frame["unique_id"].nunique() == 3
    for _, series in frame.groupby("unique_id"):
        assert set(series["y"].unique()) == {20.0, 120.0}
    spikes = [tuple(s["y"].to_numpy() > 20) for _, s in frame.groupby("unique_id")]
    assert len(set(spikes)) == 3  # each canary's secret spike days differ


@pytest.mark.slow  # ~4 s on 2 cores: trains a non-DP and a DP model
def test_tiny_audit_catches_a_memorising_non_dp_model():
    # 60 steps at a high learning rate: the tiny non-DP model memorises its ~10 member series (AUC ~1 on seeds 0-4)
    settings = {"merchants": 1, "days": 140, "stride": 7, "steps": 60, "canaries": 5, "insert": 1, "backbone": "tiny",
                "layers": 1, "seeds": "0", "batch": 4, "lr": 1e-2}
    result = run_audit(settings, seeds=[0], epsilons=[4.0], log=lambda _: None)
    runs = {r["setting"]: r for r in result["runs"]}
    assert set(runs) == {"non-DP", "DP eps=4"}
    n = result["series"]["ordinary"]
    for run in runs.values():
        assert run["members"] + run["nonmembers"] == n and abs(run["members"] - run["nonmembers"]) <= 1
        assert run["steps_run"] == 60 and run["canaries_inserted"] == 1 and run["canaries_heldout"] == 4
        assert set(run["canary_exposure"]) == set(run["attacks"]) == {"loss", "loss_minus_init", "loss_minus_ref"}
        assert run["canary_exposure_max_possible"] == pytest.approx(np.log2(5))
    non_dp, dp = runs["non-DP"], runs["DP eps=4"]
    # members score as members: a sign or index slip in the attack would put these at or below 0.5
    assert non_dp["member_loss"] < non_dp["nonmember_loss"]
    assert all(attack["auc"] > 0.8 for attack in non_dp["attacks"].values()), non_dp["attacks"]
    assert non_dp["attacks"]["loss_minus_init"]["tpr_at_10pct_fpr"] >= 0.5
    # the inserted canary has the lowest calibrated loss of the 5 candidates: rank 1, log2(5) bits
    assert non_dp["canary_rank"]["loss_minus_init"] == [1.0]
    assert non_dp["canary_exposure"]["loss_minus_init"] == [pytest.approx(np.log2(5))]
    # DP-SGD at eps = 4 leaks measurably less to the same attack
    assert dp["attacks"]["loss_minus_init"]["auc"] < non_dp["attacks"]["loss_minus_init"]["auc"]
    # noise from get_noise_multiplier for the charged sample rate: the planned steps spend (nearly) the whole budget
    assert dp["noise_multiplier"] > 0 and 3.9 < dp["epsilon_spent"] <= 4.0
    assert dp["sample_rate"] == pytest.approx(1 / np.ceil((dp["members"] + 1) / 4))  # one unit per series, batch 4
    summary = summarise_runs(result).set_index("setting")
    assert summary.loc["DP eps=4", "ε spent"] <= 4.0 and summary.loc["non-DP", "ε spent"] == float("inf")
