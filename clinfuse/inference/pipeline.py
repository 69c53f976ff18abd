"""Batch inference: stream a manifest through the model into the store, losing nothing.

Every manifest row ends as exactly one of a prediction (calibrated probabilities, decisions at
the saved thresholds, the sides used, the model version) or a failure with its typed reason.
Results are committed to the store one batch per transaction; a run killed at any moment and
started again with the same command skips what is done and finishes the rest. The manifest is
read in chunks and decoded in DataLoader workers, overlapped with the model, so memory stays
flat however long the manifest is. On CPU each worker also runs the model (on one thread) on
the batches it decodes, and explains them when asked, so every core decodes, scores and explains
and the main process only writes; on a GPU the main process holds the model. Exports are written
at the end, each atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from clinfuse.allocator import reuse_freed_memory
from clinfuse.atomic import sweep_temporaries, write_atomic
from clinfuse.data.batch import Batch, Collator, load_item
from clinfuse.data.manifest import file_sha256, iter_manifest, no_rows
from clinfuse.data.study import modality_name
from clinfuse.data.transforms import build_transforms
from clinfuse.engine import (
    available_cores,
    cpu_threads,
    die_with_parent,
    iter_predictions,
    select_device,
)
from clinfuse.errors import ClinfuseError, DicomError
from clinfuse.exports.files import STUDY_FILES, new_folder, study_file
from clinfuse.folders import FOLDER_RUNS_FILE, refuse_foreign_folder
from clinfuse.inference.outputs import check_exports, write_exports
from clinfuse.model.checkpoint import NOTICE, load_checkpoint, model_version, read_checkpoint_config
from clinfuse.model.model import FusionModel
from clinfuse.store import ExplanationRecord, FailureRecord, PredictionRecord, Store, parse_url

log = logging.getLogger(__name__)
ExplainMode = Literal["none", "positive", "all"]


@dataclass
class InferenceSettings:
    """How to run; only `explain` and `standards` identify the run (with model and manifest)."""

    batch_size: int = 32
    workers: int = 2  # DataLoader processes decoding studies (and, on CPU, scoring them)
    threads: int | None = None  # the main process's model threads (the scoring and explaining
    # with no workers or on a GPU); None: the cores the workers leave
    explain: ExplainMode = "none"
    standards: tuple[str, ...] = ()  # "fhir", "sr"
    device: str | None = None
    chunk_rows: int = 4096  # manifest rows read at a time
    retry_failed: bool = False  # score again what earlier invocations of the run recorded failed


@dataclass
class InferenceSummary:
    run_id: int
    run_dir: Path
    store_url: str
    model_version: str
    predicted: int  # written by this invocation
    failed: int  # written by this invocation
    skipped: int  # already done by an earlier invocation of the same run
    explained: int = 0  # studies whose explanation this invocation wrote (--explain)
    retried: int = 0  # failed studies of earlier invocations scored again (--retry-failed)
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # whole run
    total_predicted: int = 0
    total_failed: int = 0
    seconds: float = 0.0  # this invocation, model loading included
    studies_per_s: float = 0.0
    streaming_seconds: float = 0.0  # from the first study requested to the last committed
    streaming_studies_per_s: float = 0.0
    exports: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"run {self.run_id} ({self.model_version}) in {self.run_dir}",
            f"this invocation: {self.predicted} predicted, {self.failed} failed, {self.skipped} "
            f"skipped as already done, {self.explained} explained"
            + (f", {self.retried} retried after failing before" if self.retried else "")
            + "; "
            f"{self.streaming_studies_per_s:.1f} studies/s while "
            f"streaming, {self.studies_per_s:.1f} studies/s with model loading",
            f"whole run: {self.total_predicted} predicted, {self.total_failed} failed",
        ]
        lines += [f"  failed {reason}: {n}" for reason, n in self.failed_by_reason.items()]
        lines += [f"export: {path}" for path in self.exports]
        lines.append(NOTICE)
        return "\n".join(lines)


class ManifestStream(IterableDataset):
    """Manifest rows not yet done, loaded into items; each DataLoader worker takes its share."""

    def __init__(self, manifest: Path, model: FusionModel, skip: set[str], chunk_rows: int) -> None:
        self.manifest = manifest
        self.labels = model.labels
        self.transforms = build_transforms(model.cfg.preprocess, model.cfg.image.in_channels)
        self.skip = skip
        self.chunk_rows = chunk_rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rows = iter_manifest(self.manifest, self.labels, self.chunk_rows, read_labels=False)
        for i, row in enumerate(rows):
            if i % workers == worker and row.study_id not in self.skip:
                yield load_item(row, self.transforms)


class ScoringCollator:
    """Collate, then score and explain in the DataLoader worker: (batch, logits (B, L),
    image_used (B,), note_used (B,), explanation records), the three arrays as numpy so they
    travel inside the pipe (see `Batch.__reduce__`). A worker's torch runs one thread, so with as
    many workers as cores every core decodes, scores and explains its own batches: measured, 1
    thread of this model does a study in ~2.0 ms of CPU where 2 threads take ~2.7 ms between
    them. The worker saves each explanation's npz itself, so only its small record (a 64x64
    summary map) crosses the pipe: full-resolution maps of a batch of radiographs would hold
    gigabytes in the queue."""

    def __init__(
        self,
        collate: Collator,
        model: FusionModel,
        explain: ExplainMode = "none",
        run_dir: Path | None = None,
        version: str = "",
    ) -> None:
        self.collate = collate
        self.model = model
        self.explain = explain
        self.run_dir = run_dir
        self.version = version

    def __call__(self, items: list[dict[str, Any]]) -> tuple:
        batch = self.collate(items)
        ((_, logits, image_used, note_used),) = iter_predictions(
            self.model, [batch], torch.device("cpu")
        )
        records = explain_and_save(
            self.model, batch, logits, self.explain, self.run_dir, self.version
        )
        return batch, logits.numpy(), image_used.numpy(), note_used.numpy(), records


def count_rows(manifest: Path, labels: tuple[str, ...], chunk_rows: int) -> int:
    """Check the whole manifest's structure up front (one clear error) and count its rows; a
    manifest with no study row is an error (a run of nothing would look like success)."""
    total = sum(1 for _ in iter_manifest(manifest, labels, chunk_rows, read_labels=False))
    if not total:
        raise no_rows(manifest)
    return total


def run_key(
    version: str,
    manifest: Path,
    manifest_sha256: str,
    settings: InferenceSettings,
    shared_out: Path | None = None,
) -> str:
    """What a run is: the model, the manifest and its bytes, what it writes and, in a store
    other run folders share (`shared_out`), its own folder; the same command finds its run
    again (a resume), another folder on a shared store starts its own. (A run folder's own
    store holds that folder's runs only, so its keys are as older clinfuse versions made them,
    and their runs resume.)"""
    identity = {
        "model": version,
        "manifest": str(manifest.resolve()),
        "sha256": manifest_sha256,
        "explain": settings.explain,
        "standards": sorted(settings.standards),
    }
    if shared_out is not None:
        identity["out"] = str(shared_out.resolve())
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class OpenRun:
    """A run set up in the store: what both engines need before the loop."""

    model: FusionModel
    version: str
    store: Store
    store_url: str  # with any password hidden
    run_id: int
    done: set[str]
    total: int
    manifest: Path
    run_dir: Path
    settings: InferenceSettings
    started: float
    issued: datetime  # when the run first started: the time stamped on its standards exports
    predicted: int = 0  # studies this invocation committed, by outcome (see `commit`)
    failed: int = 0
    explained: int = 0
    retried: int = 0  # failed studies of earlier invocations forgotten, to be scored again
    lock: int | None = None  # the run folder's descriptor, locked while this invocation runs

    def release(self) -> None:
        """Let another invocation take the run folder (the OS does it if the process dies)."""
        release_run_folder(self.lock)
        self.lock = None


def hold_run_folder(run_dir: Path) -> int | None:
    """Lock `run_dir` for this invocation (flock on the folder itself, so no file is left):
    two invocations of one command (an overlapping cron job) would score the same studies and
    each call the run its own. Returns the descriptor (None where the file system cannot lock
    a folder); a ClinfuseError when it is held."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ClinfuseError(
            f"{run_dir}: another clinfuse infer is writing this run folder; wait for it to "
            "end (the same command then skips what it did), or choose another --out"
        ) from None
    except OSError as exc:  # a file system without folder locks (NFS): run unguarded
        os.close(fd)
        log.warning("%s cannot be locked (%s): do not run two invocations on it", run_dir, exc)
        return None
    return fd


