"""`evaluate_model`: a model folder on a manifest split -> metrics, predictions and a report.

The split is rebuilt with the model's own saved split settings, so `--split test` means the
patients that training held out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from clinfuse.atomic import write_atomic
from clinfuse.data.batch import Collator, StudyDataset
from clinfuse.data.manifest import PatientSplit, load_manifest, reference_labels
from clinfuse.engine import Predictions, predict, select_device
from clinfuse.errors import ManifestError
from clinfuse.evaluation.calibration import calibrated_probabilities
from clinfuse.evaluation.metrics import evaluate_predictions
from clinfuse.evaluation.report import EvaluationRun, failures_file, write_report
from clinfuse.folders import refuse_foreign_folder
from clinfuse.model.checkpoint import load_checkpoint, model_version, read_checkpoint_config
from clinfuse.spreadsheet import formula_safe

log = logging.getLogger(__name__)


def measured_labels(
    predictions: Predictions, labels: Sequence[str], labels_path: str | Path | None
) -> np.ndarray:
    """(N, L) the labels to score `predictions` against: the manifest's, or those of the
    `labels_path` table (see `reference_labels`)."""
    if labels_path is None:
        return predictions.labels
    return reference_labels(labels_path, labels, predictions.study_ids)


def evaluate_model(
    model_dir: str | Path,
    manifest_path: str | Path,
    split: str = "test",
    device: str | None = None,
    batch_size: int = 32,
    bootstrap: int = 1000,
    labels_path: str | Path | None = None,
) -> tuple[EvaluationRun, pd.DataFrame]:
    """Score `split` ("all" for every row) and compute the metrics at the saved thresholds.

    `labels_path`: measure against the labels of that table (see `reference_labels`) instead
    of the manifest's.
    """
    torch_device = select_device(device)
    model = load_checkpoint(model_dir, torch_device)
    data = read_checkpoint_config(model_dir).get("data", {})
    manifest = load_manifest(
        manifest_path,
        labels=model.labels,
        split=PatientSplit(
            data.get("val_fraction", 0.15),
            data.get("test_fraction", 0.15),
            data.get("split_seed", 0),
        ),
        read_labels=labels_path is None,  # measured against that table's: these are not read
    )
    rows = list(manifest.rows(None if split == "all" else split))
    if not rows:
        raise ManifestError(manifest_path, f"no rows in the {split!r} split")
    if labels_path is not None:  # its columns and cells checked before the model runs
        reference_labels(labels_path, model.labels, [])
    loader = DataLoader(
        StudyDataset(rows, model.cfg),
        batch_size=batch_size,
        collate_fn=Collator(model.note_tokenizer, model.cfg),
    )
    predictions = predict(model, loader, torch_device).require_any(manifest_path, split)
    thresholds = model.thresholds.cpu().numpy()
    probs = calibrated_probabilities(model, predictions.logits)
    y = measured_labels(predictions, model.labels, labels_path)  # (N, L)
    metrics = evaluate_predictions(
        y, probs, thresholds, model.labels, n_bootstrap=bootstrap, patients=predictions.patient_ids
    )
    metrics["split"] = split
    metrics["labels_from"] = str(labels_path) if labels_path is not None else "manifest"
    metrics["failed"] = len(predictions.failures)
    version = model_version(model_dir)
    metrics["model_version"] = version
    table = pd.DataFrame(
        {"study_id": predictions.study_ids, "modalities": predictions.modalities()}
    )
    for j, name in enumerate(model.labels):
        table[f"p_{name}"] = probs[:, j]
        table[f"y_{name}"] = y[:, j]
    run = EvaluationRun(
        metrics=metrics,
        y=y,
        probs=probs,
        labels=model.labels,
        model_version=version,
        failures=sorted(predictions.failures),
    )
    return run, table


def check_report_folder(out_dir: str | Path) -> None:
    """A report folder is not a model folder or an inference run's folder: its predictions and
    failures.csv would replace theirs. A `ClinfuseError` naming it, before anything is scored."""
    refuse_foreign_folder(out_dir, "report")


def write_evaluation(
    out_dir: str | Path, runs: dict[str, tuple[EvaluationRun, pd.DataFrame]]
) -> Path:
    """metrics.json (the first model), compare.json (all), predictions and failures CSVs (the
    studies that could not be read, with why), report.html."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(runs)
    first_run, first_table = runs[names[0]]
    check_report_folder(out_dir)
    write_atomic(
        out_dir / "metrics.json",
        json.dumps(first_run.metrics, indent=2, allow_nan=False),
    )
    write_atomic(out_dir / "predictions.csv", formula_safe(first_table).to_csv(index=False))
    write_failures(out_dir / "failures.csv", first_run.failures)  # the model of metrics.json
    apart = not_comparable(runs)
    for said in apart.values():
        log.warning("%s", said)
    if len(names) > 1:
        compare = {  # a model scored on other labels or studies says so beside its figures
            name: {**run.metrics, **({"not_comparable": apart[name]} if name in apart else {})}
            for name, (run, _) in runs.items()
        }
        write_atomic(
            out_dir / "compare.json",
            json.dumps(compare, indent=2, allow_nan=False),
        )
        for name, (run, table) in runs.items():
            csv = formula_safe(table).to_csv(index=False)
            write_atomic(out_dir / f"predictions_{name}.csv", csv)
            write_failures(out_dir / failures_file(names, name), run.failures)
    return write_report(
        out_dir, {name: run for name, (run, _) in runs.items()}, notes=list(apart.values())
    )


def write_failures(path: Path, failures: Iterable[tuple[str, str]]) -> None:
    """failures.csv: the studies that could not be read, with why (study_id, reason), sorted;
    `clinfuse train` and `clinfuse evaluate` both write it."""
    table = pd.DataFrame(sorted(failures), columns=["study_id", "reason"])
    write_atomic(path, formula_safe(table).to_csv(index=False))


def not_comparable(runs: dict[str, tuple[EvaluationRun, pd.DataFrame]]) -> dict[str, str]:
    """Per model scored unlike the first, why: models side by side are scored alike only on the
    same labels and the same studies (a model trained with another split seed or test share
    has another test split). Logged, in compare.json and on the report."""
    (first, (run0, table0)), *others = runs.items()
    apart = {}
    for name, (run, table) in others:
        differs = []
        if run.labels != run0.labels:
            differs.append(f"labels ({', '.join(run.labels)} against {', '.join(run0.labels)})")
        if set(table["study_id"]) != set(table0["study_id"]):
            differs.append(f"studies ({len(table)} against {len(table0)}: another split)")
        if differs:
            apart[name] = (
                f"{name} and {first} were scored on different {' and '.join(differs)}: their "
                "macro figures do not compare"
            )
    return apart


def unique_names(model_dirs: list[Path]) -> list[str]:
    """A name per model folder: its own name, with as many parent folders as it takes to tell
    colliding ones apart ("run1-seed0-model"), numbered if even the full paths agree (one
    folder given twice). Every folder keeps its own report column."""
    paths = [Path(d).resolve() for d in model_dirs]
    depths = [1] * len(paths)

    def name(i: int) -> str:
        return "-".join(part.strip("/") for part in paths[i].parts[-depths[i] :] if part != "/")

    while True:
        names = [name(i) for i in range(len(paths))]
        deeper = [
            i for i, n in enumerate(names) if names.count(n) > 1 and depths[i] < len(paths[i].parts)
        ]
        if not deeper:
            break
        for i in deeper:
            depths[i] += 1
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if names.count(n) == 1 else f"{n}-{seen[n]}")
    return unique
