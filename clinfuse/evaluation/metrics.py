"""Per-label and macro metrics for multi-label predictions, with bootstrap confidence intervals.

`y` is (N, L) with 1.0 / 0.0 / NaN (NaN = unknown, masked out per label); `probs` (N, L) are
calibrated probabilities; a label is called positive at `probs >= threshold`. Every number comes
from `sklearn.metrics` except the bootstrap, which evaluates the same weighted AUROC and average
precision for all resamples at once (a test checks it against sklearn resample by resample).
The result is plain JSON: a metric that is undefined on this split is `None`, never NaN.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    recall_score,
    roc_auc_score,
)

from clinfuse.evaluation.calibration import check_scores

METRICS = ("auroc", "auprc", "sensitivity", "specificity", "f1", "brier", "ece")
CI_LEVEL = 0.95
# a bootstrap interval needs this many known positives and negatives: with fewer, most
# resamples repeat the same few cases and the interval is narrow for want of data (one
# positive scored highest gives AUROC [1.0, 1.0])
CI_MIN_CLASS = 5
BOOTSTRAP_CELLS = 2_000_000  # resamples x studies drawn at once; bounds the bootstrap's memory


def expected_calibration_error(
    y_true_1d: np.ndarray, probs_1d: np.ndarray, n_bins: int = 10
) -> float:
    """ECE: |observed rate - mean probability| per equal-width bin on [0, 1], weighted by the
    bin's share of cells. Bins are those of `sklearn.calibration.calibration_curve` (uniform)."""
    y_true_1d, probs_1d = np.asarray(y_true_1d, dtype=float), np.asarray(probs_1d, dtype=float)
    if y_true_1d.size == 0:
        raise ValueError("expected_calibration_error needs at least one cell")
    observed, predicted = calibration_curve(y_true_1d, probs_1d, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], probs_1d), minlength=n_bins)
    weights = counts[counts > 0] / probs_1d.size  # the non-empty bins, as calibration_curve
    return float(np.sum(weights * np.abs(observed - predicted)))


