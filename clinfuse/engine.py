"""Where device and precision are decided, once, and the one prediction loop.

Modules are built on CPU in float32; the engine moves them to the device and picks the
autocast context for training (bfloat16/float16 on GPU when asked, nothing on CPU).
Predictions are always float32: calibration is fitted, metrics are measured and decisions are
made on the same logits on every device (bfloat16 ties and shifts logits near a threshold).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clinfuse.data.batch import Batch
from clinfuse.data.study import modality_name
from clinfuse.errors import ConfigError, unreadable_split
from clinfuse.model.model import FusionModel

_DEVICE_HINT = "leave --device out to use a GPU when there is one, else the CPU; or give cpu"


def select_device(requested: str | None = None) -> torch.device:
    """`requested`, else this process's GPU (LOCAL_RANK under torchrun) when there is one.

    Under torchrun with several processes, "cuda" is each process's own GPU (LOCAL_RANK) and
    a GPU index is refused (every process would share it). A device this machine does not
    have is a `ConfigError` naming what it has."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    shared = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            detail = f"{requested!r} is not a device"
            raise ConfigError("--device", detail, hint=_DEVICE_HINT) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device", "no CUDA GPU is available here", hint=_DEVICE_HINT)
        if device.type == "cuda" and shared and device.index is not None:
            detail = f"{requested!r} under torchrun: every process would train on that one GPU"
            raise ConfigError("--device", detail, hint="give cuda: each process takes its own")
        if device.type == "cuda" and shared:
            device = torch.device("cuda", local_rank)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            detail = f"{requested!r}: this machine has {torch.cuda.device_count()} GPU(s)"
            raise ConfigError("--device", detail, hint=_DEVICE_HINT)
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("--device", "Apple's MPS is not available here", hint=_DEVICE_HINT)
        return device
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            detail = (
                f"process {local_rank} of torchrun has no GPU of its own: this machine has "
                f"{torch.cuda.device_count()}"
            )
            raise ConfigError("--nproc_per_node", detail, hint="start one process per GPU")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Run the block with `threads` intra-op threads (None: unchanged); restores the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """Training's mixed precision on `device`: bfloat16 on a GPU that has it, else float16;
    None (float32) on CPU or when not `enabled`."""
    if device.type != "cuda" or not enabled:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision on GPU (`amp_dtype`); a no-op on CPU."""
    dtype = amp_dtype(device, enabled)
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


@dataclass
class Predictions:
    """Model outputs for a set of studies, in the order they came."""

    study_ids: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)  # each study's, as the manifest has it
    logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (N, L)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (N, L)
    image_used: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,)
    note_used: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (study_id, reason)

    def require_any(self, manifest: str | Path, split: str) -> Predictions:
        """These predictions, or the error saying that none of the split's studies could be
        read (every one of them is a failure)."""
        if len(self.logits) == 0:
            failed = dict(self.failures)
            raise unreadable_split(manifest, split, len(failed), failed)
        return self

    def modalities(self) -> list[str]:
        """Per study: the sides the prediction used (see `modality_name`)."""
        return [modality_name(i, n) for i, n in zip(self.image_used, self.note_used, strict=True)]


def iter_predictions(
    model: FusionModel, batches: Iterable[Batch], device: torch.device
) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch: (batch, logits (B, L) float32 on CPU, image_used (B,), note_used (B,)).

    Only the forward pass runs under inference mode, so the caller may compute gradients
    (explanations) between batches.
    """
    model.eval()
    for batch in batches:
        if len(batch) == 0:
            none = torch.zeros(0, dtype=torch.bool)
            yield batch, torch.zeros(0, len(model.labels)), none, none
            continue
        with torch.inference_mode():
            out = model.forward_intermediates(*batch.to(device).model_inputs())
            logits = out.logits.float().cpu()
            image_used, note_used = out.image_used.cpu(), out.note_used.cpu()
        yield batch, logits, image_used, note_used


def evidence_terms(
    model: FusionModel, batches: Iterable[Batch], device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """A naive-Bayes model's logit terms (N, 3, L) before their weights: the image's evidence
    (image head - prior), the note's and the fused correction; and the labels (N, L). Over the
    studies that used both sides, the ones those three terms answer."""
    if not model.weighs_evidence:
        raise ValueError("evidence terms need side heads and fusion.combine=naive_bayes")
    terms, labels = [], []
    model.eval()
    for batch in batches:
        if len(batch) == 0:
            continue
        with torch.inference_mode():
            out = model.forward_intermediates(*batch.to(device).model_inputs())
            both = (out.image_used & out.note_used).cpu()  # (B,)
        terms.append(out.evidence.float().cpu()[both].numpy())  # (n, 3, L)
        labels.append(batch.labels[both].numpy())
    if not terms:
        return np.zeros((0, 3, len(model.labels))), np.zeros((0, len(model.labels)))
    return np.concatenate(terms), np.concatenate(labels)


def predict(model: FusionModel, batches: Iterable[Batch], device: torch.device) -> Predictions:
    """Run the model over every batch and gather logits, labels, sides used and failures."""
    ids, patients, logits, labels, image_used, note_used, failures = [], [], [], [], [], [], []
    for batch, batch_logits, batch_image, batch_note in iter_predictions(model, batches, device):
        failures += batch.failures
        if len(batch) == 0:
            continue
        ids += batch.study_ids
        patients += [batch.patient_ids.get(s, s) for s in batch.study_ids]
        logits.append(batch_logits.numpy())
        labels.append(batch.labels.numpy())
        image_used.append(batch_image.numpy())
        note_used.append(batch_note.numpy())
    if not ids:
        return Predictions(failures=failures)
    return Predictions(
        study_ids=ids,
        patient_ids=patients,
        logits=np.concatenate(logits),
        labels=np.concatenate(labels),
        image_used=np.concatenate(image_used),
        note_used=np.concatenate(note_used),
        failures=failures,
    )


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent thread ends


def die_with_parent(parent: int, _worker: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn` (with `functools.partial(die_with_parent,
    os.getpid())`): on Linux the kernel kills the worker when the process that started it dies
    (kill -9, the OOM killer), where it would stay blocked on a pipe nobody reads, holding its
    memory."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)
