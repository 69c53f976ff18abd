"""`train`: manifest -> a calibrated model folder. Resumable, seeded, DDP under torchrun.

Patient-level splits from the manifest; unknown labels masked out of the loss; class-imbalance
weighting; AdamW with linear warm-up and cosine decay; gradient clipping; early stopping on
validation macro AUROC. Afterwards per-label temperatures and decision thresholds are fitted on
the validation split and saved with the model and its validation metrics.

Started again with the same command, a killed run continues from its newest snapshot (see
`clinfuse.training.state`); a finished run is not trained again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from clinfuse import __version__
from clinfuse.atomic import write_atomic
from clinfuse.config import (
    SPEED_ONLY_TRAIN_KEYS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    as_current,
)
from clinfuse.data.batch import Batch, Collator, StudyDataset, derived_seed
from clinfuse.data.manifest import (
    Manifest,
    PatientSplit,
    StudyRow,
    file_sha256,
    label_problem,
    load_manifest,
    manifest_kind,
)
from clinfuse.data.study import study_note
from clinfuse.engine import (
    Predictions,
    amp_dtype,
    autocast,
    die_with_parent,
    evidence_terms,
    predict,
    select_device,
)
from clinfuse.errors import ClinfuseError, ConfigError, ManifestError, unreadable_split
from clinfuse.evaluation.calibration import (
    apply_temperature,
    fit_calibration,
    fit_evidence_weights,
    fit_thresholds,
)
from clinfuse.evaluation.evaluate import write_failures
from clinfuse.evaluation.metrics import evaluate_predictions
from clinfuse.folders import refuse_foreign_folder
from clinfuse.model.checkpoint import read_checkpoint_config, save_checkpoint
from clinfuse.model.model import FusionModel
from clinfuse.model.registry import create_model
from clinfuse.training.pretrain import pretrain_note_encoder
from clinfuse.training.state import Progress, latest_snapshot, load_snapshot, save_snapshot

log = logging.getLogger(__name__)
FEW_VALIDATION_STUDIES = 30  # below it, a warning: per-label fits on so few studies are rough


@dataclass
class TrainResult:
    model_dir: Path
    epochs: int
    best_epoch: int
    validation: dict[str, Any]  # metrics of the calibrated model on the validation split
    seconds: float
    resumed: bool
    already_done: bool = False


@dataclass(frozen=True)
class Workers:
    """This process's place in a (possibly single-process) distributed run."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device) -> Workers:
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1 and device.type == "cuda":
            # NCCL's collectives (the barrier, the object broadcasts) run on the current GPU:
            # without this, GPU 0 for every rank ("duplicate GPU", or a hang)
            torch.cuda.set_device(device)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if world > 1 and dist.get_rank() != 0:  # rank 0 says it once; the others only fail
            logging.getLogger("clinfuse").setLevel(logging.ERROR)
        return cls(dist.get_rank(), world) if world > 1 else cls()

    def agree(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def merged(self, found: dict[str, str]) -> dict[str, str]:
        """Every rank's `found` in one dict, on every rank (each rank reads its own rows)."""
        if self.world == 1:
            return found
        return {key: value for box in self._everyones(found) for key, value in sorted(box.items())}

    def gathered(self, values: list[float]) -> list[float]:
        """Every rank's `values`, rank after rank, on every rank."""
        if self.world == 1:
            return list(values)
        return [value for box in self._everyones(list(values)) for value in box]

    def _everyones(self, value: Any) -> list[Any]:
        """Each rank's `value`, rank after rank, on every rank."""
        boxes: list[Any] = [None] * self.world
        dist.all_gather_object(boxes, value)
        return boxes

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is True on any rank."""
        if self.world == 1:
            return flag
        box = torch.tensor([float(flag)], device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return bool(box.item())


def masked_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: torch.Tensor,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean binary cross-entropy over known labels; NaN labels contribute nothing. With
    `smoothing` e the targets are 1 - e/2 and e/2: the best logit is finite even where the
    data separate the classes."""
    known = ~torch.isnan(labels)  # (B, L)
    targets = torch.nan_to_num(labels) * (1 - smoothing) + smoothing / 2
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), targets, pos_weight=pos_weight, reduction="none"
    )
    return (losses * known).sum() / known.sum().clamp(min=1)


