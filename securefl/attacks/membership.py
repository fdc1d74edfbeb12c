"""Membership inference: was example ``(x, y)`` in the training set of a model?

Two attacks, both producing one score per candidate example (higher = "member"):

* :func:`loss_threshold_scores` - Yeom, Giacomelli, Fredrikson & Jha, "Privacy Risk in
  Machine Learning: Analyzing the Connection to Overfitting" (CSF 2018): predict "member"
  when ``CE(f(x), y) < τ``; the score is ``-CE``.
* :func:`lira_scores` - the Likelihood Ratio Attack of Carlini, Chien, Nasr, Song, Terzis &
  Tramèr, "Membership Inference Attacks From First Principles" (S&P 2022).  Confidences are
  logit-scaled, ``φ = log p_y - log(1 - p_y)`` (:func:`logit_confidence`), and fitted per
  example with Gaussians over shadow models trained with (IN) and without (OUT) the example.
  Online: ``Λ = log N(φ; μ_in, σ_in²) - log N(φ; μ_out, σ_out²)``.  Offline (OUT shadows
  only): ``Λ = log Φ((φ - μ_out) / σ_out)``, the one-sided test that ``φ`` is larger than an
  OUT model would give.  With few shadows the variance is shared across examples (the
  paper's "global variance", Sec. VI-A).

:func:`evaluate_scores` turns scores into the paper's metrics: ROC AUC and TPR at fixed low
FPR (1% and 0.1%), taking the best TPR at FPR ≤ the level; :func:`plot_roc` draws the
log-log ROC curve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn

from securefl.output import pyplot, save_figure

__all__ = [
    "MembershipMetrics",
    "balanced_membership",
    "evaluate_scores",
    "lira_scores",
    "logit_confidence",
    "loss_threshold_scores",
    "model_outputs",
    "plot_roc",
]

_FPR_LEVELS = (0.01, 0.001)


@dataclass(frozen=True)
class MembershipMetrics:
    """ROC summary of one attack: AUC, TPR at 1% and 0.1% FPR, and the curve itself."""

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    fpr: np.ndarray
    tpr: np.ndarray

    def summary(self) -> dict[str, float]:
        return {"auc": self.auc, "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
                "tpr_at_01pct_fpr": self.tpr_at_01pct_fpr}


def model_outputs(model: nn.Module, features: np.ndarray, *,
                  batch_size: int = 1024) -> np.ndarray:
    """Logits ``(n, classes)`` of ``model`` on ``features`` (evaluation mode, no gradient)."""
    model.eval()
    inputs = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    with torch.no_grad():
        parts = [model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return torch.cat(parts).double().numpy() if parts else np.zeros((0, 0))


def _check_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[1] < 2:
        raise ValueError(f"need logits (n, classes >= 2) and labels (n,), got {z.shape} and "
                         f"{y.shape}")
    if y.dtype.kind not in "iu" or (y < 0).any() or (y >= z.shape[1]).any():
        raise ValueError(f"labels must be integers in [0, {z.shape[1]}), got {y[:5]}...")
    return z, y.astype(np.int64)


def loss_threshold_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Yeom et al. 2018: score ``-CE(f(x), y) = log softmax(z)_y`` (members have low loss)."""
    z, y = _check_labels(logits, labels)
    log_p = z - _logsumexp(z)
    return log_p[np.arange(len(y)), y]


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=1, keepdims=True)
    return top + np.log(np.exp(z - top).sum(axis=1, keepdims=True))


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``φ = log(p_y / (1 - p_y)) = z_y - logsumexp_{c ≠ y} z_c`` (stable for p_y → 1)."""
    z, y = _check_labels(logits, labels)
    rows = np.arange(len(y))
    own = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    return own - _logsumexp(others)[:, 0]


def balanced_membership(num_models: int, num_examples: int, *,
                        rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(num_models, num_examples)``: each example is IN exactly half the models.

    Carlini et al. (Sec. VI) train each shadow on a random half of the candidate pool; balancing
    per example guarantees every example has both IN and OUT shadows for the online test.
    """
    if num_models < 2 or num_models % 2:
        raise ValueError(f"num_models must be even and >= 2, got {num_models}")
    base = np.arange(num_models) < num_models // 2
    return np.stack([rng.permutation(base) for _ in range(num_examples)], axis=1)