def evaluate_predictions(
    y: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    labels: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    patients: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """Metrics per label (on its known cells) and their macro means, as a JSON-able dict.

    `{"macro": {metric: mean over labels where defined, or None}, "labels": {name: {...}},
    "n": N, "resampled": "patients" | "studies", "n_resampled": count}`; each label holds the
    seven `METRICS`, its `threshold`, `n_known`, `n_positive`, `prevalence`, percentile
    bootstrap `auroc_ci` / `auprc_ci` ([lo, hi] or None) from `n_bootstrap` resamples (None,
    with a `ci_note` saying why, when a class has fewer than `CI_MIN_CLASS` known cases), and
    a `note` saying why metrics are None (else None).

    `patients` (N,), each study's patient: the bootstrap then resamples patients, every study
    of a drawn patient with it, since one patient's studies are not independent (resampling
    them one by one gives intervals too narrow when patients have several); a class's cases
    are then counted in patients. Without it, each study is its own patient.
    """
    probs, y = check_scores(probs, y, "probs")
    thresholds = np.asarray(thresholds, dtype=float)
    labels = tuple(labels)
    if thresholds.shape != (y.shape[1],) or not np.isfinite(thresholds).all():
        raise ValueError(f"thresholds must be {y.shape[1]} finite numbers, got {thresholds}")
    if len(labels) != y.shape[1] or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be {y.shape[1]} distinct names, got {labels}")
    if ((probs < 0) | (probs > 1)).any():
        raise ValueError("probs must be probabilities in [0, 1]; apply the sigmoid first")

    groups = patient_groups(patients, y.shape[0])
    unit = "patients" if patients is not None else "studies"
    cis = bootstrap_ranking_cis(y, probs, n_bootstrap, seed, groups)
    per_label = {}
    for j, name in enumerate(labels):
        known = ~np.isnan(y[:, j])
        per_label[name] = label_metrics(y[known, j], probs[known, j], float(thresholds[j]))
        per_label[name]["auroc_ci"], per_label[name]["auprc_ci"] = cis[j]
        per_label[name]["note"] = _note(y[known, j])
        per_label[name]["ci_note"] = None
        fewest = min(
            np.unique(groups[known & (y[:, j] == c)]).size for c in (0, 1)
        )  # patients with a known case of the rarer class
        if n_bootstrap and 0 < fewest < CI_MIN_CLASS:
            per_label[name]["auroc_ci"] = per_label[name]["auprc_ci"] = None
            counted = unit if fewest > 1 else {"patients": "patient", "studies": "study"}[unit]
            per_label[name]["ci_note"] = (
                f"no confidence interval: one class is in {fewest} {counted}, fewer than "
                f"{CI_MIN_CLASS}"
            )
    return {
        "macro": macro_average(per_label),
        "labels": per_label,
        "n": int(y.shape[0]),
        "resampled": unit,  # what the bootstrap draws
        "n_resampled": int(np.unique(groups).size),
    }


def patient_groups(patients: Sequence[Hashable] | None, n: int) -> np.ndarray:
    """(N,) int: each study's group for the bootstrap, numbered from 0; each study its own
    without `patients`."""
    if patients is None:
        return np.arange(n)
    if len(patients) != n:
        raise ValueError(f"patients must name the patient of each of the {n} studies")
    _, codes = np.unique(np.asarray([str(p) for p in patients]), return_inverse=True)
    return codes.reshape(-1)


def label_metrics(t: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """One label's metrics on its known cells `t` (0/1) and probabilities `p`; None if undefined.

    AUROC and AUPRC need both classes, sensitivity and F1 a positive, specificity a negative;
    Brier and ECE need any cell. F1 with no positive call is 0 (sklearn's zero_division=0).
    """
    t = t.astype(int)
    n_known, n_positive = int(t.size), int(t.sum())
    has_pos, has_neg = n_positive > 0, n_positive < n_known
    called = (p >= threshold).astype(int)
    out: dict[str, Any] = dict.fromkeys(METRICS)
    if has_pos and has_neg:
        out["auroc"] = float(roc_auc_score(t, p))
        out["auprc"] = float(average_precision_score(t, p))
    if has_pos:
        out["sensitivity"] = float(recall_score(t, called, pos_label=1, zero_division=0.0))
        out["f1"] = float(f1_score(t, called, pos_label=1, zero_division=0.0))
    if has_neg:
        out["specificity"] = float(recall_score(t, called, pos_label=0, zero_division=0.0))
    if n_known:
        out["brier"] = float(brier_score_loss(t, p, pos_label=1))
        out["ece"] = expected_calibration_error(t, p)
    out["threshold"] = threshold
    out["n_known"], out["n_positive"] = n_known, n_positive
    out["prevalence"] = n_positive / n_known if n_known else None
    return out


def macro_average(per_label: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Mean of each metric over the labels where it is defined; None where it is nowhere."""
    macro: dict[str, float | None] = {}
    for metric in METRICS:
        values = [m[metric] for m in per_label.values() if m[metric] is not None]
        macro[metric] = float(np.mean(values)) if values else None
    return macro


def bootstrap_ranking_cis(
    y: np.ndarray,
    probs: np.ndarray,
    n_bootstrap: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> list[tuple[list[float] | None, list[float] | None]]:
    """Per label, percentile CIs ([lo, hi] or None) for AUROC and AUPRC.

    Each resample draws G groups (`groups` (N,), numbered 0..G-1: patients; by default each
    row its own) with replacement from a `numpy.random.default_rng(seed)`, shared by every
    label, each drawn group bringing all its rows; resamples where a label has a single known
    class are skipped for it. A resample is a count per row, which is the same as sklearn's
    metric with those counts as `sample_weight`; that is how all resamples are scored in one
    pass per label.
    """
    n, n_labels = y.shape
    groups = np.arange(n) if groups is None else groups
    g = int(groups.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    scores: list[list[np.ndarray]] = [[] for _ in range(n_labels)]
    chunk = max(1, BOOTSTRAP_CELLS // max(n, g, 1))
    for start in range(0, n_bootstrap if n else 0, chunk):
        b = min(chunk, n_bootstrap - start)
        drawn = rng.integers(0, g, size=(b, g))  # (b, G) group indices
        offsets = (np.arange(b) * g)[:, None]
        counts = np.bincount((drawn + offsets).ravel(), minlength=b * g).reshape(b, g)
        counts = counts[:, groups]  # (b, N): each row drawn as often as its group
        for j in range(n_labels):
            known = ~np.isnan(y[:, j])
            scores[j].append(
                weighted_ranking_scores(y[known, j], probs[known, j], counts[:, known])
            )

    cis = []
    for j in range(n_labels):
        stacked = np.concatenate(scores[j], axis=1) if scores[j] else np.empty((2, 0))
        cis.append((_percentile_ci(stacked[0]), _percentile_ci(stacked[1])))
    return cis


def weighted_ranking_scores(t: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(2, B) AUROC and average precision of scores `p` for labels `t` under each row of
    `weights` (B, n); NaN where a weighting leaves one class. Matches `roc_auc_score` and
    `average_precision_score` called with `sample_weight` (ties share a threshold)."""
    result = np.full((2, weights.shape[0]), np.nan)
    if t.size == 0:
        return result
    order = np.argsort(-p, kind="stable")  # descending score: thresholds from high to low
    starts = np.r_[0, np.flatnonzero(np.diff(p[order])) + 1]  # one group per distinct score
    w = weights[:, order].astype(float)
    tps = np.cumsum(np.add.reduceat(w * t[order], starts, axis=1), axis=1)  # (B, G)
    fps = np.cumsum(np.add.reduceat(w * (1 - t[order]), starts, axis=1), axis=1)
    pos, neg = tps[:, -1:], fps[:, -1:]
    valid = (pos[:, 0] > 0) & (neg[:, 0] > 0)
    tps, fps, pos, neg = tps[valid], fps[valid], pos[valid], neg[valid]

    tpr = np.hstack([np.zeros_like(pos), tps / pos])
    fpr = np.hstack([np.zeros_like(neg), fps / neg])
    auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)  # trapezoids
    called = tps + fps
    precision = np.divide(tps, called, out=np.zeros_like(tps), where=called > 0)
    average_precision = np.sum(np.diff(tpr, axis=1) * precision, axis=1)  # step, no interpolation
    result[0, valid], result[1, valid] = auroc, average_precision
    return result


def _percentile_ci(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _note(t: np.ndarray) -> str | None:
    if t.size == 0:
        return "no known labels in this split"
    if not (t == 1).any():
        return "no positives in this split"
    if not (t == 0).any():
        return "no negatives in this split"
    return None
