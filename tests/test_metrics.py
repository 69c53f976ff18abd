"""Evaluation: metrics against values counted by hand, masking of unknown labels, labels a split
cannot score, bootstrap CIs, temperature and threshold fitting, and the HTML report."""

import base64
import json
import logging
import re

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import average_precision_score, roc_auc_score

from clinfuse.evaluation import (
    EvaluationRun,
    apply_temperature,
    evaluate_predictions,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    fit_thresholds,
    write_report,
)
from clinfuse.evaluation.metrics import weighted_ranking_scores

# 4 positives, 4 negatives. Ranked: .9P .8N .7P .5P .4N .3P .2N .1N
HAND_Y = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=float)
HAND_P = np.array([0.9, 0.7, 0.5, 0.3, 0.8, 0.4, 0.2, 0.1])


def evaluate(y, probs, labels, thresholds=None, **kwargs):
    thresholds = np.full(len(labels), 0.5) if thresholds is None else thresholds
    kwargs.setdefault("n_bootstrap", 200)
    return evaluate_predictions(y, probs, thresholds, labels, **kwargs)


def test_metrics_match_hand_counts():
    m = evaluate(HAND_Y[:, None], HAND_P[:, None], ["a"])["labels"]["a"]
    # Positive-negative pairs ranked right: .9 beats 4, .7 beats 3, .5 beats 3, .3 beats 2.
    assert m["auroc"] == pytest.approx(12 / 16)
    # Precision at each positive's rank: 1/1, 2/3, 3/4, 4/6.
    assert m["auprc"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 6) / 4)
    # Called at p >= 0.5: .9 .7 .5 (TP), .8 (FP); .3 missed; .4 .2 .1 rejected.
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    brier = (0.1**2 + 0.3**2 + 0.5**2 + 0.7**2 + 0.8**2 + 0.4**2 + 0.2**2 + 0.1**2) / 8
    assert m["brier"] == pytest.approx(brier)
    assert (m["n_known"], m["n_positive"], m["prevalence"]) == (8, 4, 0.5)
    assert m["threshold"] == 0.5
    # 4 positives are too few for a bootstrap interval: said, not a narrow interval
    assert m["auroc_ci"] is None and m["auprc_ci"] is None
    assert m["note"] is None  # the metrics are there
    assert m["ci_note"] == "no confidence interval: one class is in 4 studies, fewer than 5"
    one = evaluate(np.r_[1.0, np.zeros(24)][:, None], np.linspace(1, 0, 25)[:, None], ["a"])
    assert one["labels"]["a"]["auroc"] == 1.0 and one["labels"]["a"]["auroc_ci"] is None
    unbootstrapped = evaluate(HAND_Y[:, None], HAND_P[:, None], ["a"], n_bootstrap=0)
    assert unbootstrapped["labels"]["a"]["ci_note"] is None


def test_ece_on_two_bins_by_hand():
    y = np.array([0, 1, 0, 0, 1, 1, 0, 1])
    p = np.array([0.2, 0.2, 0.4, 0.4, 0.6, 0.8, 0.8, 0.9])
    # Bin [0, .5): rate 1/4, mean .3; bin [.5, 1]: rate 3/4, mean .775; each half the cells.
    expected = 0.5 * abs(0.25 - 0.3) + 0.5 * abs(0.75 - 0.775)
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(expected)
    assert expected_calibration_error(y, np.where(y == 1, 1.0, 0.0)) == 0.0


def test_unknown_cells_are_masked_per_label():
    # Two extra studies: unknown for "a" (scored badly, must not count), known for "b".
    y = np.column_stack([np.r_[HAND_Y, np.nan, np.nan], np.r_[HAND_Y, 1.0, 0.0]])
    probs = np.column_stack([np.r_[HAND_P, 0.0, 1.0], np.r_[HAND_P, 0.95, 0.05]])
    result = evaluate(y, probs, ["a", "b"])
    a, b = result["labels"]["a"], result["labels"]["b"]
    assert a["auroc"] == pytest.approx(12 / 16) and a["n_known"] == 8
    assert b["n_known"] == 10 and b["auroc"] == pytest.approx((12 + 4 + 4 + 1) / 25)
    assert result["n"] == 10


