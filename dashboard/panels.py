"""The study view's read-only panels: image, scores, modality contribution, note, history.

Each takes what `clinfuse.review.study_view` returned (and the study's `Explanation` when its
file is there) and lays it out; none of them queries the store.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
from imaging import (
    grey_slice,
    map_slice,
    n_slices,
    opening_slice,
    overlay_rgb,
    window_presets,
)
from session import as_written

from clinfuse.data.dicom import DicomImage, read_dicom, stored_flipped
from clinfuse.errors import DicomError, ImageWarning, without_path
from clinfuse.explain import Explanation
from clinfuse.explain.explanation import decode_map, note_fingerprint, overlay_scale
from clinfuse.explain.render import note_html, peak_slice, read_part, unread_notice

# overlay name -> the Explanation attribute holding its (L, *spatial) maps; the first is shown
METHODS = {
    "localisation (Grad-CAM x smoothed IG)": "localisation",
    "integrated gradients": "image",
    "Grad-CAM": "gradcam",
}


@st.cache_resource(max_entries=16, show_spinner=False)
def load_image(path: str, mtime: float) -> DicomImage:
    """The study's DICOM as pixels (cached per file version)."""
    return read_dicom(path)


@st.cache_resource(max_entries=32, show_spinner=False)
def load_explanation(path: str, mtime: float) -> Explanation:
    """The study's explanation file (cached per file version)."""
    return Explanation.load_npz(path)


def explanation_of(path: str | Path | None, record: dict | None) -> Explanation | None:
    """The `Explanation` in `path` when it is the one the store's `record` summarises (study
    id, model version, labels, scores and Shapley values, written from the same object); None
    (with a warning) for a file that cannot be read or is another's (a later run into the same
    folder rewrites `explanations/<study_id>.npz`, and would show a note of another patient),
    else None when there is no file."""
    if not path or not Path(path).is_file():
        return None
    try:
        expl = load_explanation(str(path), Path(path).stat().st_mtime)
    except Exception:  # a damaged file (zip, npz or array errors of many types)
        st.warning("This study's explanation file cannot be read: its summary is shown instead.")
        return None
    if not summarised_by(expl, record or {}):
        st.warning(
            "This study's explanation file was written by another run or for other scores "
            "since: not shown; its summary in the store is shown instead."
        )
        return None
    return expl


def summarised_by(expl: Explanation, record: dict) -> bool:
    """Whether `record` (`Explanation.to_record`, kept in the store) is `expl`'s summary."""
    try:
        return (
            record.get("study_id") == expl.study_id
            and record.get("model_version", expl.model_version) == expl.model_version
            and list(record.get("labels", ())) == list(expl.labels)
            and np.allclose(  # JSON keeps a float32 to the digit: only rounding differs
                np.asarray(record.get("probabilities"), dtype=np.float32),
                expl.probabilities,
                atol=1e-6,
                equal_nan=True,
            )
            and np.allclose(
                np.asarray(record.get("modality"), dtype=np.float32),
                expl.modality,
                atol=1e-5,
                equal_nan=True,
            )
        )
    except (TypeError, ValueError):  # a record or file of other shapes: not this one's
        return False


def _keep_valid(key: str, options: Sequence[Any]) -> None:
    """Drop a widget's remembered value when this study does not offer it."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]


def label_picker(labels: list[str], explained: Sequence[str], default: str, study_id: str) -> str:
    """The label whose evidence (overlay and note highlights) is shown; a widget of its own
    per study, so the next study opens on its own first explained label."""
    key = f"sv_label-{study_id}"
    _keep_valid(key, labels)
    return st.selectbox(
        "Evidence for label",
        labels,
        index=labels.index(default),
        key=key,
        format_func=lambda x: x if x in explained else f"{x} (not explained)",
    )


def attribution(
    expl: Explanation | None, record: dict | None, label: str, method: str
) -> np.ndarray | None:
    """One label's image map: from the npz (full grid), else the store record's small map."""
    if expl is not None and label in expl.labels:
        j = expl.labels.index(label)
        if METHODS[method] == "localisation":
            return expl.localisation(j)
        maps = getattr(expl, METHODS[method])
        return None if maps is None else maps[j]
    if record and record.get("image") and label in record.get("labels", []):
        return decode_map(record["image"])[record["labels"].index(label)]
    return None


def explained_grid(expl: Explanation | None, record: dict | None) -> tuple[int, ...] | None:
    """The pixel grid (*spatial) the study's image maps were made on, if any."""
    if expl is not None and expl.image is not None:
        return tuple(expl.image.shape[1:])
    if record and record.get("image"):
        return tuple(record["image"]["original_shape"])
    return None


