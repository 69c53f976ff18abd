"""The fusion model: one contract over every registered architecture, plus the behaviours a
user relies on (missing sides, masks, residual path, baselines, checkpoint, configs)."""

import json
import shutil

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from clinfuse.config import ModelConfig, apply_overrides, parse_config
from clinfuse.errors import ConfigError, ModelFolderError
from clinfuse.evaluation.calibration import fit_evidence_weights
from clinfuse.explain.attribution import modality_shapley
from clinfuse.model import (
    create_model,
    list_models,
    load_checkpoint,
    model_config,
    save_checkpoint,
)
from clinfuse.model.image_encoder import ImageEncoder
from clinfuse.model.model import FusionModel
from clinfuse.model.text_encoder import train_tokenizer
from clinfuse.training.trainer import warn_dropped_sides

LABELS = ("pneumonia", "copd", "effusion")
NOTES = [
    "Fever and productive cough; crackles at the left base.",
    "No history of COPD. Denies fever.",
    "Type 2 diabetes on metformin. Chest pain.",
    "Emphysema on home oxygen, evaluate for effusion.",
]
MODES = ("cross_attention", "late", "image_only", "text_only")


def inputs(model, notes=(NOTES[0], None, NOTES[1]), image_present=(True, True, False), seed=0):
    torch.manual_seed(seed)
    enc = model.note_tokenizer(list(notes))
    image = torch.randn(len(notes), model.cfg.image.in_channels, *model.cfg.preprocess.spatial_size)
    present = torch.tensor(image_present)
    return image, enc.input_ids, enc.attention_mask, present, enc.note_present


def build(name="tiny", **overrides):
    # the four NOTES stand for a large training set: every word of theirs in the vocabulary
    overrides["text"] = {"min_word_patients": 1, **overrides.get("text", {})}
    return create_model(model_config(name, LABELS, **overrides), NOTES)


def contract_model(name, mode):
    """A registered architecture in a fusion mode; 2D ones at 64x64 to keep the test small."""
    overrides = {"fusion": {"mode": mode}}
    if model_config(name, LABELS).image.spatial_dims == 2:
        overrides["preprocess"] = {"spatial_size": (64, 64)}
    return build(name, **overrides)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_and_mode_meets_the_contract(name, mode, tmp_path):
    """timm-style contract: logits (B, L), finite, every parameter gets a gradient, padding
    never changes a prediction, save -> load gives identical outputs."""
    model = contract_model(name, mode).train()
    # one study with both sides, one without a note, one without an image
    args = inputs(model)
    logits = model(*args)
    assert logits.shape == (3, len(LABELS))
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    # with side heads a one-sided study is answered by its side's own head, so the learned
    # stand-ins (and the prior, trained by the side loss) only serve a study with neither side;
    # a naive-Bayes head subtracts the prior from every two-sided answer
    stand_ins = ["missing_image", "missing_text", "prior"] if model.side_heads is not None else []
    if model.cfg.fusion.combine == "naive_bayes":
        stand_ins = [n for n in stand_ins if n != "prior"]
    assert no_grad == [n for n in stand_ins if hasattr(model, n) and getattr(model, n) is not None]

    model.eval()
    image, ids, mask, image_present, note_present = args
    expected = model(*args)
    ids2 = torch.where(mask.bool(), ids, torch.randint(5, 50, ids.shape))
    torch.testing.assert_close(model(image, ids2, mask, image_present, note_present), expected)
    save_checkpoint(model, tmp_path / "m")
    torch.testing.assert_close(load_checkpoint(tmp_path / "m")(*args), expected)


@pytest.mark.parametrize("mode", MODES)
def test_every_fusion_mode_meets_the_contract_and_uses_only_its_sides(mode):
    model = build(fusion={"mode": mode}).eval()
    args = inputs(model, image_present=(True, True, True))
    out = model.forward_intermediates(*args)
    assert out.logits.shape == (3, len(LABELS))
    assert out.image_used.tolist() == [mode != "text_only"] * 3
    assert out.note_used.tolist() == [mode != "image_only", False, mode != "image_only"]
    changed_image = (args[0] + 5.0, *args[1:])
    moved = not torch.allclose(model(*changed_image), out.logits)
    assert moved == (mode != "text_only")