def test_label_without_positives_is_null_with_a_note_and_json_safe():
    y = np.column_stack([HAND_Y, np.zeros(8), np.ones(8), np.full(8, np.nan)])
    probs = np.column_stack([HAND_P] * 4)
    result = evaluate(y, probs, ["ok", "none_pos", "none_neg", "unknown"])
    json.dumps(result, allow_nan=False)  # no NaN or inf anywhere

    none_pos = result["labels"]["none_pos"]
    assert none_pos["note"] == "no positives in this split"
    for key in ("auroc", "auprc", "sensitivity", "f1", "auroc_ci", "auprc_ci"):
        assert none_pos[key] is None, key
    assert none_pos["specificity"] == pytest.approx(4 / 8)  # .9 .8 .7 .5 called positive
    assert none_pos["brier"] is not None and none_pos["ece"] is not None

    none_neg = result["labels"]["none_neg"]
    assert none_neg["note"] == "no negatives in this split"
    assert none_neg["specificity"] is None and none_neg["auroc"] is None
    assert none_neg["sensitivity"] == pytest.approx(4 / 8)

    unknown = result["labels"]["unknown"]
    assert unknown["note"] == "no known labels in this split"
    assert unknown["prevalence"] is None and unknown["brier"] is None

    # Macro ignores the labels where a metric is undefined.
    assert result["macro"]["auroc"] == pytest.approx(12 / 16)
    specificities = [3 / 4, 4 / 8]
    assert result["macro"]["specificity"] == pytest.approx(np.mean(specificities))


def test_macro_is_null_where_no_label_defines_a_metric():
    result = evaluate(np.zeros((8, 1)), HAND_P[:, None], ["none_pos"])
    assert result["macro"]["auroc"] is None and result["macro"]["sensitivity"] is None
    json.dumps(result, allow_nan=False)


def synthetic_split(n=400, n_labels=6, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < 0.3).astype(float)
    probs = np.round(np.clip(0.35 * y + 0.65 * rng.random((n, n_labels)), 0, 1), 2)  # with ties
    y[rng.random((n, n_labels)) < 0.1] = np.nan
    return y, probs


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    y, probs = synthetic_split()
    labels = [f"label{j}" for j in range(y.shape[1])]
    first = evaluate(y, probs, labels, n_bootstrap=1000, seed=3)
    again = evaluate(y, probs, labels, n_bootstrap=1000, seed=3)
    other = evaluate(y, probs, labels, n_bootstrap=1000, seed=4)
    for name in labels:
        m = first["labels"][name]
        for metric in ("auroc", "auprc"):
            lo, hi = m[f"{metric}_ci"]
            assert lo <= m[metric] <= hi and hi - lo < 0.3
        assert m["auroc_ci"] == again["labels"][name]["auroc_ci"]
        assert m["auroc_ci"] != other["labels"][name]["auroc_ci"]


def test_bootstrap_draws_patients_so_repeated_studies_do_not_narrow_the_interval():
    y, probs = synthetic_split(n=120, n_labels=2, seed=5)
    labels = ["a", "b"]
    alone = evaluate(y, probs, labels, n_bootstrap=400, seed=1)
    # each patient had 4 studies scored the same: no more evidence than 120 studies
    y4, p4 = np.repeat(y, 4, axis=0), np.repeat(probs, 4, axis=0)
    patients = np.repeat([f"P{i:03d}" for i in range(120)], 4)  # numbered in row order
    grouped = evaluate(y4, p4, labels, n_bootstrap=400, seed=1, patients=patients)
    by_study = evaluate(y4, p4, labels, n_bootstrap=400, seed=1)
    assert (grouped["resampled"], grouped["n_resampled"], grouped["n"]) == ("patients", 120, 480)
    assert (by_study["resampled"], by_study["n_resampled"]) == ("studies", 480)
    for name in labels:
        # the same draws of patients as of the 120 studies themselves
        for ci in ("auroc_ci", "auprc_ci"):
            assert grouped["labels"][name][ci] == pytest.approx(alone["labels"][name][ci])
        lo, hi = grouped["labels"][name]["auroc_ci"]
        lo_s, hi_s = by_study["labels"][name]["auroc_ci"]
        assert hi_s - lo_s < 0.7 * (hi - lo)  # studies drawn one by one: about half as wide


def test_too_few_patients_of_a_class_give_no_interval_however_many_studies():
    y = np.r_[np.ones(12), np.zeros(40)][:, None]  # 12 positive studies ...
    probs = np.linspace(0.9, 0.1, 52)[:, None]
    patients = [f"P{i % 3}" for i in range(12)] + [f"N{i}" for i in range(40)]  # ... of 3 patients
    m = evaluate(y, probs, ["a"], patients=patients)["labels"]["a"]
    assert m["auroc"] == 1.0 and m["auroc_ci"] is None and m["auprc_ci"] is None
    assert m["ci_note"] == "no confidence interval: one class is in 3 patients, fewer than 5"
    with pytest.raises(ValueError, match="each of the 52 studies"):
        evaluate(y, probs, ["a"], patients=patients[:-1])