def release_run_folder(lock: int | None) -> None:
    """Undo `hold_run_folder` (closing the descriptor drops its lock)."""
    if lock is not None:
        os.close(lock)


PER_STUDY_FOLDERS = tuple(sorted(folder for folder, _ in STUDY_FILES.values()))


def record_folder_run(run_dir: Path, keys: list[str], key: str) -> None:
    """Note in a shared store's run folder (whose `folder_run_keys` are `keys`) that the run
    `key` writes into it."""
    if key not in keys:
        text = json.dumps({"run_keys": [*keys, key]}, indent=1)
        write_atomic(run_dir / FOLDER_RUNS_FILE, text + "\n")


def folder_run_keys(run_dir: Path) -> list[str]:
    """The keys of the runs of a shared store that wrote into `run_dir` (`FOLDER_RUNS_FILE`;
    the store's other runs wrote other folders)."""
    path = run_dir / FOLDER_RUNS_FILE
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))["run_keys"]
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise TypeError
        return keys
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ClinfuseError(
            f"{path}: not the list of runs clinfuse keeps in a run folder on a shared store "
            "(edited or damaged); restore it or use a new --out folder"
        ) from None


def differences(
    earlier: dict[str, Any], version: str, manifest: Path, sha: str, settings: InferenceSettings
) -> str:
    """What sets this run apart from an `earlier` one (`Store.run`), as a user would say it."""
    said = []
    if earlier["model_version"] != version:
        said.append(f"model {version}, not {earlier['model_version']}")
    if Path(earlier["manifest"]).resolve() != manifest.resolve():
        said.append(f"manifest {manifest}, not {earlier['manifest']}")
    elif earlier["manifest_sha256"] != sha:
        said.append("the manifest's bytes changed since (a cell, a row or a column)")
    before = earlier.get("settings") or {}
    if before.get("explain", "none") != settings.explain:
        said.append(f"--explain {settings.explain}")
    if sorted(before.get("standards", [])) != sorted(settings.standards):
        said.append(f"--standards {','.join(settings.standards) or '(none)'}")
    return "; ".join(said) or "another model, manifest or --explain/--standards"


