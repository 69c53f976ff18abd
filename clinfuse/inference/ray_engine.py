"""`--engine ray`: the same pipeline on Ray Data, for when one machine is not enough.

The driver streams the manifest in chunks (skipping studies already done), adds each patient
id's pseudonym (computed with the store's key, which never leaves the driver), and hands each
chunk to Ray Data; the patient id travels with its note, as the local engine's workers read
it, only so that the actor masks it in the note; records carry the pseudonym alone. Actors
each hold the model and score batches with the same `score_batch` as the local engine; the
driver commits each returned batch to the store in one transaction, so resumability and
exactly-once writing are the local engine's. Point it at an existing cluster with
`--ray-address ray://head:10001` (or `auto` on a cluster node); model folder, manifest files and
the run folder must be on storage every node sees. Without an address a local Ray starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from clinfuse import errors
from clinfuse.allocator import reuse_freed_memory
from clinfuse.data.batch import Collator, load_item
from clinfuse.data.manifest import StudyRow, iter_manifest
from clinfuse.data.transforms import build_transforms
from clinfuse.engine import iter_predictions, select_device
from clinfuse.inference.pipeline import (
    InferenceSettings,
    InferenceSummary,
    OpenRun,
    commit,
    finish_run,
    open_run,
    score_batch,
)
from clinfuse.model.checkpoint import load_checkpoint, model_version
from clinfuse.store import ExplanationRecord, FailureRecord, PredictionRecord


def row_to_item(row: StudyRow, pseudonym: str) -> dict[str, Any]:
    """A manifest row as plain values for Ray, with its patient's pseudonym."""
    return {
        "row": row.row,
        "study_id": row.study_id,
        "patient_id": row.patient_id,  # to mask in the note (`study_note`), never recorded
        "pseudonym": pseudonym,
        "image": str(row.image) if row.image else "",
        "note": row.note or "",
        "note_path": str(row.note_path) if row.note_path else "",
        "split": row.split,
        "labels": row.labels.tolist(),
    }


def item_to_row(item: dict[str, Any]) -> StudyRow:
    return StudyRow(
        row=int(item["row"]),
        study_id=str(item["study_id"]),
        patient_id=str(item["patient_id"]),
        image=Path(item["image"]) if item["image"] else None,
        note=item["note"] or None,
        note_path=Path(item["note_path"]) if item["note_path"] else None,
        split=item["split"],
        labels=np.asarray(item["labels"], dtype=np.float32),
    )


class Scorer:
    """A Ray actor: holds the model, turns a batch of rows into serialised records."""

    def __init__(self, model_dir: str, run_dir: str, settings: dict[str, Any]) -> None:
        reuse_freed_memory()  # an actor is a process of its own
        self.settings = InferenceSettings(**settings)
        import ray

        # the GPU Ray gave it (`actor_pool`; the only one it sees, whatever index --device
        # named), else the device asked for, else the CPU
        device = "cuda" if ray.get_gpu_ids() else self.settings.device
        self.model = load_checkpoint(model_dir, select_device(device))
        self.version = model_version(model_dir)
        self.run_dir = Path(run_dir)
        self.transforms = build_transforms(
            self.model.cfg.preprocess, self.model.cfg.image.in_channels
        )
        self.collate = Collator(self.model.note_tokenizer, self.model.cfg)

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        given = rows.to_dict("records")
        with told() as said:  # what a local run's workers print (a note repaired, ...)
            items = [load_item(item_to_row(r), self.transforms) for r in given]
            pseudonyms = {r["patient_id"]: r["pseudonym"] for r in given}
            batch = self.collate(items)
            scored = next(iter_predictions(self.model, [batch], self.model.temperature.device))
            predictions, failures, explanations = score_batch(
                self.model,
                *scored,
                self.version,
                pseudonyms.__getitem__,
                self.settings.explain,
                self.run_dir,
            )
        out = [("prediction", r.study_id, dataclasses.asdict(r)) for r in predictions]
        out += [("failure", r.study_id, dataclasses.asdict(r)) for r in failures]
        out += [("explanation", r.study_id, dataclasses.asdict(r)) for r in explanations]
        out += [("said", "", message) for message in said]
        return pd.DataFrame(
            {
                "kind": [k for k, _, _ in out],
                "study_id": [s for _, s, _ in out],
                "record": [json.dumps(r) for _, _, r in out],
            }
        )