def fusion_loss(
    model: torch.nn.Module,
    batch: Batch,
    pos_weight: torch.Tensor,
    side_weight: float,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """The training loss of one batch: masked BCE of the fused logits, plus `side_weight` x
    the side heads' loss on the sides each study really used (after modality dropout) and the
    prior's on every study."""
    if side_weight <= 0:
        return masked_bce(model(*batch.model_inputs()), batch.labels, pos_weight, smoothing)
    logits, side_logits, used = model(*batch.model_inputs(), with_sides=True)
    side_labels = batch.labels[:, None, :].expand_as(side_logits)  # (B, 3, L)
    side_labels = side_labels.masked_fill(~used[:, :, None], float("nan"))
    return masked_bce(logits, batch.labels, pos_weight, smoothing) + side_weight * masked_bce(
        side_logits, side_labels, pos_weight, smoothing
    )


def balanced_pos_weight(labels: np.ndarray, max_weight: float) -> torch.Tensor:
    """(L,) negatives / positives per label over known cells, clipped to [1, max_weight]."""
    positives = np.nansum(labels, axis=0)
    negatives = np.sum(labels == 0, axis=0)
    weight = np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)
    return torch.tensor(np.clip(weight, 1.0, max_weight), dtype=torch.float32)


def class_weights(manifest: Manifest, cfg: TrainConfig) -> torch.Tensor:
    """(L,) the loss's pos_weight: balanced over the train split, or ones."""
    if cfg.class_weighting == "balanced":
        return balanced_pos_weight(manifest.label_matrix("train"), cfg.max_pos_weight)
    return torch.ones(len(manifest.labels))


def epoch_order(n: int, epoch: int, seed: int, workers: Workers) -> list[int]:
    """This rank's seeded sample order for `epoch` (padded so every rank gets as many)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    total = math.ceil(n / workers.world) * workers.world
    order += order[: total - n]
    return order[workers.rank :: workers.world]


def warmup_cosine(total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def training_differences(done: dict, manifest_path: str | Path, cfg: RunConfig) -> list[str]:
    """What a finished model folder's saved config (`done`) was trained with that this
    manifest and configuration are not: some of "manifest", "model", "data", "train"."""
    asked, made = _trainings(done, manifest_path, cfg)
    return [part for part in asked if asked[part] != made[part]]


def _trainings(done: dict, manifest_path: str | Path, cfg: RunConfig) -> tuple[dict, dict]:
    """(what this command asks, what the folder was trained with), as comparable values."""
    asked = {
        "manifest": file_sha256(manifest_path) if Path(manifest_path).is_file() else None,
        "model": {**cfg.model.model_dump(mode="json"), "labels": None},
        "data": cfg.data.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
    }
    made = {
        "manifest": done.get("manifest_sha256"),
        "model": {**(as_current(ModelConfig, done.get("model")) or {}), "labels": None},
        "data": as_current(DataConfig, done.get("data")),
        "train": as_current(TrainConfig, done.get("train")),
    }
    if cfg.model.fusion.combine != "naive_bayes":  # evidence weights are fitted for it alone
        for side in (asked, made):
            if side["train"] is not None:
                side["train"] = {**side["train"], "evidence_ridge": None}
    for side in (asked, made):
        side["train"] = _without_speed_keys(side["train"])
    return asked, made


def _without_speed_keys(train: dict | None) -> dict | None:
    """A train section without `SPEED_ONLY_TRAIN_KEYS`: what decides the trained model."""
    return (
        None
        if train is None
        else {k: v for k, v in train.items() if k not in SPEED_ONLY_TRAIN_KEYS}
    )


def _run_settings(cfg: RunConfig, manifest_sha: str) -> dict[str, Any]:
    """What an unfinished run resumes only with: this configuration (its speed-only keys
    aside) on this manifest's bytes."""
    return {
        "manifest": manifest_sha,
        "model": cfg.model.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json"),
        "train": _without_speed_keys(cfg.train.model_dump(mode="json")),
    }


