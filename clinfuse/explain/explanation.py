"""`Explanation`: why the model scored one study as it did, per label, in plain arrays.

One object per study holds every explanation `explain` computes: the image attribution on the
DICOM's own pixel grid, Grad-CAM, each word's attribution with its character span in the note
as written, the two-player Shapley values of image and note, and the cross-attention read from
each word into the image. It saves to a compact `.npz` that loads without unpickling, and
summarises to a JSON-able record for a database.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from clinfuse.atomic import write_atomic

TOP_WORDS = 10  # words kept per label in `to_record`
RECORD_MAX_SIDE = {2: 64, 3: 32}  # the record's image map: at most 64x64, or 32x32x32
# A finer map weighs a coarser one by (its value / its peak) + CAM_FLOOR (multi-scale Grad-CAM,
# and `localisation_map`); 0.03 was chosen on the sample data's validation split.
CAM_FLOOR = 0.03
# `localisation_map` smooths integrated gradients with a Gaussian of this share of the image's
# longer side (2 pixels on the sample data's 96-pixel images), chosen on the validation split.
SMOOTH_FRACTION = 2 / 96


def localisation_map(gradcam: np.ndarray, ig: np.ndarray) -> np.ndarray:
    """Where in the image the evidence lies: Grad-CAM squared, weighed per pixel by the
    positive part of the smoothed integrated gradients (its value / its peak + `CAM_FLOOR`).

    Grad-CAM says which region (and deletes well: it ranks a whole enlarged heart), integrated
    gradients which pixels in it; smoothed, their pixel-to-pixel sign noise cancels and what is
    left is structure. Squaring the coarse map keeps a bright decoy outside the region from
    pulling the mass. The README's explanation results compare it with each part alone.
    `gradcam`, `ig`: (*spatial) on the same grid; returns the same shape.
    """
    sigma = SMOOTH_FRACTION * max(ig.shape)
    smooth = np.clip(gaussian_filter(np.nan_to_num(ig).astype(np.float32), sigma), 0, None)
    weight = smooth / max(float(smooth.max()), 1e-12) + CAM_FLOOR
    return np.square(np.nan_to_num(gradcam).astype(np.float32)) * weight


@dataclass
class Explanation:
    """Explanations of one study for `labels`; any part the study or model lacks is None."""

    study_id: str
    labels: tuple[str, ...]  # (L,) the labels explained, in this order
    probabilities: np.ndarray  # (L,) float32 calibrated probabilities
    # (L, H, W) or (L, D, H, W) float32 integrated gradients on the DICOM grid, summing per label
    # to f(x) - f(black image) there too
    image: np.ndarray | None
    gradcam: np.ndarray | None  # same shape: Grad-CAM (ReLU'd), upsampled to the DICOM grid
    note: str | None  # the note text that `spans` index
    spans: np.ndarray | None  # (N, 2) int32 [start, end) character offsets of the note's words
    words: np.ndarray | None  # (L, N) float32 attribution of each word per label
    modality: np.ndarray  # (L, 3) float32 Shapley (image, note) and interaction, logit units
    attention: np.ndarray | None  # (N, *grid) float32 text->image cross-attention per word
    delta: np.ndarray  # (L, 2) float32 IG convergence deltas (image, note); NaN = not computed
    model_version: str = ""
    # the model read note[:note_read]; less than the note's length when the note was cut to
    # the model's token limit (the words after it have no attribution); None without a note
    note_read: int | None = None
    _localised: dict[int, np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)

    def localisation(self, j: int) -> np.ndarray | None:
        """Label j's `localisation_map` (*spatial), the default image map; None without an
        image. Kept once made (a viewer asks again on every redraw)."""
        if self.image is None or self.gradcam is None:
            return None
        if j not in self._localised:
            self._localised[j] = localisation_map(self.gradcam[j], self.image[j])
        return self._localised[j]

    # -- files ------------------------------------------------------------------------------
    def save_npz(self, path: str | Path, sweep: bool = True) -> Path:
        """Write a compressed `.npz` of plain arrays (no pickled objects), atomically (a crash or
        a full disk leaves the old file or none, never half of one); returns the path. `sweep`:
        see `write_atomic` (a run of many studies sweeps its folder once)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "study_id": np.asarray(self.study_id, dtype=np.str_),
            "model_version": np.asarray(self.model_version, dtype=np.str_),
            "labels": np.asarray(self.labels, dtype=np.str_).reshape(len(self.labels)),
            "probabilities": np.asarray(self.probabilities, dtype=np.float32),
            "modality": np.asarray(self.modality, dtype=np.float32),
            "delta": np.asarray(self.delta, dtype=np.float32),
        }
        scaled = {}  # float16 of each map over its peak, the peaks beside it: see `peak_scaled`
        for key in SCALED_MAPS:
            if getattr(self, key) is not None:
                scaled[key], arrays[f"{key}_scale"] = peak_scaled(getattr(self, key))
        optional = {
            **{key: (value, np.float16) for key, value in scaled.items()},
            "spans": (self.spans, np.int32),
            "attention": (self.attention, np.float32),
        }
        for key, (value, dtype) in optional.items():
            if value is not None:
                arrays[key] = np.asarray(value, dtype=dtype)
        if self.note is not None:
            arrays["note"] = np.asarray(self.note, dtype=np.str_)
        if self.note_read is not None:
            arrays["note_read"] = np.asarray(self.note_read, dtype=np.int64)
        buffer = io.BytesIO()  # a file object: numpy would otherwise append ".npz"
        np.savez_compressed(buffer, **arrays)
        write_atomic(path, buffer.getvalue(), sweep=sweep)
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> Explanation:
        """Read a file `save_npz` wrote; float16 maps come back as float32."""
        with np.load(Path(path), allow_pickle=False) as data:

            def get(key: str, dtype: type | None = None) -> np.ndarray | None:
                if key not in data.files:
                    return None
                value = data[key]
                return value.astype(dtype) if dtype is not None else value

            labels = tuple(str(x) for x in data["labels"])
            note = get("note")
            maps = {key: get(key, np.float32) for key in SCALED_MAPS}
            for key, value in maps.items():
                scale = get(f"{key}_scale", np.float32)  # absent: saved unscaled (earlier files)
                if value is not None and scale is not None:
                    value *= per_label(scale, value.ndim)
            return cls(
                study_id=str(data["study_id"]),
                labels=labels,
                probabilities=data["probabilities"].astype(np.float32),
                image=maps["image"],
                gradcam=maps["gradcam"],
                note=None if note is None else str(note),
                spans=get("spans", np.int32),
                words=maps["words"],
                modality=data["modality"].astype(np.float32),
                attention=get("attention", np.float32),
                delta=(
                    data["delta"].astype(np.float32)
                    if "delta" in data.files
                    else np.full((len(labels), 2), np.nan, np.float32)
                ),
                model_version=str(data["model_version"]) if "model_version" in data.files else "",
                note_read=int(data["note_read"]) if "note_read" in data.files else None,
            )

    # -- database ---------------------------------------------------------------------------
    def top_words(self, k: int = TOP_WORDS) -> dict[str, list[tuple[int, int, float]]]:
        """Per label, the `k` words of largest |attribution| as (start, end, score)."""
        if self.words is None or self.spans is None:
            return {}
        top: dict[str, list[tuple[int, int, float]]] = {}
        for j, label in enumerate(self.labels):
            order = np.argsort(-np.abs(self.words[j]), kind="stable")[:k]
            top[label] = [
                (int(self.spans[i, 0]), int(self.spans[i, 1]), float(self.words[j, i]))
                for i in order
            ]
        return top

    def to_record(self) -> dict[str, Any]:
        """A compact JSON-able summary: scores, Shapley values, top words, a small image map."""
        return {
            "study_id": self.study_id,
            "model_version": self.model_version,
            "labels": list(self.labels),
            "probabilities": [_finite(p) for p in self.probabilities],
            "modality": [[_finite(v) for v in row] for row in self.modality],
            "modality_columns": ["image", "note", "interaction"],
            "top_words": {
                label: [list(w) for w in words] for label, words in self.top_words().items()
            },
            "image": None if self.image is None else encode_map(self.image),
            "note_read": self.note_read,
            # which note the top words' character spans index (`note_fingerprint`)
            "note_fingerprint": None if self.note is None else note_fingerprint(self.note),
        }


