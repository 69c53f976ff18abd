"""`explain(model, batch)`: per study and label, why the model scored it as it did.

Four explanations, each computed for a whole batch of studies at once:

- image: integrated gradients on the image input from a black image (captum
  `IntegratedGradients`), summed over channels and put back on the DICOM's own pixel grid;
  and Grad-CAM on the image encoder's last feature map (captum `LayerGradCam`);
- note: layer integrated gradients over the word embeddings from a [CLS] [PAD]... [SEP]
  reference (captum `LayerIntegratedGradients`), token scores merged into the words of the
  note as written, each with its character span;
- modality: exact two-player Shapley values of image and note from four forward passes through
  the model's missing-modality path, plus their interaction;
- attention: what each word read in the image, from the fusion blocks' cross-attention.

Integrated gradients are complete: a label's image attributions sum (on the model grid, and on
the DICOM's grid they are mapped back to) to f(x) - f(black image), its word attributions to
f(x) - f(reference note), up to the convergence delta kept in `Explanation.delta`. All values
are in logit units.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import (
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    LayerIntegratedGradients,
)
from torch import nn

from clinfuse.data.batch import Batch
from clinfuse.data.identifiers import MASK
from clinfuse.data.transforms import to_original_grid
from clinfuse.errors import ConfigError
from clinfuse.explain.explanation import CAM_FLOOR, Explanation
from clinfuse.model.model import FusionModel

METHODS = ("ig", "gradcam", "shapley", "attention")
# a word: a run of \w characters with the combining marks among them (an accent written as its
# own character, Unicode NFD: "re\u0301sume\u0301"), a masked identifier (a run of `MASK`), or
# one punctuation mark
MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
WORD = re.compile(rf"\w[\w{MARKS}]*|{MASK}+|[^\w\s]")

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class BatchAttributions:
    """Every explanation of a batch as tensors on the CPU, before it is split into studies."""

    probabilities: torch.Tensor  # (B, L)
    modality: torch.Tensor  # (B, L, 3) Shapley image, note, interaction; NaN if not asked for
    image: torch.Tensor | None  # (B, L, *spatial) integrated gradients on the model grid
    gradcam: torch.Tensor | None  # (B, L, *spatial)
    tokens: torch.Tensor | None  # (B, L, Nt) integrated gradients per token
    attention: torch.Tensor | None  # (B, Nt, *grid) text->image cross-attention
    delta: torch.Tensor  # (B, L, 2) convergence deltas (image, note); NaN = not computed


def explain(
    model: FusionModel,
    batch: Batch,
    labels: Sequence[str] | None = None,
    *,
    steps: int = 32,
    internal_batch_size: int = 64,
    methods: Collection[str] = METHODS,
    model_version: str = "",
) -> list[Explanation]:
    """One `Explanation` per study of `batch` for `labels` (None = every model label)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown explanation methods {sorted(unknown)}; known: {METHODS}")
    targets = label_indices(model, labels)
    if len(batch) == 0:
        return []
    batch = batch.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    # the methods need gradients, also when the caller scores under no_grad or inference_mode
    try:
        with torch.inference_mode(False), torch.enable_grad():
            if any(isinstance(v, torch.Tensor) and v.is_inference() for v in vars(batch).values()):
                batch = batch.select(range(len(batch)))  # copies autograd may record
            found = attribute_batch(model, batch, targets, steps, internal_batch_size, methods)
    finally:
        model.train(was_training)
    names = tuple(model.labels[t] for t in targets)
    return [
        _study_explanation(model, batch, b, names, found, model_version) for b in range(len(batch))
    ]