def _differing(asked: Any, made: Any, key: str) -> list[str]:
    """`key: <the folder's> -> <this command's>` for each setting that differs, nested keys
    dotted as on the command line (`train.epochs: 3 -> 2`)."""
    if isinstance(asked, dict) and isinstance(made, dict):
        keys = list(dict.fromkeys([*made, *asked]))
        return [d for k in keys for d in _differing(asked.get(k), made.get(k), f"{key}.{k}")]
    if asked == made:
        return []
    if key == "manifest":
        return ["the manifest's contents (its SHA-256)"]
    made_text, asked_text = (json.dumps(v) for v in (made, asked))
    return [f"{key}: {textwrap.shorten(made_text, 60)} -> {textwrap.shorten(asked_text, 60)}"]


def _check_same_training(
    out_dir: Path, done: dict, manifest_path: str | Path, cfg: RunConfig
) -> None:
    """A finished model folder is reused only by the command that made it: another manifest or
    configuration would otherwise leave the old model in place and report it as trained."""
    asked, made = _trainings(done, manifest_path, cfg)
    changed = [d for part in asked for d in _differing(asked[part], made[part], part)]
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if changed[5:] else "")
        raise ClinfuseError(
            f"{out_dir}: already holds a model trained otherwise than this command asks "
            f"(the folder's -> this command's: {shown}). Choose a new --out to train this one "
            "(the folder is kept)"
        )


def diverged(progress: Progress, lr: float) -> ClinfuseError:
    """The error of a run whose loss stopped being a number (NaN or infinite weights)."""
    return ClinfuseError(
        f"training diverged at epoch {progress.epoch + 1}, step {progress.step + 1}: the loss "
        f"is not a number. Train again with a lower learning rate (train.lr={lr:g} now), "
        "and a new --out"
    )


def split_rows(manifest: Manifest, split: str) -> list[StudyRow]:
    rows = list(manifest.rows(split))
    if not rows:
        raise ManifestError(
            manifest.path,
            f"no rows in the {split!r} split",
            hint="add rows, set data.val_fraction, or give a split column with val rows",
        )
    return rows


def check_sides(manifest_path: Path, mode: str, rows: list[StudyRow]) -> None:
    """A `ManifestError` when no training row has the one side `mode` reads (a model of
    constant answers otherwise); a warning when a fused mode would see one side only."""
    given = {
        "image": any(r.image is not None for r in rows),
        "note": any(r.note or r.note_path is not None for r in rows),
    }
    needs = {"image_only": ("image",), "text_only": ("note",)}.get(mode, ("image", "note"))
    missing = [side for side in needs if not given[side]]
    if missing and len(needs) == 1:
        raise ManifestError(
            manifest_path,
            f"no row of the train split has a{'n' if needs[0] == 'image' else ''} "
            f"{needs[0]}, the only side model.fusion.mode={mode} reads",
            hint=f"fill in the {needs[0]} column, or train another fusion mode",
        )
    for side in missing:
        log.warning(
            "%s: no row of the train split has a%s %s: the model learns from the other side alone",
            manifest_path,
            "n" if side == "image" else "",
            side,
        )


