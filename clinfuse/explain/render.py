"""Explanations people can read: the image with its attribution overlaid (PNG), the note with
its words highlighted (HTML), and the files `clinfuse explain` writes per study.

Only pixels and the note text are shown; never a DICOM header, so no patient name, id or birth
date reaches an output. Every page carries the notice that this is decision support.
"""

from __future__ import annotations

import html
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from clinfuse.atomic import sweep_temporaries, write_atomic  # noqa: E402
from clinfuse.data.batch import Batch  # noqa: E402
from clinfuse.data.dicom import DicomImage, apply_window, default_window, read_dicom  # noqa: E402
from clinfuse.data.manifest import StudyRow, iter_manifest  # noqa: E402
from clinfuse.data.study import file_stem  # noqa: E402
from clinfuse.engine import select_device  # noqa: E402
from clinfuse.errors import (  # noqa: E402
    ClinfuseError,
    ConfigError,
    DicomError,
    ImageWarning,
    ManifestError,
)
from clinfuse.explain.attribution import explain  # noqa: E402
from clinfuse.explain.explanation import Explanation, overlay_scale  # noqa: E402
from clinfuse.explain.metrics import POINTING_TOLERANCE  # noqa: E402
from clinfuse.explain.quality import study_batch  # noqa: E402
from clinfuse.model.checkpoint import NOTICE, load_checkpoint  # noqa: E402
from clinfuse.model.model import FusionModel  # noqa: E402

log = logging.getLogger(__name__)

POSITIVE, NEGATIVE = (214, 39, 40), (31, 119, 180)  # red: for the label, blue: against it
AS_WRITTEN = "white-space: pre-wrap"  # a note's line breaks and indents, as its author wrote them
DISPLAY_SIDE = 384  # pixels of a figure panel's longer side at most (it shows ~300)
OVERLAY_LEGEND = (
    "Colour marks what raises the label's score, brightest where it raises it most; what "
    "lowers it is not drawn."
)


# -- pixels and maps ------------------------------------------------------------------------
def display_pixels(image: DicomImage) -> np.ndarray:
    """A DICOM image windowed for display: (H, W) or (D, H, W) float32 in [0, 1], grey."""
    center, width = default_window(image)
    return apply_window(image.pixels, center, width).mean(axis=0)


def _slice(pixels: np.ndarray, maps: Sequence[np.ndarray | None]) -> tuple[np.ndarray, list, str]:
    """2D as is; for a volume, the slice holding the most positive attribution of maps[0]."""
    if pixels.ndim == 2:
        return pixels, list(maps), ""
    first = next((m for m in maps if m is not None), np.zeros_like(pixels))
    z = peak_slice(first)
    return pixels[z], [None if m is None else m[z] for m in maps], f" (slice {z + 1}/{len(pixels)})"


def peak_slice(values: np.ndarray) -> int:
    """(D, H, W) -> the slice holding the most positive attribution (0-based)."""
    return int(np.argmax(np.clip(np.nan_to_num(values), 0, None).reshape(len(values), -1).sum(1)))


