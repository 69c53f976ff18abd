"""Pixels for the study view: window/level presets and an attribution overlay, as RGB arrays.

Display only: the image is read with `clinfuse.data.dicom.read_dicom` and windowed with its
`apply_window`; the attribution comes from an `Explanation` on the DICOM's own pixel grid.
No DICOM header value other than the window reaches the page.
"""

from __future__ import annotations

import matplotlib
import numpy as np

from clinfuse.data.dicom import DicomImage, apply_window, percentile_window
from clinfuse.explain.explanation import overlay_scale

# Common CT windows (center, width) in Hounsfield units; offered for CT only.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DISPLAY_SIDE = 512  # small images are enlarged (nearest neighbour) to about this many pixels


def window_presets(image: DicomImage) -> dict[str, tuple[float, float]]:
    """Named (center, width) windows: the file's own first, then automatic and full range."""
    presets: dict[str, tuple[float, float]] = {}
    if image.window is not None:
        presets["file"] = (float(image.window[0]), float(image.window[1]))
    presets["auto (0.5-99.5%)"] = percentile_window(image)  # not the file's, when it has one
    low, high = float(np.min(image.pixels)), float(np.max(image.pixels))
    presets["full range"] = ((low + high) / 2, max(high - low, 1.0))
    if str(image.meta.get("modality") or "").upper() == "CT":
        presets.update(CT_PRESETS)
    return presets


def n_slices(image: DicomImage) -> int:
    """Slices along the first spatial axis of a volume; 1 for a 2D image."""
    return int(image.pixels.shape[1]) if image.spatial_dims == 3 else 1


def grey_slice(image: DicomImage, center: float, width: float, z: int = 0) -> np.ndarray:
    """(H, W) float32 in [0, 1]: one slice (or the image) windowed, channels averaged."""
    pixels = image.pixels[:, z] if image.spatial_dims == 3 else image.pixels  # (C, H, W)
    return apply_window(pixels, center, width).mean(axis=0)


def opening_slice(peak: int, map_depth: int, depth: int) -> int:
    """The image slice (0-based, of `depth`) that `map_slice` shows map slice `peak` of
    `map_depth` on: the first of them (a map may be coarser than the image, the store's)."""
    return min(-(-peak * depth // map_depth), depth - 1)


def map_slice(values: np.ndarray, shape: tuple[int, int], z: int = 0, depth: int = 1) -> np.ndarray:
    """One label's map, (H, W) or (D, H, W), as the (H, W) at slice `z` of `depth` resized
    to `shape` (a map smaller than the image, like the store's record, is stretched)."""
    if values.ndim == 3:
        values = values[min(z * len(values) // max(depth, 1), len(values) - 1)]
    if values.shape != shape:  # a downsampled map (the store record): nearest neighbour
        rows = np.arange(shape[0]) * values.shape[0] // shape[0]
        cols = np.arange(shape[1]) * values.shape[1] // shape[1]
        values = values[np.ix_(rows, cols)]
    return values.astype(np.float32)


def overlay_rgb(
    grey: np.ndarray, values: np.ndarray | None, opacity: float, top: float | None = None
) -> np.ndarray:
    """(H, W, 3) uint8: the grey image with the positive attribution blended in (inferno),
    each pixel's opacity growing with its attribution up to `top` (default: `overlay_scale` of
    `values`; a volume's slice gives its whole map's); enlarged for display."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if values is not None and opacity > 0:
        positive = np.clip(np.nan_to_num(values), 0, None)
        top = overlay_scale(values) if top is None else top
        if top > 0:
            scaled = np.clip(positive / top, 0, 1)
            heat = matplotlib.colormaps["inferno"](scaled)[..., :3]  # (H, W, 3)
            alpha = (opacity * scaled)[..., None]
            rgb = (1 - alpha) * rgb + alpha * heat
    out = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    factor = max(1, DISPLAY_SIDE // max(out.shape[:2]))
    return np.kron(out, np.ones((factor, factor, 1), dtype=np.uint8)) if factor > 1 else out
