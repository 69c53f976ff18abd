"""Explanations are measured, not just drawn: integrated gradients are complete, words map to
the note as written, maps land on the DICOM's own grid, Shapley values add up, a model that
cannot see a side gives it no credit, and the saved file loads without unpickling."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam

from clinfuse.data.batch import Batch, Collator
from clinfuse.data.dicom import DicomImage
from clinfuse.data.transforms import build_transforms, fit_geometry, to_original_grid
from clinfuse.errors import ConfigError
from clinfuse.explain import Explanation, explain
from clinfuse.explain.attribution import (
    CAM_FLOOR,
    black_image,
    gradcam_maps,
    image_integrated_gradients,
    note_integrated_gradients,
    note_words,
    reference_ids,
    token_word_weights,
)
from clinfuse.explain.explanation import decode_map
from clinfuse.explain.render import select_labels
from clinfuse.model import create_model, model_config
from clinfuse.training.trainer import fusion_loss

LABELS = ("cardiomegaly", "effusion", "copd", "diabetes", "pneumonia", "mass")
UNICODE_NOTE = "Temp 38.9 °C, SpO₂ 91% on room air. Café-au-lait spots; naïve to insulin."
NOTES = [
    "Fever and productive cough; crackles at the left base.",
    "No history of COPD. Denies fever.",
    "Type 2 diabetes on metformin. Chest pain.",
    UNICODE_NOTE,
]
STEPS = 16  # Gauss-Legendre: enough for the tiny models to be complete within 1e-2


def build(name: str = "tiny", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    # the few NOTES stand for a large training set: every word of theirs in the vocabulary
    overrides["text"] = {"min_word_patients": 1, **overrides.get("text", {})}
    return create_model(model_config(name, LABELS, **overrides), NOTES).eval()


def pixels(shape: tuple[int, ...], seed: int = 0) -> DicomImage:
    """A DICOM-like image in modality units: (1, *shape) float32, a bright blob on noise."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = np.exp(-sum((g - 0.3) ** 2 for g in grid) / 0.05)
    values = 1000 + 2000 * blob + 100 * rng.standard_normal(shape)
    return DicomImage(values[None].astype(np.float32), (1.0,) * len(shape), None, {})


def make_batch(model, studies: list[tuple[DicomImage | None, str | None]]) -> Batch:
    """Studies (image, note) -> a Batch through the real transforms and collator."""
    transforms = build_transforms(model.cfg.preprocess, model.cfg.image.in_channels)
    items = []
    for i, (image, note) in enumerate(studies):
        tensor = None if image is None else transforms({"image": image, "path": "x"})["image"]
        items.append(
            {
                "study_id": f"S{i}",
                "patient_id": f"P{i}",
                "image_path": "",
                "labels": np.zeros(len(LABELS), np.float32),
                "image": tensor,
                "note": note,
                "original_shape": None if image is None else tuple(image.pixels.shape[1:]),
                "failure": None,
            }
        )
    return Collator(model.note_tokenizer, model.cfg)(items)


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture(scope="module")
def batch(model):
    # a non-square original (100 rows x 80 columns), a study without image, one without note
    return make_batch(
        model,
        [(pixels((100, 80)), NOTES[0]), (None, UNICODE_NOTE), (pixels((96, 96), 1), None)],
    )


@pytest.fixture(scope="module")
def explained(model, batch):
    return explain(model, batch, steps=STEPS)


def logits(model, batch, **replace) -> torch.Tensor:
    args = dict(
        zip(
            ("image", "input_ids", "attention_mask", "image_present", "note_present"),
            batch.model_inputs(),
            strict=True,
        )
    )
    with torch.no_grad():
        return model(**{**args, **replace})


