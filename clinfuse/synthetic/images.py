"""Chest-radiograph-like images drawn with numpy: anatomy, findings, decoys and lesion masks.

Everything is drawn on a normalised grid (u across, v down, both in [-1, 1]) so the anatomy
looks the same at every size. Values are "density" in [0, 1], bright = dense (MONOCHROME2);
`export.py` turns density into 12-bit stored values. Display convention as on a viewing box:
the patient's right is on the image's left (u < 0), the patient's left on the image's right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR, TISSUE, LUNG, MEDIASTINUM, HEART = 0.03, 0.42, 0.14, 0.58, 0.62
THORAX_HALF_WIDTH = 0.68  # lung centre offset + lung half-width: the CTR denominator / 2

# 5 x 7 bitmaps of the side-marker letters (one string a row, "#" = ink).
GLYPHS = {
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
}


@dataclass(frozen=True)
class ImageSpec:
    """What a study's image shows; sides are the patient's ("left"/"right"), "" = absent."""

    ctr: float  # cardiothoracic ratio of the heart as drawn
    effusion_side: str
    opacity_side: str
    marker: bool  # a bright "L"/"R" lead marker near a top corner
    line: bool  # a line/tube running down into the mediastinum
    ecg: bool  # an ECG-lead button, possibly over a lung


@dataclass(frozen=True)
class Rendering:
    """A drawn image and the regions a finding occupies on its pixel grid."""

    density: np.ndarray  # (H, W) float32 in [0, 1], bright = dense
    masks: dict[str, np.ndarray]  # "heart" | "effusion" | "opacity" -> (H, W) bool


def image_side(side: str) -> float:
    """+1 when the patient's `side` is drawn on the image's right (patient left), else -1."""
    return 1.0 if side == "left" else -1.0


def render_chest(spec: ImageSpec, size: int, rng: np.random.Generator) -> Rendering:
    """Draw one radiograph for `spec`; all geometry jitter and noise come from `rng`."""
    scale = rng.uniform(0.96, 1.04)
    shift_u, shift_v = rng.uniform(-0.04, 0.04, size=2)
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    u = (axis[None, :] - shift_u) / scale  # (1, W)
    v = (axis[:, None] - shift_v) / scale  # (H, 1)
    u, v = np.broadcast_arrays(u, v)  # (H, W) each

    body = _soft_ellipse(u, v, 0.0, 0.2, 0.9, 1.3, edge=0.04)
    lungs = {side: _lung(u, v, side, rng) for side in ("right", "left")}
    lung = np.maximum(lungs["right"], lungs["left"])
    heart_width = spec.ctr * THORAX_HALF_WIDTH  # half-width: CTR = heart / thorax width
    heart_v, heart_height = 0.34 + rng.uniform(-0.03, 0.03), rng.uniform(0.2, 0.24)
    heart = _soft_ellipse(u, v, 0.08, heart_v, heart_width, heart_height, edge=0.08)
    mediastinum = np.clip((0.1 - np.abs(u - 0.02)) / 0.04, 0, 1) * np.clip((v + 0.7) / 0.5, 0, 1)

    density = AIR + (TISSUE - AIR) * body
    density -= (TISSUE - LUNG) * lung
    density += _ribs(u, v, rng) * (0.35 * body + 0.65 * lung)
    density = _over(density, MEDIASTINUM, mediastinum)
    density += 0.06 * np.clip((0.05 - np.abs(u - 0.02)) / 0.02, 0, 1) * body  # spine
    masks = {"heart": heart > 0.5}
    density = _over(density, HEART, heart)

    if spec.effusion_side:
        fluid = _effusion(u, v, lungs[spec.effusion_side], spec.effusion_side, rng)
        fluid *= 1 - heart  # fluid behind the heart does not show
        density += (TISSUE + 0.04 - LUNG) * fluid
        masks["effusion"] = fluid > 0.5
    if spec.opacity_side:
        blob = _opacity(u, v, lungs[spec.opacity_side], heart, spec.opacity_side, rng)
        density += rng.uniform(0.34, 0.42) * blob
        masks["opacity"] = blob > 0.3

    density *= 1.0 - 0.06 * (u**2 + v**2)  # vignetting
    if spec.line:
        density = np.maximum(density, _line(u, v, rng))
    if spec.ecg:
        density = np.maximum(density, _ecg_button(u, v, size, rng))
    if spec.marker:
        density = np.maximum(density, _side_marker(size, rng))
    return Rendering(density=density.astype(np.float32), masks=masks)


def _soft_ellipse(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float, edge: float
) -> np.ndarray:
    """1 inside the ellipse, 0 outside, a smooth ramp `edge` wide (in radius units)."""
    r = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
    t = np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _over(density: np.ndarray, value: float, alpha: np.ndarray) -> np.ndarray:
    """Composite a region of constant `value` over `density` with coverage `alpha`."""
    return density * (1 - alpha) + value * alpha


def _lung(u: np.ndarray, v: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    """Soft mask of one lung field: a tall ellipse narrowing to the apex, cut by a domed
    diaphragm that leaves a sharp costophrenic angle laterally."""
    sign = image_side(side)
    cu = sign * (0.38 + rng.uniform(-0.02, 0.02))
    cv = rng.uniform(-0.03, 0.03)
    taper = 1.0 - 0.3 * np.clip((cv - v) / 0.7, 0, 1)  # apex narrower than base
    field = _soft_ellipse(u, v, cu, cv, 0.3 * taper, 0.72, edge=0.08)
    dome = rng.uniform(0.5, 0.58) - 0.16 * np.clip(1 - ((u - cu) / 0.3) ** 2, 0, 1)
    return field * np.clip((dome - v) / 0.04 + 0.5, 0, 1)


def _ribs(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Curved periodic bands (posterior ribs) sloping down towards the chest wall."""
    curved = v - 0.35 * (np.abs(u) - 0.1) ** 2
    bands = 0.5 + 0.5 * np.sin(2 * np.pi * (curved * rng.uniform(4.6, 5.4) + rng.random()))
    return 0.07 * bands**3