def test_bootstrap_scores_each_resample_as_sklearn_with_counts_as_weights():
    rng = np.random.default_rng(0)
    t = (rng.random(60) < 0.4).astype(float)
    p = np.round(rng.random(60), 1)  # many ties
    counts = rng.multinomial(60, np.full(60, 1 / 60), size=30)  # (30 resamples, 60 rows)
    counts[0, t == 1] = 0  # a resample without positives is skipped (NaN)
    scores = weighted_ranking_scores(t, p, counts)
    assert np.isnan(scores[:, 0]).all()
    for b in range(1, 30):
        assert scores[0, b] == pytest.approx(roc_auc_score(t, p, sample_weight=counts[b]))
        assert scores[1, b] == pytest.approx(average_precision_score(t, p, sample_weight=counts[b]))


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    n, true_t = 20_000, np.array([0.5, 2.5])
    logits = rng.normal(0.0, 3.0, size=(n, 2))
    y = (rng.random((n, 2)) < expit(logits / true_t)).astype(float)
    y[:100, 1] = np.nan  # unknown cells are ignored
    y = np.column_stack([y, np.zeros(n)])  # a single class keeps T = 1
    logits = np.column_stack([logits, rng.normal(size=n)])
    fitted = fit_temperature(logits, y)
    assert fitted[:2] == pytest.approx(true_t, rel=0.1)
    assert fitted[2] == 1.0


def test_temperature_scaling_lowers_ece_of_overconfident_logits():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 1.5, size=(5000, 1))
    y = (rng.random(true_logits.shape) < expit(true_logits)).astype(float)
    overconfident = 4.0 * true_logits
    before = expected_calibration_error(y[:, 0], expit(overconfident[:, 0]))
    calibrated = apply_temperature(overconfident, fit_temperature(overconfident, y))
    after = expected_calibration_error(y[:, 0], calibrated[:, 0])
    assert before > 0.1 and after < before / 3


def test_offset_removes_the_shift_class_weighting_puts_into_the_logits():
    # A loss with positive weight w moves the optimum logit up by log w: a temperature cannot
    # undo that shift, a temperature with an offset recovers both (and keeps the ranking).
    rng = np.random.default_rng(0)
    true_logits = rng.normal(-1.5, 2.0, size=(20_000, 1))
    y = (rng.random(true_logits.shape) < expit(true_logits)).astype(float)
    weighted = (true_logits + np.log(4.0)) * 1.5  # pos_weight 4, then overconfident
    temperature, offset = fit_calibration(weighted, y)
    assert temperature[0] == pytest.approx(1.5, rel=0.1)
    assert offset[0] == pytest.approx(-np.log(4.0), abs=0.15)
    only_t = apply_temperature(weighted, fit_temperature(weighted, y))
    both = apply_temperature(weighted, temperature, offset)
    assert expected_calibration_error(y[:, 0], both[:, 0]) < 0.02
    assert expected_calibration_error(y[:, 0], only_t[:, 0]) > 0.05
    ranked = both[np.argsort(weighted[:, 0]), 0]  # the same order (float32 may tie neighbours)
    assert (np.diff(ranked) >= 0).all()


def test_a_label_with_few_positives_gets_its_offset_alone_and_a_failed_fit_is_said(caplog):
    """One positive among ten would make the label a step function (T ~0.06, b at -20)."""
    z = np.array([-3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5])[:, None]
    y = np.zeros((10, 1))
    y[-1] = 1
    with caplog.at_level(logging.WARNING, logger="clinfuse.evaluation.calibration"):
        (temperature,), (offset,) = fit_calibration(z, y, names=["rare"])
    assert temperature == 1.0 and -5 < offset < 0  # the mean probability ~ 1 in 10
    assert "label 'rare': 1 positive and 9 negative validation studies" in caplog.text
    probs = apply_temperature(np.array([[0.5], [1.0], [1.4]]), [temperature], [offset])
    assert np.all(np.diff(probs[:, 0]) > 0) and probs.min() > 0.01  # not a step
    caplog.clear()
    backwards = np.linspace(3, -3, 40)[:, None]  # the validation scores rank it backwards
    y = np.r_[np.zeros(20), np.ones(20)][:, None]
    with caplog.at_level(logging.WARNING, logger="clinfuse.evaluation.calibration"):
        fit_calibration(backwards, y, names=["inverted"])
    assert "label 'inverted': its calibration ended at a bound (temperature 100" in caplog.text


