"""Calibration fitted on validation data: a temperature, an offset and a decision threshold a
label, and for naive-Bayes models first the weights of each label's evidence terms.

All are fitted on known cells only (`y` is 1.0 / 0.0 / NaN, NaN = unknown) and saved with the
model, which predicts `sigmoid(logit / temperature + offset) >= threshold` (see `FusionModel`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.metrics import roc_curve

TEMPERATURE_BOUNDS = (1e-2, 1e2)  # searched over log T
OFFSET_BOUND = 20.0  # |b| on the logit scale
WEIGHT_BOUND = 4.0  # an evidence weight's upper end (a separable label would push it to inf)
DEFAULT_THRESHOLD = 0.5  # for a label with no positives or no negatives to fit on
THRESHOLD_RULES = ("youden", "sensitivity")
# positives and negatives a label needs before its evidence is weighed, or its temperature
# fitted (below it, the offset alone: one positive made the label a step function)
MIN_CLASS_CELLS = 5

log = logging.getLogger(__name__)


def apply_temperature(
    logits: np.ndarray, temperatures: np.ndarray, offsets: np.ndarray | None = None
) -> np.ndarray:
    """Calibrated probabilities (N, L): sigmoid(logits / T + b) with one T (and b) a label,
    computed as `FusionModel.probabilities` computes them (float32, in torch), so thresholds
    fitted on them make the same calls at inference and in `evaluate`."""
    as32 = {"dtype": torch.float32}
    values = np.ascontiguousarray(logits)  # a reversed view has negative strides torch refuses
    scaled = torch.as_tensor(values, **as32) / torch.as_tensor(np.asarray(temperatures), **as32)
    if offsets is not None:
        scaled = scaled + torch.as_tensor(offsets, **as32)
    return torch.sigmoid(scaled).numpy()


def calibrated_probabilities(model: Any, logits: np.ndarray) -> np.ndarray:
    """(N, L) probabilities at a model's saved calibration (its `temperature` and `offset`
    buffers): `FusionModel.probabilities` on numpy logits, for any model that carries the
    buffers (the Transchex peer too)."""
    return apply_temperature(logits, model.temperature.cpu().numpy(), model.offset.cpu().numpy())


def too_few_cases(name: str, t: np.ndarray, then: str, counted: str = "") -> bool:
    """Whether known labels `t` hold fewer than `MIN_CLASS_CELLS` positives or negatives, said
    in a warning naming the label, which validation studies were `counted` (all of them by
    default) and what `then` happens."""
    positives = int(t.sum())
    if min(positives, t.size - positives) >= MIN_CLASS_CELLS:
        return False
    log.warning(
        "label %r: %d positive and %d negative validation studies%s, fewer than %d of either, "
        "so %s",
        name, positives, t.size - positives, counted, MIN_CLASS_CELLS, then,
    )  # fmt: skip
    return True


def fit_calibration(
    logits: np.ndarray, y: np.ndarray, offset: bool = True, names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(L,) temperatures T > 0 and (L,) offsets b minimising the NLL of sigmoid(logit / T + b)
    on each label's known cells (b stays 0 with `offset=False`: plain temperature scaling).

    The offset undoes the shift that class-imbalance weighting puts into the logits (a positive
    weight w moves the loss's optimum by log w, which a temperature alone cannot remove); it
    moves every score of a label alike, so the ranking (AUROC) is unchanged. A bounded search
    (L-BFGS-B) over log T in `TEMPERATURE_BOUNDS` and b in +-`OFFSET_BOUND`. A label with fewer
    than two known cells, or only one class among them, keeps T = 1, b = 0; one with fewer than
    `MIN_CLASS_CELLS` positives or negatives gets its offset alone (T = 1), with a warning naming
    it (`names`, else its column); so does a fit that did not converge or ended at a bound (a
    label the validation scores rank backwards is flattened at the high T; a separable one is
    sharpened wherever the search stops).
    """
    logits, y = check_scores(logits, y, "logits")
    temperatures, offsets = np.ones(y.shape[1]), np.zeros(y.shape[1])
    offset_bounds = (-OFFSET_BOUND, OFFSET_BOUND) if offset else (0.0, 0.0)
    for j in range(y.shape[1]):
        name = names[j] if names is not None else f"column {j}"
        known = ~np.isnan(y[:, j])
        z, t = logits[known, j], y[known, j]
        if t.size < 2 or t.min() == t.max():
            continue
        then = "only its offset is fitted (temperature 1)" if offset else "its temperature stays 1"
        few = too_few_cases(name, t, then)
        if few and not offset:
            continue
        bounds = [(0.0, 0.0) if few else tuple(np.log(TEMPERATURE_BOUNDS)), offset_bounds]

        def nll(params: np.ndarray, z: np.ndarray = z, t: np.ndarray = t) -> float:
            # Binary cross-entropy on logits, log(1 + e^s) - t*s: stable where sigmoid saturates.
            s = z / np.exp(params[0]) + params[1]
            return float(np.mean(np.logaddexp(0.0, s) - t * s))

        result = minimize(nll, np.zeros(2), method="L-BFGS-B", bounds=bounds)
        temperatures[j], offsets[j] = float(np.exp(result.x[0])), float(result.x[1])
        at_bound = [
            f"{what} {shown(value):.3g}"
            for what, shown, value, (low, high) in (
                ("temperature", np.exp, result.x[0], bounds[0]),  # searched as log T
                ("offset", float, result.x[1], bounds[1]),
            )
            if high > low and min(value - low, high - value) < 1e-3 * (high - low)
        ]  # fmt: skip
        if at_bound or not result.success:
            log.warning(
                "label %r: its calibration %s (%s): its probabilities may be badly calibrated; "
                "look at its validation AUROC and give the validation split more studies",
                name,
                "ended at a bound" if at_bound else "did not converge",
                ", ".join(at_bound) or result.message,
            )
    return temperatures, offsets