@pytest.mark.parametrize(
    ("backbone", "spatial_dims", "channels", "size", "tokens"),
    [
        ("densenet", 2, 1, (64, 64), 64),  # stem /4, one transition /2: 64 / 8 -> 8x8
        ("densenet", 2, 3, (64, 96), 96),  # any channel count, non-square grid: 8x12
        ("densenet", 3, 1, (16, 32, 32), 2 * 4 * 4),
        ("resnet", 2, 1, (64, 64), 4),  # stem /4 and three strided stages: 64 / 32 -> 2x2
        ("resnet", 3, 2, (64, 64, 64), 8),
        ("vit", 2, 1, (64, 64), 16),  # 16x16 patches
    ],
)
def test_image_encoder_turns_any_backbone_into_tokens(
    backbone, spatial_dims, channels, size, tokens
):
    cfg = model_config(
        "tiny",
        LABELS,
        image={
            "backbone": backbone,
            "spatial_dims": spatial_dims,
            "in_channels": channels,
            "vit_hidden": 32,
            "vit_heads": 2,
            "vit_layers": 1,
        },
    )
    encoder = ImageEncoder(cfg.image, size, width=32)
    out = encoder(torch.randn(2, channels, *size))
    assert out.shape == (2, tokens, 32)
    assert encoder.num_tokens == tokens


def test_an_absent_side_is_ignored_whatever_its_tensor_holds():
    model = build().eval()
    image, ids, mask, image_present, note_present = inputs(model)
    logits = model(image, ids, mask, image_present, note_present)
    # study 2 has no image: its image tensor's content must not matter
    noisy = image.clone()
    noisy[2] = torch.randn_like(noisy[2]) * 100
    # study 1 has no note: its token ids must not matter
    ids2 = ids.clone()
    ids2[1] = torch.randint(5, 50, ids2[1].shape)
    mask2 = mask.clone()
    mask2[1] = 1
    again = model(noisy, ids2, mask2, image_present, note_present)
    torch.testing.assert_close(again, logits)


def test_modality_dropout_only_in_training():
    model = build(fusion={"modality_dropout": 1.0})
    args = inputs(model, notes=(NOTES[0], NOTES[1], NOTES[2]), image_present=(True, True, True))
    model.train()
    out = model.forward_intermediates(*args)
    assert not (out.image_used & out.note_used).any()  # p=1: every study lost one side
    model.eval()
    out = model.forward_intermediates(*args)
    assert (out.image_used & out.note_used).all()


def test_side_heads_learn_from_each_side_only_where_that_side_was_used():
    from clinfuse.data.batch import Batch
    from clinfuse.training.trainer import fusion_loss, masked_bce

    model = build(fusion={"side_loss": 0.5, "modality_dropout": 0.0}).train()
    assert build(fusion={"side_loss": 0.0}).side_heads is None
    assert build(fusion={"side_loss": 0.5, "mode": "image_only"}).side_heads is None
    image, ids, mask, present, note_present = inputs(model)  # 2nd: no note, 3rd: no image
    logits, side_logits, used = model(image, ids, mask, present, note_present, with_sides=True)
    assert side_logits.shape == (3, 3, len(LABELS))  # image head, note head, prior
    assert used.tolist() == [[True, True, True], [True, False, True], [False, True, True]]
    torch.testing.assert_close(side_logits[:, 2], model.prior.expand(3, -1))
    labels = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch = Batch(
        study_ids=["a", "b", "c"], image=image, image_present=present, input_ids=ids,
        attention_mask=mask, note_present=note_present, offsets=torch.zeros(3, ids.shape[1], 2),
        labels=labels, notes=[None] * 3, original_shapes=[None] * 3,
    )  # fmt: skip
    ones = torch.ones(len(LABELS))
    torch.manual_seed(0)
    loss = fusion_loss(model, batch, ones, 0.5)
    torch.manual_seed(0)
    logits, side_logits, _ = model(image, ids, mask, present, note_present, with_sides=True)
    # by hand: the image head sees studies a and b, the note head a and c, the prior all three
    parts = [(side_logits[:2, 0], labels[:2]), (side_logits[[0, 2], 1], labels[[0, 2]])]
    parts.append((side_logits[:, 2], labels))
    sides = masked_bce(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), ones)
    expected = masked_bce(logits, labels, ones) + 0.5 * sides
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.side_heads.parameters())
    assert model.prior.grad is not None
    model.eval()  # a study with neither side gets the prior
    none = torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(model(image, ids, mask, none, none), model.prior.expand(3, -1))