def test_a_threshold_saved_in_float32_makes_the_fitted_calls():
    """Two validation scores a float32 step apart: the halfway threshold would round onto the
    lower one and call it too."""
    low = np.float32(0.3)
    high = np.nextafter(low, np.float32(1))
    probs = np.array([[0.1], [low], [high], [0.9]], dtype=np.float32)
    y = np.array([[0.0], [0.0], [1.0], [1.0]])
    (threshold,) = fit_thresholds(probs, y)
    saved = np.float32(threshold)
    assert (probs[:, 0] >= saved).tolist() == [False, False, True, True]


def test_youden_threshold_separates_a_separable_label():
    y = np.array([[0, 0, 0, 1, 1, 1, np.nan]]).T
    probs = np.array([[0.1, 0.2, 0.3, 0.6, 0.7, 0.9, 0.5]]).T
    (threshold,) = fit_thresholds(probs, y, rule="youden")
    assert threshold == pytest.approx(0.45)  # halfway between the classes, on no study's score
    assert ((probs[:6, 0] >= threshold) == (y[:6, 0] == 1)).all()


def test_youden_ties_go_to_the_highest_cut_whatever_the_round_off():
    # J is exactly 2/3 at the cut below .5 (tpr 2/3, fpr 0) and below .3 (tpr 1, fpr 1/3); in
    # floats 1 - 1/3 is 2/3 + 1e-16, which made the lower cut win
    probs = np.array([0.95, 0.5, 0.45, 0.3, 0.2, 0.15])[:, None]
    y = np.array([1, 1, 0, 1, 0, 0], dtype=float)[:, None]
    (threshold,) = fit_thresholds(probs, y, rule="youden")
    assert threshold == pytest.approx(0.475)


def test_sensitivity_rule_is_the_highest_threshold_reaching_the_target():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 1)) < 0.4).astype(float)
    probs = np.clip(0.3 * y + 0.7 * rng.random((300, 1)), 0, 1)
    (threshold,) = fit_thresholds(probs, y, rule="sensitivity", target_sensitivity=0.9)
    positives = probs[y[:, 0] == 1, 0]
    assert np.mean(positives >= threshold) >= 0.9
    assert not np.isclose(probs, threshold, rtol=0, atol=1e-9).any()  # round-off cannot flip a call
    chosen = probs[probs[:, 0] >= threshold, 0].min()
    higher = probs[probs[:, 0] > chosen, 0].min()  # the next cut up misses the target
    assert np.mean(positives >= higher) < 0.9


def test_thresholds_default_without_both_classes_and_reject_unknown_rule():
    probs = np.column_stack([HAND_P, HAND_P])
    y = np.column_stack([np.zeros(8), np.ones(8)])
    assert fit_thresholds(probs, y).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="unknown threshold rule"):
        fit_thresholds(probs, y, rule="f1")


def test_scores_with_nan_are_rejected():
    probs = HAND_P[:, None].copy()
    probs[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(HAND_Y[:, None], probs, ["a"])


def test_report_compares_two_runs_and_names_a_label_without_positives(tmp_path):
    labels = ("pneumonia", "effusion", "rare_finding")
    y, probs = synthetic_split(n=120, n_labels=3, seed=2)
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)  # no positives
    runs = {}
    for name, noise in (("fusion", 0.0), ("image_only", 0.3)):
        run_probs = np.clip(probs + noise * np.random.default_rng(5).random(probs.shape), 0, 1)
        metrics = evaluate(y, run_probs, labels, n_bootstrap=50)
        runs[name] = EvaluationRun(metrics, y, run_probs, labels, model_version=f"{name}-v1")

    path = write_report(tmp_path / "report", runs)
    assert path == tmp_path / "report" / "report.html"
    page = path.read_text(encoding="utf-8")
    for text in (*labels, "fusion", "image_only", "fusion-v1", "Decision support, not a diagnosis"):
        assert text in page, text
    assert "no positives" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # one figure per label that has both classes
    assert base64.b64decode(images[0]).startswith(b"\x89PNG")
    ci = runs["fusion"].metrics["labels"]["pneumonia"]["auroc_ci"]
    assert f"({ci[0]:.3f}–{ci[1]:.3f})" in page
    assert "macro" in page