def _for_display(
    pixels: np.ndarray, maps: Sequence[np.ndarray | None]
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """A 2D image and its maps area-averaged so the longer side is at most `DISPLAY_SIDE`: a
    figure panel shows ~300 pixels, and drawing a 5-megapixel radiograph's colours per panel
    and label would take gigabytes."""
    scale = DISPLAY_SIDE / max(pixels.shape)
    if scale >= 1:
        return pixels, list(maps)
    size = tuple(max(1, round(n * scale)) for n in pixels.shape)

    def shrink(values: np.ndarray) -> np.ndarray:
        grid = torch.from_numpy(np.ascontiguousarray(np.nan_to_num(values), dtype=np.float32))
        return torch.nn.functional.adaptive_avg_pool2d(grid[None, None], size)[0, 0].numpy()

    return shrink(pixels), [None if m is None else shrink(m) for m in maps]


def _save_figure(figure: plt.Figure, path: Path, sweep: bool = True, **options: Any) -> Path:
    """Render `figure` to PNG bytes, close it, and write them atomically (`write_atomic`)."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None}, **options)
    finally:
        plt.close(figure)
    write_atomic(path, buffer.getvalue(), sweep=sweep)
    return path


def _overlay(axis: plt.Axes, pixels: np.ndarray, values: np.ndarray | None, opacity: float) -> bool:
    """Grey image, then the positive attribution as a heat map whose opacity grows with it;
    False when `values` hold no positive evidence (nothing drawn)."""
    axis.imshow(pixels, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axis.set_axis_off()
    if values is None:
        return True
    positive = np.clip(np.nan_to_num(values), 0, None)
    top = overlay_scale(values)
    if top <= 0:
        return False
    scaled = np.clip(positive / top, 0, 1).astype(np.float32)
    colours = plt.get_cmap("inferno")(scaled).astype(np.float32)  # (H, W, 4)
    colours[..., 3] = opacity * scaled
    axis.imshow(colours, interpolation="nearest")
    return True


def overlay_png(
    pixels: np.ndarray, attribution: np.ndarray, path: str | Path, opacity: float = 0.6
) -> Path:
    """One image with `attribution` (same shape as `pixels`) overlaid, written as a PNG."""
    pixels, (values,), _ = _slice(pixels, [attribution])
    pixels, (values,) = _for_display(pixels, [values])
    figure, axis = plt.subplots(figsize=(4, 4 * pixels.shape[0] / pixels.shape[1]))
    _overlay(axis, pixels, values, opacity)
    return _save_figure(figure, Path(path), bbox_inches="tight")


def explanation_png(
    expl: Explanation, pixels: np.ndarray, path: str | Path, sweep: bool = True
) -> Path:
    """One row per label: the image, then overlaid the localisation map (the default: Grad-CAM
    weighed by smoothed integrated gradients), integrated gradients and Grad-CAM."""
    figure, axes = plt.subplots(
        len(expl.labels), 4, figsize=(12, 3.2 * len(expl.labels)), squeeze=False
    )
    for j, label in enumerate(expl.labels):
        ig = None if expl.image is None else expl.image[j]
        cam = None if expl.gradcam is None else expl.gradcam[j]
        where_map = expl.localisation(j)
        shown, maps, where = _slice(pixels, [where_map, ig, cam])
        shown, (where_map, ig, cam) = _for_display(shown, maps)
        panels = (
            ("image", None),
            ("localisation", where_map),
            ("integrated gradients", ig),
            ("Grad-CAM", cam),
        )
        for axis, (title, values) in zip(axes[j], panels, strict=True):
            drawn = _overlay(axis, shown, values, opacity=0.6)
            title += "" if drawn else " (no positive evidence)"
            axis.set_title(f"{label} {expl.probabilities[j]:.2f}: {title}{where}", fontsize=8)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.text(0.5, 0.005, OVERLAY_LEGEND, ha="center", va="bottom", fontsize=8)
    return _save_figure(figure, Path(path), sweep)


# -- the note ---------------------------------------------------------------------------------
def _mark(text: str, score: float, scale: float) -> str:
    if scale <= 0 or abs(score) < 0.05 * scale:
        return html.escape(text)
    r, g, b = POSITIVE if score > 0 else NEGATIVE
    alpha = 0.15 + 0.7 * min(abs(score) / scale, 1.0)
    return (
        f'<mark style="background: rgba({r}, {g}, {b}, {alpha:.2f})" '
        f'title="{score:+.3f}">{html.escape(text)}</mark>'
    )


def read_part(note: str, read: int | None) -> tuple[str, str]:
    """(what the model read, the rest it did not) of a note cut at `read` characters (its
    token limit; None: all of it). The rest is "" when it holds only white space."""
    unread = note[read:] if read and note[read:].strip() else ""
    return (note[:read] if unread else note), unread


def unread_notice(read: int, length: int) -> str:
    """What to tell a reader of a note the model read only `read` characters of."""
    return (
        f"The model read the first {read:,} of {length:,} characters of this note (its token "
        "limit); the rest, below the note, did not count."
    )


def note_html(
    note: str,
    spans: np.ndarray,
    words: np.ndarray,
    labels: Sequence[str],
    read: int | None = None,
) -> str:
    """The note as written, once per label, each word's background coloured by its score
    (red for the label, blue against it, stronger = larger); HTML-escaped. A note the model
    read only `read` characters of says so, and shows the rest apart, unscored."""
    note, unread = read_part(note, read)
    shown = spans[:, 1] <= len(note)  # (N,) the words the model read
    spans, words = spans[shown], words[:, shown]
    rest = (
        f'<p class="notice">{html.escape(unread_notice(len(note), len(note) + len(unread)))}</p>'
        f'<p class="unread" style="{AS_WRITTEN}">{html.escape(unread)}</p>'
        if unread
        else ""
    )
    blocks = []
    for j, label in enumerate(labels):
        scale = float(np.max(np.abs(words[j]))) if len(spans) else 0.0
        parts, last = [], 0
        for (start, end), score in zip(spans.tolist(), words[j].tolist(), strict=True):
            parts += [html.escape(note[last:start]), _mark(note[start:end], score, scale)]
            last = end
        parts.append(html.escape(note[last:]))
        blocks.append(
            f'<div class="note"><h3>{html.escape(label)}</h3>'
            f'<p style="{AS_WRITTEN}">{"".join(parts)}</p>{rest}</div>'
        )
    return "\n".join(blocks)


def _modality_bar(values: np.ndarray) -> str:
    """Image and note Shapley shares as a two-colour bar, with the values (logit units)."""
    image, note, interaction = (float(v) for v in values)
    total = abs(image) + abs(note)
    share = abs(image) / total if total > 0 else 0.5
    return (
        f'<div class="bar"><span style="width: {100 * share:.0f}%; background: #4c72b0"></span>'
        f'<span style="width: {100 * (1 - share):.0f}%; background: #dd8452"></span></div>'
        f"image {image:+.2f}, note {note:+.2f}, interaction {interaction:+.2f}"
    )


STYLE = """body { font-family: sans-serif; max-width: 60em; margin: 1em auto; }
.notice { background: #fff3cd; padding: .5em; border: 1px solid #e0c36c; }
.bar { display: inline-flex; width: 12em; height: .9em; margin-right: .5em; }
.bar span { display: block; } table { border-collapse: collapse; }
td, th { padding: .2em .6em; border-bottom: 1px solid #ddd; text-align: left; }
.note p { line-height: 1.6; } img { max-width: 100%; } .unread { color: #777; }"""


def explanation_html(expl: Explanation, image_file: str | None = None) -> str:
    """The study's page: notice, probabilities, modality bars, the PNG and the note per label."""
    rows = "\n".join(
        f"<tr><td>{html.escape(label)}</td><td>{expl.probabilities[j]:.3f}</td>"
        f"<td>{_modality_bar(expl.modality[j])}</td></tr>"
        for j, label in enumerate(expl.labels)
    )
    if expl.note is not None and expl.words is not None and expl.spans is not None:
        note = note_html(expl.note, expl.spans, expl.words, expl.labels, expl.note_read)
    elif expl.note is not None:
        note = f'<div class="note"><p style="{AS_WRITTEN}">{html.escape(expl.note)}</p></div>'
    else:
        note = "<p>This study has no note.</p>"
    image = (
        f'<img src="{html.escape(image_file)}" alt="attribution maps"><p>{OVERLAY_LEGEND}</p>'
        if image_file
        else "<p>No image attribution: the study has no image or the model reads none.</p>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clinfuse explanation</title>
<style>{STYLE}</style></head><body>
<p class="notice"><strong>{html.escape(NOTICE)}</strong></p>
<h1>Explanation of study {html.escape(expl.study_id)}</h1>
<p>Model {html.escape(expl.model_version or "unknown")}. Probabilities are calibrated; the bar
splits the label's logit between image (blue) and note (orange) by exact Shapley values.</p>
<table><tr><th>label</th><th>probability</th><th>image / note contribution</th></tr>
{rows}</table>
<h2>Image</h2>
{image}
<h2>Note</h2>
<p>Red words raise the label's score, blue words lower it.</p>
{note}
</body></html>
"""


def render_explanation(
    expl: Explanation, image_pixels: np.ndarray | None, out_dir: str | Path, sweep: bool = True
) -> list[Path]:
    """Write <study_id>.png (when there is an image map) and <study_id>.html into `out_dir`
    (named by `file_stem`). `sweep`: see `write_atomic` (a writer of many studies sweeps the
    folder once)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    image_file = None
    if image_pixels is not None and (expl.image is not None or expl.gradcam is not None):
        written.append(
            explanation_png(expl, image_pixels, out_dir / f"{file_stem(expl.study_id)}.png", sweep)
        )
        image_file = written[-1].name
    page = out_dir / f"{file_stem(expl.study_id)}.html"
    write_atomic(page, explanation_html(expl, image_file), sweep=sweep)
    return [*written, page]


# -- `clinfuse explain` -------------------------------------------------------------------------
@dataclass
class ExplainedStudy:
    """What `explain_studies` did for one study."""

    study_id: str
    labels: tuple[str, ...] = ()
    files: list[Path] = field(default_factory=list)
    failure: str | None = None  # why the study could not be explained


STUDY_SUFFIXES = (".npz", ".png", ".html")  # what `clinfuse explain` writes per study


def study_paths(out_dir: Path, study_id: str) -> list[Path]:
    """The files `clinfuse explain` writes for a study, named by `file_stem` (which may hold
    dots, "1.2.840...": never `with_suffix`)."""
    return [out_dir / f"{file_stem(study_id)}{suffix}" for suffix in STUDY_SUFFIXES]


def select_labels(
    model: FusionModel, probabilities: torch.Tensor, which: str, study: str = "this study"
) -> list[str]:
    """ "positive" (called at the saved thresholds; the most probable label when none is, with
    a warning naming `study`), "all", or comma-separated label names."""
    if which == "all":
        return list(model.labels)
    if which == "positive":
        called = model.decisions(probabilities).nonzero().flatten().tolist()
        if not called:
            called = [int(probabilities.argmax())]
            log.warning(
                "%s: no label is called positive at the saved thresholds; explaining its most "
                "probable one, %s (p=%.3f)",
                study,
                model.labels[called[0]],
                float(probabilities[called[0]]),
            )
        return [model.labels[k] for k in called]
    return label_names(model, which)


def label_names(model: FusionModel, which: str) -> list[str]:
    """Comma-separated label names, each one of the model's (else a ConfigError naming them)."""
    names = list(dict.fromkeys(name.strip() for name in which.split(",") if name.strip()))
    unknown = [name for name in names if name not in model.labels]
    if unknown or not names:
        raise ConfigError(
            "--labels",
            f"unknown label(s) {', '.join(unknown) or '(none given)'}",
            hint=f"use positive, all, or names from: {', '.join(model.labels)}",
        )
    return names


def explain_studies(
    model_dir: str | Path,
    manifest_path: str | Path,
    study_ids: Sequence[str],
    out_dir: str | Path,
    labels: str = "positive",
    steps: int = 32,
    device: str | None = None,
    progress: Callable[[ExplainedStudy], None] | None = None,
) -> list[ExplainedStudy]:
    """Explain each study: <study_id>.npz, .png and .html in `out_dir` (named by `file_stem`)."""
    from clinfuse.evaluation.evaluate import model_version

    model = load_checkpoint(model_dir, select_device(device))
    if labels not in ("positive", "all"):
        label_names(model, labels)  # a wrong name is an error before any study is read
    version = model_version(model_dir)
    study_ids = list(dict.fromkeys(s.strip() for s in study_ids))  # as manifest ids are read
    wanted = set(study_ids)  # streamed as `infer` reads it: label columns optional
    rows = {
        r.study_id: r
        for r in iter_manifest(manifest_path, model.labels, read_labels=False)
        if r.study_id in wanted
    }
    for study_id in study_ids:
        if study_id not in rows:
            raise ManifestError(
                manifest_path,
                f"study id {study_id!r} is not in the manifest",
                column="study_id",
                hint="check the id (ids are case-sensitive)",
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out_dir)  # once, not at each file's write: what a killed run left
    done = []
    for study_id in study_ids:
        batch = study_batch(model, [rows[study_id]])
        if batch.failures:
            done.append(ExplainedStudy(study_id, failure=batch.failures[0][1]))
            earlier = [path.name for path in study_paths(out_dir, study_id) if path.is_file()]
            if earlier:
                log.warning(
                    "study %s: %s in %s are an earlier explanation's, of its files as they were",
                    study_id,
                    ", ".join(earlier),
                    out_dir,
                )
        else:
            try:
                done.append(
                    _explain_one(model, batch, rows[study_id], labels, steps, version, out_dir)
                )
            except (ClinfuseError, RuntimeError, ValueError) as exc:  # this study, not the rest
                why = f"image:{exc.reason}" if isinstance(exc, DicomError) else type(exc).__name__
                log.warning("study %s could not be explained (%s)", study_id, why)
                done.append(ExplainedStudy(study_id, failure=f"explain_failed: {why}"))
        if progress:
            progress(done[-1])
    return done


def _explain_one(
    model: FusionModel,
    batch: Batch,
    row: StudyRow,
    labels: str,
    steps: int,
    version: str,
    out_dir: Path,
) -> ExplainedStudy:
    """One read study explained: its .npz, PNG and HTML written into `out_dir`."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(*batch.to(device).model_inputs())
    names = select_labels(
        model, model.probabilities(logits)[0].cpu(), labels, f"study {row.study_id!r}"
    )
    expl = explain(model, batch, names, steps=steps, model_version=version)[0]
    image = row.image  # read again for display: the DICOM's own pixel grid
    pixels = None
    if image and model.uses_image:
        with warnings.catch_warnings():  # said when the study was read, with its row
            warnings.simplefilter("ignore", ImageWarning)
            pixels = display_pixels(read_dicom(image))
    paths = study_paths(out_dir, row.study_id)
    before = {path: path.stat().st_ino for path in paths if path.is_file()}
    try:
        files = [expl.save_npz(paths[0], sweep=False)]
        files += render_explanation(expl, pixels, out_dir, sweep=False)
    except BaseException:  # none of this attempt's files beside the failure; earlier ones stay
        for path in paths:  # an atomic write renames a new file (inode) into place
            if path.is_file() and before.get(path) != path.stat().st_ino:
                path.unlink()
        raise
    return ExplainedStudy(row.study_id, expl.labels, files)


# -- the quality report as Markdown ----------------------------------------------------------
def _cell(value: object, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


MODALITY_COLUMNS = ("phi_image", "phi_note", "interaction", "note_share")


def _verdict(bar: dict[str, Any]) -> str:
    """A bar's verdict for the table, naming the labels it could not judge."""
    if bar["passed"]:
        return "pass"
    missed = bar.get("unexplained") or []
    if missed:
        return f"**FAIL** (no true positive of {', '.join(missed)} to explain)"
    return "**FAIL**" if bar["value"] is not None else "not measured"


def quality_markdown(summary: dict) -> str:
    """`evaluate_explanations`'s summary as Markdown: per label, per image method, per
    randomisation stage, the modality Shapley means, and the bar with its verdicts."""
    default, labels = summary["default_method"], summary["labels"]
    rows = []
    for name, e in labels.items():
        image, note = e.get(default, {}), e.get("note", {})
        rows.append(
            [
                name,
                e["group"],
                f"{e['true_positives']}/{e['truly_present']}",
                image.get("pointing_game"),
                image.get("pointing_strict"),
                image.get("relevance_mass"),
                e.get("mask", {}).get("fraction"),
                image.get("mask_auroc"),
                image.get("deletion_ratio"),
                image.get("randomization_drop"),
                note.get("rationale_first"),
                e.get("note_occlusion", {}).get("rationale_first"),
                note.get("rationale_mass"),
                note.get("deletion_ratio"),
                e.get("modality", {}).get("note_share"),
            ]
        )
    header = ["label", "depends on", "TP/present", "pointing", "(strict)", "relevance mass"]
    header += ["(mask area)"]
    header += ["mask AUROC", "deletion px / random", "randomisation drop", "rationale first"]
    header += ["(by occlusion)", "rationale mass", "deletion words / random", "note share"]
    keys = ("pointing_game", "pointing_strict", "relevance_mass", "mask_auroc", "deletion_pixels")
    methods = _table(
        ["method", "pointing", "(strict)", "relevance mass", "mask AUROC", "deletion px"]
        + ["rand. drop", "bars"],
        [
            [m, *(w[k]["value"] for k in (*keys, "randomization_drop")), w["bars_passed"]]
            for m, w in summary["image_methods"].items()
        ],
    )
    stages: list[str] = []
    stage_rows = []
    for name, e in labels.items():
        means = e.get(default, {}).get("randomized_relevance_mass")
        means = means or e.get("note", {}).get("randomized_rationale_mass") or {}
        stages = stages or list(means)
        if means:
            stage_rows.append([name, *(means.get(s) for s in stages)])
    bars = _table(
        ["bar", "needs", "worst label", "value", "verdict"],
        [
            [
                b["bar"],
                f"{'>=' if b['direction'] == 'min' else '<='} {b['threshold']}",
                b["label"] or "-",
                b["value"],
                _verdict(b),
            ]
            for b in summary["bars"]
        ],
    )
    parts = [
        f"# Explanation quality ({summary.get('model_version', 'model')}, {summary['split']})",
        f"{summary['explained']} studies with a true positive explained, of {summary['studies']}"
        f" in the split"
        + (
            f" ({summary['unreadable']} could not be read: the log names them and why)"
            if summary.get("unreadable")
            else ""
        )
        + f" ({summary.get('one_sided', 0)} explained studies left out of the "
        "note's Shapley share: they lack their image or note, so their one side gets all the "
        "credit whatever the model). Pointing game: the map's peak within "
        f"{POINTING_TOLERANCE * 224:.0f}/224"
        " of the image's longer side from the lesion mask (the standard 15-pixel tolerance at "
        f"224 pixels); strict: inside the mask. Default image method: **{default}** (most image "
        "bars passed, then "
        "the worst label's relevance mass and mask AUROC). The worst label decides every bar; "
        "deletion areas are divided by the random-order area (n/a where removing the pixels or "
        "words barely moves the output, so no order can be judged); the mask area is the "
        "relevance mass of a map that knows nothing; the randomisation drop is the relative "
        "fall of the relevance mass from the trained model to the fully re-initialised one; "
        "rationale first by occlusion: the same question asked of the model with no attribution "
        "method, the word whose removal alone lowers the probability most.",
        "## Per label (image columns: the default method)",
        _table(header, rows),
        "## Image methods compared (worst label)",
        methods,
    ]
    if stage_rows:
        parts += [
            "## Cascading randomisation: relevance mass (image labels) or rationale mass "
            "(note-only labels) after re-initialising up to each stage",
            _table(["label", *stages], stage_rows),
        ]
    modality = [
        [name, e["group"], *(e["modality"].get(k) for k in MODALITY_COLUMNS)]
        for name, e in labels.items()
        if "modality" in e
    ]
    if modality:
        parts += [
            "## Modality Shapley values (mean over the true positives, logits)",
            "The note's share is |phi_note| / (|phi_image| + |phi_note|) per study; each phi "
            "holds half the interaction (both - image alone - note alone + neither); studies "
            "with both an image and a note only.",
            _table(
                ["label", "depends on", "phi_image", "phi_note", "interaction", "note share"],
                modality,
            ),
        ]
    parts += ["## Bar", bars]
    return "\n\n".join(parts) + "\n"