def refuse_replacing_files(
    run_dir: Path,
    runs: list[dict[str, Any]],
    key: str,
    settings: InferenceSettings,
    differ: str = "",
) -> None:
    """A new run (another model, manifest or --explain/--standards) into a folder whose
    per-study files belong to an earlier run: they are named by study, so this run's would
    replace them while the store still points the earlier run at them. A `ClinfuseError`
    naming the folders; the same command (a resume) and a run writing other folders pass.
    `runs`: the store's runs (`Store.runs`)."""
    earlier = [r["id"] for r in runs if r["run_key"] != key]
    if not earlier or len(earlier) < len(runs):  # the first run, or this run resumed
        return
    wanted = {
        "explanations": settings.explain != "none",
        "fhir": "fhir" in settings.standards,
        "sr": "sr" in settings.standards,
    }
    taken = [
        f"{name}/"
        for name in PER_STUDY_FOLDERS
        if wanted[name] and (run_dir / name).is_dir() and any((run_dir / name).iterdir())
    ]
    if taken:
        raise ClinfuseError(
            f"{run_dir}: the files in {' and '.join(taken)} belong to run "
            f"{', '.join(map(str, earlier))}; this run's ({differ or 'another run'}) would "
            "replace them (they are named by study) while the store still points at them. Use "
            "a new --out folder for this run, or the earlier run's command to resume it"
        )


def same_store(url: str, other: str) -> bool:
    """Whether two store URLs name one database; SQLite files are compared by their resolved
    path, so "sqlite:///run/clinfuse.db" is RUN_DIR's own store from any working folder."""
    a, b = parse_url(url), parse_url(other)
    if a.get_backend_name() == b.get_backend_name() == "sqlite" and a.database and b.database:
        return Path(a.database).expanduser().resolve() == Path(b.database).expanduser().resolve()
    return a == b