def test_naive_bayes_combination_corrects_the_sum_of_the_side_heads():
    model = build(fusion={"combine": "naive_bayes", "pooling": "label_attention"}).eval()
    both = (True, True, True)
    image, ids, mask, present, note_present = inputs(model, notes=NOTES[:3], image_present=both)
    out = model.forward_intermediates(image, ids, mask, present, note_present)
    sides = out.side_logits  # (B, 3, L): image head, note head, prior
    expected = model.head(out.pooled) + sides[:, 0] + sides[:, 1] - sides[:, 2]
    torch.testing.assert_close(out.logits, expected)
    # each side head reads its own side only, before fusion
    other_note = inputs(model, notes=NOTES[1:4], image_present=both)
    changed = model.forward_intermediates(image, *other_note[1:3], present, note_present)
    torch.testing.assert_close(changed.side_logits[:, 0], sides[:, 0])
    assert not torch.allclose(changed.side_logits[:, 1], sides[:, 1])
    # a study with one side is still answered by that side's head alone
    no_note = torch.tensor([True, False, True])
    alone = model.forward_intermediates(image, ids, mask, present, no_note)
    torch.testing.assert_close(alone.logits[1], alone.side_logits[1, 0])


def test_token_dropout_masks_only_real_word_pieces_and_only_in_training():
    model = build(text={"token_dropout": 0.3})
    enc = model.note_tokenizer(NOTES * 50)
    encoder = model.text_encoder.train()
    torch.manual_seed(0)
    dropped = encoder.drop_tokens(enc.input_ids, enc.attention_mask)
    mask_id = model.note_tokenizer.tokenizer.mask_token_id
    changed = dropped != enc.input_ids
    assert (dropped[changed] == mask_id).all()
    special = torch.isin(
        enc.input_ids, torch.tensor(model.note_tokenizer.tokenizer.all_special_ids)
    )
    assert not (
        changed & (special | ~enc.attention_mask.bool())
    ).any()  # [CLS], [SEP], padding kept
    words = enc.attention_mask.bool() & ~special
    assert 0.25 < changed.sum() / words.sum() < 0.35
    model.eval()  # predictions are deterministic: nothing is dropped outside training
    args = inputs(model)
    torch.testing.assert_close(model(*args), model(*args))


def test_attention_maps_are_available_on_request():
    model = build(fusion={"depth": 2}).eval()
    args = inputs(model)
    out = model.forward_intermediates(*args, need_weights=True)
    assert len(out.attention) == 2
    text_to_image = out.attention[0].text_to_image
    assert text_to_image.shape == (3, args[1].shape[1], model.image_encoder.num_tokens)
    torch.testing.assert_close(text_to_image.sum(-1), torch.ones(text_to_image.shape[:2]))
    assert model.forward_intermediates(*args).attention == []