def note_fingerprint(note: str) -> str:
    """A short digest of a note's text: tells whether a stored summary's word spans index the
    note shown now (the note's file can change after it was scored)."""
    return hashlib.sha256(note.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# maps saved as float16 over each label's peak: integrated gradients over the pixels, Grad-CAM
# (its peak can be ~1e-7, where float16 keeps a few levels or none) and the word scores
SCALED_MAPS = ("image", "gradcam", "words")


def peak_scaled(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, *spatial) -> (values / each label's peak |value|, the peaks (L,) float32; 1 for an
    all-zero map). Attributions that add up to a logit change are tiny per pixel of a large
    DICOM (~1e-7 on 3000x2500): float16 would round them to zero, but not their share of the
    peak. A saved map is the first times the second, label by label."""
    flat = np.abs(np.asarray(values, dtype=np.float32)).reshape(len(values), -1)
    flat = np.where(np.isnan(flat), 0.0, flat)  # a NaN pixel would make the peak NaN, then 1
    peak = flat.max(1) if flat.size else np.ones(len(values), np.float32)
    peak = np.where(np.isfinite(peak) & (peak > 0), peak, 1.0).astype(np.float32)
    return values / per_label(peak, values.ndim), peak


def overlay_scale(values: np.ndarray) -> float:
    """The attribution an overlay draws at full strength: the 99.5th percentile of the positive
    values, for a volume (D, H, W) the largest of its slices' (one slice's finding is drawn as on
    a 2D image, the other slices on the same scale); where that is 0 (evidence on under 0.5 % of
    the pixels: a small lesion), the largest positive value. 0: no positive evidence at all."""
    positive = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0, None)
    if positive.size == 0:
        return 0.0
    rows = positive.reshape(len(positive), -1) if positive.ndim == 3 else positive.reshape(1, -1)
    top = float(np.percentile(rows, 99.5, axis=1).max())
    return top if top > 0 else float(positive.max())


def per_label(vector: np.ndarray, ndim: int) -> np.ndarray:
    """(L,) -> (L, 1, ...): one value a label, broadcast over an (L, *spatial) map."""
    return vector.reshape(-1, *[1] * (ndim - 1))


def encode_map(values: np.ndarray) -> dict[str, Any]:
    """(L, *spatial) -> {"shape", "original_shape", "dtype", "base64", "scale"}: area-downsampled,
    aspect kept, so no axis exceeds 64 (2D) or 32 (3D); little-endian float16 bytes in base64 of
    the map over each label's peak (`peak_scaled`), the peaks in "scale"."""
    spatial = values.shape[1:]
    scale = min(1.0, RECORD_MAX_SIDE.get(len(spatial), 64) / max(spatial))  # keep the aspect
    size = tuple(max(1, round(s * scale)) for s in spatial)
    small = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if size != spatial:
        pool = (
            torch.nn.functional.adaptive_avg_pool2d
            if len(spatial) == 2
            else torch.nn.functional.adaptive_avg_pool3d
        )
        small = pool(small.unsqueeze(1), size).squeeze(1)  # (L, *size)
    unit, peak = peak_scaled(small.numpy())
    data = unit.astype("<f2")
    return {
        "shape": list(data.shape),
        "original_shape": list(spatial),
        "dtype": "float16",
        "base64": base64.b64encode(data.tobytes()).decode("ascii"),
        "scale": [float(p) for p in peak],
    }


def decode_map(encoded: dict[str, Any]) -> np.ndarray:
    """The inverse of `encode_map`: a float32 array of `encoded["shape"]` (records from before
    "scale" hold the values themselves)."""
    raw = base64.b64decode(encoded["base64"])
    values = np.frombuffer(raw, dtype="<f2").reshape(encoded["shape"]).astype(np.float32)
    scale = np.asarray(encoded.get("scale", [1.0] * len(values)), dtype=np.float32)
    return values * per_label(scale, values.ndim)


def _finite(value: float) -> float | None:
    """A float for JSON; NaN and infinities (not JSON) become None."""
    value = float(value)
    return value if math.isfinite(value) else None