def attribute_batch(
    model: FusionModel,
    batch: Batch,
    targets: Sequence[int],
    steps: int = 32,
    internal_batch_size: int = 64,
    methods: Collection[str] = METHODS,
) -> BatchAttributions:
    """Run the asked-for methods over the batch (model in eval mode, on the batch's device)."""
    B, L = len(batch), len(targets)
    inputs: Inputs = batch.model_inputs()  # type: ignore[assignment]
    logits, shapley = modality_shapley(model, inputs)  # (B, L_all), (B, L_all, 3)
    found = BatchAttributions(
        probabilities=model.probabilities(logits)[:, targets].cpu(),
        modality=(
            shapley[:, targets].cpu() if "shapley" in methods else torch.full((B, L, 3), np.nan)
        ),
        image=None,
        gradcam=None,
        tokens=None,
        attention=None,
        delta=torch.full((B, L, 2), np.nan),
    )
    image_rows = batch.image_present.nonzero().flatten() if model.uses_image else []
    note_rows = batch.note_present.nonzero().flatten() if model.uses_text else []
    if "ig" in methods and len(image_rows):
        attr, delta = image_integrated_gradients(
            model, _rows(inputs, image_rows), targets, steps, internal_batch_size
        )  # (R, L, *spatial), (R, L)
        found.image = _scatter(attr.cpu(), image_rows.cpu(), B)  # (B, L, *spatial)
        found.delta[image_rows.cpu(), :, 0] = delta.cpu()
    if "gradcam" in methods and len(image_rows):
        cam = gradcam_maps(model, _rows(inputs, image_rows), targets)  # (R, L, *spatial)
        found.gradcam = _scatter(cam.cpu(), image_rows.cpu(), B)
    if "ig" in methods and len(note_rows):
        scores, delta = note_integrated_gradients(
            model, _rows(inputs, note_rows), targets, steps, internal_batch_size
        )  # (R, L, Nt), (R, L)
        found.tokens = _scatter(scores.cpu(), note_rows.cpu(), B)  # (B, L, Nt)
        found.delta[note_rows.cpu(), :, 1] = delta.cpu()
    if "attention" in methods and model.fusion is not None:
        found.attention = word_attention(model, inputs).cpu()  # (B, Nt, *grid)
    return found


def _study_explanation(
    model: FusionModel,
    batch: Batch,
    b: int,
    labels: tuple[str, ...],
    found: BatchAttributions,
    model_version: str,
) -> Explanation:
    """Study b's slice of the batch's attributions, on its own image grid and note words."""
    has_image = bool(batch.image_present[b]) and model.uses_image
    original = batch.original_shapes[b] or tuple(model.cfg.preprocess.spatial_size)
    note = batch.notes[b] if bool(batch.note_present[b]) else None
    spans = weights = note_read = None
    if note is not None:
        spans = note_words(note)  # (N, 2)
        offsets, mask = batch.offsets[b].cpu(), batch.attention_mask[b].cpu()
        special = torch.isin(batch.input_ids[b].cpu(), frame_ids(model))  # (Nt,) bool
        weights = token_word_weights(offsets, mask, spans, special)
        note_read = int(offsets[mask.bool(), 1].max()) if mask.any() else 0
        # a word the token limit cut in two counts as read (it is scored by the pieces read)
        cut = (spans[:, 0] < note_read) & (spans[:, 1] > note_read)
        note_read = int(spans[cut, 1].max()) if cut.any() else note_read
        if batch.note_truncated is not None and not bool(batch.note_truncated[b]):
            # all of it fitted: what follows its last token is what the tokenizer drops (a
            # zero-width space, a replacement character), not a part left unread
            note_read = len(note)

    def on_original_grid(maps: torch.Tensor | None, conserve_sum: bool) -> np.ndarray | None:
        if maps is None or not has_image:
            return None
        spec = model.cfg.preprocess
        return to_original_grid(maps[b], original, spec, conserve_sum).numpy()  # (L, *orig)

    words = attention = None
    if weights is not None and found.tokens is not None:
        words = (found.tokens[b] @ weights).numpy()  # (L, Nt) @ (Nt, N) -> (L, N)
    if weights is not None and found.attention is not None and has_image:
        attention = _words_attention(found.attention[b], weights)  # (N, *grid)
    return Explanation(
        study_id=batch.study_ids[b],
        labels=labels,
        probabilities=found.probabilities[b].numpy().astype(np.float32),
        image=on_original_grid(found.image, conserve_sum=True),  # still sums to the change
        gradcam=on_original_grid(found.gradcam, conserve_sum=False),
        note=note,
        spans=spans,
        words=words,
        modality=found.modality[b].numpy().astype(np.float32),
        attention=attention,
        delta=found.delta[b].numpy().astype(np.float32),
        model_version=model_version,
        note_read=note_read,
    )