def open_run(
    model_dir: str | Path,
    manifest: str | Path,
    run_dir: str | Path,
    store_url: str | None,
    settings: InferenceSettings,
) -> OpenRun:
    """Load the model, check the manifest, register model and run, find what is done; the run
    folder is held (`hold_run_folder`) until `OpenRun.release`."""
    started = time.perf_counter()
    run_dir = Path(run_dir).expanduser().resolve()  # the store records files by absolute path
    with new_folder(run_dir):  # removed again, while empty, if the model or manifest is refused
        lock = hold_run_folder(run_dir)
        try:
            return _open_run(
                Path(model_dir), Path(manifest), run_dir, store_url, settings, started, lock
            )
        except BaseException:
            release_run_folder(lock)
            raise


def _open_run(
    model_dir: Path,
    manifest: Path,
    run_dir: Path,
    store_url: str | None,
    settings: InferenceSettings,
    started: float,
    lock: int | None,
) -> OpenRun:
    """`open_run`'s work, with the run folder already held."""
    refuse_foreign_folder(run_dir, "run")  # a model's or a report's folder
    check_exports(run_dir)
    model = load_checkpoint(model_dir, select_device(settings.device))
    version = model_version(model_dir)
    total = count_rows(manifest, model.labels, settings.chunk_rows)
    store_url = store_url or Store.default_url(run_dir)
    own_store = same_store(store_url, Store.default_url(run_dir))  # RUN_DIR's
    store = Store(store_url)
    try:
        run_id, done, retried, issued = _start_run(
            store, model, model_dir, version, manifest, run_dir, settings, own_store, total
        )
    except BaseException:  # a refused run, a database error: the store closes with it
        store.close()
        raise
    shown_url = parse_url(store_url).render_as_string(hide_password=True)
    return OpenRun(
        model,
        version,
        store,
        shown_url,
        run_id,
        done,
        total,
        manifest,
        run_dir,
        settings,
        started,
        issued,
        retried=retried,
        lock=lock,
    )


def _start_run(
    store: Store,
    model: FusionModel,
    model_dir: Path,
    version: str,
    manifest: Path,
    run_dir: Path,
    settings: InferenceSettings,
    own_store: bool,
    total: int,
) -> tuple[int, set[str], int, datetime]:
    """Register the model and the run in `store`: (run id, the studies done, the failures
    forgotten for --retry-failed, when the run first started)."""
    saved = read_checkpoint_config(model_dir)
    thresholds = dict(zip(model.labels, model.thresholds.tolist(), strict=True))
    store.register_model(
        version,
        model.cfg.name,
        list(model.labels),
        thresholds,
        saved["model"],
        saved.get("metrics", {}).get("validation", {}),
    )
    sha = file_sha256(manifest)
    key = run_key(version, manifest, sha, settings, None if own_store else run_dir)
    runs = store.runs()  # those that wrote into run_dir: all of its own store's
    keys = [] if own_store else folder_run_keys(run_dir)
    if not own_store:
        runs = [r for r in runs if r["run_key"] in keys]
    differ = differences(runs[-1], version, manifest, sha, settings) if runs else ""
    refuse_replacing_files(run_dir, runs, key, settings, differ)
    if not own_store:  # before the run exists: a kill between the two
        record_folder_run(run_dir, keys, key)
    run_id, resumed = store.start_run(  # must not leave the run out of its folder's list
        key,
        version,
        str(manifest.absolute()),  # not resolved: its rows' paths are relative to this folder
        sha,
        {k: v for k, v in asdict(settings).items() if k != "device"},
    )
    retried = store.forget_failures(run_id) if resumed and settings.retry_failed else 0
    if retried:
        log.info("run %d: scoring again the %d studies earlier invocations failed", run_id, retried)
    done = store.done_study_ids(run_id)
    if resumed:
        log.info("resuming run %d: %d of %d studies already done", run_id, len(done), total)
    earlier = [r["id"] for r in runs if r["id"] != run_id]  # the runs before this one
    if not resumed and earlier:
        kept = [f"{d}/" for d in PER_STUDY_FOLDERS if (run_dir / d).is_dir()]
        log.warning(
            "%s already holds run %s (this one: %s): its predictions.csv, .parquet and "
            "failures.csv are replaced by run %d's%s; the store keeps every run. Use a new --out "
            "folder to keep each run's files apart",
            run_dir,
            ", ".join(map(str, earlier)),
            differ,
            run_id,
            f" while {', '.join(kept)} may still hold the earlier run's files" if kept else "",
        )
    linked = [str(run_dir / name) for name in PER_STUDY_FOLDERS if (run_dir / name).is_symlink()]
    if linked:  # the files named by study would be written, and stale ones removed, through it
        raise ClinfuseError(
            f"{linked[0]}: is a link; a run writes its per-study files in folders of its own "
            "inside --out, never through a link (it could aim them at any folder): remove it"
        )
    for name in PER_STUDY_FOLDERS:  # what a killed earlier invocation was writing
        sweep_temporaries(run_dir / name)
    issued = store.run(run_id)["started_at"]
    return run_id, done, retried, issued


