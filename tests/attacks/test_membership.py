"""Membership inference cores: confidences, loss threshold, LiRA, ROC metrics, plot."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch.nn import functional as F

from securefl.attacks.membership import (
    balanced_membership,
    evaluate_scores,
    lira_scores,
    logit_confidence,
    loss_threshold_scores,
    model_outputs,
    plot_roc,
)


def test_logit_confidence_is_log_odds_of_the_label() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = np.array([0, 2])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = np.log(p[[0, 1], labels] / (1 - p[[0, 1], labels]))
    np.testing.assert_allclose(logit_confidence(logits, labels), expected, rtol=1e-12)


def test_logit_confidence_is_stable_when_the_model_is_certain() -> None:
    # p_y = 1 - 1e-300 underflows to exactly 1.0 in float64: the naive formula gives inf
    phi = logit_confidence(np.array([[700.0, 0.0]]), np.array([0]))
    assert phi[0] == pytest.approx(700.0)
    phi = logit_confidence(np.array([[0.0, 700.0]]), np.array([0]))
    assert phi[0] == pytest.approx(-700.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_loss_threshold_score_is_minus_cross_entropy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=5, size=(7, 4))
    labels = rng.integers(0, 4, size=7)
    expected = -F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                                reduction="none").numpy()
    np.testing.assert_allclose(loss_threshold_scores(logits, labels), expected, atol=1e-10)


def test_labels_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="labels must be integers"):
        logit_confidence(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="need logits"):
        loss_threshold_scores(np.zeros(3), np.array([0]))


def test_metrics_of_known_rankings() -> None:
    truth = np.array([1, 1, 0, 0], dtype=bool)
    perfect = evaluate_scores(np.array([4.0, 3.0, 2.0, 1.0]), truth)
    assert (perfect.auc, perfect.tpr_at_1pct_fpr, perfect.tpr_at_01pct_fpr) == (1.0, 1.0, 1.0)
    reversed_ = evaluate_scores(np.array([1.0, 2.0, 3.0, 4.0]), truth)
    assert reversed_.auc == 0.0 and reversed_.tpr_at_1pct_fpr == 0.0
    # one member ranked first, one below one non-member: AUC = 3/4, TPR at FPR 0 = 1/2
    mixed = evaluate_scores(np.array([4.0, 2.0, 3.0, 1.0]), truth)
    assert mixed.auc == 0.75
    assert mixed.tpr_at_1pct_fpr == 0.5


def test_tpr_at_low_fpr_uses_only_thresholds_under_the_level() -> None:
    # 200 non-members: FPR 1% allows 2 false positives, 0.1% allows none
    rng = np.random.default_rng(0)
    non_members = rng.permutation(np.arange(200, dtype=float))
    # two members above every non-member, one above all but one (FPR 0.5%), one at the bottom
    members = np.array([1000.0, 199.5, 198.5, -1.0])
    truth = np.r_[np.ones(4), np.zeros(200)].astype(bool)
    metrics = evaluate_scores(np.r_[members, non_members], truth)
    assert metrics.tpr_at_01pct_fpr == 0.5
    assert metrics.tpr_at_1pct_fpr == 0.75


def test_evaluate_refuses_one_sided_truth_and_nan() -> None:
    with pytest.raises(ValueError, match="both members and non-members"):
        evaluate_scores(np.array([1.0, 2.0]), np.array([True, True]))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_scores(np.array([np.nan, 2.0]), np.array([True, False]))


def test_balanced_membership_puts_each_example_in_half_the_models() -> None:
    mask = balanced_membership(8, 50, rng=np.random.default_rng(1))
    assert mask.shape == (8, 50)
    assert (mask.sum(axis=0) == 4).all()
    with pytest.raises(ValueError, match="even"):
        balanced_membership(3, 5, rng=np.random.default_rng(0))


def test_lira_online_is_the_gaussian_log_likelihood_ratio() -> None:
    shadow = np.array([[1.0, 10.0], [3.0, 12.0], [-1.0, 0.0], [1.0, 2.0]])
    inside = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=bool)
    target = np.array([2.0, 1.0])
    scores = lira_scores(target, shadow, inside, online=True, global_variance=False)
    # example 0: IN N(2, sqrt 2), OUT N(0, sqrt 2); example 1: IN N(11, sqrt 2), OUT N(1, sqrt 2)
    sd = np.sqrt(2.0)
    expected = [stats.norm.logpdf(2, 2, sd) - stats.norm.logpdf(2, 0, sd),
                stats.norm.logpdf(1, 11, sd) - stats.norm.logpdf(1, 1, sd)]
    np.testing.assert_allclose(scores, expected)
    offline = lira_scores(target, shadow, inside, online=False, global_variance=False)
    np.testing.assert_allclose(offline, [stats.norm.logcdf(2, 0, sd), stats.norm.logcdf(1, 1, sd)])


def test_lira_separates_synthetic_gaussians() -> None:
    # each example has its own difficulty mu_i; training on it shifts phi by +1.5
    rng = np.random.default_rng(2)
    n, k = 400, 16
    difficulty = rng.normal(0, 3, size=n)
    inside = balanced_membership(k, n, rng=rng)
    shadow = difficulty + 1.5 * inside + rng.normal(size=(k, n))
    truth = rng.random(n) < 0.5
    target = difficulty + 1.5 * truth + rng.normal(size=n)
    online = evaluate_scores(lira_scores(target, shadow, inside, online=True), truth)
    offline = evaluate_scores(lira_scores(target, shadow, inside, online=False), truth)
    naive = evaluate_scores(target, truth)  # no per-example calibration
    # optimal AUC for a 1.5-sigma shift is Phi(1.5 / sqrt 2) = 0.856
    assert online.auc > 0.8 and offline.auc > 0.8
    assert naive.auc < 0.7


def test_lira_needs_shadows_on_both_sides() -> None:
    with pytest.raises(ValueError, match="at least one shadow"):
        lira_scores(np.zeros(2), np.zeros((2, 2)), np.array([[1, 1], [1, 0]], dtype=bool),
                    online=True)


def test_model_outputs_and_roc_plot(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    logits = model_outputs(model, np.ones((5, 3), dtype=np.float32))
    assert logits.shape == (5, 2)
    truth = np.array([1, 0, 1, 0, 1], dtype=bool)
    metrics = evaluate_scores(np.array([0.9, 0.1, 0.8, 0.3, 0.2]), truth)
    path = plot_roc(tmp_path / "roc.png", {"toy": metrics}, title="toy")
    image = matplotlib.image.imread(path)
    assert image.shape[0] == image.shape[1] == 504  # 4.2 in at 120 dpi