def test_cross_attention_learns_a_label_that_depends_on_the_note_alone():
    """The residual path: a note-only label is learnable through the fusion blocks."""
    torch.manual_seed(0)
    words = ["copd", "asthma", "fever", "cough", "diabetes", "chest", "pain", "left", "right"]
    notes = [" ".join(words[(i * 7 + k) % len(words)] for k in range(4)) for i in range(64)]
    target = torch.tensor([[float("copd" in n)] for n in notes])
    cfg = model_config("tiny", ["copd"], fusion={"dropout": 0.0, "modality_dropout": 0.0})
    model = create_model(cfg, notes)
    enc = model.note_tokenizer(notes)
    image = torch.randn(64, 1, 64, 64)
    present = torch.ones(64, dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        logits = model(image, enc.input_ids, enc.attention_mask, present, enc.note_present)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(image, enc.input_ids, enc.attention_mask, present, enc.note_present) > 0
    assert (predicted.float() == target).float().mean() > 0.95


def test_long_notes_are_truncated_with_a_warning_or_chunked(caplog):
    long_note = " ".join(["fever cough"] * 100)
    truncating = build(text={"max_length": 32})
    enc = truncating.note_tokenizer([long_note, NOTES[0]])
    assert enc.input_ids.shape == (2, 32) and enc.truncated.tolist() == [True, False]
    assert "notes longer than 32 tokens are cut" in caplog.text
    chunking = build(text={"max_length": 32, "long_notes": "chunk", "max_chunks": 3})
    enc = chunking.note_tokenizer([long_note])
    assert enc.input_ids.shape == (1, 96)
    cls = chunking.note_tokenizer.tokenizer.cls_token_id
    assert enc.input_ids[0, ::32].tolist() == [cls] * 3  # each window is its own sequence
    starts = enc.offsets[0, 1::32, 0].tolist()
    assert starts == sorted(starts) and starts[1] > 0  # later windows continue the note
    logits = chunking.eval()(*inputs(chunking, notes=(long_note,), image_present=(True,)))
    assert torch.isfinite(logits).all()


def test_checkpoint_folder_restores_the_exact_model_without_unpickling(tmp_path, monkeypatch):
    model = build().eval()
    model.temperature.copy_(torch.tensor([1.5, 0.8, 1.1]))
    model.offset.copy_(torch.tensor([0.0, -0.25, 0.1]))
    model.thresholds.copy_(torch.tensor([0.3, 0.6, 0.45]))
    args = inputs(model)
    expected = model(*args)
    save_checkpoint(model, tmp_path / "m", info={"manifest_sha256": "abc"})
    assert {p.name for p in (tmp_path / "m").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer",
        "MODEL_CARD.md",
    }
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"]["labels"] == list(LABELS)
    assert config["model"]["preprocess"]["spatial_size"] == [64, 64]
    assert config["calibration"]["copd"] == {
        "temperature": pytest.approx(0.8),
        "offset": pytest.approx(-0.25),
        "threshold": pytest.approx(0.6),
    }
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert (
        "Decision support, not a diagnosis" in card and "| copd | 0.800 | -0.250 | 0.600 |" in card
    )

    def no_pickle(*a, **k):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_checkpoint(tmp_path / "m")
    torch.testing.assert_close(loaded(*args), expected)
    # for inference the trunk's convolutions are laid out channels-last (same outputs, above);
    # such a model saves and reloads like any other
    convs = [m for m in loaded.image_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    conv = next(c for c in convs if c.in_channels > 1 and c.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    save_checkpoint(loaded, tmp_path / "again")
    torch.testing.assert_close(load_checkpoint(tmp_path / "again")(*args), expected)
    assert loaded.labels == LABELS
    torch.testing.assert_close(loaded.thresholds, model.thresholds)
    assert (
        loaded.note_tokenizer.tokenizer("fever")["input_ids"]
        == model.note_tokenizer.tokenizer("fever")["input_ids"]
    )


def test_evidence_weights_act_on_every_path_and_a_weightless_side_gets_no_credit(tmp_path):
    model = build(fusion={"combine": "naive_bayes", "pooling": "label_attention"}).eval()
    both = (True, True, True)
    image, ids, mask, present, note_present = inputs(model, notes=NOTES[:3], image_present=both)
    weights = torch.tensor([[1.5, 0.0, 0.0], [0.0, 0.8, 0.3], [1.0, 1.0, 1.0]])
    model.evidence_weights.copy_(weights)
    with torch.no_grad():
        model.prior.copy_(torch.tensor([-1.2, 0.7, 2.0]))  # a base rate that is not 0.5
    out = model.forward_intermediates(image, ids, mask, present, note_present)
    image_head, note_head, prior = out.side_logits.unbind(1)  # (B, L) each
    expected = (
        prior
        + weights[:, 0] * (image_head - prior)
        + weights[:, 1] * (note_head - prior)
        + weights[:, 2] * out.correction
    )
    torch.testing.assert_close(out.logits, expected)
    no_note = model.forward_intermediates(image, ids, mask, present, torch.zeros(3, dtype=bool))
    torch.testing.assert_close(no_note.logits, prior + weights[:, 0] * (image_head - prior))
    # the first label weighs the note at 0 and the correction at 0: its note gets no credit
    _, shapley = modality_shapley(model, (image, ids, mask, present, note_present))
    torch.testing.assert_close(shapley[:, 0, 1:], torch.zeros(3, 2))
    torch.testing.assert_close(shapley[:, 0, 0], out.logits[:, 0] - prior[:, 0])
    # the second weighs the image at 0: it gets only its half of the weighted correction
    torch.testing.assert_close(shapley[:, 1, 0], 0.3 * out.correction[:, 1] / 2)
    # saved and read back; recorded in config.json and on the model card
    save_checkpoint(model, tmp_path / "m")
    torch.testing.assert_close(load_checkpoint(tmp_path / "m").evidence_weights, weights)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["evidence_weights"]["pneumonia"] == {"image": 1.5, "note": 0.0, "correction": 0.0}
    assert "| copd | 0.00 | 0.80 | 0.30 |" in (tmp_path / "m" / "MODEL_CARD.md").read_text()


def test_evidence_weights_drop_the_side_that_does_not_inform_a_label():
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.random((n, 2)) < 0.4  # (N, L)
    terms = rng.normal(0, 1, (n, 3, 2))  # (N, 3, L): image, note, correction; noise
    terms[:, 0, 0] += np.where(y[:, 0], 1.0, -1.0)  # label 0: the image tells it
    terms[:, 1, 1] += np.where(y[:, 1], 1.0, -1.0)  # label 1: the note tells it
    labels = y.astype(float)
    labels[:5, 1] = np.nan  # unknown cells are left out
    weights = fit_evidence_weights(terms, labels, ridge=0.01)
    assert weights[0, 0] > 0.5 and weights[0, 1] < 0.1 and weights[0, 2] < 0.1
    assert weights[1, 1] > 0.5 and weights[1, 0] < 0.1 and weights[1, 2] < 0.1
    one_class = np.zeros((n, 2))
    assert np.array_equal(fit_evidence_weights(terms, one_class, ridge=0.01), np.ones((2, 3)))


def test_evidence_weights_are_not_fitted_on_too_few_cases_or_overflowed_logits(caplog):
    rng = np.random.default_rng(0)
    terms = rng.normal(0, 1, (200, 3, 2))  # (N, 3, L)
    labels = np.zeros((200, 2))
    labels[:4, 0] = 1.0  # label "rare": 4 positives, a regression would fit noise
    labels[:50, 1] = 1.0
    terms[7, 1, 1] = np.inf  # label "flu": an overflowed logit
    with caplog.at_level("WARNING"):
        weights = fit_evidence_weights(terms, labels, ridge=0.01, names=["rare", "flu"])
    assert np.array_equal(weights, np.ones((2, 3)))  # both keep the model as trained
    said = caplog.text
    assert "'rare': 4 positive and 196 negative" in said and "'flu': non-finite" in said
    weights[1, 1] = 0.0  # a side weighed out where its evidence overflowed: no crash either
    warn_dropped_sides(terms, labels, weights, ["rare", "flu"])


def test_checkpoint_weights_must_match_the_config_except_a_missing_offset(tmp_path):
    model = build().eval()
    save_checkpoint(model, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    older = ("offset", "evidence_weights")  # buffers folders written before them lack
    save_file(
        {k: v for k, v in weights.items() if k not in older}, tmp_path / "m" / "model.safetensors"
    )
    loaded = load_checkpoint(tmp_path / "m")
    assert torch.equal(loaded.offset, torch.zeros(len(LABELS)))  # predicts as it did
    assert torch.equal(loaded.evidence_weights, torch.ones(len(LABELS), 3))
    save_file(
        {k: v for k, v in weights.items() if k != "head.weight"},
        tmp_path / "m" / "model.safetensors",
    )
    with pytest.raises(ModelFolderError, match="does not match config.json"):
        load_checkpoint(tmp_path / "m")


def test_a_damaged_model_folder_is_one_error_naming_the_part(tmp_path):
    save_checkpoint(build(), tmp_path / "m")
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(weights[:1000])  # a copy cut short
    with pytest.raises(ModelFolderError, match="model.safetensors cannot be read"):
        load_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(weights)
    shutil.rmtree(tmp_path / "m" / "tokenizer")
    with pytest.raises(ModelFolderError, match="its tokenizer cannot be read"):
        load_checkpoint(tmp_path / "m")  # never looked up on the hub as a name
    (tmp_path / "m" / "config.json").write_text("{cut short", encoding="utf-8")
    with pytest.raises(ModelFolderError, match="config.json is not valid JSON"):
        load_checkpoint(tmp_path / "m")
    with pytest.raises(ModelFolderError, match="config.json: is a file, not a model folder"):
        load_checkpoint(tmp_path / "m" / "config.json")  # the file, not its folder
    for other in ('{"architectures": ["BertModel"]}', "[]"):  # e.g. a Hugging Face folder
        (tmp_path / "m" / "config.json").write_text(other, encoding="utf-8")
        with pytest.raises(ModelFolderError, match="config.json has no 'model' section"):
            load_checkpoint(tmp_path / "m")


def test_calibration_no_training_writes_is_refused_when_loaded(tmp_path):
    model = build()
    for name, value in (("temperature", -1.0), ("offset", float("nan")), ("thresholds", 1.5)):
        broken = build()
        broken.load_state_dict(model.state_dict())
        getattr(broken, name)[0] = value  # an edited file: a reversed or void label
        save_checkpoint(broken, tmp_path / name)
        with pytest.raises(ModelFolderError, match=f"calibration no training writes .{name}"):
            load_checkpoint(tmp_path / name)
    save_checkpoint(model, tmp_path / "fine")
    assert load_checkpoint(tmp_path / "fine").temperature.gt(0).all()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "fine").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]  # readable as the rest (umask)


def test_weights_of_another_shape_are_one_error_naming_the_tensor(tmp_path):
    save_checkpoint(build(), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["model"]["labels"] = [*config["model"]["labels"], "extra"]  # files of two models
    path.write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"does not match config.json \(size mismatch"):
        load_checkpoint(tmp_path / "m")


def test_checkpoint_with_an_unknown_key_fails_naming_it(tmp_path):
    save_checkpoint(build(), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["model"]["fusion"]["widht"] = 64
    path.write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="'model.fusion.widht': unknown key"):
        load_checkpoint(tmp_path / "m")
    config["model"]["fusion"].pop("widht")
    config["model"]["fusion"]["dropout"] = 1.5  # a value this clinfuse's ranges refuse
    path.write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="does not hold a model this clinfuse builds"):
        load_checkpoint(tmp_path / "m")


def test_a_model_too_small_for_its_backbone_is_refused_when_made_not_when_loaded(tmp_path):
    small = {"image": {"backbone": "resnet"}, "preprocess": {"spatial_size": (32, 32)}}
    with pytest.raises(ConfigError, match="spatial_size': .32, 32. is too small for this resnet"):
        build(**small)  # its last feature map would be 1x1
    # a folder an earlier clinfuse trained that way still scores
    cfg = model_config("tiny", LABELS, **small)
    old = FusionModel(cfg, train_tokenizer(NOTES, cfg.text.vocab_size, 1))
    save_checkpoint(old, tmp_path / "old")
    assert load_checkpoint(tmp_path / "old").image_encoder.grid == (1, 1)


def test_configs_reject_unknown_and_mistyped_keys_by_name():
    with pytest.raises(ConfigError, match="'model.image.backbon': unknown key.*backbone"):
        parse_config(ModelConfig, {"image": {"backbon": "resnet"}}, "model")
    with pytest.raises(ConfigError, match="'model.fusion.depth'"):
        parse_config(ModelConfig, {"fusion": {"depth": "deep"}}, "model")
    with pytest.raises(ConfigError, match="'model.fusion.mode'"):
        model_config("tiny", LABELS, fusion={"mode": "early"})
    with pytest.raises(ConfigError, match="unknown architecture 'huge'"):
        model_config("huge", LABELS)
    cfg = apply_overrides(model_config("tiny", LABELS), ["fusion.mode=late", "text.layers=2"])
    assert cfg.fusion.mode == "late" and cfg.text.layers == 2
    with pytest.raises(ConfigError, match="'fusion.widht': unknown key"):
        apply_overrides(cfg, ["fusion.widht=3"])
    with pytest.raises(ConfigError, match=r"in brackets, \[64\]"):
        apply_overrides(cfg, ["preprocess.spatial_size=64"])  # a list without its brackets
    assert parse_config(ModelConfig, json.loads(cfg.model_dump_json())) == cfg  # round trip


def test_pretrained_image_weights_load_from_a_local_safetensors_file(tmp_path):
    monai_net = DenseNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=4,
        init_features=8,
        growth_rate=8,
        block_config=(1, 1),
    )
    save_file(monai_net.state_dict(), tmp_path / "densenet.safetensors")
    model = build(image={"pretrained": str(tmp_path / "densenet.safetensors")})
    torch.testing.assert_close(
        model.image_encoder.backbone.features.conv0.weight, monai_net.features.conv0.weight
    )
    (tmp_path / "other.safetensors").write_bytes(b"")
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="other.safetensors lacks 34 of the 34 weights"):
        build(image={"pretrained": str(tmp_path / "other.safetensors")})
    # under another library's names most weights would stay random: refused, not half-loaded
    renamed = {k.replace(".layers.", "."): v for k, v in monai_net.state_dict().items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    first = "first: features.denseblock1.denselayer1.layers"
    with pytest.raises(ConfigError, match=f"lacks 20 of the 34 weights .*{first}"):
        build(image={"pretrained": str(tmp_path / "renamed.safetensors")})
    wider = DenseNet(2, 1, 4, init_features=8, growth_rate=16, block_config=(1, 1))
    save_file(wider.state_dict(), tmp_path / "wider.safetensors")  # another shape: named
    shapes = r"conv1.weight is \(64, 8, 1, 1\) where this backbone's is \(32"
    with pytest.raises(ConfigError, match=shapes):
        build(image={"pretrained": str(tmp_path / "wider.safetensors")})
    torch.save(monai_net.state_dict(), tmp_path / "densenet.pt")
    with pytest.raises(ConfigError, match="not a .safetensors file"):  # never unpickled
        build(image={"pretrained": str(tmp_path / "densenet.pt")})


def test_a_word_only_one_patients_notes_hold_stays_out_of_the_saved_vocabulary(tmp_path):
    signed = [("P1", "Crackles at the left base. Seen by Zebulon, MRN 8837261.")] * 3
    shared = [(f"P{i}", "Crackles at the left base.") for i in range(2, 7)]  # five patients
    tokenizer = train_tokenizer(signed + shared, 200, min_patients=5)
    vocab = tokenizer.get_vocab()
    assert {"crackles", "left", "base"} <= set(vocab)  # held by six patients
    assert not {"zebulon", "mrn", "8837261"} & set(vocab)  # one patient, three notes
    pieces = tokenizer.tokenize("Zebulon 8837261")
    assert tokenizer.convert_tokens_to_string(pieces).replace(" ", "") == "zebulon8837261"
    model = create_model(model_config("tiny", ["flu"], text={"min_word_patients": 5}), signed)
    save_checkpoint(model, tmp_path / "m")  # what a model folder ships
    assert "zebulon" not in (tmp_path / "m" / "tokenizer" / "tokenizer.json").read_text().lower()


def test_pretrained_text_encoder_and_tokenizer_load_from_a_local_folder(tmp_path):
    tokenizer = train_tokenizer(NOTES * 3, 200)
    bert = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    model = build(text={"pretrained": str(tmp_path / "bert")})
    assert model.text_encoder.model.config.hidden_size == 48
    torch.testing.assert_close(
        model.text_encoder.embeddings.weight, bert.get_input_embeddings().weight
    )
    save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / "bert" / "model.safetensors").unlink()  # the checkpoint alone must suffice
    loaded = load_checkpoint(tmp_path / "ckpt")
    args = inputs(model)
    torch.testing.assert_close(loaded(*args), model.eval()(*args))
    torch.save(bert.state_dict(), tmp_path / "bert" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="model.text.pretrained.*safetensors"):
        build(text={"pretrained": str(tmp_path / "bert")})  # a pickled folder is refused
    # without its tokenizer, transformers would build an empty one: every note [UNK]
    bert.save_pretrained(tmp_path / "bare")
    with pytest.raises(ConfigError, match="bare holds no tokenizer"):
        build(text={"pretrained": str(tmp_path / "bare")})
    with pytest.raises(ConfigError, match="nowhere: no such folder"):
        build(text={"pretrained": str(tmp_path / "nowhere")})
    small = BertModel(BertConfig(**{**bert.config.to_dict(), "vocab_size": len(tokenizer) - 10}))
    small.save_pretrained(tmp_path / "small")
    tokenizer.save_pretrained(tmp_path / "small")  # 10 ids past its embedding table
    with pytest.raises(ConfigError, match="tokenizer has .* tokens but the encoder embeds"):
        build(text={"pretrained": str(tmp_path / "small")})
    tokenizer.pad_token = None  # a note batch is padded, the explanations' reference too
    tokenizer.save_pretrained(tmp_path / "bare")
    with pytest.raises(ConfigError, match="its tokenizer has no padding token"):
        build(text={"pretrained": str(tmp_path / "bare")})