def train(
    manifest_path: str | Path, out_dir: str | Path, cfg: RunConfig, device: str | None = None
) -> TrainResult:
    """Train, calibrate and save a model folder at `out_dir`; see the module docstring."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    torch_device = select_device(device)
    workers = Workers.start(torch_device)
    manifest_kind(Path(manifest_path))  # a wrong path says so, also into a finished folder
    refuse_foreign_folder(out_dir, "model")  # an inference run's or a report's folder
    if out_dir.resolve() == Path(manifest_path).resolve().parent:
        raise ClinfuseError(
            f"{out_dir}: is the folder of the manifest it trains on; the model's files would mix "
            "with the export's. Give --out a folder of its own (e.g. models/NAME)"
        )
    if (out_dir / "config.json").is_file() and "training" in read_checkpoint_config(out_dir):
        done = read_checkpoint_config(out_dir)
        _check_same_training(out_dir, done, manifest_path, cfg)
        log.info("%s is already a trained model folder; nothing to do", out_dir)
        if workers.main:  # a run stopped after its model was saved leaves its snapshots
            shutil.rmtree(out_dir / ".train_state", ignore_errors=True)
        return TrainResult(
            out_dir,
            done["training"]["epochs"],
            done["training"]["best_epoch"],
            done["metrics"]["validation"],
            0.0,
            False,
            already_done=True,
        )

    manifest = load_manifest(
        manifest_path,
        labels=cfg.data.labels,
        split=PatientSplit(cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed),
    )
    if cfg.model.labels and tuple(cfg.model.labels) != manifest.labels:
        raise ConfigError(
            "model.labels",
            f"a model's labels are the manifest's label columns ({', '.join(manifest.labels)})",
            hint="choose which columns to train on with data.labels=[...]",
        )
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"labels": manifest.labels})})
    manifest_sha = file_sha256(manifest_path)  # read once: the bytes this run trains on
    settings = _run_settings(cfg, manifest_sha)
    config_sha = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    train_rows, val_rows = split_rows(manifest, "train"), split_rows(manifest, "val")
    check_sides(manifest.path, cfg.model.fusion.mode, train_rows)
    problem = label_problem(
        manifest.label_matrix(), manifest.table["split"].to_numpy(), manifest.labels
    )
    if problem:
        raise ManifestError(
            manifest.path,
            problem,
            hint="fill in the label columns (1 / 0), or move labelled patients with a split "
            "column; `clinfuse validate` shows each split's counts",
        )
    if len(val_rows) < FEW_VALIDATION_STUDIES:
        log.warning(
            "the validation split holds %d studies: early stopping, calibration and thresholds "
            "are fitted on them and will be rough; give it more (data.val_fraction, or a split "
            "column)",
            len(val_rows),
        )
    state_dir = out_dir / ".train_state"
    snapshot = latest_snapshot(state_dir)
    best: FusionModel | None = None
    if snapshot is not None:
        model, best, states, progress = load_snapshot(snapshot)
        # (the hash of a run an earlier clinfuse started covered the whole configuration)
        legacy_sha = hashlib.sha256((cfg.model_dump_json() + manifest_sha).encode()).hexdigest()
        if progress.config_sha256 not in (config_sha, legacy_sha):
            saved = progress.settings
            changed = [
                d for k in settings if k in saved for d in _differing(settings[k], saved[k], k)
            ]
            shown = f" (the run's -> this command's: {'; '.join(changed[:5])})" if changed else ""
            raise ClinfuseError(
                f"{out_dir}: holds an unfinished run with a different configuration or "
                f"manifest{shown}. Rerun the same command (same config, same manifest file), "
                "or choose a new --out"
            )
        started_by = progress.settings.get("processes", workers.world)  # older: not recorded
        if started_by != workers.world:  # its schedule and sample order are per process count
            raise ClinfuseError(
                f"{out_dir}: holds an unfinished run started by {started_by} training "
                f"process(es), resumed here by {workers.world}: its learning-rate schedule and "
                "study order depend on that count. Resume it as it was started "
                + (
                    f"(torchrun --nproc_per_node {started_by} ...)"
                    if started_by > 1
                    else "(one process, without torchrun)"
                )
                + ", or choose a new --out"
            )
        log.info(
            "resuming from %s (epoch %d, step %d)", snapshot.name, progress.epoch, progress.step
        )
    else:
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        notes = training_notes(train_rows)
        model = create_model(cfg.model, notes)
        if cfg.model.text.mlm_epochs > 0:  # each rank alike: same seed, same notes
            pretrain_note_encoder(
                model.to(torch_device),
                [text for _, text in notes],
                cfg.model.text.mlm_epochs,
                cfg.train.batch_size,
                cfg.train.lr,
                cfg.train.seed,
            )
        progress = Progress(
            config_sha256=config_sha, settings={**settings, "processes": workers.world}
        )
        states = None
    model.to(torch_device).train()

    collate = Collator(model.note_tokenizer, cfg.model)
    train_set = StudyDataset(
        train_rows, cfg.model, train=cfg.train.augment, cache=cfg.train.cache, seed=cfg.train.seed
    )
    dies_with_us = partial(die_with_parent, os.getpid())  # a killed run leaves no worker
    val_loader = DataLoader(
        StudyDataset(val_rows, cfg.model, cache=cfg.train.cache),
        batch_size=cfg.train.batch_size,
        collate_fn=collate,
        num_workers=cfg.train.workers,
        worker_init_fn=dies_with_us,
    )
    pos_weight = class_weights(manifest, cfg.train).to(torch_device)
    side_weight = cfg.model.fusion.side_loss if model.side_heads is not None else 0.0
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / workers.world) / cfg.train.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps_per_epoch * cfg.train.epochs, cfg.train.warmup_fraction)
    )
    if states is not None:
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
    ddp = (
        DistributedDataParallel(
            model, device_ids=[torch_device.index] if torch_device.type == "cuda" else None
        )
        if workers.world > 1
        else model
    )
    # loss scaling keeps float16's small gradients from vanishing; bfloat16 has float32's range
    fp16 = amp_dtype(torch_device, cfg.train.amp) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    if states is not None and states.get("scaler"):  # {} on CPU, where it is off
        scaler.load_state_dict(states["scaler"])
    failures = progress.failures  # kept in the snapshots: a resumed run reports them all
    losses: list[float] = []  # this rank's since the last snapshot (before it: the progress's)

    def snapshot_now() -> None:
        failures.update(workers.merged(failures))  # each rank reads its own rows: keep them all
        progress.epoch_losses += workers.gathered(losses)  # every rank's: the epoch's mean
        losses.clear()
        if workers.main:
            save_snapshot(state_dir, model, best, optimizer, scheduler, progress, scaler)
        if workers.world > 1:
            dist.barrier()

    while not progress.stopped and progress.epoch < cfg.train.epochs:
        epoch_started, seen, skipped = time.perf_counter(), 0, 0
        order = epoch_order(len(train_rows), progress.epoch, cfg.train.seed, workers)
        order = order[progress.batch_in_epoch * cfg.train.batch_size :]
        train_set.epoch = progress.epoch  # its augmentation: from (seed, epoch, study) alone
        loader = DataLoader(
            train_set,
            batch_size=cfg.train.batch_size,
            sampler=order,
            collate_fn=collate,
            num_workers=cfg.train.workers,
            worker_init_fn=dies_with_us,
        )
        bar = tqdm(
            loader,
            desc=f"epoch {progress.epoch + 1}/{cfg.train.epochs}",
            disable=not workers.main,
            leave=False,
            unit="batch",
        )
        model.train()
        for batch in bar:
            failures.update(batch.failures)
            progress.batch_in_epoch += 1
            # every row of a batch failed to load (here or on another rank): no step anywhere
            # (DDP needs every rank in each step); the rows are in failures.csv
            if workers.any(len(batch) == 0, torch_device):
                skipped += len(batch)  # readable rows of this rank, in a step another skips
                continue
            batch = batch.to(torch_device)
            # dropout's draws: from (seed, rank, step) alone, so a resumed run is the same run
            torch.manual_seed(derived_seed(cfg.train.seed, workers.rank, progress.step))
            with autocast(torch_device, cfg.train.amp):
                loss = fusion_loss(ddp, batch, pos_weight, side_weight, cfg.train.label_smoothing)
            broken = not bool(torch.isfinite(loss))  # the scaler only skips a step whose
            # gradients overflow: a loss that is not finite is a diverged run on every device
            if workers.any(broken, torch_device):
                raise diverged(progress, cfg.train.lr)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            progress.step += 1
            seen += len(batch)
            losses.append(loss.item())
            rate = seen * workers.world / (time.perf_counter() - epoch_started)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", studies_per_s=f"{rate:.1f}")
            if progress.step % cfg.train.checkpoint_every == 0:
                snapshot_now()

        if progress.step == 0:  # a whole epoch and not one study read: stop now, say why
            raise unreadable_split(manifest_path, "training", len(train_rows), failures)
        val = predict(model, val_loader, torch_device)
        val.require_any(manifest_path, "validation")  # not one study read: stop now, say why
        unread = {k: v for k, v in val.failures if k not in failures}
        if unread and workers.main:
            log.warning(
                "%d validation studies could not be read (failures.csv gives why); early "
                "stopping, calibration and thresholds use the other %d",
                len(unread),
                len(val.study_ids),
            )
        failures.update(unread)
        auroc = validation_macro_auroc(val, manifest.labels)
        if auroc is None:  # the rows giving a label both outcomes are among the unread ones
            raise ManifestError(
                manifest.path,
                f"no label of the {len(val.study_ids)} validation studies that could be read "
                f"(of {len(val_rows)}) has both a positive and a negative, so early stopping, "
                "calibration and the decision thresholds could not be fitted",
                hint="`clinfuse validate` gives each unreadable row's reason: mend those rows, "
                "or move labelled patients into the val split with a split column",
            )
        seconds = time.perf_counter() - epoch_started
        epoch_losses = progress.epoch_losses + workers.gathered(losses)  # every rank's steps
        losses.clear()
        seen, skipped = (sum(workers.gathered([n])) for n in (seen, skipped))
        if skipped and workers.main:
            log.warning(
                "epoch %d: %d readable training studies were left out of it: each shared a "
                "step with another process's batch whose every row failed to load, and "
                "DistributedDataParallel steps all processes together; the failed rows are in "
                "failures.csv",
                progress.epoch + 1,
                skipped,
            )
        improved = auroc is not None and auroc > progress.best_auroc
        if improved:
            progress.best_auroc, progress.best_epoch = auroc, progress.epoch
            progress.epochs_without_improvement = 0
            best = copy.deepcopy(model).cpu().eval()
        else:
            progress.epochs_without_improvement += 1
        progress.history.append(
            {
                "epoch": progress.epoch + 1,
                "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                "val_macro_auroc": auroc,
                "lr": scheduler.get_last_lr()[0],
                "studies_per_s": seen / seconds,
                "seconds": seconds,
            }
        )
        if workers.main:
            log.info(
                "epoch %d/%d loss %.4f val macro AUROC %s (best %.4f at epoch %d) %.1f studies/s",
                progress.epoch + 1,
                cfg.train.epochs,
                progress.history[-1]["train_loss"] if epoch_losses else float("nan"),
                "n/a" if auroc is None else f"{auroc:.4f}",
                progress.best_auroc,
                progress.best_epoch + 1,
                seen / seconds,
            )
        progress.epoch += 1
        progress.batch_in_epoch = 0
        progress.epoch_losses = []
        stop = workers.agree(progress.epochs_without_improvement >= cfg.train.patience)
        progress.stopped = stop  # saved: a run killed after this resumes stopped, not training
        snapshot_now()
        if stop:
            log.info(
                "early stop: no better validation macro AUROC for %d epochs", cfg.train.patience
            )
            break

    final = best if best is not None else model
    validation = calibrate(final.to(torch_device), val_loader, torch_device, cfg, manifest_path)
    failures = workers.merged(failures)
    if workers.main:
        info = {
            "metrics": {"validation": validation},
            "manifest": str(Path(manifest_path).resolve()),
            "manifest_sha256": manifest_sha,
            "data": cfg.data.model_dump(mode="json"),
            "train": cfg.train.model_dump(mode="json"),
            "training": {
                "epochs": progress.epoch,
                "best_epoch": progress.best_epoch + 1,
                "history": progress.history,
                "world_size": workers.world,
                "device": str(torch_device),
                "seconds": time.perf_counter() - started,
            },
            "code_version": __version__,
        }
        # config.json says "trained": save_checkpoint writes it last, after everything else
        write_atomic(out_dir / "history.csv", pd.DataFrame(progress.history).to_csv(index=False))
        write_failures(out_dir / "failures.csv", failures.items())
        save_checkpoint(final, out_dir, info)
        shutil.rmtree(state_dir, ignore_errors=True)
    if workers.world > 1:
        dist.barrier()
    return TrainResult(
        out_dir,
        progress.epoch,
        progress.best_epoch + 1,
        validation,
        time.perf_counter() - started,
        resumed=snapshot is not None,
    )


def training_notes(rows: list[StudyRow]) -> list[tuple[str, str]]:
    """(patient id, note) of the readable, non-empty notes of `rows`, masked as `load_study`
    masks them: what the tokenizer is trained on (the patient, so a word only one patient's
    notes hold stays out of it)."""
    notes = []
    for row in rows:
        try:
            notes.append((row.patient_id, study_note(row)))
        except ClinfuseError:
            continue  # recorded as a failure when the study is loaded for training
    return [(patient, note) for patient, note in notes if note]


def validation_macro_auroc(predictions: Predictions, labels: tuple[str, ...]) -> float | None:
    """Macro AUROC of raw (uncalibrated) scores: what early stopping watches; None if empty."""
    if not predictions.study_ids:
        return None
    probs = expit(predictions.logits)
    metrics = evaluate_predictions(
        predictions.labels, probs, np.full(len(labels), 0.5), labels, n_bootstrap=0
    )
    return metrics["macro"]["auroc"]


def score_distribution(
    probs: np.ndarray, thresholds: np.ndarray, labels: tuple[str, ...], bins: int = 20
) -> dict[str, Any]:
    """Per label: histogram of calibrated probabilities and the rate called positive, the
    reference a monitoring page compares a later run against."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {
        "bins": edges.tolist(),
        "n": int(len(probs)),
        "labels": {
            name: {
                "counts": np.histogram(probs[:, j], edges)[0].tolist(),
                "positive_rate": float(np.mean(probs[:, j] >= thresholds[j]))
                if len(probs)
                else None,
            }
            for j, name in enumerate(labels)
        },
    }