def image_panel(
    image_path: str | Path | None, expl: Explanation | None, record: dict | None, label: str
) -> None:
    """The image with window/level, slice and the attribution overlay for `label`."""
    if not image_path:
        st.info("This study has no image.")
        return
    try:
        with warnings.catch_warnings():  # said on the page below (the server's log has no row)
            warnings.simplefilter("ignore", ImageWarning)
            image = load_image(str(image_path), Path(image_path).stat().st_mtime)
    except DicomError as exc:  # never the path: it may hold a patient's name
        shown = without_path(exc, "this study's image")
        st.error(f"The image cannot be shown: {shown}")
        return
    except OSError as exc:
        st.error(f"The image cannot be shown: {exc.strerror or type(exc).__name__}")
        return
    if flipped := stored_flipped(image.meta):
        st.warning(
            f"This image is stored {flipped} (PatientOrientation "
            f"{as_written(str(image.meta['patient_orientation']))}; a standard view is L\\F). "
            f"It is shown, and was scored, as stored: the model read it {flipped}."
        )
    presets = window_presets(image)
    names = [*presets, "custom"]
    _keep_valid("sv_window", names)
    controls = st.columns(3)
    preset = controls[0].selectbox("Window", names, key="sv_window")
    center, width = presets.get(preset, next(iter(presets.values())))
    if preset == "custom":
        center = controls[1].number_input("Center (level)", value=float(center), key="sv_center")
        width = controls[2].number_input(  # > 0: a width below 1 is LINEAR_EXACT's (apply_window)
            "Width", value=float(width), min_value=1e-6, format="%g", key="sv_width"
        )
    else:
        controls[1].metric("Center", f"{center:g}")
        controls[2].metric("Width", f"{width:g}")
    method = st.session_state.get("sv_method", next(iter(METHODS)))
    values = attribution(expl, record, label, method)
    z, depth = 0, n_slices(image)
    if depth > 1:  # opens on the slice the explanation's PNG shows: its strongest
        start = depth // 2
        if values is not None and values.ndim == 3:
            start = opening_slice(peak_slice(values), len(values), depth)
        shown_as = hashlib.sha256(str(image_path).encode()).hexdigest()[:12]  # never the path
        z = st.slider("Slice", 1, depth, value=start + 1, key=f"sv_slice-{shown_as}") - 1
    grey = grey_slice(image, center, width, z)
    overlay = st.columns([2, 2, 3])
    shown = overlay[0].toggle("Overlay", value=True, key="sv_overlay")
    overlay[1].selectbox("Method", list(METHODS), key="sv_method", disabled=values is None)
    opacity = overlay[2].slider("Opacity", 0.0, 1.0, 0.5, 0.05, key="sv_opacity")
    grid, now = explained_grid(expl, record), tuple(image.pixels.shape[1:])
    if values is not None and grid is not None and grid != now:
        values, shown = None, False  # it would be stretched onto pixels it never saw
        sizes = " against ".join("x".join(map(str, g)) for g in (now, grid))
        st.warning(
            f"No overlay: the image file has changed since it was scored ({sizes} pixels when "
            "explained)."
        )
    elif values is None:
        shown = False
        st.caption(
            f"No image attribution for {as_written(label)}: explanations cover the positive labels."
        )
    elif (expl is None or label not in expl.labels) and METHODS[method] != "image":
        st.caption(
            "The explanation file is not there: the overlay is the store's small "
            "integrated-gradients map, whatever the method."
        )
    top = None
    if values is not None:
        top = overlay_scale(values)  # a volume's slices share one scale
        values = map_slice(values, grey.shape, z, depth)
        if top <= 0 and shown:
            shown = False
            st.caption(
                f"No positive image evidence for {as_written(label)} in this map: nothing in "
                "the image raises its score (what lowers it is not drawn)."
            )
    rgb = overlay_rgb(grey, values if shown else None, opacity, top)
    where = f" · slice {z + 1}/{depth}" if depth > 1 else ""
    st.image(rgb, caption=f"window {center:g}/{width:g}{where}", width="stretch")
    if shown:
        drawn = method if expl is not None and label in expl.labels else "integrated gradients"
        st.caption(
            f"Overlay: where the image raises {as_written(label)}'s score ({drawn}), dark "
            "purple to bright yellow and more opaque as it rises, scaled to this image's "
            "strongest 0.5 % (over all its slices); what lowers the score is not drawn."
        )