# -- completeness ---------------------------------------------------------------------------
def test_image_attributions_sum_to_the_logit_change_from_a_black_image(model, batch, explained):
    rows = torch.tensor([0, 2])  # the studies with an image
    inputs = tuple(t[rows] for t in batch.model_inputs())
    attr, delta = image_integrated_gradients(model, inputs, range(len(LABELS)), steps=32)
    assert attr.shape == (2, len(LABELS), 64, 64)  # (B, L, *spatial), channels summed
    gap = logits(model, batch) - logits(model, batch, image=black_image(model, batch.image))
    torch.testing.assert_close(attr.sum((-2, -1)), gap[rows], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(delta, attr.sum((-2, -1)) - gap[rows], atol=1e-4, rtol=0)
    # explain reports the same deltas: small for studies with an image, NaN without one
    assert np.abs(explained[0].delta[:, 0]).max() < 1e-2
    assert np.isnan(explained[1].delta[:, 0]).all()


def test_the_map_on_the_dicoms_own_grid_keeps_the_attributions_sum(
    model, batch, explained, tmp_path
):
    # study 0 is 100x80 rows x columns, seen by the model as 64x51 (+ padding): its map on the
    # DICOM's grid still adds up to f(x) - f(black), also after the float16 npz round trip
    inputs = tuple(t[:1] for t in batch.model_inputs())
    attr, _ = image_integrated_gradients(model, inputs, range(len(LABELS)), steps=STEPS)
    expl = explained[0]
    assert expl.image.shape == (len(LABELS), 100, 80)
    np.testing.assert_allclose(expl.image.sum((1, 2)), attr[0].sum((1, 2)), rtol=1e-3, atol=1e-5)
    loaded = Explanation.load_npz(expl.save_npz(tmp_path / "s.npz"))
    np.testing.assert_allclose(loaded.image.sum((1, 2)), expl.image.sum((1, 2)), rtol=1e-3)
    # a large radiograph: ~1e-7 a pixel, below float16's smallest number, survives the file
    big = dataclasses.replace(expl, image=expl.image.repeat(15, 1).repeat(15, 2) / 225)
    big.image[0] = 0  # a label with no image attribution stays all zero
    with np.load(big.save_npz(tmp_path / "big.npz")) as raw:
        assert raw["image"].dtype == np.float16 and np.abs(raw["image"]).max() <= 1
    loaded = Explanation.load_npz(tmp_path / "big.npz")
    np.testing.assert_allclose(loaded.image.sum((1, 2)), big.image.sum((1, 2)), rtol=1e-3)
    assert (loaded.image[0] == 0).all()
    # Grad-CAM and word scores as small (an untrained label's Grad-CAM peaked at ~5e-7): the
    # overlay the dashboard draws from the file is the map, not float16's few levels of it
    faint = dataclasses.replace(expl, gradcam=expl.gradcam * 1e-6, words=expl.words * 1e-6)
    loaded = Explanation.load_npz(faint.save_npz(tmp_path / "faint.npz"))
    for key in ("gradcam", "words"):
        saved, kept = getattr(faint, key), getattr(loaded, key)
        peak = np.abs(saved).max(axis=tuple(range(1, saved.ndim)), keepdims=True)  # per label
        assert (np.abs(kept - saved) <= 1e-3 * peak).all(), key  # float16's precision of the peak


def test_a_dicom_smaller_than_the_model_grid_keeps_the_sum_and_every_pixel(model):
    # 24x18 rows x columns seen as 64x48: mapping back shrinks, and no model pixel is skipped
    small = make_batch(model, [(pixels((24, 18)), NOTES[0])])
    [expl] = explain(model, small, methods=("ig",), steps=STEPS)
    attr, _ = image_integrated_gradients(model, small.model_inputs(), range(len(LABELS)), STEPS)
    assert expl.image.shape == (len(LABELS), 24, 18)
    np.testing.assert_allclose(expl.image.sum((1, 2)), attr[0].sum((1, 2)), rtol=1e-3, atol=1e-5)
    spike = torch.zeros(64, 64)
    spike[2, 8 + 2] = 1.0  # resized pixel (2, 2): between those bilinear resizing samples
    back = to_original_grid(spike[None], (24, 18), model.cfg.preprocess, conserve_sum=True)
    assert abs(float(back.sum()) - 1.0) < 1e-6 and float(back.max()) > 0.05


def test_padding_added_by_preprocessing_gets_no_image_attribution(model, batch):
    attr, _ = image_integrated_gradients(model, batch.model_inputs(), [0, 1], steps=STEPS)
    geometry = fit_geometry((100, 80), model.cfg.preprocess)  # 100x80 -> 64x51, padded to 64
    left, width = geometry.pad_before[1], geometry.resized[1]
    assert left > 0
    assert (attr[0, :, :, :left] == 0).all() and (attr[0, :, :, left + width :] == 0).all()


@pytest.mark.parametrize("chunked", [False, True])
def test_word_attributions_sum_to_the_logit_change_from_the_reference_note(chunked):
    text = {"max_length": 16, "long_notes": "chunk", "max_chunks": 3} if chunked else {}
    model = build(text=text)
    batch = make_batch(model, [(pixels((64, 64)), NOTES[0]), (None, UNICODE_NOTE)])
    scores, delta = note_integrated_gradients(
        model, batch.model_inputs(), range(len(LABELS)), steps=32
    )
    reference = reference_ids(model, batch.input_ids, batch.attention_mask)
    gap = logits(model, batch) - logits(model, batch, input_ids=reference)
    torch.testing.assert_close(scores.sum(-1), gap, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(delta, scores.sum(-1) - gap, atol=1e-4, rtol=0)
    # [CLS], [SEP] and padding equal the reference: they get exactly nothing
    same = (batch.input_ids == reference).unsqueeze(1).expand_as(scores)
    assert (scores[same] == 0).all()
    # merging tokens into words keeps every bit of the attribution
    for b, expl in enumerate(explain(model, batch, methods=("ig",), steps=32)):
        np.testing.assert_allclose(expl.words.sum(1), scores[b].sum(-1).numpy(), atol=1e-5)


def roberta_folder(folder) -> str:
    """A RoBERTa-family encoder as a team would bring one, built offline: byte-level BPE with
    <s>/</s>, padding id 1, positions numbered from it (66, so 64 usable)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(NOTES * 5, vocab_size=400, min_frequency=1, special_tokens=specials)
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_roberta_encoders_words_add_up_to_the_logit_change(tmp_path):
    """Its positions come from the padding id: the reference note ([PAD] for every word) must
    be read at the note's positions, and its space and line-break tokens belong to a word."""
    model = build(text={"pretrained": roberta_folder(tmp_path / "roberta"), "max_length": 64})
    note = "Fever  and productive cough;\n\ncrackles at the   left base.  "
    batch = make_batch(model, [(pixels((64, 64)), note), (None, NOTES[1])])
    scores, delta = note_integrated_gradients(
        model, batch.model_inputs(), range(len(LABELS)), steps=32
    )
    assert delta.abs().max() < 1e-3  # it was up to 0.07: more than any one word's score
    for b, expl in enumerate(explain(model, batch, methods=("ig",), steps=32)):
        np.testing.assert_allclose(expl.words.sum(1), scores[b].sum(-1).numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="66 tokens exceed the 64 positions the encoder has"):
        build(text={"pretrained": str(tmp_path / "roberta"), "max_length": 66})


# -- words and spans ------------------------------------------------------------------------
def test_words_are_spans_of_the_note_as_written_including_unicode(model):
    spans = note_words(UNICODE_NOTE)
    words = [UNICODE_NOTE[s:e] for s, e in spans]
    assert words[:8] == ["Temp", "38", ".", "9", "°", "C", ",", "SpO₂"]
    assert "Café" in words and "naïve" in words and words[-1] == "."
    assert spans.dtype == np.int32 and spans.shape == (len(words), 2)
    # every word before any cut receives tokens (accents stripped by the tokenizer, "°C" one token)
    enc = model.note_tokenizer([UNICODE_NOTE])
    weights = token_word_weights(enc.offsets[0], enc.attention_mask[0], spans)
    assert (weights.sum(0) > 0).all()
    per_token = weights.sum(1)  # (Nt,): 1 for a content token, 0 for [CLS], [SEP], padding
    real = enc.attention_mask[0].bool() & (enc.offsets[0, :, 1] > enc.offsets[0, :, 0])
    torch.testing.assert_close(per_token, real.float())
    # "°C" is one token here, split between the words "°" and "C" by characters
    degree = [i for i, (s, e) in enumerate(spans) if UNICODE_NOTE[s:e] == "°"][0]
    shared = weights[:, degree] > 0
    assert (weights[shared][:, degree + 1] > 0).all()


def test_explanation_words_index_the_original_note(explained):
    expl = explained[1]  # the unicode note
    assert expl.note == UNICODE_NOTE
    assert [expl.note[s:e] for s, e in expl.spans] == [
        UNICODE_NOTE[s:e] for s, e in note_words(UNICODE_NOTE)
    ]
    assert expl.words.shape == (len(LABELS), len(expl.spans))
    assert np.abs(expl.words).sum(0).min() > 0  # every word got some attribution


def test_words_cut_by_truncation_are_listed_with_score_zero(tmp_path):
    model = build(text={"max_length": 16})
    note = " ".join(f"word{i} fever" for i in range(30)) + " café"
    [expl] = explain(model, make_batch(model, [(None, note)]), methods=("ig",), steps=STEPS)
    words = [note[s:e] for s, e in expl.spans]
    assert words == [m for m in note.split()]  # every word of the note, beyond the cut too
    enc = model.note_tokenizer([note])
    last_char = int(enc.offsets[0, :, 1].max())  # the end of the last token the model saw
    seen = expl.spans[:, 1] <= last_char
    assert seen.sum() < len(words) // 4  # the note was cut early
    assert (expl.words[:, ~seen] == 0).all()
    assert (np.abs(expl.words[:, seen]).sum(0) > 0).all()
    # how much of the note the model read, for the reviewer: in the file and in the record
    assert expl.note_read == last_char < len(note)
    assert Explanation.load_npz(expl.save_npz(tmp_path / "cut.npz")).note_read == last_char
    assert expl.to_record()["note_read"] == last_char


def test_a_word_the_token_limit_cuts_in_two_counts_as_read():
    model = build(text={"max_length": 16})
    note = "fever " * 10 + "supercalifragilistic cough"
    enc = model.note_tokenizer([note])
    last_char = int(enc.offsets[0, :, 1].max())
    long_word = note.index("super"), note.index(" cough")
    assert long_word[0] < last_char < long_word[1]  # the model read only its first pieces
    [expl] = explain(model, make_batch(model, [(None, note)]), methods=("ig",), steps=STEPS)
    assert expl.note_read == long_word[1]  # the page shows it whole, with its score
    j = [tuple(span) for span in expl.spans].index(long_word)
    assert np.abs(expl.words[:, j]).sum() > 0 and (expl.words[:, j + 1] == 0).all()


def test_a_note_that_fits_is_read_whole_even_if_its_tokenizer_drops_its_last_character():
    model = build(text={"max_length": 64})
    notes = ["Fever, cough. Caf\ufffd", "Fever and cough.\u200b"]  # cut mid-character; a ZWSP
    for note in notes:
        enc = model.note_tokenizer([note])
        assert int(enc.offsets[0, :, 1].max()) < len(note)  # no token covers the last character
        [expl] = explain(model, make_batch(model, [(None, note)]), methods=("ig",), steps=STEPS)
        assert expl.note_read == len(note)  # not "cut at its token limit"


def test_positive_labels_fall_back_to_the_most_probable_with_a_warning(caplog):
    model = build()
    probabilities = torch.tensor([0.2, 0.7, 0.1, 0.3, 0.4, 0.6])
    model.thresholds.fill_(0.5)
    assert select_labels(model, probabilities, "positive") == ["effusion", "mass"]
    assert "no label is called" not in caplog.text
    model.thresholds.fill_(0.999)  # nothing called: the most probable, said
    assert select_labels(model, probabilities, "positive", "study 'S1'") == ["effusion"]
    assert "study 'S1': no label is called positive at the saved thresholds" in caplog.text


def test_an_accent_written_as_its_own_character_stays_in_its_word():
    note = "Fie\u0300vre re\u0301solue, toux se\u0300che."  # Unicode NFD
    words = [note[s:e] for s, e in note_words(note)]
    assert words == ["Fie\u0300vre", "re\u0301solue", ",", "toux", "se\u0300che", "."]
    masked = "Jane Doe, MRN-0042"
    masked = masked.replace("Jane", "████").replace("Doe", "███").replace("0042", "████")
    words = [masked[s:e] for s, e in note_words(masked)]
    assert words == ["████", "███", ",", "MRN", "-", "████"]  # a masked identifier: one word


MODES = ["cross_attention", "late", "image_only", "text_only"]


@pytest.mark.parametrize(
    ("backbone", "mode", "pooling"),
    [(b, m, "mean") for b in ("densenet", "resnet", "vit") for m in MODES]
    + [("densenet", "cross_attention", "label_attention")],
)
def test_every_backbone_and_fusion_mode_is_explained(backbone, mode, pooling):
    image_cfg = {"backbone": backbone, "vit_hidden": 32, "vit_heads": 2, "vit_layers": 1}
    model = build(image=image_cfg, fusion={"mode": mode, "pooling": pooling})
    batch = make_batch(model, [(pixels((72, 64)), NOTES[1]), (pixels((64, 64), 3), None)])
    labels = ["copd", "mass"]
    first, second = explain(model, batch, labels=labels, steps=4)
    sees_image, sees_note = mode != "text_only", mode != "image_only"
    assert (first.image is not None, first.words is not None) == (sees_image, sees_note)
    assert (first.attention is not None) == (mode == "cross_attention")
    if sees_image:
        assert first.image.shape == first.gradcam.shape == (2, 72, 64)
        assert np.isfinite(first.image).all() and np.isfinite(first.gradcam).all()
    if sees_note:
        assert first.words.shape == (2, len(first.spans)) and np.isfinite(first.words).all()
    assert second.words is None and second.spans is None and second.note is None
    for expl in (first, second):
        assert np.isfinite(expl.modality).all() and np.isfinite(expl.probabilities).all()


@pytest.mark.parametrize("backbone", ["densenet", "resnet", "vit"])
def test_gradcam_sharpens_the_last_map_with_the_stages_at_two_and_four_times_its_resolution(
    backbone,
):
    model = build(image={"backbone": backbone, "vit_hidden": 32, "vit_heads": 2, "vit_layers": 1})
    encoder = model.image_encoder
    layers = encoder.cam_layers()
    assert layers[0] is encoder.backbone
    if backbone == "vit":  # one resolution throughout: the last map alone
        assert len(layers) == 1
        return
    grids = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: grids.append(tuple(out.shape[2:])))
        for layer in layers[1:]
    ]
    with torch.no_grad():
        encoder(torch.zeros(1, 1, *model.cfg.preprocess.spatial_size))
    for hook in hooks:
        hook.remove()
    assert sorted(grids) == sorted(tuple(f * g for g in encoder.grid) for f in (2, 4))


