"""Explanation-quality metrics on one map or one note, as pure functions of arrays.

Localisation (pointing game, relevance mass, mask AUROC), note rationales (is the top word a
rationale word, share of mass on rationale words), the deletion-curve area, and the note's
share of the modality Shapley credit. `clinfuse.explain.quality` applies them per label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

# -- one map / one note ------------------------------------------------------------
# The pointing game's tolerance (Zhang et al., "Top-down neural attention by excitation
# backprop", 2016): 15 pixels at 224, here a share of the image's longer side.
POINTING_TOLERANCE = 15 / 224


def pointing_game(attribution: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> float:
    """1.0 when the map's maximum lies within `tolerance` pixels of the mask (0: inside it),
    else 0.0 (a flat map points nowhere)."""
    flat = np.nan_to_num(attribution.ravel(), nan=-np.inf)
    if not flat.max() > flat.min():
        return 0.0
    peak = np.array(np.unravel_index(np.argmax(flat), attribution.shape))
    inside = np.argwhere(mask > 0)  # (M, ndim)
    if not len(inside):
        return 0.0
    return float(np.sqrt(((inside - peak) ** 2).sum(1)).min() <= tolerance)


def relevance_mass(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's positive attribution that lies inside the mask (0 without any)."""
    positive = np.clip(np.nan_to_num(attribution), 0, None)
    total = positive.sum()
    return float(positive[mask > 0].sum() / total) if total > 0 else 0.0


def mask_auroc(attribution: np.ndarray, mask: np.ndarray) -> float:
    """AUROC of the map's values as a pixel classifier of the mask (NaN for an empty mask)."""
    inside = mask.ravel() > 0
    if inside.all() or not inside.any():
        return float("nan")
    return float(roc_auc_score(inside, np.nan_to_num(attribution.ravel())))


def rationale_words(spans: np.ndarray, rationale: Sequence[Sequence[int]]) -> np.ndarray:
    """(N,) bool: the word [start, end) overlaps one of the rationale's character spans."""
    inside = np.zeros(len(spans), dtype=bool)
    for start, end in rationale:
        inside |= (spans[:, 0] < end) & (spans[:, 1] > start)
    return inside


def rationale_first(scores: np.ndarray, inside: np.ndarray) -> float:
    """1.0 when the highest-scoring word is a rationale word, else 0.0."""
    return float(len(scores) > 0 and bool(inside[int(np.argmax(scores))]))


def rationale_mass(scores: np.ndarray, inside: np.ndarray) -> float:
    """Share of the note's positive word attribution that falls on rationale words."""
    return relevance_mass(scores, inside)


MIN_DROP = 0.05  # deleting every feature must lower the probability this much to judge an order


def deletion_area(curve: np.ndarray, min_drop: float = MIN_DROP) -> float:
    """Area under a deletion curve (probabilities at equal fractions deleted, 0 to 1), the
    curve scaled to run from 1 (nothing deleted) to 0 (everything deleted): small = the output
    fell early. NaN when deleting everything lowers the output by less than `min_drop` (the
    deleted features were not the evidence, so the order cannot be judged)."""
    curve = np.asarray(curve, dtype=np.float64)
    start, end = curve[0], curve[-1]
    if not start - end >= min_drop:
        return float("nan")
    scaled = (curve - end) / (start - end)
    return float(((scaled[1:] + scaled[:-1]) / 2).mean())


def note_share(modality: np.ndarray) -> float:
    """|phi_note| / (|phi_image| + |phi_note|) of one label's (image, note, interaction)."""
    total = abs(modality[0]) + abs(modality[1])
    return float(abs(modality[1]) / total) if total > 0 else float("nan")