def finish_run(run: OpenRun, streaming_seconds: float) -> InferenceSummary:
    """Count, export and close the run; the summary printed at the end."""
    counts = run.store.counts(run.run_id)
    seconds = time.perf_counter() - run.started
    scored = run.predicted + run.failed
    summary = InferenceSummary(
        run_id=run.run_id,
        run_dir=run.run_dir,
        store_url=run.store_url,
        model_version=run.version,
        predicted=run.predicted,
        failed=run.failed,
        skipped=len(run.done),
        explained=run.explained,
        retried=run.retried,
        failed_by_reason=dict(counts["by_reason"]),
        total_predicted=counts["predicted"],
        total_failed=counts["failed"],
        seconds=seconds,
        studies_per_s=scored / seconds if seconds else 0.0,
        streaming_seconds=streaming_seconds,
        streaming_studies_per_s=scored / streaming_seconds if streaming_seconds else 0.0,
    )
    summary.exports = [str(p) for p in write_exports(run.store, run.run_id, run.run_dir)]
    summary.exports += [  # the per-study files' folders: FHIR, SR and explanations
        f"{run.run_dir / name}/"
        for name, wanted in (
            ("fhir", "fhir" in run.settings.standards),
            ("sr", "sr" in run.settings.standards),
            ("explanations", run.settings.explain != "none"),
        )
        if wanted and (run.run_dir / name).is_dir()
    ]
    run.store.finish_run(
        run.run_id, {k: v for k, v in asdict(summary).items() if k not in ("run_dir", "exports")}
    )
    return summary


def commit(
    run: OpenRun,
    predictions: list[PredictionRecord],
    failures: list[FailureRecord],
    explanations: list,
    image_paths: dict[str, str],
    bar: tqdm,
) -> None:
    """Per-study standards files first (rewritten identically if a kill lands between the two),
    then one store transaction for the batch, which marks its studies done; counted in `run`."""
    if run.settings.standards:
        write_standards(
            run.run_dir,
            predictions,
            run.model.labels,
            image_paths,
            run.settings.standards,
            run.issued,
        )
    # a failed study's files are an earlier, killed attempt's: gone before the commit, so a
    # kill now leaves them to the rerun, which fails the study again or writes them anew
    remove_study_files(run.run_dir, [f.study_id for f in failures])
    written = run.store.write_batch(run.run_id, predictions, failures, explanations)
    new_studies = written["predicted"] + written["failed"]
    if new_studies != len(predictions) + len(failures):
        log.warning(
            "%d studies of a batch were already in the store; kept the first",
            len(predictions) + len(failures) - new_studies,
        )
    bar.update(len(predictions) + len(failures))
    run.predicted += written["predicted"]  # the summary counts what this run wrote
    run.failed += written["failed"]
    run.explained += written["explained"]


def remove_study_files(run_dir: Path, study_ids: list[str]) -> None:
    """Delete what an earlier, killed attempt wrote for studies that have now failed (their
    image gone since): FHIR, SR and explanation files reporting a prediction the store and the
    exports do not have."""
    for study_id in study_ids:
        for kind in STUDY_FILES:
            study_file(run_dir, kind, study_id).unlink(missing_ok=True)


