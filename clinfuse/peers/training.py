"""Train, calibrate, save and load Transchex with clinfuse's recipe on a clinfuse manifest.

Everything a clinfuse run fixes is shared: the patient-level split (`data.*`), the data layer
(`StudyDataset`, `Collator`, augmentation), the seeded sample order, the masked and
class-weighted loss, AdamW with warm-up and cosine decay, gradient clipping, early stopping on
validation macro AUROC (`train.patience`), and the temperature and threshold fit on validation
(`clinfuse.training.trainer.calibrate`). Single process; float32 on CPU.

A folder holds `peer.json` (configs, calibration, history, validation metrics),
`model.safetensors` and `bert/` (the offline BERT and its tokenizer). A finished folder whose
configuration and manifest match is loaded instead of trained again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader

from clinfuse.config import ModelConfig, RunConfig, parse_config
from clinfuse.data.batch import Batch, Collator, StudyDataset
from clinfuse.data.manifest import PatientSplit, file_sha256, load_manifest
from clinfuse.engine import predict, select_device
from clinfuse.model.checkpoint import calibration_table
from clinfuse.model.text_encoder import load_tokenizer, train_tokenizer
from clinfuse.peers.transchex import (
    TranschexClassifier,
    TranschexConfig,
    build_transchex,
    data_config,
    write_offline_bert,
)
from clinfuse.training.trainer import (
    Workers,
    calibrate,
    class_weights,
    epoch_order,
    masked_bce,
    split_rows,
    training_notes,
    validation_macro_auroc,
    warmup_cosine,
)

log = logging.getLogger(__name__)
INFO_FILE = "peer.json"


@dataclass
class PeerTraining:
    """A trained (or reloaded) Transchex and what its training recorded."""

    model: TranschexClassifier
    folder: Path
    info: dict[str, Any]  # peer.json: configs, calibration, training history, validation
    reused: bool = False


def note_length(tokenizer: Any, notes: list[str], limit: int) -> int:
    """The fixed token length: the longest training note, rounded up to 8, at most `limit`."""
    longest = max((len(tokenizer(n).input_ids) for n in notes), default=8)
    return min(limit, 8 * math.ceil(longest / 8))


def create_transchex(
    model_cfg: ModelConfig,
    peer: TranschexConfig,
    labels: tuple[str, ...],
    notes: list[tuple[str, str]],
    folder: str | Path,
) -> TranschexClassifier:
    """A new Transchex: tokenizer trained on `notes` ((patient id, text) pairs, the same rule
    as clinfuse's), offline BERT written to `folder/bert`."""
    tokenizer = train_tokenizer(notes, model_cfg.text.vocab_size, model_cfg.text.min_word_patients)
    limit = min(model_cfg.text.max_length, peer.max_position_embeddings)
    texts = [text for _, text in notes]
    cfg = data_config(model_cfg, peer, labels, note_length(tokenizer, texts, limit))
    bert_dir = write_offline_bert(Path(folder) / "bert", peer, tokenizer)
    net = build_transchex(peer, len(labels), len(tokenizer), bert_dir)
    return TranschexClassifier(net, cfg, tokenizer, peer)


def load_transchex(folder: str | Path) -> TranschexClassifier:
    """A saved Transchex folder -> the model, with its calibration; never unpickles the weights
    (the offline BERT's pickle is read by Transchex itself, as `torch.load(weights_only=True)`)."""
    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    peer = parse_config(TranschexConfig, info["peer"], "peer")
    cfg = parse_config(ModelConfig, info["data_model"], "model")
    tokenizer = load_tokenizer(str(folder / "bert"))
    net = build_transchex(peer, len(cfg.labels), len(tokenizer), folder / "bert")
    model = TranschexClassifier(net, cfg, tokenizer, peer)
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


def train_step(
    model: TranschexClassifier,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    pos_weight: torch.Tensor,
    grad_clip: float,
    smoothing: float = 0.0,
) -> float:
    """One optimisation step on `batch` (already on the model's device); returns the loss."""
    loss = masked_bce(model(*batch.model_inputs()), batch.labels, pos_weight, smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def _run_key(manifest_path: Path, cfg: RunConfig, peer: TranschexConfig) -> str:
    text = cfg.model_dump_json() + peer.model_dump_json() + file_sha256(manifest_path)
    return hashlib.sha256(text.encode()).hexdigest()


def train_transchex(
    manifest_path: str | Path,
    out_dir: str | Path,
    cfg: RunConfig,
    peer: TranschexConfig,
    device: str | None = None,
) -> PeerTraining:
    """Train Transchex on the manifest's train split with `cfg.train`'s budget; save it."""
    started = time.perf_counter()
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    key = _run_key(manifest_path, cfg, peer)
    if (out_dir / INFO_FILE).is_file():
        info = json.loads((out_dir / INFO_FILE).read_text(encoding="utf-8"))
        if info.get("run_key") == key:
            log.info("%s already holds this Transchex run; reusing it", out_dir)
            return PeerTraining(load_transchex(out_dir), out_dir, info, reused=True)
    torch_device = select_device(device)
    manifest = load_manifest(
        manifest_path,
        labels=cfg.data.labels,
        split=PatientSplit(cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed),
    )
    train_rows, val_rows = split_rows(manifest, "train"), split_rows(manifest, "val")
    torch.manual_seed(cfg.train.seed)
    model = create_transchex(
        cfg.model, peer, manifest.labels, training_notes(train_rows), out_dir
    ).to(torch_device)
    torch.manual_seed(cfg.train.seed + 1)
    collate = Collator(model.note_tokenizer, model.cfg)
    train_set = StudyDataset(
        train_rows, model.cfg, train=cfg.train.augment, cache=cfg.train.cache, seed=cfg.train.seed
    )
    val_loader = DataLoader(
        StudyDataset(val_rows, model.cfg, cache=cfg.train.cache),
        batch_size=cfg.train.batch_size,
        collate_fn=collate,
        num_workers=cfg.train.workers,
    )
    pos_weight = class_weights(manifest, cfg.train).to(torch_device)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.train.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps_per_epoch * cfg.train.epochs, cfg.train.warmup_fraction)
    )
    best, best_auroc, best_epoch, stale, history = None, -1.0, 0, 0, []
    for epoch in range(cfg.train.epochs):
        epoch_started, seen, losses = time.perf_counter(), 0, []
        train_set.epoch = epoch  # the same augmentation as clinfuse's training at this epoch
        loader = DataLoader(
            train_set,
            batch_size=cfg.train.batch_size,
            sampler=epoch_order(len(train_rows), epoch, cfg.train.seed, Workers()),
            collate_fn=collate,
            num_workers=cfg.train.workers,
        )
        model.train()
        for batch in loader:
            if len(batch) == 0:
                continue
            batch = batch.to(torch_device)
            losses.append(
                train_step(
                    model,
                    batch,
                    optimizer,
                    pos_weight,
                    cfg.train.grad_clip,
                    cfg.train.label_smoothing,
                )
            )
            scheduler.step()
            seen += len(batch)
        val = predict(model, val_loader, torch_device)
        auroc = validation_macro_auroc(val, model.labels)
        seconds = time.perf_counter() - epoch_started
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)) if losses else None,
                "val_macro_auroc": auroc,
                "studies_per_s": seen / seconds,
                "seconds": seconds,
            }
        )
        log.info("transchex epoch %d/%d val macro AUROC %s", epoch + 1, cfg.train.epochs, auroc)
        if auroc is not None and auroc > best_auroc:
            best, best_auroc, best_epoch, stale = copy.deepcopy(model).cpu(), auroc, epoch, 0
        else:
            stale += 1
        if stale >= cfg.train.patience:
            log.info("transchex early stop after %d epochs", epoch + 1)
            break
    final = (best if best is not None else model).to(torch_device).eval()
    validation = calibrate(final, val_loader, torch_device, cfg)  # type: ignore[arg-type]
    info = {
        "run_key": key,
        "peer": peer.model_dump(mode="json"),
        "data_model": final.cfg.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json"),
        "calibration": calibration_table(final),
        "metrics": {"validation": validation},
        "training": {
            "epochs": len(history),
            "best_epoch": best_epoch + 1,
            "history": history,
            "device": str(torch_device),
            "seconds": time.perf_counter() - started,
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(final.cpu(), str(out_dir / "model.safetensors"))
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return PeerTraining(final, out_dir, info)
