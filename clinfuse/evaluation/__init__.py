"""Evaluation: calibration fitted on validation data, metrics with bootstrap CIs, an HTML report.

Decision support, not a diagnosis: these numbers describe a model, not a patient.
"""

from clinfuse.evaluation.calibration import (
    apply_temperature,
    fit_calibration,
    fit_temperature,
    fit_thresholds,
)
from clinfuse.evaluation.metrics import evaluate_predictions, expected_calibration_error
from clinfuse.evaluation.report import EvaluationRun, write_report

__all__ = [
    "EvaluationRun",
    "apply_temperature",
    "evaluate_predictions",
    "expected_calibration_error",
    "fit_calibration",
    "fit_temperature",
    "fit_thresholds",
    "write_report",
]