def run_inference(
    model_dir: str | Path,
    manifest: str | Path,
    run_dir: str | Path,
    store_url: str | None = None,
    settings: InferenceSettings | None = None,
) -> InferenceSummary:
    """Score every row of `manifest` with the model in `model_dir`; see the module docstring."""
    reuse_freed_memory()  # before the workers fork: they inherit it
    run = open_run(model_dir, manifest, run_dir, store_url, settings or InferenceSettings())
    settings, model = run.settings, run.model
    device = model.temperature.device
    try:
        with cpu_threads(model_threads(settings, device)):
            seconds = stream(run)
        return finish_run(run, seconds)
    finally:
        run.release()


def model_threads(settings: InferenceSettings, device: torch.device) -> int | None:
    """The model's CPU threads: as set, else the cores the decoding workers leave (at least 1).

    On CPU the workers and the model share the cores; more threads than are free make the
    model's parallel regions wait on preempted threads (measured: 2 threads beside 2 workers on
    2 cores score 25-30% fewer studies/s than 1). None (unchanged) on a GPU.
    """
    if settings.threads:
        return settings.threads
    return None if device.type != "cpu" else max(1, available_cores() - settings.workers)


def start_worker(parent: int, lock: int | None, worker: int) -> None:
    """A DataLoader worker's start: it lets go of the run folder's lock (only the invocation
    holds it) and dies with the invocation (`die_with_parent`): it would go on writing
    explanations for a run that is over."""
    if lock is not None:
        os.close(lock)
    die_with_parent(parent, worker)


def stream(run: OpenRun) -> float:
    """The loop: decode in workers, score, commit batch by batch; returns its seconds."""
    settings, model = run.settings, run.model
    device = model.temperature.device
    started = time.perf_counter()
    collate = Collator(model.note_tokenizer, model.cfg)
    in_workers = settings.workers > 0 and device.type == "cpu"
    loader = DataLoader(
        ManifestStream(run.manifest, model, run.done, settings.chunk_rows),
        batch_size=settings.batch_size,
        collate_fn=(
            ScoringCollator(collate, model, settings.explain, run.run_dir, run.version)
            if in_workers
            else collate
        ),
        num_workers=settings.workers,
        prefetch_factor=4 if settings.workers else None,
        worker_init_fn=partial(start_worker, os.getpid(), run.lock),
        # forked: the worker's parent is this process (forkserver, Python 3.14's default on
        # Linux, would make it the server's)
        multiprocessing_context="fork" if settings.workers and sys.platform == "linux" else None,
    )
    batches = (
        ((b, *map(torch.from_numpy, arrays), explained) for b, *arrays, explained in loader)
        if in_workers
        else ((*scored, None) for scored in iter_predictions(model, loader, device))
    )  # (batch, logits, image_used, note_used, explanation records or None: not explained yet)
    bar = tqdm(total=run.total, initial=len(run.done), unit="study", desc="infer", smoothing=0.05)
    for batch, *scored, explained in batches:
        predictions, failures, explanations = score_batch(
            model,
            batch,
            *scored,
            run.version,
            run.store.pseudonym,
            settings.explain,
            run.run_dir,
            explained,
        )
        commit(run, predictions, failures, explanations, batch.image_paths, bar)
    bar.close()
    return time.perf_counter() - started


def score_batch(
    model: FusionModel,
    batch: Batch,
    logits: torch.Tensor,
    image_used: torch.Tensor,
    note_used: torch.Tensor,
    version: str,
    pseudonym: Callable[[str], str],
    explain_mode: ExplainMode,
    run_dir: Path,
    explained: list[ExplanationRecord] | None = None,
) -> tuple[list[PredictionRecord], list[FailureRecord], list[ExplanationRecord]]:
    """One scored batch -> the records the store takes: predictions, failures, explanations
    (`explained`, where a worker already explained the batch, else explained here)."""
    predictions = prediction_records(
        model, batch, logits, image_used, note_used, version, pseudonym
    )
    failures = [
        FailureRecord(
            study_id, pseudonym(batch.patient_ids[study_id]), reason.split(": ", 1)[0], reason
        )
        for study_id, reason in batch.failures
    ]
    if explained is None:
        explained = explain_and_save(model, batch, logits, explain_mode, run_dir, version)
    return predictions, failures, explained


