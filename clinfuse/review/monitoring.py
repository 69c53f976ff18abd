"""Model monitoring: a run's score distributions next to the validation data saved with the
model, so a shift in the studies being scored is visible before anyone trusts the scores.

The run's histograms are counted in the database (constant memory however long the run); the
reference is `validation["score_distribution"]` written by `clinfuse train`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import sqlalchemy as sa

from clinfuse.store import Store
from clinfuse.store.schema import Prediction

BINS = 20
PSI_EPSILON = 1e-4  # an empty bin counts as this fraction, so the log stays finite
PSI_MODERATE, PSI_MAJOR = 0.1, 0.25  # the usual reading of a population stability index


def score_distributions(store: Store, run_id: int) -> dict[str, Any]:
    """Per label: the run's histogram and positive rate, the validation reference, the shift.

    {"bins": [21 edges], "n": run studies scored, "reference_n": validation studies or None,
     "has_reference": bool, "model_version": str,
     "labels": {label: {"counts": [20], "positive_rate", "n", "reference": [20] | None,
                        "reference_positive_rate", "psi", "shift": none|moderate|major|None}}}
    Labels the run has no prediction for are left out.
    """
    run = store.run(run_id)
    model = store.model(run["model_version"])
    reference = model["validation"].get("score_distribution") or {}
    edges = [float(x) for x in reference.get("bins") or np.linspace(0.0, 1.0, BINS + 1)]
    counts, rates = _run_histograms(store, run_id, edges, model["thresholds"])
    labels = {}
    for name in run["labels"]:
        if name not in rates:
            continue
        run_counts = [int(c) for c in counts.get(name, [0] * (len(edges) - 1))]
        ref = (reference.get("labels") or {}).get(name) or {}
        ref_counts = ref.get("counts")
        psi = population_stability(run_counts, ref_counts) if ref_counts else None
        labels[name] = {
            "counts": run_counts,
            "positive_rate": rates[name][0],
            "n": rates[name][1],
            "reference": list(ref_counts) if ref_counts else None,
            "reference_positive_rate": ref.get("positive_rate"),
            "psi": psi,
            "shift": None if psi is None else shift_level(psi),
        }
    n = max((entry["n"] for entry in labels.values()), default=0)
    return {
        "bins": edges,
        "n": n,
        "reference_n": reference.get("n"),
        "has_reference": bool(reference.get("labels")),
        "model_version": run["model_version"],
        "labels": labels,
    }


def _run_histograms(
    store: Store, run_id: int, edges: list[float], thresholds: dict[str, float]
) -> tuple[dict[str, list[int]], dict[str, tuple[float, int]]]:
    """({label: counts per bin}, {label: (positive rate, n)}), counted in SQL.

    Bins are [edge_i, edge_i+1) and the last one closed, as numpy.histogram counts them; the
    positive rate is the share at or above the label's threshold, as the reference counts it
    (and as the decisions were made). Both read only the (run_id, label, probability) index.
    """
    p = Prediction
    last = len(edges) - 2
    bin_of = sa.case(*((p.probability < edges[i + 1], i) for i in range(last)), else_=last)
    binned = (
        sa.select(p.label, bin_of.label("bin"), sa.func.count())
        .where(p.run_id == run_id)
        .group_by(p.label, bin_of)
    )
    at_or_above = [(sa.and_(p.label == x, p.probability >= t), 1) for x, t in thresholds.items()]
    positives = sa.func.sum(sa.case(*at_or_above, else_=0))
    rated = (
        sa.select(p.label, positives, sa.func.count()).where(p.run_id == run_id).group_by(p.label)
    )
    counts: dict[str, list[int]] = {}
    with store.engine.connect() as conn:
        for label, index, n in conn.execute(binned):
            counts.setdefault(label, [0] * (last + 1))[int(index)] = int(n)
        rates = {label: (int(k) / int(n), int(n)) for label, k, n in conn.execute(rated)}
    return counts, rates


def population_stability(counts: list[int], reference: list[int]) -> float | None:
    """PSI = sum((r - q) * ln(r / q)) over bins of the two histograms as fractions."""
    total, ref_total = sum(counts), sum(reference)
    if not total or not ref_total or len(counts) != len(reference):
        return None
    psi = 0.0
    for c, q in zip(counts, reference, strict=True):
        r_frac = max(c / total, PSI_EPSILON)
        q_frac = max(q / ref_total, PSI_EPSILON)
        psi += (r_frac - q_frac) * math.log(r_frac / q_frac)
    return psi


def shift_level(psi: float) -> str:
    """'none' below 0.1, 'moderate' below 0.25, else 'major'."""
    if psi < PSI_MODERATE:
        return "none"
    return "moderate" if psi < PSI_MAJOR else "major"