def test_a_note_length_not_a_multiple_of_8_is_read():
    model = build(text={"max_length": 100})
    enc = model.note_tokenizer([" ".join(NOTES * 10), NOTES[0]])
    assert enc.input_ids.shape[1] == 100 and bool(enc.truncated[0])


def test_calibrated_probabilities_and_decisions_use_saved_buffers():
    model = build()
    model.temperature.copy_(torch.tensor([2.0, 1.0, 0.5]))
    model.offset.copy_(torch.tensor([0.0, 0.0, -1.0]))
    model.thresholds.copy_(torch.tensor([0.6, 0.5, 0.9]))
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    probs = model.probabilities(logits)
    torch.testing.assert_close(probs, torch.sigmoid(torch.tensor([[0.5, 1.0, 1.0]])))
    assert model.decisions(probs).tolist() == [[True, True, False]]


def test_a_training_saved_before_evidence_weights_reads_as_trained_without_them():
    from clinfuse.config import TrainConfig, as_current

    # an older model folder's train section has no evidence_ridge: it was trained without
    # weights, so it must not compare equal to today's default (0.01) and count as done
    assert as_current(TrainConfig, {"epochs": 36})["evidence_ridge"] is None
    assert as_current(TrainConfig, {"evidence_ridge": 0.01})["evidence_ridge"] == 0.01


def test_the_model_card_shows_a_label_name_as_written():
    """A manifest's header names the labels: one must not run in a viewer or split a table."""
    from markdown_it import MarkdownIt

    from clinfuse.model.checkpoint import as_markdown

    for name in ("<img src=x onerror=alert(3)>", "[copd](https://evil.example)", "a|b"):
        rendered = MarkdownIt().renderInline(as_markdown(name))
        assert "<img" not in rendered and "<a " not in rendered
        assert "|" not in as_markdown(name).replace("\\|", "")  # a table row stays one row
    assert as_markdown("copd") == "copd"