def label_indices(model: FusionModel, labels: Sequence[str] | None) -> list[int]:
    """Positions of `labels` among the model's labels (all of them for None)."""
    if labels is None:
        return list(range(len(model.labels)))
    if isinstance(labels, str) or not labels:
        raise ConfigError(
            "labels",
            f"need a list of label names, not {labels!r}",
            hint=f"e.g. [{model.labels[0]!r}], or None for all: {', '.join(model.labels)}",
        )
    missing = [name for name in labels if name not in model.labels]
    if missing:
        raise ConfigError(
            "labels",
            f"the model has no label {missing[0]!r}",
            hint=f"its labels: {', '.join(model.labels)}",
        )
    return [model.labels.index(name) for name in labels]


# -- modality -------------------------------------------------------------------------------
@torch.no_grad()
def modality_shapley(model: FusionModel, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, L) and exact Shapley values (B, L, 3): image, note, interaction.

    Four forward passes in one batch toggle each side through the missing-modality path; a side
    the study lacks stays absent, so its value is 0. phi_image + phi_note = f(both) - f(neither).
    """
    image, ids, mask, image_present, note_present = inputs
    off = torch.zeros_like(image_present)
    image_on = torch.cat([image_present, image_present, off, off])  # (4B,)
    note_on = torch.cat([note_present, off, note_present, off])  # (4B,)
    logits = model(
        image.repeat(4, *[1] * (image.dim() - 1)),
        ids.repeat(4, 1),
        mask.repeat(4, 1),
        image_on,
        note_on,
    )  # (4B, L)
    both, image_only, note_only, neither = logits.float().chunk(4)  # each (B, L)
    phi_image = 0.5 * ((image_only - neither) + (both - note_only))
    phi_note = 0.5 * ((note_only - neither) + (both - image_only))
    interaction = both - image_only - note_only + neither
    return both, torch.stack([phi_image, phi_note, interaction], dim=-1)  # (B, L, 3)


# -- image ----------------------------------------------------------------------------------
def black_image(model: FusionModel, image: torch.Tensor) -> torch.Tensor:
    """The integrated-gradients baseline: a black image after normalisation, like `image`."""
    mean, std = model.cfg.preprocess.normalize
    return torch.full_like(image, (0.0 - mean) / std)


def image_integrated_gradients(
    model: FusionModel,
    inputs: Inputs,
    targets: Sequence[int],
    steps: int = 32,
    internal_batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attributions (B, L, *spatial) on the model grid, summed over channels, and deltas (B, L).

    Per label the attributions sum to f(image) - f(black image) + delta, the note held fixed.
    """
    image, *rest = inputs
    ig = IntegratedGradients(model)
    maps, deltas = [], []
    for target in targets:
        attr, delta = ig.attribute(
            image,
            baselines=black_image(model, image),
            target=target,
            additional_forward_args=tuple(rest),
            n_steps=steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )  # (B, C, *spatial), (B,)
        maps.append(attr.detach().sum(1))  # (B, *spatial)
        deltas.append(delta.detach())
    return torch.stack(maps, 1).float(), torch.stack(deltas, 1).float()