def test_gradcam_keeps_the_coarse_maps_support_and_order_where_finer_maps_are_zero(model, batch):
    rows = torch.tensor([0, 2])  # the studies with an image
    image, *rest = (t[rows] for t in batch.model_inputs())
    layers = model.image_encoder.cam_layers()
    spatial = tuple(model.cfg.preprocess.spatial_size)
    cam = gradcam_maps(model, (image, *rest), [4])[:, 0]  # (2, *spatial)
    coarse = LayerGradCam(model, layers[0]).attribute(
        image, target=4, additional_forward_args=tuple(rest), relu_attributions=True
    )
    coarse = LayerAttribution.interpolate(coarse.detach(), spatial, "bilinear")[:, 0]
    assert len(layers) == 3 and (coarse > 0).any()
    assert torch.equal(cam > 0, coarse > 0)  # no pixel of the coarse map is zeroed
    ratio = cam[coarse > 0] / coarse[coarse > 0]  # each finer map scales by [floor, 1 + floor]
    assert ratio.min() >= CAM_FLOOR**2 * (1 - 1e-4)
    assert ratio.max() <= (1 + CAM_FLOOR) ** 2 * (1 + 1e-4)


# -- maps on the DICOM grid -----------------------------------------------------------------
def test_image_maps_have_the_original_image_shape(explained):
    expl, square, no_image = explained[0], explained[2], explained[1]
    assert expl.image.shape == expl.gradcam.shape == (len(LABELS), 100, 80)
    assert square.image.shape == (len(LABELS), 96, 96)
    assert (expl.gradcam >= 0).all() and expl.gradcam.max() > 0  # Grad-CAM is ReLU'd
    assert np.abs(expl.image).max() > 0
    assert no_image.image is None and no_image.gradcam is None and no_image.attention is None