def warn_dropped_sides(
    terms: np.ndarray, labels: np.ndarray, weights: np.ndarray, names: Sequence[str]
) -> None:
    """Warn where a side that tells a label on its own (validation AUROC >= 0.7) was weighed
    near 0 given the other side: a study without the other side gets about the base rate."""
    for j, name in enumerate(names):
        known = ~np.isnan(labels[:, j])
        y = labels[known, j]
        if y.size < 2 or y.min() == y.max():
            continue
        for k, side in enumerate(("image", "note")):
            evidence = terms[known, k, j]
            if weights[j, k] >= 0.1 or not np.isfinite(evidence).all():
                continue  # weighed in, or an overflowed logit (`fit_evidence_weights` said so)
            alone = roc_auc_score(y, evidence)
            if alone >= 0.7:
                other = "note" if side == "image" else "image"
                log.warning(
                    "label %r: the %s alone tells it (validation AUROC %.2f) but weighs %.2f "
                    "beside the %s, so a study without its %s gets about the base rate for "
                    "it; train.evidence_ridge=null keeps each side's head as trained",
                    name, side, alone, weights[j, k], other, other,
                )  # fmt: skip


def calibrate(
    model: FusionModel,
    val_loader: DataLoader,
    device: torch.device,
    cfg: RunConfig,
    manifest_path: str | Path = "the manifest",
) -> dict[str, Any]:
    """Fit per-label evidence weights (naive-Bayes models), temperature, offset and thresholds
    on validation; return the validation metrics."""
    if cfg.train.evidence_ridge is not None and getattr(model, "weighs_evidence", False):
        terms, labels = evidence_terms(model, val_loader, device)
        weights = fit_evidence_weights(terms, labels, cfg.train.evidence_ridge, model.labels)
        model.evidence_weights.copy_(torch.as_tensor(weights, dtype=torch.float32))
        warn_dropped_sides(terms, labels, weights, model.labels)
    val = predict(model, val_loader, device).require_any(manifest_path, "validation")
    raw = expit(val.logits)
    temperature, offset = fit_calibration(val.logits, val.labels, names=model.labels)
    probs = apply_temperature(val.logits, temperature, offset)
    thresholds = fit_thresholds(
        probs,
        val.labels,
        rule=cfg.train.threshold_rule,
        target_sensitivity=cfg.train.target_sensitivity,
    )
    model.temperature.copy_(torch.as_tensor(temperature, dtype=torch.float32))
    model.offset.copy_(torch.as_tensor(offset, dtype=torch.float32))
    model.thresholds.copy_(torch.as_tensor(thresholds, dtype=torch.float32))
    metrics = evaluate_predictions(
        val.labels,
        probs,
        thresholds,
        model.labels,
        n_bootstrap=cfg.train.bootstrap,
        seed=cfg.train.seed,
        patients=val.patient_ids,
    )
    before = evaluate_predictions(val.labels, raw, thresholds, model.labels, n_bootstrap=0)
    metrics["macro"]["ece_before_temperature"] = before["macro"]["ece"]
    metrics["score_distribution"] = score_distribution(probs, thresholds, model.labels)
    for name, found in metrics["labels"].items():
        if found.get("note"):  # said at the end of training, not only in config.json
            log.warning(
                "label %r: %s (validation): its threshold and calibration could not be fitted "
                "and are left near their defaults; give the validation split studies with and "
                "without it",
                name,
                found["note"].removesuffix(" in this split"),
            )
    return json.loads(json.dumps(metrics))  # plain JSON types