def lira_scores(target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray, *,
                online: bool, global_variance: bool = True) -> np.ndarray:
    """LiRA scores for ``n`` candidates.

    ``target`` ``(n,)`` are the logit-scaled confidences under the attacked model;
    ``shadow`` ``(k, n)`` those under ``k`` shadow models and ``shadow_in`` ``(k, n)`` says
    which shadow trained on which candidate.  Offline uses only OUT shadows.
    """
    phi = np.asarray(target, dtype=np.float64)
    conf = np.asarray(shadow, dtype=np.float64)
    member = np.asarray(shadow_in, dtype=bool)
    if conf.ndim != 2 or conf.shape != member.shape or conf.shape[1:] != phi.shape:
        raise ValueError(f"need target (n,), shadow and shadow_in (k, n); got {phi.shape}, "
                         f"{conf.shape}, {member.shape}")
    mu_out, sd_out = _gaussian_fit(conf, ~member, global_variance)
    if not online:
        return stats.norm.logcdf(phi, loc=mu_out, scale=sd_out)
    mu_in, sd_in = _gaussian_fit(conf, member, global_variance)
    return (stats.norm.logpdf(phi, loc=mu_in, scale=sd_in)
            - stats.norm.logpdf(phi, loc=mu_out, scale=sd_out))


def _gaussian_fit(values: np.ndarray, mask: np.ndarray,
                  global_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    counts = mask.sum(axis=0)
    if (counts < 1).any():
        raise ValueError("every candidate needs at least one shadow model on each side; use "
                         "balanced_membership to assign shadow training sets")
    mean = np.where(mask, values, 0.0).sum(axis=0) / counts
    residual = np.where(mask, values - mean, 0.0)
    if global_variance or (counts < 2).any():
        sd = np.full_like(mean, np.sqrt((residual ** 2).sum() / max(mask.sum() - 1, 1)))
    else:
        sd = np.sqrt((residual ** 2).sum(axis=0) / (counts - 1))
    return mean, np.maximum(sd, 1e-6)


def evaluate_scores(scores: np.ndarray, is_member: np.ndarray) -> MembershipMetrics:
    """AUC and TPR at 1% / 0.1% FPR of ``scores`` against the ground truth ``is_member``.

    TPR at a level ``a`` is the largest TPR over thresholds whose FPR ≤ ``a`` (Carlini et al.
    2022, Sec. III-B); with fewer than ``1/a`` non-members that is the TPR at FPR = 0.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(is_member, dtype=bool)
    if s.shape != truth.shape or s.ndim != 1:
        raise ValueError(f"scores and is_member must be (n,) arrays, got {s.shape}, {truth.shape}")
    if truth.all() or not truth.any():
        raise ValueError("need both members and non-members to evaluate an attack")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    fpr, tpr, _ = roc_curve(truth, s)
    at = [float(tpr[fpr <= level].max()) for level in _FPR_LEVELS]
    return MembershipMetrics(float(roc_auc_score(truth, s)), at[0], at[1], fpr, tpr)


def plot_roc(path: str | Path, curves: Mapping[str, MembershipMetrics], *,
             title: str = "") -> Path:
    """Log-log ROC curves (Carlini et al. 2022, Fig. 1 style) with the chance diagonal."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(4.2, 4.2))
    floor = 1e-4
    for name, metrics in curves.items():
        axis.plot(np.maximum(metrics.fpr, floor), np.maximum(metrics.tpr, floor),
                  label=f"{name} (AUC {metrics.auc:.3f})")
    axis.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlim(floor, 1)
    axis.set_ylim(floor, 1)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    if title:
        axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)