def test_volume_maps_have_the_original_volume_shape():
    model = build("tiny-3d")
    batch = make_batch(model, [(pixels((20, 40, 36)), NOTES[2])])
    [expl] = explain(model, batch, labels=["diabetes", "mass"], steps=8)
    assert expl.image.shape == expl.gradcam.shape == (2, 20, 40, 36)
    assert expl.attention.shape == (len(expl.spans), *model.image_encoder.grid)


def test_each_word_attends_to_a_distribution_over_the_image_grid(model, explained):
    expl = explained[0]
    assert expl.attention.shape == (len(expl.spans), *model.image_encoder.grid)
    np.testing.assert_allclose(expl.attention.sum((1, 2)), 1.0, atol=1e-5)


# -- modality Shapley -----------------------------------------------------------------------
def test_shapley_values_add_up_to_both_minus_neither(model, batch, explained):
    off = torch.zeros(len(batch), dtype=torch.bool)
    both = logits(model, batch)
    image_only = logits(model, batch, note_present=off)
    note_only = logits(model, batch, image_present=off)
    neither = logits(model, batch, image_present=off, note_present=off)
    for b, expl in enumerate(explained):
        phi_image, phi_note, interaction = torch.from_numpy(expl.modality).T
        torch.testing.assert_close(phi_image + phi_note, both[b] - neither[b])
        torch.testing.assert_close(interaction, both[b] - image_only[b] - note_only[b] + neither[b])
        torch.testing.assert_close(
            torch.from_numpy(expl.probabilities), model.probabilities(both)[b]
        )
    assert (explained[1].modality[:, 0] == 0).all()  # no image: the image gets nothing
    assert (explained[2].modality[:, 1] == 0).all()  # no note: the note gets nothing