@contextlib.contextmanager
def told() -> Iterator[list[dict[str, str]]]:
    """Collect the warnings and clinfuse's warning log lines of an actor's batch (Ray keeps an
    actor's output in its own log files): {"warning": category, "message": ...} or {"log":
    logger name, "message": ...}, for the driver to say them again (`say_again`)."""
    said: list[dict[str, str]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append({"log": record.name, "message": record.getMessage()})

    handler, logger = Collect(logging.WARNING), logging.getLogger("clinfuse")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # each study's, as a local run's workers say them
            yield said
    finally:
        logger.removeHandler(handler)
    said += [
        {"warning": w.category.__name__, "message": str(w.message)}
        for w in caught
        if getattr(errors, w.category.__name__, None) is w.category  # clinfuse's own
    ]


def say_again(said: dict[str, str]) -> None:
    """An actor's warning or log line, said in the driver as a local run says it."""
    if "log" in said:
        logging.getLogger(said["log"]).warning("%s", said["message"])
        return
    warnings.warn(said["message"], getattr(errors, said["warning"]), stacklevel=1)


def records(frame: pd.DataFrame) -> tuple[list, list, list]:
    """The actor's serialised records back as the store's dataclasses; its warnings said."""
    predictions, failures, explanations = [], [], []
    for kind, record in zip(frame["kind"], frame["record"], strict=True):
        data = json.loads(record)
        if kind == "prediction":
            predictions.append(PredictionRecord(**data))
        elif kind == "failure":
            failures.append(FailureRecord(**data))
        elif kind == "explanation":
            explanations.append(ExplanationRecord(**data))
        else:
            say_again(data)
    return predictions, failures, explanations


def run_inference_ray(
    model_dir: str | Path,
    manifest: str | Path,
    run_dir: str | Path,
    store_url: str | None = None,
    settings: InferenceSettings | None = None,
    address: str | None = None,
) -> InferenceSummary:
    """`run_inference` on Ray Data; see the module docstring."""
    import ray

    run: OpenRun = open_run(
        model_dir, manifest, run_dir, store_url, settings or InferenceSettings()
    )
    started_ray = not ray.is_initialized()
    try:
        if started_ray:
            caller = signal.getsignal(signal.SIGTERM)
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            # Ray's own SIGTERM handler exits at once; the caller's (the CLI's: shut down, say
            # so, end by the signal) is put back
            if caller is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, caller)
        return _score_on_ray(run, model_dir)
    finally:
        run.release()
        if started_ray:  # also when stopped: a process ended by its signal runs no atexit,
            ray.shutdown()  # and Ray's agents outlived it


def actor_pool(settings: InferenceSettings, cluster_gpus: float) -> tuple[int, float]:
    """(actors, GPUs per actor): on a cluster with GPUs (and no CPU `--device`), one GPU per
    actor and as many actors as GPUs, at most `--workers`; else `--workers` CPU actors."""
    wants_gpu = settings.device is None or settings.device.startswith("cuda")
    if wants_gpu and cluster_gpus >= 1:
        return max(1, min(settings.workers or 1, int(cluster_gpus))), 1.0
    return max(1, settings.workers), 0.0


def _score_on_ray(run: OpenRun, model_dir: str | Path) -> InferenceSummary:
    """Score what `run` has left on the Ray runtime this process is connected to."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # clinfuse shows its own
    pending = (
        r
        for r in iter_manifest(
            run.manifest, run.model.labels, run.settings.chunk_rows, read_labels=False
        )
        if r.study_id not in run.done
    )
    actor_settings = {k: v for k, v in dataclasses.asdict(run.settings).items()}
    actors, gpus = actor_pool(run.settings, ray.cluster_resources().get("GPU", 0))
    resources = {"num_gpus": gpus} if gpus else {}
    started = time.perf_counter()
    bar = tqdm(total=run.total, initial=len(run.done), unit="study", desc="infer (ray)")
    while chunk := list(itertools.islice(pending, run.settings.chunk_rows)):
        items = [row_to_item(r, run.store.pseudonym(r.patient_id)) for r in chunk]
        scored = ray.data.from_items(items).map_batches(
            Scorer,
            fn_constructor_kwargs={
                "model_dir": str(Path(model_dir).resolve()),
                "run_dir": str(run.run_dir.resolve()),
                "settings": actor_settings,
            },
            batch_size=run.settings.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=actors),
            **resources,
        )
        for frame in scored.iter_batches(batch_format="pandas", batch_size=None):
            predictions, failures, explanations = records(frame)
            paths = {r["study_id"]: r["image"] for r in items}
            commit(run, predictions, failures, explanations, paths, bar)
    bar.close()
    return finish_run(run, time.perf_counter() - started)