def fit_evidence_weights(
    terms: np.ndarray, y: np.ndarray, ridge: float, names: Sequence[str] | None = None
) -> np.ndarray:
    """(L, 3) weights of each label's image evidence, note evidence and fused correction.

    `terms` (N, 3, L) holds those three logit terms for studies with both sides, `y` (N, L)
    their labels. Per label, on its known cells: the weights in [0, `WEIGHT_BOUND`] (and a
    free intercept, dropped: the offset fitted next takes its place) of the logistic
    regression of the label on the three terms, with `ridge` x weight^2 on the correction
    alone. So the sides' naive-Bayes sum is the default and the correction keeps the weight the
    validation data give it; a side whose evidence does not help a label gets weight ~0 (on
    the sample data, the note's on the image-only findings). A label with fewer than
    `MIN_CLASS_CELLS` positives or negatives among its known cells, or a non-finite term, keeps
    ones (the model as trained), with a warning naming it (`names`, else its column).
    """
    terms, y = np.asarray(terms, dtype=float), np.asarray(y, dtype=float)
    weights = np.ones((y.shape[1], 3))
    bounds = [(0.0, WEIGHT_BOUND)] * 3 + [(-OFFSET_BOUND, OFFSET_BOUND)]
    for j in range(y.shape[1]):
        name = names[j] if names is not None else f"column {j}"
        known = ~np.isnan(y[:, j])
        x, t = terms[known, :, j], y[known, j]  # (n, 3), (n,)
        kept = "its evidence keeps the trained weights (1, 1, 1)"
        if too_few_cases(name, t, kept, counted=" with both sides"):
            continue
        if not np.isfinite(x).all():
            log.warning(
                "label %r: non-finite evidence on validation (the model's logits overflowed); "
                "its evidence keeps the trained weights (1, 1, 1)",
                name,
            )
            continue

        def loss(params: np.ndarray, x: np.ndarray = x, t: np.ndarray = t) -> float:
            s = x @ params[:3] + params[3]
            return float(np.mean(np.logaddexp(0.0, s) - t * s) + ridge * params[2] ** 2)

        start = np.array([1.0, 1.0, 1.0, 0.0])
        weights[j] = minimize(loss, start, method="L-BFGS-B", bounds=bounds).x[:3]
    return weights


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(L,) temperatures alone (`fit_calibration` without the offset)."""
    return fit_calibration(logits, y, offset=False)[0]


def fit_thresholds(
    probs: np.ndarray, y: np.ndarray, rule: str = "youden", target_sensitivity: float = 0.9
) -> np.ndarray:
    """(L,) decision thresholds on calibrated probabilities; a label is called at `probs >= t`.

    Rules, each over the label's ROC curve on known cells (`sklearn.metrics.roc_curve`, every
    distinct score a candidate cut):

    - ``"youden"``: the cut maximising Youden's J = sensitivity + specificity - 1; ties go to
      the highest cut. On a separable label this cuts between the lowest positive score and the
      highest negative one.
    - ``"sensitivity"``: the highest cut whose sensitivity reaches `target_sensitivity`, i.e.
      the most specific operating point that still finds that share of positives.

    The threshold lies halfway between the chosen score and the next lower validation score (or
    0), so it makes the same calls on validation, and a study scored exactly as a validation
    study was is not flipped by float round-off (another batch size or thread count). A label
    with no positives or no negatives among its known cells gets 0.5.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; use one of {THRESHOLD_RULES}")
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    probs, y = check_scores(probs, y, "probs")
    thresholds = np.full(y.shape[1], DEFAULT_THRESHOLD)
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        t, p = y[known, j], probs[known, j]
        if t.size == 0 or t.min() == t.max():
            continue
        fpr, tpr, candidates = roc_curve(t, p, drop_intermediate=False)
        # candidates[0] is +inf (nothing called positive); it is never a usable threshold.
        fpr, tpr, candidates = fpr[1:], tpr[1:], candidates[1:]
        if rule == "youden":  # J = tp/P - fp/N, compared as whole counts tp*N - fp*P: in
            # floats two cuts of equal J can differ by round-off and the lower one win the tie
            positives, negatives = int(t.sum()), int(t.size - t.sum())
            tp, fp = np.rint(tpr * positives), np.rint(fpr * negatives)
            best = int(np.argmax(tp * negatives - fp * positives))  # first: the highest cut
        else:
            best = int(np.argmax(tpr >= target_sensitivity - 1e-12))  # first = highest threshold
        # Below the lowest score (every study called), halfway down to probability 0.
        below = candidates[best + 1] if best + 1 < len(candidates) else 0.0
        # saved (and compared) in float32: halfway, unless that rounds onto the score below
        # (neighbours a float32 step apart), then the chosen score itself, still called
        halfway = np.float32((candidates[best] + below) / 2)
        thresholds[j] = float(halfway if halfway > below else np.float32(candidates[best]))
    return thresholds


def check_scores(scores: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Float (N, L) copies of `scores` and `y`, with the shapes and values the contract needs."""
    scores, y = np.asarray(scores, dtype=float), np.asarray(y, dtype=float)
    if scores.ndim != 2 or scores.shape != y.shape:
        raise ValueError(f"{name} and y must both be (N, L); got {scores.shape} and {y.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or inf; only y may hold NaN (unknown labels)")
    known = y[~np.isnan(y)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError("y must hold 1.0, 0.0 or NaN (unknown)")
    return scores, y