def _effusion(
    u: np.ndarray, v: np.ndarray, lung: np.ndarray, side: str, rng: np.random.Generator
) -> np.ndarray:
    """Fluid filling one lung base, its surface a meniscus rising towards the chest wall."""
    lateral = np.clip((u * image_side(side) - 0.1) / 0.58, 0, 1)  # 0 medial .. 1 lateral
    level = rng.uniform(0.1, 0.3) - 0.22 * lateral**2
    below = 1.0 / (1.0 + np.exp(-(v - level) / 0.02))
    return below * np.clip(lung * 1.5, 0, 1)


def _opacity(
    u: np.ndarray,
    v: np.ndarray,
    lung: np.ndarray,
    heart: np.ndarray,
    side: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """An irregular consolidation (a few merged Gaussians) inside one lung, peak 1."""
    sign = image_side(side)
    for _ in range(50):  # a centre well inside the lung, away from the heart shadow
        cu, cv = sign * rng.uniform(0.2, 0.58), rng.uniform(-0.5, 0.4)
        around = [(cu, cv), (cu - 0.08, cv), (cu + 0.08, cv), (cu, cv - 0.08), (cu, cv + 0.08)]
        cols = [int(np.argmin(np.abs(u[0] - pu))) for pu, _ in around]
        rows = [int(np.argmin(np.abs(v[:, 0] - pv))) for _, pv in around]
        if lung[rows, cols].min() > 0.9 and heart[rows[0], cols[0]] < 0.2:
            break
    radius = rng.uniform(0.07, 0.13)
    blob = np.zeros_like(u)
    for _ in range(rng.integers(3, 6)):
        du, dv = rng.normal(0, 0.5 * radius, size=2)
        sigma = radius * rng.uniform(0.5, 0.9)
        blob += rng.uniform(0.6, 1.0) * np.exp(
            -((u - cu - du) ** 2 + (v - cv - dv) ** 2) / (2 * sigma**2)
        )
    blob *= np.clip(lung * 1.3, 0, 1)
    return blob / blob.max()


def _line(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A thin bright tube: a quadratic curve from the top edge down into the mediastinum."""
    start = np.array([rng.choice([-1, 1]) * rng.uniform(0.1, 0.5), -1.1])
    bend = np.array([rng.uniform(-0.15, 0.15), rng.uniform(-0.6, -0.3)])
    end = np.array([rng.uniform(-0.02, 0.12), rng.uniform(0.0, 0.35)])
    t = np.linspace(0.0, 1.0, 64)[:, None]  # (K, 1)
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end  # (K, 2)
    grid = np.stack([u.ravel(), v.ravel()], axis=1)  # (H*W, 2)
    dist = np.full(len(grid), np.inf)
    for chunk in np.array_split(points, 4):  # bounded memory: (H*W, K/4)
        d2 = ((grid[:, None, :] - chunk[None, :, :]) ** 2).sum(-1)
        dist = np.minimum(dist, np.sqrt(d2.min(axis=1)))
    half_width = max(0.012, 1.2 / u.shape[1])
    return (rng.uniform(0.8, 0.9) * np.exp(-((dist / half_width) ** 2))).reshape(u.shape)


def _ecg_button(u: np.ndarray, v: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A small sharp-edged bright disc, anywhere over the chest (often over a lung)."""
    radius = max(rng.uniform(0.035, 0.05), 2.0 / size)
    cu, cv = rng.uniform(-0.65, 0.65), rng.uniform(-0.6, 0.45)
    r = np.sqrt((u - cu) ** 2 + (v - cv) ** 2)
    disc = np.clip((radius - r) * size / 2 + 0.5, 0, 1)  # about one pixel of edge
    return rng.uniform(0.75, 0.9) * disc


def _side_marker(size: int, rng: np.random.Generator) -> np.ndarray:
    """A lead marker: an "L" or "R" glyph on a faint block, near a top corner (outside lungs)."""
    glyph = np.array([[c == "#" for c in row] for row in GLYPHS[rng.choice(["L", "R"])]])
    cell = max(1, size // 40)
    ink = np.kron(glyph, np.ones((cell, cell), dtype=bool))  # (7*cell, 5*cell)
    block = np.pad(ink.astype(np.float64) * 0.95, cell, constant_values=0.3)
    h, w = block.shape
    margin = max(1, size // 25)
    top = margin + int(rng.integers(0, margin + 1))
    left = margin + int(rng.integers(0, margin + 1))
    if rng.random() < 0.5:  # top-right corner instead
        left = size - w - left
    out = np.zeros((size, size))
    out[top : top + h, left : left + w] = block
    return out
