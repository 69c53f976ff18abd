"""An HTML evaluation report a person opens: one page, every plot embedded, runs side by side.

Per label: ROC, precision-recall and reliability plots overlaying every run, then one table with
a row per label (each metric's runs side by side, CIs shown) and the macro row.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from clinfuse import __version__
from clinfuse.atomic import write_atomic

NOTICE = "Decision support, not a diagnosis: every score here is for review by a clinician."
TABLE_COLUMNS = (  # (metric key, header, CI key or None)
    ("auroc", "AUROC (95% CI)", "auroc_ci"),
    ("auprc", "AUPRC (95% CI)", "auprc_ci"),
    ("sensitivity", "Sensitivity", None),
    ("specificity", "Specificity", None),
    ("f1", "F1", None),
    ("brier", "Brier", None),
    ("ece", "ECE", None),
    ("threshold", "Threshold", None),
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.notice { font-weight: bold; color: #8a1c1c; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.label { text-align: left; }
tr.macro td { font-weight: bold; border-top: 2px solid #888; }
.note { color: #8a5a00; font-size: 0.85em; }
img { max-width: 100%; }
"""


@dataclass
class EvaluationRun:
    """One model's predictions on one split and its `evaluate_predictions` output."""

    metrics: dict
    y: np.ndarray  # (N, L) 1.0 / 0.0 / NaN
    probs: np.ndarray  # (N, L) calibrated probabilities
    labels: tuple[str, ...]
    model_version: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)  # (study_id, reason) unread


def write_report(
    out_dir: str | Path,
    runs: dict[str, EvaluationRun],
    title: str = "clinfuse evaluation",
    notes: Sequence[str] = (),
) -> Path:
    """Write `out_dir/report.html` (self-contained, PNGs embedded) comparing `runs` by name;
    `notes` (models that do not compare) are shown above the figures."""
    if not runs:
        raise ValueError("write_report needs at least one run")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(dict.fromkeys(name for run in runs.values() for name in run.labels))
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="notice">{_esc(NOTICE)}</p>',
        _runs_list(runs),
        *(f'<p class="notice">{_esc(note)}</p>' for note in notes),
        "<h2>Metrics</h2>",
        _metrics_table(runs, labels),
        "<p>Sensitivity, specificity and F1 at each label's threshold (called at probability "
        "&ge; threshold); ECE over 10 equal-width bins; CIs are bootstrap percentiles over "
        f"{_resampled(runs)}. The macro row averages the labels where a metric is defined.</p>",
        *(_label_section(name, runs) for name in labels),
        f"<p><small>clinfuse {_esc(__version__)}. {_esc(NOTICE)}</small></p>",
    ]
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = out_dir / "report.html"
    write_atomic(path, page)
    return path


def failures_file(names: list[str], name: str) -> str:
    """The file listing model `name`'s unread studies among the compared `names`:
    failures.csv for a model alone, failures_<name>.csv for each of several (failures.csv then
    holds the first model's, as metrics.json does)."""
    return "failures.csv" if len(names) == 1 else f"failures_{name}.csv"


def _runs_list(runs: dict[str, EvaluationRun]) -> str:
    items = []
    for name, run in runs.items():
        version = f", model {_esc(run.model_version)}" if run.model_version else ""
        n = run.metrics.get("n", len(run.y))
        listed = failures_file(list(runs), name)
        unread = (
            f" ({len(run.failures)} more could not be read and are not counted: {listed})"
            if run.failures
            else ""
        )
        patients = (
            f" of {run.metrics['n_resampled']} patients"
            if run.metrics.get("resampled") == "patients"
            else ""
        )
        items.append(f"<li><b>{_esc(name)}</b>{version}: {n} studies{patients}{unread}</li>")
    return "<h2>Runs</h2><ul>" + "".join(items) + "</ul>"


def _resampled(runs: dict[str, EvaluationRun]) -> str:
    """What the bootstrap drew, in words: patients (with all their studies) or studies."""
    units = {run.metrics.get("resampled", "studies") for run in runs.values()}
    if units == {"patients"}:
        return "patients (a drawn patient brings all their studies)"
    return "studies" if units == {"studies"} else "patients or studies (see each run's metrics)"