def scores_panel(labels: list[dict[str, Any]]) -> None:
    """Per label: the probability against its threshold and the model's call."""
    frame = pd.DataFrame(
        {
            "label": [x["label"] for x in labels],
            "probability": [float(x["probability"]) for x in labels],
            "threshold": [float(x["threshold"]) for x in labels],
            "call": ["positive" if x["decision"] else "negative" for x in labels],
        }
    )
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config={
            "probability": st.column_config.ProgressColumn(
                format="%.3f", min_value=0.0, max_value=1.0
            ),
            "threshold": st.column_config.NumberColumn(format="%.3f"),
        },
    )


def modality_panel(record: dict | None) -> None:
    """Exact Shapley split of each explained label's logit between image and note."""
    if not record or not record.get("modality"):
        st.caption("No modality contribution: this study was not explained.")
        return
    columns = record.get("modality_columns", ["image", "note", "interaction"])
    frame = pd.DataFrame(record["modality"], columns=columns, index=record["labels"])
    total = frame["image"].abs() + frame["note"].abs()
    frame["image share"] = (frame["image"].abs() / total.where(total > 0)).fillna(0.5)
    st.dataframe(
        frame,
        width="stretch",
        column_config={
            **{c: st.column_config.NumberColumn(format="%+.2f") for c in columns},
            "image share": st.column_config.ProgressColumn(
                format="percent", min_value=0.0, max_value=1.0
            ),
        },
    )
    st.caption("Shapley values in logit units; image share = |image| / (|image| + |note|).")


def note_panel(note: str | None, expl: Explanation | None, record: dict | None, label: str) -> None:
    """The note as written, words coloured by their attribution to `label`; a note longer than
    the model read is shown up to where it stopped, the rest apart; a note changed since it was
    scored is shown as the model read it (its saved explanation holds that text)."""
    if expl is not None and expl.note and note != expl.note:
        st.warning(
            "This study's note has changed since it was scored: shown here as the model read "
            "it, which is what the scores and the highlighted words are about."
        )
        note = expl.note
    if not note:
        st.info("This study has no note.")
        return
    spans = words = None
    scored = (record or {}).get("note_fingerprint")  # None: a store of an earlier clinfuse
    if expl is None and scored is not None and scored != note_fingerprint(note):
        st.warning(
            "This study's note has changed since it was scored and its explanation file is not "
            "there: the note is shown as it is now, without the words the model weighed."
        )
        record = None  # its word spans and read length index the note as it was
    if expl is not None and expl.words is not None and label in expl.labels and expl.note == note:
        spans, words = expl.spans, expl.words[[expl.labels.index(label)]]
    elif record and label in (record.get("top_words") or {}):
        top = sorted(record["top_words"][label])  # the record keeps the strongest words only
        spans = np.array([[s, e] for s, e, _ in top], dtype=np.int32).reshape(-1, 2)
        words = np.array([[score for _, _, score in top]], dtype=np.float32)
    read = (expl.note_read if expl is not None else None) or (record or {}).get("note_read")
    note, unread = read_part(note, read)
    if unread:
        st.warning(unread_notice(len(note), len(note) + len(unread)))
    if spans is None:
        st.text(note)
    else:
        st.html(note_html(note, spans, words, [label]))
        st.caption("Red words raise the label's score, blue words lower it.")
    if unread:
        with st.expander(f"The rest of the note ({len(unread):,} characters, not read)"):
            st.text(unread)


def failure_message(failure: tuple[str, str] | None) -> str | None:
    """Why a study was not scored, its reason once (the stored detail may start with it)."""
    if failure is None:
        return None
    reason, detail = failure
    said = detail if detail.startswith(f"{reason}:") else f"{reason}: {detail}"
    return f"This study could not be scored: {said}"


CALLED = {1: "positive", 0: "negative", None: "unknown"}  # a review's label values, as said


def history_panel(history: list[dict[str, Any]]) -> None:
    """The study's review events, oldest first; nothing is ever overwritten. Each says how its
    labels differ from the model's calls and from the review before it (where a later review
    undid an earlier one's correction, that shows)."""
    if not history:
        st.caption("No review yet.")
        return

    def differences(before: dict[str, Any], after: dict[str, Any]) -> str:
        changed = [
            f"{k}: {CALLED.get(before.get(k), before.get(k))} → {CALLED.get(v, v)}"
            for k, v in after.items()
            if before.get(k) != v
        ]
        return ", ".join(changed) or "none"

    rows, previous = [], None
    for event in history:
        before, after = event.get("labels_before") or {}, event.get("labels_after") or {}
        rows.append(
            {
                "time (UTC)": str(event["created_at"])[:19],
                "reviewer": event["reviewer"],
                "verdict": event["verdict"],
                "label changes": differences(before, after),  # against the model's calls
                "since the review before": "—"
                if previous is None
                else differences(previous, after),
                "comment": event.get("comment") or "",
                "model": event.get("model_version") or "",
            }
        )
        previous = after
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