def prediction_records(
    model: FusionModel,
    batch: Batch,
    logits: torch.Tensor,
    image_used: torch.Tensor,
    note_used: torch.Tensor,
    version: str,
    pseudonym: Callable[[str], str],
) -> list[PredictionRecord]:
    """Calibrated probabilities and decisions at the saved thresholds, one record a study."""
    probabilities = model.probabilities(logits.to(model.temperature.device)).cpu()
    decisions = model.decisions(probabilities.to(model.thresholds.device)).cpu()
    thresholds = dict(zip(model.labels, model.thresholds.tolist(), strict=True))
    records = []
    for i, study_id in enumerate(batch.study_ids):
        records.append(
            PredictionRecord(
                study_id=study_id,
                patient_pseudonym=pseudonym(batch.patient_ids[study_id]),
                probabilities={
                    n: float(p)
                    for n, p in zip(model.labels, probabilities[i].tolist(), strict=True)
                },
                thresholds=thresholds,
                decisions={
                    n: bool(d) for n, d in zip(model.labels, decisions[i].tolist(), strict=True)
                },
                modalities=modality_name(bool(image_used[i]), bool(note_used[i])),
                model_version=version,
            )
        )
    return records


def explain_and_save(
    model: FusionModel,
    batch: Batch,
    logits: torch.Tensor,
    mode: ExplainMode,
    run_dir: Path | None,
    version: str,
) -> list[ExplanationRecord]:
    """Explain each study of a scored batch for its positive labels (the decisions at the saved
    thresholds) or, with mode "all", every label, and save it as
    `RUN_DIR/explanations/<study_id>.npz` (atomically), one study at a time so that only one
    study's full-resolution maps are held; a study with nothing to explain is left out, and
    one whose explanation fails is logged as a warning naming it (its prediction stands)."""
    if mode == "none" or len(batch) == 0:
        return []
    from clinfuse.explain import explain

    if run_dir is None:
        raise ValueError("explaining needs the run folder to save the explanations into")
    device = model.temperature.device
    decisions = model.decisions(model.probabilities(logits.to(device))).cpu()  # (B, L) bool
    records = []
    for i, positive in enumerate(decisions.tolist()):
        labels = [n for n, d in zip(model.labels, positive, strict=True) if d or mode == "all"]
        if not labels:
            continue
        try:
            (explanation,) = explain(model, batch.select([i]).to(device), labels)
        except Exception as exc:  # one study's explanation never stops a night's run
            log.warning(
                "study %s: not explained (%s: %s); its prediction is kept",
                batch.study_ids[i],
                type(exc).__name__,
                " ".join(str(exc).split())[:200],
            )
            continue
        explanation.model_version = version
        # A full disk stops the run before the batch is committed, so the same command
        # explains these studies again (not: their predictions kept, their explanations lost).
        path = study_file(run_dir, "explanation", batch.study_ids[i])
        explanation.save_npz(path, sweep=False)  # swept once a run, by `open_run`
        records.append(ExplanationRecord(explanation.study_id, explanation.to_record(), str(path)))
    return records


def write_standards(
    run_dir: Path,
    predictions: list[PredictionRecord],
    labels: tuple[str, ...],
    image_paths: dict[str, str],
    formats: tuple[str, ...],
    issued: datetime,
) -> None:
    """FHIR / DICOM SR files per study (the SR references the study's own image). An image
    whose header cannot be read again (replaced or removed since it was scored), or that the
    report cannot reference (highdicom refuses a vendor's private SOP class), leaves that
    study's files without the reference, with a warning: it never stops the run, whose every
    rerun would stop at the same study."""
    from clinfuse.exports import write_study_exports

    for prediction in predictions:
        source = image_paths.get(prediction.study_id) or None
        for form in formats:  # one at a time: an SR highdicom refuses leaves the FHIR whole
            write = partial(
                write_study_exports, run_dir, prediction, labels, formats={form}, issued=issued
            )
            try:
                write(Path(source) if source else None)
            except OSError:
                raise  # a full disk or a read-only folder: stop, so the batch is not committed
            except Exception as exc:
                why = exc.reason if isinstance(exc, DicomError) else type(exc).__name__
                log.warning(  # the reason, not the message: a path may hold a patient's name
                    "study %s: its %s does not reference its image, whose header cannot be "
                    "read again or referenced (%s)",
                    prediction.study_id,
                    {"fhir": "FHIR report", "sr": "DICOM SR"}.get(form, form),
                    why,
                )
                write(None)