def gradcam_maps(model: FusionModel, inputs: Inputs, targets: Sequence[int]) -> torch.Tensor:
    """Multi-scale Grad-CAM (B, L, *spatial): the ReLU'd Grad-CAM of the backbone's last
    feature map, scaled by those of its last stages at twice and four times the resolution
    (one layer for a trunk without such stages, e.g. a ViT), each upsampled. The coarse map
    says which region, the finer ones where in it: a finer map weighs each pixel by its value
    over its peak plus `CAM_FLOOR`, so the product peaks where all scales agree (within the
    pointing game's tolerance on the sample data's small lesions, where the coarse map's peaks
    sit on its cell centres) while pixels a finer map leaves at zero keep the coarse map's
    order (a plain product zeroes them, and deleting a large lesion such as an enlarged heart
    then falls back to random order)."""
    image, *rest = inputs
    spatial = tuple(model.cfg.preprocess.spatial_size)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    layers = model.image_encoder.cam_layers()
    maps = []
    for target in targets:
        product = None
        for layer in layers:
            grid_map = LayerGradCam(model, layer).attribute(
                image, target=target, additional_forward_args=tuple(rest), relu_attributions=True
            )  # (B, 1, *grid of the layer)
            upsampled = LayerAttribution.interpolate(grid_map.detach(), spatial, mode)[:, 0]
            if product is None:
                product = upsampled  # (B, *spatial)
                continue
            peak = upsampled.flatten(1).amax(1).clamp(min=1e-12)  # (B,)
            weight = upsampled / peak.view(-1, *[1] * len(spatial)) + CAM_FLOOR  # (B, *spatial)
            product = product * weight
        maps.append(product)
    return torch.stack(maps, 1).float()  # (B, L, *spatial)


# -- note -----------------------------------------------------------------------------------
def frame_ids(model: FusionModel) -> torch.Tensor:
    """The ids of the tokens that frame a note rather than read it: [CLS], [SEP] (<s>, </s>)
    and padding. Not [UNK]: it stands for a word of the note."""
    tokenizer = model.note_tokenizer.tokenizer
    names = ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
    return torch.tensor(sorted({i for n in names if (i := getattr(tokenizer, n)) is not None}))


