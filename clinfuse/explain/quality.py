"""Are the explanations right? `explain` scored against known ground truth, per label.

On data whose truth is known (the sample data's lesion masks and rationale spans), on the true
positives of a split (truly present and called positive by the model):

- image localisation: pointing game (with the standard tolerance, and strict), relevance mass
  inside the lesion mask, mask AUROC;
- note localisation: is the top-ranked word a rationale word; share of mass on rationale words;
- faithfulness: deletion-curve area, most-attributed first, against random orders (pixels set to
  the black baseline in model-input space; words replaced by [PAD], the note baseline), as the
  ratio of the mean areas over the label's studies;
- sanity: localisation again after cascading re-initialisation of the weights, from the heads
  back towards the input, on a copy of the model (an explanation that does not change failed);
- modality: the note's Shapley share on image-only, note-only and both-modality labels.

Image methods compared side by side: integrated gradients as `explain` computes it (its black
baseline makes it gradient x input), its positive part, Grad-CAM, cross-attention (mean over
words) and Grad-CAM x positive IG; `quality_summary` picks the default and checks the bar.
The per-map metrics are in `clinfuse.explain.metrics`, the weight re-initialisation in
`clinfuse.explain.randomization`.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from clinfuse.config import PreprocessConfig
from clinfuse.data.batch import Batch, Collator, StudyDataset
from clinfuse.data.dicom import read_header
from clinfuse.data.manifest import PatientSplit, StudyRow, load_manifest
from clinfuse.data.study import study_note
from clinfuse.data.transforms import fit_geometry, to_original_grid
from clinfuse.engine import predict
from clinfuse.errors import ClinfuseError, ManifestError
from clinfuse.explain.attribution import explain
from clinfuse.explain.explanation import Explanation
from clinfuse.explain.metrics import (
    MIN_DROP,
    POINTING_TOLERANCE,
    deletion_area,
    mask_auroc,
    note_share,
    pointing_game,
    rationale_first,
    rationale_mass,
    rationale_words,
    relevance_mass,
)
from clinfuse.explain.randomization import cascading_randomization
from clinfuse.model.model import FusionModel

IMAGE_METHODS = ("ig", "ig_positive", "gradcam", "attention", "gradcam_x_ig", "localisation")
Record = dict[str, Any]
log = logging.getLogger(__name__)


# -- ground truth ---------------------------------------------------------------------------
@dataclass
class GroundTruth:
    """Lesion masks on the DICOM grid, rationale spans and noise-free labels of a data set."""

    masks: dict[str, np.ndarray]  # "<study_id>/<label>" -> (H, W) uint8
    rationales: dict[tuple[str, str], list[tuple[int, int]]]
    labels: dict[str, dict[str, float]]  # study_id -> label -> 1.0 / 0.0 (truth.csv)
    folder: Path | None = None  # where it was read from
    # (study_id, label) -> the text of each rationale span, where rationales.jsonl gives it
    rationale_texts: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def mask(self, study_id: str, label: str) -> np.ndarray | None:
        return self.masks.get(f"{study_id}/{label}")

    def mask_on(self, study_id: str, label: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The mask, checked to lie on the study's DICOM grid `shape`."""
        mask = self.mask(study_id, label)
        if mask is not None and tuple(mask.shape) != tuple(shape):
            raise self._other_export(
                "masks.npz",
                f"the mask of {study_id}/{label} is {'x'.join(map(str, mask.shape))} pixels "
                f"but the study's image is {'x'.join(map(str, shape))}",
            )
        return mask

    def rationale(self, study_id: str, label: str) -> list[tuple[int, int]]:
        return self.rationales.get((study_id, label), [])

    def rationale_in(self, study_id: str, label: str, note: str | None) -> list[tuple[int, int]]:
        """The rationale's spans, checked to hold their recorded text in the study's `note`."""
        spans = self.rationale(study_id, label)
        texts = self.rationale_texts.get((study_id, label))
        if note is None or texts is None:
            return spans
        read = [note[s:e] for s, e in spans]
        if read != texts:  # the message gives offsets, not the note's words (they may name)
            (start, end), wanted = next(
                (span, t) for span, r, t in zip(spans, read, texts, strict=True) if r != t
            )
            raise self._other_export(
                "rationales.jsonl",
                f"the rationale of {study_id}/{label} does not match the study's note: its "
                f"characters {start}-{end} do not hold the recorded text ({len(wanted)} "
                "characters)",
            )
        return spans

    def _other_export(self, name: str, message: str) -> ManifestError:
        """The error for ground truth that does not fit the studies (another export's)."""
        return ManifestError(
            (self.folder or Path(".")) / name,
            message,
            hint="pass the ground truth of the export the manifest comes from",
        )

    def study_ids(self) -> set[str]:
        """The studies any mask, rationale or truth.csv row speaks of."""
        found = {key.rsplit("/", 1)[0] for key in self.masks}
        return found | {study for study, _ in self.rationales} | set(self.labels)

    def known_labels(self) -> set[str]:
        """The labels any mask, rationale or truth.csv column speaks of."""
        found = {key.rsplit("/", 1)[-1] for key in self.masks}
        found |= {label for _, label in self.rationales}
        return found | {label for row in self.labels.values() for label in row}

    def label(self, study_id: str, label: str, fallback: float) -> float:
        """The noise-free label when truth.csv has it, else `fallback` (the manifest's)."""
        return self.labels.get(study_id, {}).get(label, fallback)