def test_a_model_blind_to_a_side_gives_that_side_no_credit():
    studies = [(pixels((64, 64)), NOTES[0]), (pixels((80, 64), 2), NOTES[2])]
    text_only = build(fusion={"mode": "text_only"})
    for expl in explain(text_only, make_batch(text_only, studies), steps=STEPS):
        assert expl.image is None and expl.gradcam is None and expl.attention is None
        np.testing.assert_allclose(expl.modality[:, [0, 2]], 0, atol=1e-6)
        assert np.abs(expl.modality[:, 1]).max() > 1e-3 and np.abs(expl.words).max() > 0
    image_only = build(fusion={"mode": "image_only"})
    for expl in explain(image_only, make_batch(image_only, studies), steps=STEPS):
        assert expl.words is None and expl.attention is None
        np.testing.assert_allclose(expl.modality[:, [1, 2]], 0, atol=1e-6)
        assert np.abs(expl.modality[:, 0]).max() > 1e-3 and np.abs(expl.image).max() > 0


def test_a_label_learned_from_the_note_gets_its_credit_from_the_note():
    """Cross-attention trained briefly on a note-only label: the note's Shapley share wins."""
    torch.manual_seed(0)
    vocab = ["copd", "asthma", "fever", "cough", "diabetes", "chest", "pain", "left", "right"]
    notes = [" ".join(vocab[(i * 7 + k) % len(vocab)] for k in range(4)) for i in range(48)]
    target = torch.tensor([[float("copd" in n)] for n in notes])
    cfg = model_config("tiny", ["copd"], fusion={"dropout": 0.0, "modality_dropout": 0.3})
    model = create_model(cfg, notes)
    batch = make_batch(model, [(pixels((64, 64), i), n) for i, n in enumerate(notes)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch.labels = target
    for _ in range(30):  # the training loss, side heads included
        loss = fusion_loss(model, batch, torch.ones(1), cfg.fusion.side_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.train()
    explanations = explain(model, batch, methods=("shapley",))
    assert model.training  # explain puts the model back in the mode it found it in
    modality = np.stack([e.modality[0] for e in explanations])  # (B, 3)
    share = np.abs(modality[:, 1]) / (np.abs(modality[:, :2]).sum(1) + 1e-9)
    assert np.median(share) > 0.8 and share.min() > 0.5  # untrained: median about 0.4


# -- labels, files, records -----------------------------------------------------------------
def test_labels_pick_and_order_the_explained_labels(model, batch, explained):
    [first] = explain(model, batch, labels=["copd", "cardiomegaly"], steps=STEPS)[:1]
    assert first.labels == ("copd", "cardiomegaly")
    np.testing.assert_allclose(first.modality, explained[0].modality[[2, 0]], atol=1e-6)
    np.testing.assert_allclose(first.image, explained[0].image[[2, 0]], atol=1e-5)
    with pytest.raises(ConfigError, match="no label 'asthma'"):
        explain(model, batch, labels=["asthma"])
    for wrong in ("copd", []):  # a bare name is not read letter by letter; none is no request
        with pytest.raises(ConfigError, match="need a list of label names"):
            explain(model, batch, labels=wrong)


def test_explain_works_inside_a_scoring_loops_inference_mode(model, explained):
    # a caller scoring under inference_mode (as the pipeline does) explains the same way,
    # also a batch whose tensors were made in that mode
    with torch.inference_mode():
        again = make_batch(model, [(pixels((100, 80)), NOTES[0])])
        [inside] = explain(model, again, steps=STEPS)
    np.testing.assert_allclose(inside.image, explained[0].image, atol=1e-5)
    np.testing.assert_allclose(inside.words, explained[0].words, atol=1e-5)


def test_npz_round_trip_without_pickle(explained, tmp_path):
    expl = explained[0]
    expl.model_version = "tiny@test"
    path = expl.save_npz(tmp_path / f"{expl.study_id}.npz")
    with np.load(path, allow_pickle=False) as data:
        assert data["labels"].tolist() == list(LABELS)
        assert data["image"].dtype == np.float16 and data["image"].shape == (len(LABELS), 100, 80)
        assert data["gradcam"].dtype == np.float16
        assert data["spans"].dtype == np.int32 and data["spans"].shape == expl.spans.shape
        assert data["words"].dtype == np.float16 and data["words"].shape == expl.words.shape
        assert data["modality"].dtype == np.float32 and data["modality"].shape == (6, 3)
        assert str(data["note"]) == NOTES[0]
    back = Explanation.load_npz(path)
    assert (back.study_id, back.labels, back.note) == (expl.study_id, expl.labels, expl.note)
    assert back.model_version == "tiny@test"
    np.testing.assert_array_equal(back.spans, expl.spans)
    np.testing.assert_array_equal(back.modality, expl.modality)
    np.testing.assert_allclose(back.image, expl.image, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(back.words, expl.words, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(back.attention, expl.attention)
    # absent parts are absent keys, and come back as None
    no_image, no_note = explained[1], explained[2]
    for part, missing in ((no_image, {"image", "gradcam"}), (no_note, {"words", "spans", "note"})):
        path = part.save_npz(tmp_path / f"{part.study_id}.npz")
        with np.load(path, allow_pickle=False) as data:
            assert not missing & set(data.files)
        back = Explanation.load_npz(path)
        assert all(getattr(back, key) is None for key in missing)


def test_a_nan_pixel_does_not_wipe_a_saved_map(tmp_path):
    """Tiny values (as on a large DICOM) are saved over their peak: a NaN made the peak 1."""
    from clinfuse.explain.explanation import peak_scaled

    values = np.full((1, 40, 30), 1e-8, np.float32)
    values[0, 5:8] = np.nan
    scaled, peak = peak_scaled(values)
    assert peak[0] == pytest.approx(1e-8) and np.nanmax(scaled.astype(np.float16)) == 1.0


def test_record_is_compact_json(explained):
    record = explained[0].to_record()
    text = json.dumps(record, allow_nan=False)
    assert len(text) < 60_000
    image = decode_map(record["image"])
    assert image.shape == (len(LABELS), 64, 51) and record["image"]["original_shape"] == [100, 80]
    assert set(record["top_words"]) == set(LABELS)
    start, end, score = record["top_words"]["copd"][0]
    assert NOTES[0][start:end].strip() and score == max(explained[0].words[2], key=lambda w: abs(w))
    assert json.loads(json.dumps(explained[2].to_record()))["top_words"] == {}