def _metrics_table(runs: dict[str, EvaluationRun], labels: Sequence[str]) -> str:
    """One row per label and a macro row; each metric has one column per run."""
    names = list(runs)
    span = f' colspan="{len(names)}"' if len(names) > 1 else ""
    top = "".join(f"<th{span}>{header}</th>" for _, header, _ in TABLE_COLUMNS)
    top += f"<th{span}>Positives / known</th>"
    runs_row = "".join(f"<th>{_esc(n)}</th>" for n in names) * (len(TABLE_COLUMNS) + 1)
    head = f'<tr><th rowspan="2">Label</th>{top}</tr><tr>{runs_row}</tr>'

    rows = []
    for label in labels:
        per_run = [run.metrics.get("labels", {}).get(label) for run in runs.values()]
        notes = sorted({m[k] for m in per_run if m for k in ("note", "ci_note") if m.get(k)})
        note_html = "".join(f'<br><span class="note">{_esc(n)}</span>' for n in notes)
        cells = [f'<td class="label">{_esc(label)}{note_html}</td>']
        for key, _, ci_key in TABLE_COLUMNS:
            for m in per_run:
                cells.append(f"<td>{_cell(m, key, ci_key)}</td>")
        for m in per_run:
            cells.append(f"<td>{m['n_positive']} / {m['n_known']}</td>" if m else "<td>—</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")

    macro = [run.metrics.get("macro", {}) for run in runs.values()]
    cells = ['<td class="label">macro</td>']
    for key, _, _ in TABLE_COLUMNS:
        cells.extend(f"<td>{_number(m.get(key))}</td>" for m in macro if key != "threshold")
    cells.extend("<td></td>" for _ in macro * 2)  # no macro threshold or counts
    rows.append('<tr class="macro">' + "".join(cells) + "</tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _cell(m: dict[str, Any] | None, key: str, ci_key: str | None) -> str:
    if m is None:
        return "—"  # this run has no such label
    text = _number(m.get(key))
    ci = m.get(ci_key) if ci_key else None
    if ci is not None and m.get(key) is not None:
        text += f" ({ci[0]:.3f}–{ci[1]:.3f})"
    return text


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _label_section(label: str, runs: dict[str, EvaluationRun]) -> str:
    """The label's heading and its plots, or a line saying why there are none."""
    heading = f'<h2 id="{_esc(label)}">{_esc(label)}</h2>'
    columns = {name: run.labels.index(label) for name, run in runs.items() if label in run.labels}
    reasons = {name: _missing_class(runs[name].y[:, j]) for name, j in columns.items()}
    drawable = [name for name, reason in reasons.items() if reason is None]
    if not drawable:
        why = "; ".join(sorted({r for r in reasons.values() if r}))
        plots = "no ROC, precision-recall or reliability plot"
        return f'{heading}<p class="note">{_esc(why)} in this split: {plots}.</p>'
    png = _label_figure(label, runs, columns, drawable)
    img = f'<img alt="{_esc(label)}: ROC, precision-recall, reliability" '
    img += f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
    skipped = "".join(
        f'<p class="note">{_esc(name)}: {_esc(reason)} in its split, not drawn.</p>'
        for name, reason in reasons.items()
        if reason
    )
    return heading + img + skipped


def _label_figure(
    label: str, runs: dict[str, EvaluationRun], columns: dict[str, int], drawable: list[str]
) -> bytes:
    """PNG of three panels (ROC, precision-recall, reliability), one colour per run."""
    fig = Figure(figsize=(15, 4.6))
    FigureCanvasAgg(fig)
    roc_ax, pr_ax, rel_ax = fig.subplots(1, 3)
    for colour, name in enumerate(runs):
        if name not in drawable:
            continue
        j, run = columns[name], runs[name]
        known = ~np.isnan(run.y[:, j])
        t, p = run.y[known, j].astype(int), run.probs[known, j]
        m = run.metrics.get("labels", {}).get(label, {})
        style = {"color": f"C{colour}"}

        fpr, tpr, _ = roc_curve(t, p)
        roc_ax.plot(fpr, tpr, label=f"{name} (AUROC {_number(m.get('auroc'))})", **style)
        if m.get("sensitivity") is not None and m.get("specificity") is not None:
            roc_ax.plot(1 - m["specificity"], m["sensitivity"], "o", **style)

        precision, recall, _ = precision_recall_curve(t, p)
        pr_ax.step(recall, precision, where="post", **style)
        pr_ax.plot([], [], label=f"{name} (AUPRC {_number(m.get('auprc'))})", **style)
        pr_ax.axhline(t.mean(), linestyle=":", linewidth=0.8, **style)

        observed, predicted = calibration_curve(t, p, n_bins=10, strategy="uniform")
        rel_ax.plot(
            predicted, observed, "o-", label=f"{name} (ECE {_number(m.get('ece'))})", **style
        )

    roc_ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    rel_ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    panels = (
        (roc_ax, "ROC (dot: operating threshold)", "1 - specificity", "sensitivity"),
        (pr_ax, "Precision-recall (dotted: prevalence)", "recall", "precision"),
        (rel_ax, "Reliability", "mean predicted probability", "observed rate"),
    )
    for ax, panel_title, xlabel, ylabel in panels:
        ax.set(title=panel_title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="lower right" if ax is roc_ax else "best", fontsize=8)
    fig.suptitle(label)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _missing_class(column: np.ndarray) -> str | None:
    """Why a label's curves cannot be drawn from this column, or None if they can."""
    known = column[~np.isnan(column)]
    if known.size == 0:
        return "no known labels"
    if not (known == 1).any():
        return "no positives"
    if not (known == 0).any():
        return "no negatives"
    return None


def _esc(text: object) -> str:
    return html.escape(str(text))