def load_ground_truth(folder: str | Path, labels: Sequence[str] = ()) -> GroundTruth:
    """Read masks.npz, rationales.jsonl and (optional) truth.csv from `folder`; a file that
    does not parse, or a truth.csv column of `labels` that is not 1/0/empty, is one
    `ManifestError` naming it (and the line or column)."""
    folder = Path(folder)
    hint = "pass the ground_truth folder `clinfuse sample-data` writes"
    for name in ("masks.npz", "rationales.jsonl"):
        if not (folder / name).is_file():
            raise ManifestError(folder / name, "ground-truth file not found", hint=hint)
    try:
        with np.load(folder / "masks.npz", allow_pickle=False) as data:
            masks = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # never unpickled
        raise ManifestError(
            folder / "masks.npz", f"not a NumPy .npz of lesion masks ({exc})", hint=hint
        ) from None
    rationales: dict[tuple[str, str], list[tuple[int, int]]] = {}
    texts: dict[tuple[str, str], list[str]] = {}
    try:
        lines = (folder / "rationales.jsonl").read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ManifestError(
            folder / "rationales.jsonl", f"is not UTF-8 text (byte {exc.start})", hint=hint
        ) from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                item = json.loads(line)
                key = (str(item["study_id"]), str(item["label"]))
                rationales[key] = [(int(s), int(e)) for s, e in item["spans"]]
                if isinstance(item.get("text"), list) and len(item["text"]) == len(item["spans"]):
                    texts[key] = [str(t) for t in item["text"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise ManifestError(
                    folder / "rationales.jsonl",
                    f"line {number} is not a rationale record ({type(exc).__name__}: {exc})",
                    hint='each line: {"study_id": ..., "label": ..., "spans": [[start, end]]}',
                ) from None
    truth: dict[str, dict[str, float]] = {}
    if (folder / "truth.csv").is_file():
        truth = _truth_labels(folder / "truth.csv", labels)
    return GroundTruth(masks, rationales, truth, folder, texts)


def _truth_labels(path: Path, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """truth.csv: study_id, then columns of 1 / 0 / empty (the labels; other columns, such as
    the sample data's latent variables, are not read). A column named in `labels` must be one."""
    try:
        table = pd.read_csv(path, dtype={"study_id": str}).set_index("study_id")
    except (ValueError, KeyError, pd.errors.ParserError) as exc:
        raise ManifestError(
            path, f"cannot read a study_id column and label columns ({exc})"
        ) from None
    binary = []
    for column in table.columns:
        values = pd.to_numeric(table[column], errors="coerce")
        if (
            values.notna().sum() == table[column].notna().sum()
            and values.dropna().isin([0, 1]).all()
        ):
            binary.append(column)
        elif column in labels:
            raise ManifestError(path, "truth values must be 1, 0 or empty", column=str(column))
    return {
        sid: {k: float(v) for k, v in row.items() if not pd.isna(v)}
        for sid, row in table[binary].apply(pd.to_numeric).iterrows()
    }


# -- image maps per method ------------------------------------------------------------------
def attention_on_grid(
    attention: np.ndarray, spec: PreprocessConfig, original: tuple[int, ...]
) -> np.ndarray:
    """A map on the image-token grid (*grid) -> the DICOM grid (*original)."""
    values = torch.as_tensor(attention, dtype=torch.float32)[None, None]
    mode = "bilinear" if values.dim() == 4 else "trilinear"
    model_grid = torch.nn.functional.interpolate(
        values, size=tuple(spec.spatial_size), mode=mode, align_corners=False
    )[0, 0]
    return to_original_grid(model_grid, original, spec).numpy()


def image_maps(
    expl: Explanation, j: int, spec: PreprocessConfig, original: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Label j's map on the DICOM grid for every method the explanation supports."""
    maps: dict[str, np.ndarray] = {}
    if expl.image is not None:
        maps["ig"] = expl.image[j]
        maps["ig_positive"] = np.clip(expl.image[j], 0, None)
    if expl.gradcam is not None:
        maps["gradcam"] = expl.gradcam[j]
        if expl.image is not None:
            maps["gradcam_x_ig"] = expl.gradcam[j] * np.clip(expl.image[j], 0, None)
            maps["localisation"] = expl.localisation(j)  # kept: deletion asks for it again
    if expl.attention is not None and len(expl.attention):
        maps["attention"] = attention_on_grid(expl.attention.mean(0), spec, original)
    return maps


# -- deletion curves ------------------------------------------------------------------------
def _counts(n: int, steps: int) -> list[int]:
    return sorted({round(x) for x in np.linspace(0, n, min(n, steps) + 1)})


def _probabilities(model: FusionModel, inputs: list[torch.Tensor], k: int) -> np.ndarray:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.probabilities(model(*(t.to(device) for t in inputs)))[:, k].cpu().numpy()


def _repeat(batch: Batch, n: int) -> list[torch.Tensor]:
    """Study 0's model inputs, n copies along the batch axis."""
    return [t[:1].repeat(n, *([1] * (t.dim() - 1))) for t in batch.model_inputs()]


def model_grid_order(
    values: np.ndarray, original: tuple[int, ...], spec: PreprocessConfig
) -> np.ndarray:
    """Flat model-grid indices of the image's own (not padded) pixels, by descending value;
    ties (a clipped map's zeros) in a fixed random order, not in raster order."""
    geometry = fit_geometry(original, spec)
    mapped = torch.nn.functional.interpolate(
        torch.as_tensor(np.nan_to_num(values), dtype=torch.float32)[None, None],
        size=geometry.resized,
        mode="area",
    ).flatten()
    index = torch.arange(int(np.prod(spec.spatial_size))).view(*spec.spatial_size)
    region = tuple(
        slice(p, p + r) for p, r in zip(geometry.pad_before, geometry.resized, strict=True)
    )
    shuffle = torch.as_tensor(np.random.default_rng(0).permutation(len(mapped)))
    ranked = shuffle[torch.argsort(mapped[shuffle], descending=True, stable=True)]
    return index[region].flatten()[ranked].numpy()


def pixel_deletion(
    model: FusionModel, batch: Batch, k: int, order: np.ndarray, steps: int
) -> np.ndarray:
    """Label k's probability as the pixels of `order` (flat model-grid indices, first = most
    relevant) are set to the black baseline, at `steps` + 1 equal fractions of the order."""
    counts = _counts(len(order), steps)
    inputs = _repeat(batch, len(counts))
    flat = inputs[0].view(len(counts), inputs[0].shape[1], -1)  # (K, C, prod(spatial))
    mean, std = model.cfg.preprocess.normalize
    for i, n in enumerate(counts):
        flat[i, :, torch.as_tensor(order[:n], dtype=torch.long)] = (0.0 - mean) / std
    return _probabilities(model, inputs, k)


def _word_tokens(batch: Batch, spans: np.ndarray) -> list[torch.Tensor]:
    """Study 0's (Nt,) bool token mask of each word [start, end): its real tokens overlapping it."""
    offsets = batch.offsets[0]  # (Nt, 2)
    real = batch.attention_mask[0].bool() & (offsets[:, 1] > offsets[:, 0])  # (Nt,)
    return [real & (offsets[:, 0] < e) & (offsets[:, 1] > s) for s, e in spans.tolist()]


def word_deletion(
    model: FusionModel, batch: Batch, k: int, spans: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """Label k's probability as the words of `order` (first = most relevant) become [PAD],
    one more word at each step."""
    counts = _counts(len(order), len(order))
    inputs = _repeat(batch, len(counts))
    tokens = _word_tokens(batch, spans)
    pad = model.note_tokenizer.tokenizer.pad_token_id
    for i, n in enumerate(counts):
        for w in order[:n]:
            inputs[1][i, tokens[w]] = pad
    return _probabilities(model, inputs, k)


def word_occlusion(model: FusionModel, batch: Batch, k: int, spans: np.ndarray) -> np.ndarray:
    """(N,) how much label k's probability falls when each word alone becomes [PAD]: a check
    of the word ranking that needs no gradient (leave-one-out occlusion, one batched pass)."""
    inputs = _repeat(batch, len(spans) + 1)
    pad = model.note_tokenizer.tokenizer.pad_token_id
    for w, tokens in enumerate(_word_tokens(batch, spans), 1):
        inputs[1][w, tokens] = pad
    probabilities = _probabilities(model, inputs, k)  # (N + 1,): the note as written first
    return probabilities[0] - probabilities[1:]


# -- scoring explained studies: one row per (study, label, stage, method, metric) ------------
def _rows(expl: Explanation, j: int, stage: str, method: str, metrics: Record) -> list[Record]:
    where = {"study_id": expl.study_id, "label": expl.labels[j], "stage": stage, "method": method}
    return [{**where, "metric": k, "value": float(v)} for k, v in metrics.items() if v is not None]


def localisation(
    expl: Explanation,
    j: int,
    truth: GroundTruth,
    spec: PreprocessConfig,
    original: Any,
    stage: str = "trained",
) -> list[Record]:
    """Label j's pointing game (within `POINTING_TOLERANCE` of the mask, and strictly inside
    it), relevance mass and mask AUROC per image method (where a mask exists), and rationale
    rank and mass of the note (where a rationale does)."""
    rows: list[Record] = []
    mask = None if original is None else truth.mask_on(expl.study_id, expl.labels[j], original)
    if mask is not None and expl.image is not None:
        rows += _rows(expl, j, stage, "mask", {"fraction": np.mean(mask > 0)})
        tolerance = POINTING_TOLERANCE * max(original)  # pixels of the DICOM grid
        for method, values in image_maps(expl, j, spec, tuple(original)).items():
            metrics = {
                "pointing_game": pointing_game(values, mask, tolerance),
                "pointing_strict": pointing_game(values, mask),
                "relevance_mass": relevance_mass(values, mask),
                "mask_auroc": mask_auroc(values, mask),
            }
            rows += _rows(expl, j, stage, method, metrics)
    rationale = truth.rationale_in(expl.study_id, expl.labels[j], expl.note)
    if rationale and expl.words is not None and expl.spans is not None:
        inside = rationale_words(expl.spans, rationale)
        metrics = {
            "rationale_first": rationale_first(expl.words[j], inside),
            "rationale_mass": rationale_mass(expl.words[j], inside),
        }
        rows += _rows(expl, j, stage, "note", metrics)
    return rows


def _excess(curve: np.ndarray) -> float:
    """The area between a deletion curve and its fully-deleted level, in probability units
    (`deletion_area` x the total drop): averaged over studies, a study whose output the deleted
    features barely move weighs little."""
    return deletion_area(curve) * float(curve[0] - curve[-1])


def faithfulness(
    model: FusionModel,
    batch: Batch,
    expl: Explanation,
    j: int,
    truth: GroundTruth,
    steps: int = 16,
    orders: int = 3,
    rng: np.random.Generator | None = None,
) -> list[Record]:
    """Label j's deletion areas (`_excess`), most relevant first and in random orders: for
    pixels per image method (where a mask exists) and for words (where a rationale exists);
    with words also whether the word whose occlusion alone lowers the probability most is a
    rationale word (method "note_occlusion": what the model's output says, with no attribution
    method in between)."""
    rng = rng or np.random.default_rng(0)
    spec, original = model.cfg.preprocess, batch.original_shapes[0]
    k = model.labels.index(expl.labels[j])
    rows: list[Record] = []
    maps = {}
    if truth.mask(expl.study_id, expl.labels[j]) is not None and original is not None:
        maps = image_maps(expl, j, spec, tuple(original))  # {} for a model that reads no image
    if maps:
        own = model_grid_order(next(iter(maps.values())), original, spec)
        random = [
            pixel_deletion(model, batch, k, rng.permutation(own), steps) for _ in range(orders)
        ]
        random_area = _mean([_excess(c) for c in random])
        for method, values in maps.items():
            order = model_grid_order(values, original, spec)
            area = _excess(pixel_deletion(model, batch, k, order, steps))
            metrics = {"deletion_area": area, "deletion_random": random_area}
            rows += _rows(expl, j, "trained", method, metrics)
    rationale = truth.rationale(expl.study_id, expl.labels[j])
    if rationale and expl.words is not None:
        spans, n = expl.spans, len(expl.spans)
        ranked = word_deletion(model, batch, k, spans, np.argsort(-expl.words[j], kind="stable"))
        random = [word_deletion(model, batch, k, spans, rng.permutation(n)) for _ in range(orders)]
        metrics = {
            "deletion_area": _excess(ranked),
            "deletion_random": _mean([_excess(c) for c in random]),
        }
        rows += _rows(expl, j, "trained", "note", metrics)
        inside = rationale_words(spans, rationale)
        first = rationale_first(word_occlusion(model, batch, k, spans), inside)
        rows += _rows(expl, j, "trained", "note_occlusion", {"rationale_first": first})
    return rows


def study_batch(model: FusionModel, rows: Sequence[StudyRow]) -> Batch:
    """The studies of `rows` as one batch (unreadable ones set aside in `Batch.failures`)."""
    dataset = StudyDataset(rows, model.cfg)
    return Collator(model.note_tokenizer, model.cfg)([dataset[i] for i in range(len(dataset))])


def true_positives(
    model: FusionModel, rows: Sequence[StudyRow], truth: GroundTruth, manifest: str | Path = ""
) -> tuple[dict[str, list[str]], dict[str, int], list[tuple[str, str]]]:
    """(study_id -> labels truly present and called positive, label -> truly present count,
    the (study_id, reason) of the rows that could not be read, each named in a warning); the
    error of `unreadable_split` when none could."""
    loader = DataLoader(
        StudyDataset(rows, model.cfg),
        batch_size=32,
        collate_fn=Collator(model.note_tokenizer, model.cfg),
    )
    predictions = predict(model, loader, next(model.parameters()).device)
    predictions.require_any(manifest, "explained")
    for study_id, reason in sorted(predictions.failures):
        log.warning("study %s could not be read, so it is not explained: %s", study_id, reason)
    logits = torch.as_tensor(predictions.logits, device=model.temperature.device).float()
    called = model.decisions(model.probabilities(logits)).cpu()  # (N, L) bool
    found: dict[str, list[str]] = {}
    present = dict.fromkeys(model.labels, 0)
    for i, study_id in enumerate(predictions.study_ids):
        for k, label in enumerate(model.labels):
            if truth.label(study_id, label, float(predictions.labels[i, k])) == 1:
                present[label] += 1
                if called[i, k]:
                    found.setdefault(study_id, []).append(label)
    return found, present, sorted(predictions.failures)


def check_fits(
    truth: GroundTruth, rows: Sequence[StudyRow], positives: dict[str, list[str]]
) -> None:
    """Each study's masks lie on its image's grid and its rationales hold their text in its
    note (`GroundTruth.mask_on`, `rationale_in`): another export's ground truth is one error
    before any study is explained, not after. From the headers and notes alone; a file that
    cannot be read is left to the explaining, which reports it."""
    for row in rows:
        shape = None
        if row.image is not None and row.image.is_file():
            try:
                header = read_header(row.image)
                if int(header.get("NumberOfFrames") or 1) == 1:
                    shape = (int(header.Rows), int(header.Columns))
            except (ClinfuseError, OSError, AttributeError, TypeError, ValueError):
                shape = None
        try:
            note = study_note(row)
        except ClinfuseError:
            note = None
        for label in positives.get(row.study_id, []):
            if shape is not None:
                truth.mask_on(row.study_id, label, shape)
            truth.rationale_in(row.study_id, label, note)


def evaluate_explanations(
    model: FusionModel,
    manifest_path: str | Path,
    truth_dir: str | Path,
    *,
    split: str = "test",
    patient_split: PatientSplit | None = None,
    steps: int = 32,
    deletion_steps: int = 16,
    random_orders: int = 3,
    sanity: bool = True,
    sanity_per_label: int = 8,
    max_studies: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score `explain` on the true positives of `split` ("all" = every row; `patient_split` =
    the model's saved split settings). Returns `quality_summary`'s dict."""
    model.eval()
    truth = load_ground_truth(truth_dir, model.labels)
    known = truth.known_labels()
    unmeasured = [name for name in model.labels if name not in known]
    if len(unmeasured) == len(model.labels):
        raise ManifestError(
            truth_dir,
            f"holds no ground truth for any of the model's labels ({', '.join(model.labels)})",
            hint=f"it speaks of: {', '.join(sorted(known)) or 'nothing'}",
        )
    if unmeasured:
        log.warning(
            "no ground truth in %s for %s: their explanations are not measured",
            truth_dir,
            ", ".join(unmeasured),
        )
    for parts, kind, bars in (
        (truth.masks, "lesion masks", "pointing game, relevance mass, pixel deletion"),
        (truth.rationales, "rationales", "rationale first, word deletion"),
    ):
        if not parts:
            log.warning("%s holds no %s: the %s bars cannot be measured", truth_dir, kind, bars)
    manifest = load_manifest(manifest_path, labels=model.labels, split=patient_split)
    rows = {r.study_id: r for r in manifest.rows(None if split == "all" else split)}
    if not rows:
        raise ManifestError(manifest_path, f"no rows in the {split!r} split")
    named = truth.study_ids() & set(rows)
    if not named:
        raise ManifestError(
            truth_dir,
            f"speaks of none of the {len(rows)} studies of the {split!r} split",
            hint="pass the ground truth of the export the manifest comes from",
        )
    if len(named) < len(rows):
        log.warning(
            "%s speaks of %d of the %d studies of the %r split: the others are scored "
            "against the manifest's labels and have no masks or rationales",
            truth_dir, len(named), len(rows), split,
        )  # fmt: skip
    positives, present, unread = true_positives(model, list(rows.values()), truth, manifest_path)
    studies = [s for s in rows if s in positives][:max_studies]
    if not studies:
        truly = ", ".join(f"{k} {v}" for k, v in present.items() if v) or "none"
        raise ManifestError(
            manifest_path,
            f"no study of the {split!r} split ({len(rows)} studies) has a label that is truly "
            f"present and that the model calls positive (truly present: {truly}): nothing to "
            "explain",
            hint="measure on another split (--split val or all)",
        )
    check_fits(truth, [rows[s] for s in studies], positives)  # before minutes of explaining
    rng = np.random.default_rng(seed)
    records: list[Record] = []
    explained: dict[str, tuple[Batch, Explanation]] = {}
    one_sided = 0  # explained studies lacking their image or note: no note share
    for n, study_id in enumerate(studies, 1):
        batch = study_batch(model, [rows[study_id]])
        if not len(batch):
            continue
        expl = explain(model, batch, positives[study_id], steps=steps)[0]
        explained[study_id] = (batch, expl)
        both_sides = bool(batch.image_present[0]) and bool(batch.note_present[0])
        spec, original = model.cfg.preprocess, batch.original_shapes[0]
        for j in range(len(expl.labels)):
            records += localisation(expl, j, truth, spec, original)
            records += faithfulness(
                model, batch, expl, j, truth, deletion_steps, random_orders, rng
            )
            # a study with one side gives that side all the credit, whatever the model: the
            # note's share is measured where the model had both to choose from
            if both_sides:
                phi_image, phi_note, interaction = expl.modality[j]
                modality = {"note_share": note_share(expl.modality[j]), "phi_image": phi_image}
                modality |= {"phi_note": phi_note, "interaction": interaction}
                records += _rows(expl, j, "trained", "modality", modality)
        one_sided += not both_sides
        if progress and (n % 10 == 0 or n == len(studies)):
            progress(f"explained {n}/{len(studies)} studies")
    if sanity:
        records += randomized_records(
            model, explained, truth, sanity_per_label, steps, seed, progress
        )
    return quality_summary(
        records,
        model.labels,
        counts={
            "studies": len(rows),
            "unreadable": len(unread),
            "explained": len(explained),
            "one_sided": one_sided,
            "truly_present": present,
        },
        split=split,
    )


def randomized_records(
    model: FusionModel,
    explained: dict[str, tuple[Batch, Explanation]],
    truth: GroundTruth,
    per_label: int = 8,
    steps: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[Record]:
    """Localisation of up to `per_label` explained studies per label (those with a mask or a
    rationale) at every stage of the cascading randomisation."""
    chosen: dict[str, list[str]] = {}
    taken = dict.fromkeys(model.labels, 0)
    for study_id, (_, expl) in explained.items():
        for label in expl.labels:
            known = truth.mask(study_id, label) is not None or truth.rationale(study_id, label)
            if known and taken[label] < per_label:
                chosen.setdefault(study_id, []).append(label)
                taken[label] += 1
    records = []
    for stage, randomized in cascading_randomization(model, seed):
        for study_id, labels in chosen.items():
            batch = explained[study_id][0]
            methods = ("ig", "gradcam", "attention")
            expl = explain(randomized, batch, labels, steps=steps, methods=methods)[0]
            spec, original = randomized.cfg.preprocess, batch.original_shapes[0]
            for j in range(len(expl.labels)):
                records += localisation(expl, j, truth, spec, original, stage)
        if progress:
            progress(f"randomised up to: {stage}")
    return records


# -- per-label summary, the default method and the bar -----------------------------------------
# The sample data's label groups (sample_data/README.md): what each label depends on.
SAMPLE_GROUPS = {"cardiomegaly": "image", "effusion": "image", "copd": "note", "diabetes": "note"}
SAMPLE_GROUPS |= {"pneumonia": "both", "mass": "both"}
BARS = {  # name: (threshold, "min" = the worst label must reach it, "max" = must not exceed it)
    "pointing_game": (0.90, "min"),
    "relevance_mass": (0.60, "min"),
    "rationale_first": (0.95, "min"),
    "deletion_pixels": (0.50, "max"),
    "deletion_words": (0.50, "max"),
    "randomization_drop": (0.50, "min"),
    "note_share_image_only": (0.10, "max"),
    "note_share_note_only": (0.90, "min"),
    "seconds_per_study": (2.0, "max"),
}
IMAGE_BARS = ("pointing_game", "relevance_mass", "deletion_pixels", "randomization_drop")


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _randomization(table: pd.DataFrame, method: str, metric: str) -> Record:
    """`metric` per stage over the (study, label) pairs randomised, the trained value over the
    same pairs, and its relative fall from trained to the last stage."""
    rows = table[(table.method == method) & (table.metric == metric)]
    stages = [s for s in dict.fromkeys(rows.stage) if s != "trained"]
    if not stages:
        return {}
    randomized = set(rows.loc[rows.stage == stages[-1], "study_id"])
    means = {
        "trained": _mean(rows[(rows.stage == "trained") & rows.study_id.isin(randomized)].value)
    }
    means |= {stage: _mean(rows[rows.stage == stage].value) for stage in stages}
    first, last = means["trained"], means[stages[-1]]
    return {
        f"randomized_{metric}": means,
        "randomization_drop": 1 - last / first if first and last is not None else None,
    }


def _label_summary(table: pd.DataFrame, group: str, present: int) -> Record:
    """Means per method and metric over the label's true positives, deletion ratios, and the
    randomisation stages. A deletion ratio needs a mean random-order area of at least
    MIN_DROP / 2 (what a random order gives when deleting everything lowers the output by
    MIN_DROP): below it the deleted features are too weak evidence to judge an order (n/a)."""
    trained = table[table.stage == "trained"]
    entry: Record = {"group": group, "truly_present": present}
    entry["true_positives"] = trained.study_id.nunique()
    for (method, metric), values in trained.groupby(["method", "metric"], sort=False).value:
        entry.setdefault(method, {"n": int(values.count())})[metric] = _mean(values)
    for method, part in entry.items():
        if isinstance(part, dict) and "deletion_random" in part:
            random = part["deletion_random"]
            judged = random is not None and random >= MIN_DROP / 2
            part["deletion_ratio"] = _ratio(part["deletion_area"], random) if judged else None
        if isinstance(part, dict) and method in (*IMAGE_METHODS, "note"):
            part |= _randomization(
                table, method, "rationale_mass" if method == "note" else "relevance_mass"
            )
    return entry


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _worst(labels: Record, method: str, metric: str, direction: str, group: str = "") -> Record:
    """The worst label's value: the lowest for "min" bars, the highest for "max" bars."""
    values = {
        name: e.get(method, {}).get(metric)
        for name, e in labels.items()
        if not group or e["group"] == group
    }
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return {"label": None, "value": None}
    name = (min if direction == "min" else max)(values, key=values.get)
    return {"label": name, "value": values[name]}


def _image_worst(labels: Record, method: str) -> dict[str, Any]:
    worst = {
        "pointing_game": _worst(labels, method, "pointing_game", "min"),
        "pointing_strict": _worst(labels, method, "pointing_strict", "min"),
        "relevance_mass": _worst(labels, method, "relevance_mass", "min"),
        "mask_auroc": _worst(labels, method, "mask_auroc", "min"),
        "deletion_pixels": _worst(labels, method, "deletion_ratio", "max"),
        "randomization_drop": _worst(labels, method, "randomization_drop", "min"),
    }
    worst["bars_passed"] = sum(_passes(b, worst[b]["value"]) for b in IMAGE_BARS)
    return worst


# The label groups each bar judges: a label of them that is truly present in the split but of
# which no study was called positive has nothing explained, so the bar cannot pass over it.
BAR_GROUPS = {
    "pointing_game": ("image", "both"),
    "relevance_mass": ("image", "both"),
    "deletion_pixels": ("image", "both"),
    "randomization_drop": ("image", "both"),
    "rationale_first": ("note", "both"),
    "deletion_words": ("note", "both"),
    "note_share_image_only": ("image",),
    "note_share_note_only": ("note",),
}


def _unexplained(labels: Record, bar: str) -> list[str]:
    """The bar's labels (`BAR_GROUPS`) truly present in the split with no true positive."""
    groups = BAR_GROUPS.get(bar, ())
    return [
        name
        for name, entry in labels.items()
        if entry["group"] in groups and entry["truly_present"] and not entry["true_positives"]
    ]


def _passes(name: str, value: float | None) -> bool:
    threshold, direction = BARS[name]
    return value is not None and (value >= threshold if direction == "min" else value <= threshold)


def quality_summary(
    records: list[Record],
    labels: Sequence[str],
    counts: Record,
    split: str = "test",
    groups: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Per-label means, the worst label per metric for every image method, the default method
    (most image bars passed; ties broken by the worst label's relevance mass, then mask AUROC)
    and the bar checked with it."""
    groups = groups or SAMPLE_GROUPS
    columns = ["study_id", "label", "stage", "method", "metric", "value"]
    table = pd.DataFrame(records, columns=columns)
    present = counts.get("truly_present", {})
    per_label = {
        label: _label_summary(
            table[table.label == label], groups.get(label, ""), present.get(label, 0)
        )
        for label in labels
    }
    methods = {m: _image_worst(per_label, m) for m in IMAGE_METHODS}
    methods = {m: w for m, w in methods.items() if w["pointing_game"]["label"] is not None}

    def rank(m: str) -> tuple:
        w = methods[m]
        return (w["bars_passed"], w["relevance_mass"]["value"] or 0, w["mask_auroc"]["value"] or 0)

    trained_note = (table.stage == "trained") & (table.method == "note")
    first = table[trained_note & (table.metric == "rationale_first")]
    summary = {
        "split": split,
        **counts,
        "default_method": max(methods, key=rank) if methods else None,
        "labels": per_label,
        "image_methods": methods,
        "rationale_first_pooled": _mean(first.value),
    }
    summary["bars"] = check_bars(summary)
    return summary


def check_bars(summary: dict[str, Any], seconds_per_study: float | None = None) -> list[Record]:
    """The issue's bar, each judged on its worst label, for the summary's default method."""
    labels = summary["labels"]
    worst = dict(summary["image_methods"].get(summary["default_method"], {}))
    worst["rationale_first"] = _worst(labels, "note", "rationale_first", "min")
    worst["deletion_words"] = _worst(labels, "note", "deletion_ratio", "max")
    worst["note_share_image_only"] = _worst(labels, "modality", "note_share", "max", "image")
    worst["note_share_note_only"] = _worst(labels, "modality", "note_share", "min", "note")
    if seconds_per_study is not None:
        worst["seconds_per_study"] = {"label": None, "value": seconds_per_study}
    unmeasured = {"label": None, "value": None}  # e.g. no lesion masks: no image bar, no pass
    bars = []
    for name, (threshold, direction) in BARS.items():
        if name == "seconds_per_study" and name not in worst:
            continue
        found = worst.get(name, unmeasured)
        missed = _unexplained(labels, name)
        passed = _passes(name, found["value"]) and not missed
        bar = {"bar": name, "threshold": threshold, "direction": direction}
        bars.append(bar | found | {"unexplained": missed, "passed": passed})
    return bars
