"""Resumable training state: crash-safe snapshots a rerun of the same command continues from.

Each snapshot is a folder `step-<N>/` holding the current model (a checkpoint folder), the best
model so far, the optimiser and scheduler state (safetensors + JSON: nothing is unpickled on
resume), and `state.json` (counters, history) written last with a `COMPLETE` marker. A crash
mid-write leaves an incomplete folder that is ignored; the newest complete snapshot wins, and
older ones are removed once a newer one is complete.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clinfuse.atomic import write_atomic
from clinfuse.errors import ModelFolderError
from clinfuse.model.checkpoint import load_checkpoint, save_checkpoint
from clinfuse.model.model import FusionModel


@dataclass
class Progress:
    """Where a run is: counters that make a resumed run continue exactly where it stopped."""

    config_sha256: str
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # batches of `epoch` already done
    step: int = 0  # optimiser steps done
    best_auroc: float = float("-inf")
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)  # the epoch in progress, per step
    stopped: bool = False  # early stopping decided: a resumed run goes straight to calibration
    failures: dict[str, str] = field(default_factory=dict)  # study_id -> why it was not read
    # what the run was started with (`trainer._run_settings`): a refusal to resume says what differs
    settings: dict[str, Any] = field(default_factory=dict)


def latest_snapshot(state_dir: Path) -> Path | None:
    complete = sorted(p.parent for p in state_dir.glob("step-*/COMPLETE"))
    return complete[-1] if complete else None


def save_snapshot(
    state_dir: Path,
    model: FusionModel,
    best: FusionModel | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write a complete snapshot, then delete the older ones. The snapshot at an epoch's end
    is named apart from a step's snapshot at the same step (`-end` sorts after it), so writing
    it never deletes the only complete snapshot."""
    end = "-end" if progress.batch_in_epoch == 0 and progress.epoch > 0 else ""
    name = f"step-{progress.step:08d}{end}"
    folder = state_dir / name
    same = re.compile(rf"{name}(?:-(\d{{3}}))?")
    saved = [same.fullmatch(p.parent.name) for p in state_dir.glob(f"{name}*/COMPLETE")]
    again = [int(m.group(1) or 0) for m in saved if m]
    if again:  # the same step saved again (an epoch of no step): a name sorting after the
        # last, which is deleted only once this one is complete
        folder = state_dir / f"{name}-{max(again) + 1:03d}"
    if folder.exists():  # an unfinished write of a killed run
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_checkpoint(model, folder / "model")
    if best is not None:
        save_checkpoint(best, folder / "best")
    save_tree(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},  # AMP's loss scale
        },
        folder / "optimizer",
    )
    state = asdict(progress)
    state["best_auroc"] = None if progress.best_auroc == float("-inf") else progress.best_auroc
    write_atomic(folder / "state.json", json.dumps(state, indent=2))
    (folder / "COMPLETE").write_text("", encoding="utf-8")
    for older in state_dir.glob("step-*"):
        if older != folder:
            shutil.rmtree(older, ignore_errors=True)
    return folder


def load_snapshot(
    folder: Path,
) -> tuple[FusionModel, FusionModel | None, dict[str, Any], Progress]:
    """(model, best model or None, optimiser/scheduler states, progress) from a snapshot."""
    if not (folder / "optimizer.json").is_file():  # written by a clinfuse that pickled it
        raise ModelFolderError(
            folder,
            "a training snapshot without optimizer.json/.safetensors (an older clinfuse kept "
            "the optimiser state as a pickle, which is never loaded)",
            hint=f"delete {folder.parent} to train from the start",
        )
    model = load_checkpoint(folder / "model", channels_last=False)  # training goes on
    best = None
    if (folder / "best").is_dir():
        best = load_checkpoint(folder / "best", channels_last=False)
    states = load_tree(folder / "optimizer")
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if state["best_auroc"] is None:
        state["best_auroc"] = float("-inf")
    return model, best, states, Progress(**state)


def save_tree(tree: Any, stem: Path) -> None:
    """A nested dict/list of tensors and JSON values -> `<stem>.safetensors` + `<stem>.json`.

    Dicts are stored as [key, value] pairs so integer keys (an optimiser's parameter indices)
    come back as integers.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous()
            return {"tensor": name}
        if isinstance(value, dict):
            return {"pairs": [[key, encode(item)] for key, item in value.items()]}
        if isinstance(value, list | tuple):
            return [encode(item) for item in value]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot save a {type(value).__name__} in a training snapshot")

    skeleton = encode(tree)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(skeleton), encoding="utf-8")


def load_tree(stem: Path) -> Any:
    """What `save_tree` wrote, read back without unpickling anything."""
    tensors = load_file(str(stem.with_suffix(".safetensors")))

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(item) for item in value]
        if isinstance(value, dict):
            if "tensor" in value:
                return tensors[value["tensor"]]
            return {key: decode(item) for key, item in value["pairs"]}
        return value

    return decode(json.loads(stem.with_suffix(".json").read_text(encoding="utf-8")))