def reference_ids(model: FusionModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, Nt) ids -> the reference note: [CLS] and [SEP] kept in place, every other token [PAD]."""
    pad = model.note_tokenizer.tokenizer.pad_token_id
    keep = (mask == 0) | torch.isin(ids, frame_ids(model).to(ids.device))
    return torch.where(keep, ids, torch.full_like(ids, pad))


def note_integrated_gradients(
    model: FusionModel,
    inputs: Inputs,
    targets: Sequence[int],
    steps: int = 32,
    internal_batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores (B, L, Nt), summed over the embedding, and deltas (B, L).

    Per label the scores sum to f(note) - f(reference note) + delta, the image held fixed; the
    reference differs from the note only at content tokens, so [CLS], [SEP] and padding score 0.
    """
    image, ids, mask, image_present, note_present = inputs
    B = ids.shape[0]
    reference = reference_ids(model, ids, mask)

    def forward(ids: torch.Tensor, image: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return model(image, ids, *rest)  # the token ids first: captum attributes to them

    lig = LayerIntegratedGradients(forward, model.text_encoder.embeddings)
    extra = (image, mask, image_present, note_present)
    scores = []
    with _fixed_output(model.image_encoder, image):  # the image is held fixed: encode it once
        for target in targets:
            attr = lig.attribute(
                ids,
                baselines=reference,
                target=target,
                additional_forward_args=extra,
                n_steps=steps,
                internal_batch_size=internal_batch_size,
            )  # (B*K, T, H): one row per window of max_length tokens
            scores.append(attr.detach().float().sum(-1).reshape(B, -1))  # (B, K*T)
        # the delta by hand: captum's compares per-window rows with per-study outputs
        with torch.no_grad():
            gap = forward(ids, *extra) - forward(reference, *extra)  # (B, L_all)
    scores_t = torch.stack(scores, 1)  # (B, L, Nt)
    return scores_t, scores_t.sum(-1) - gap[:, list(targets)].float()


@contextmanager
def _fixed_output(module: nn.Module | None, inputs: torch.Tensor) -> Iterator[None]:
    """Within the block, `module` returns its output for `inputs` (B, ...) without recomputing it.

    Captum evaluates the B studies n times over, stacked step by step, so a call on (n*B, ...)
    rows gets the B outputs tiled n times; any other call runs the module as usual. With the
    image fixed, the image encoder (most of a forward pass) then runs once, not once a step.
    """
    if module is None:
        yield
        return
    with torch.no_grad():
        cached = module(inputs)  # (B, ...)
    B = cached.shape[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, left = divmod(x.shape[0], B)
        tiled = left == 0 and all(torch.equal(x[i * B : (i + 1) * B], inputs) for i in range(n))
        if not tiled:
            return type(module).forward(module, x)
        return cached.repeat(n, *[1] * (cached.dim() - 1))  # (n*B, ...)

    module.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del module.forward


def note_words(note: str) -> np.ndarray:
    """(N, 2) int32 [start, end) of each word (`WORD`): a run of \\w characters and combining
    marks, or one punctuation mark."""
    spans = [m.span() for m in WORD.finditer(note)]
    return np.asarray(spans, dtype=np.int32).reshape(len(spans), 2)


def token_word_weights(
    offsets: torch.Tensor,
    mask: torch.Tensor,
    spans: np.ndarray,
    special: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Nt, N): the share of each token's characters falling in each word.

    `offsets` (Nt, 2) are the tokenizer's character spans in the original note; special
    tokens (`special` (Nt,) bool) and padding (masked) get a zero row. A token inside one word
    gives it all its score; one spanning two words (e.g. "°c") splits it by characters; a read
    token on no word's characters (a byte-level BPE tokenizer's space or line-break token)
    gives it to the next word (the last one, at the note's end), so the words' scores add up
    to the tokens'. Words the truncation cut away have a zero column.
    """
    size = max(int(spans[:, 1].max(initial=0)), int(offsets[:, 1].max()) if len(offsets) else 0)
    char_word = np.full(size, -1)
    for i, (start, end) in enumerate(spans):
        char_word[start:end] = i  # (chars,) word index of each character, -1 = space
    weights = np.zeros((offsets.shape[0], len(spans)), np.float32)
    for t, (start, end) in enumerate(offsets.tolist()):
        if not mask[t] or (special is not None and bool(special[t])):
            continue
        hit = char_word[start:end] if end > start else char_word[:0]
        hit = hit[hit >= 0]
        if hit.size:
            weights[t] = np.bincount(hit, minlength=len(spans)) / hit.size
        elif special is not None and len(spans):  # spaces alone: the next word's
            weights[t, min(int(np.searchsorted(spans[:, 0], start)), len(spans) - 1)] = 1.0
    return torch.from_numpy(weights)


# -- attention ------------------------------------------------------------------------------
@torch.no_grad()
def word_attention(model: FusionModel, inputs: Inputs) -> torch.Tensor:
    """Text->image cross-attention averaged over heads and blocks: (B, Nt, *grid)."""
    out = model.forward_intermediates(*inputs, need_weights=True)
    maps = torch.stack([a.text_to_image for a in out.attention]).mean(0)  # (B, Nt, Ni)
    return maps.reshape(*maps.shape[:2], *model.image_encoder.grid).float()


def _words_attention(attention: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    """(Nt, *grid) token maps, (Nt, N) weights -> (N, *grid): each word the mean of its tokens."""
    flat = attention.flatten(1)  # (Nt, Ni)
    totals = weights.sum(0).clamp(min=1e-12)[:, None]  # (N, 1); 0-token words stay 0
    words = (weights.T @ flat) / totals  # (N, Ni)
    return words.reshape(weights.shape[1], *attention.shape[1:]).numpy().astype(np.float32)


# -- rows -----------------------------------------------------------------------------------
def _rows(inputs: Inputs, rows: torch.Tensor) -> Inputs:
    """The model inputs of some studies only."""
    return tuple(t[rows] for t in inputs)  # type: ignore[return-value]


def _scatter(values: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """(R, ...) values of `rows` -> (B, ...) with zeros elsewhere."""
    full = values.new_zeros(B, *values.shape[1:])
    full[rows] = values
    return full
