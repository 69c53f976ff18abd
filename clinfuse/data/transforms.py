"""Image preprocessing: one builder of MONAI dictionary transforms, driven by the saved spec.

The `PreprocessConfig` travels inside the checkpoint, so inference rebuilds exactly the
transforms training used. The resize geometry is computed in one place (`fit_geometry`) and
used both ways: forwards to make the model input, backwards (`to_original_grid`) to put an
attribution map back on the DICOM's own pixel grid.

No flips in augmentation: laterality carries meaning (a finding's side is in the note).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    MapTransform,
    RandAffined,
    RandGaussianNoised,
)

from clinfuse.config import PreprocessConfig
from clinfuse.data.dicom import DicomImage, apply_window, default_window
from clinfuse.errors import ClinfuseError, DicomError


@dataclass(frozen=True)
class Geometry:
    """How an original grid maps into the model's input grid."""

    resized: tuple[int, ...]  # size after resizing, before padding
    pad_before: tuple[int, ...]  # padding added before each axis


def fit_geometry(original: tuple[int, ...], spec: PreprocessConfig) -> Geometry:
    """Resize so the image fits `spatial_size` (keeping aspect with fit=pad), pad symmetrically."""
    target = tuple(spec.spatial_size)
    if spec.fit == "stretch":
        return Geometry(target, (0,) * len(target))
    scale = min(t / o for t, o in zip(target, original, strict=True))
    resized = tuple(min(t, max(1, round(o * scale))) for t, o in zip(target, original, strict=True))
    return Geometry(resized, tuple((t - r) // 2 for t, r in zip(target, resized, strict=True)))


def to_original_grid(
    values: torch.Tensor,
    original: tuple[int, ...],
    spec: PreprocessConfig,
    conserve_sum: bool = False,
) -> torch.Tensor:
    """(..., *spatial_size) on the model grid -> (..., *original): un-pad, then resize back:
    area-averaged along the axes that shrink (every model pixel counts), then interpolated
    (bi/trilinear) along those that grow.

    Resizing keeps a map's values (its mean); with `conserve_sum` (attributions, which add up
    to a change of the output) they are scaled by resized / original area, so a 96x96 map back
    on a 3000x2500 radiograph spreads each value over ~800 pixels, and what resizing still
    moves of the sum (a few % of a signed map's) is given back to the pixels in proportion to
    their magnitude: the map adds up to the same total exactly, its zeros stay zero (NaN
    pixels stay NaN and are left out of the sums)."""
    geometry = fit_geometry(original, spec)
    n = len(original)
    lead = values.shape[:-n]
    index = [slice(None)] * len(lead) + [
        slice(p, p + r) for p, r in zip(geometry.pad_before, geometry.resized, strict=True)
    ]
    cropped = values[tuple(index)].reshape(-1, 1, *geometry.resized).float()  # (M, 1, *resized)
    shrunk = tuple(min(o, r) for o, r in zip(original, geometry.resized, strict=True))
    back = cropped
    if shrunk != geometry.resized:  # the axes that shrink: averages over the model pixels
        back = torch.nn.functional.interpolate(back, size=shrunk, mode="area")
    if shrunk != tuple(original):  # the axes that grow
        mode = "bilinear" if n == 2 else "trilinear"
        back = torch.nn.functional.interpolate(back, size=original, mode=mode, align_corners=False)
    if conserve_sum:
        back = back * (math.prod(geometry.resized) / math.prod(original))
        axes = tuple(range(2, back.dim()))
        wide = {"dim": axes, "keepdim": True, "dtype": torch.float64}
        missing = torch.nansum(cropped, **wide) - torch.nansum(back, **wide)  # (M, 1, 1...)
        magnitude = torch.nansum(back.abs(), **wide).clamp(min=1e-30)
        back += back.abs() * (missing / magnitude).float()  # (M, 1, *original)
    return back.reshape(*lead, *original)


class WindowAndFitd(MapTransform):
    """DicomImage -> (C, *spatial_size) float32 in [0, 1]: window, channels, resize, pad."""

    def __init__(self, keys: str, spec: PreprocessConfig, in_channels: int) -> None:
        super().__init__(keys)
        self.spec = spec
        self.in_channels = in_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.prepare(d[key], d.get("path", key))
        return d

    def prepare(self, image: DicomImage, path: str) -> torch.Tensor:
        spatial = len(self.spec.spatial_size)
        if image.pixels.ndim - 1 != spatial:
            raise DicomError(
                path,
                "wrong_dimensions",
                f"a {image.pixels.ndim - 1}D image given to a {spatial}D model",
                hint="use a model whose image.spatial_dims matches the studies",
            )
        if self.spec.window == "file" and image.window is not None:
            center, width = image.window
        else:
            center, width = default_window(
                DicomImage(image.pixels, image.spacing, None, image.meta)
            )
        pixels = apply_window(image.pixels, center, width)  # (C, *orig) in [0, 1]
        if pixels.shape[0] != self.in_channels:
            # colour to grey for a 1-channel model; grey repeated for a 3-channel one
            pixels = pixels.mean(0, keepdims=True).repeat(self.in_channels, axis=0)
        return fit_to_input(torch.from_numpy(np.ascontiguousarray(pixels)), self.spec)


def fit_to_input(pixels: torch.Tensor, spec: PreprocessConfig) -> torch.Tensor:
    """(C, *original) -> (C, *spatial_size) float32: area-resize to `fit_geometry`, then pad
    with zeros, the smaller half before (what MONAI's `Resize(mode="area")` and
    `SpatialPad(method="symmetric")` compute, without building both transforms per study)."""
    geometry = fit_geometry(tuple(pixels.shape[1:]), spec)
    image = pixels.float()
    if tuple(image.shape[1:]) != geometry.resized:
        image = torch.nn.functional.interpolate(image[None], size=geometry.resized, mode="area")[0]
    axes = zip(spec.spatial_size, geometry.resized, geometry.pad_before, strict=True)
    pad: list[int] = []  # F.pad order: last axis (before, after), then the one before it, ...
    for size, resized, before in reversed(list(axes)):
        pad += [before, size - resized - before]
    return torch.nn.functional.pad(image, pad) if any(pad) else image


class Preprocess:
    """The transforms in two stages, run on plain tensors: `fit` (window, channels, resize, pad:
    the same every time, so a dataset may cache its output) and `finish` (random augmentation
    when training, then normalisation). MONAI's metadata tracking is switched off for each call
    (and restored), which makes the random affine about 7x cheaper."""

    def __init__(
        self, fit: Compose, augment: Compose | None, normalize: tuple[float, float]
    ) -> None:
        self.fit = fit
        self.augment = augment
        self.mean, self.std = normalize

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        return self.run_finish(self.run_fit(data))

    def run_fit(self, data: dict[str, Any]) -> dict[str, Any]:
        """{"image": DicomImage, "path": str} -> {"image": (C, *spatial_size) in [0, 1], ...}."""
        return _untracked(self.fit, data)

    def run_finish(self, data: dict[str, Any]) -> dict[str, Any]:
        """The fitted image -> the model input (augmented when training, normalised)."""
        if self.augment is not None:
            data = _untracked(self.augment, data)
        image = torch.as_tensor(data["image"], dtype=torch.float32)
        return {**data, "image": (image - self.mean) / self.std}

    def set_random_state(self, seed: int) -> Preprocess:
        if self.augment is not None:
            self.augment.set_random_state(seed=seed)
        return self


def _untracked(compose: Compose, data: dict[str, Any]) -> dict[str, Any]:
    """Run `compose` without MONAI's metadata tracking; a `ClinfuseError` a transform raised
    comes out as itself, not inside MONAI's "applying transform" RuntimeError."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        return compose(data)
    except RuntimeError as exc:
        cause = exc.__cause__
        while isinstance(cause, RuntimeError):  # MONAI wraps once per nested Compose
            cause = cause.__cause__
        if isinstance(cause, ClinfuseError):
            raise cause from None
        raise
    finally:
        set_track_meta(previous)


def build_transforms(spec: PreprocessConfig, in_channels: int, train: bool = False) -> Preprocess:
    """The image pipeline for one study dict {"image": DicomImage, "path": str}."""
    augment = None
    if train:
        spatial = len(spec.spatial_size)
        augment = Compose(
            [
                RandAffined(
                    "image",
                    prob=0.5,
                    rotate_range=[0.05] * (1 if spatial == 2 else 3),
                    scale_range=[0.05] * spatial,
                    translate_range=[s * 0.03 for s in spec.spatial_size],
                    padding_mode="zeros",
                ),
                RandGaussianNoised("image", prob=0.3, std=0.02),
            ],
            map_items=False,
        )
    return Preprocess(
        Compose([WindowAndFitd("image", spec, in_channels)], map_items=False),
        augment,
        spec.normalize,
    )
