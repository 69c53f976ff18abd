"""The Transchex adapter: built offline from a local BERT folder, fed by clinfuse's data layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clinfuse.config import resolve_run_config
from clinfuse.data.batch import Batch, Collator, StudyDataset
from clinfuse.data.manifest import load_manifest
from clinfuse.peers import (
    TranschexClassifier,
    TranschexConfig,
    build_transchex,
    create_transchex,
    load_transchex,
    train_step,
    train_transchex,
)
from clinfuse.peers.training import training_notes
from clinfuse.training.trainer import masked_bce

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "manifest.csv"
TINY = TranschexConfig(
    img_size=32,
    patch_size=16,
    hidden=32,
    heads=2,
    intermediate=64,
    language_layers=1,
    vision_layers=1,
    mixed_layers=1,
    max_position_embeddings=64,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def rows():
    return list(load_manifest(SAMPLE).rows())[:6]


@pytest.fixture()
def model(rows, tmp_path) -> TranschexClassifier:
    torch.manual_seed(0)
    # six notes stand for a training set: each of their words in the vocabulary
    cfg = resolve_run_config(None, ["model.name=tiny", "model.text.min_word_patients=1"])
    labels = load_manifest(SAMPLE).labels
    return create_transchex(cfg.model, TINY, labels, training_notes(rows), tmp_path)


def tiny_batch(model: TranschexClassifier, rows) -> Batch:
    dataset = StudyDataset(rows, model.cfg)
    return Collator(model.note_tokenizer, model.cfg)([dataset[i] for i in range(len(rows))])


def test_transchex_takes_its_bert_from_the_local_folder(model, tmp_path):
    saved = torch.load(tmp_path / "bert" / "pytorch_model.bin", weights_only=True)
    loaded = model.net.multimodal.embeddings.word_embeddings.weight
    assert torch.equal(saved["embeddings.word_embeddings.weight"], loaded)
    config = (tmp_path / "bert" / "config.json").read_text()
    assert '"hidden_size": 32' in config and '"num_hidden_layers": 1' in config
    assert (tmp_path / "bert" / "tokenizer.json").is_file()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        build_transchex(TINY, 6, 100, tmp_path / "nowhere")


def test_a_tiny_batch_runs_forward_and_backward(model, rows):
    batch = tiny_batch(model, rows)
    assert batch.image.shape == (6, 3, 32, 32)  # grey repeated to 3 channels, at img_size
    logits = model(*batch.model_inputs())
    assert logits.shape == (6, len(model.labels)) and torch.isfinite(logits).all()
    logits.sum().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    # Transchex classifies the pooled text side: the last mixed layer's image branch is unused
    assert no_grad and all(".mixed_encoder.0.att_y." in n or ".output_y." in n for n in no_grad)


def test_one_training_step_lowers_the_loss_on_its_batch(model, rows):
    batch = tiny_batch(model, rows)
    weight = torch.ones(len(model.labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.eval()  # no dropout, so the two losses compare
    before = masked_bce(model(*batch.model_inputs()), batch.labels, weight).item()
    loss = train_step(model, batch, optimizer, weight, grad_clip=1.0)
    after = masked_bce(model(*batch.model_inputs()), batch.labels, weight).item()
    assert loss == pytest.approx(before) and after < before


def test_a_score_does_not_depend_on_the_batch(model, rows):
    """Transchex attends to padding, so the adapter pads every note to one length."""
    model.eval()
    batch = tiny_batch(model, rows)
    shortest = int(batch.attention_mask.sum(1).argmin())
    alone = tiny_batch(model, [rows[shortest]])
    assert alone.input_ids.shape[1] < batch.input_ids.shape[1]  # the collator pads it less
    torch.testing.assert_close(
        model(*alone.model_inputs())[0], model(*batch.model_inputs())[shortest]
    )


def test_a_removed_side_is_a_black_image_or_the_empty_note(model, rows):
    model.eval()
    batch = tiny_batch(model, rows)
    image, ids, mask, image_present, note_present = batch.model_inputs()
    absent = torch.zeros_like(image_present)
    black = torch.full_like(image, (0 - 0.5) / 0.25)  # intensity 0, normalised as clinfuse does
    torch.testing.assert_close(
        model(image, ids, mask, absent, note_present),
        model(black, ids, mask, image_present, note_present),
    )
    empty = model.note_tokenizer([None] * len(rows))
    torch.testing.assert_close(
        model(image, ids, mask, image_present, absent),
        model(image, empty.input_ids, empty.attention_mask, image_present, note_present),
    )


def test_train_saves_a_folder_that_reloads_and_is_reused(small_export, tmp_path):
    cfg = resolve_run_config(
        None, ["model.name=tiny", "train.epochs=1", "train.batch_size=16", "train.bootstrap=0"]
    )
    first = train_transchex(small_export, tmp_path / "peer", cfg, TINY)
    assert not first.reused and first.info["training"]["epochs"] == 1
    assert set(first.info["calibration"]) == set(load_manifest(small_export).labels)
    temperature = torch.tensor([c["temperature"] for c in first.info["calibration"].values()])
    reloaded = load_transchex(tmp_path / "peer")
    torch.testing.assert_close(reloaded.temperature, temperature)
    batch = tiny_batch(reloaded, list(load_manifest(small_export).rows())[:4])
    first.model.cpu().eval()
    torch.testing.assert_close(reloaded(*batch.model_inputs()), first.model(*batch.model_inputs()))
    again = train_transchex(small_export, tmp_path / "peer", cfg, TINY)
    assert again.reused
