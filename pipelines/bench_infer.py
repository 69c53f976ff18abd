"""Batch-inference benchmark: pipeline efficiency, scaling in time and memory, DICOM decoding.

    python pipelines/bench_infer.py --model MODEL_DIR [--n 1000] [--sizes 1000,10000,50000] \
        [--workers 2] [--explain-n 200] [--out benchmarks/infer]

- efficiency: `clinfuse infer`'s own studies/s while streaming (decoding, tokenizing, the
  model, the store's commits; process start-up, model loading and the final exports excluded,
  and reported apart) divided by the model's forward pass alone on the same collated batches
  (studies/s, the median of three passes), measured in the same run, one after the other. The
  forward pass is timed with every core (the headline ratio: what the pipeline loses against
  the bare model on this machine) and, for reference, on one thread, as each decoding worker
  of `clinfuse infer` runs it on CPU (two threads of a hyperthreaded pair do little more than
  one);
- scaling: wall time and peak resident memory of `clinfuse infer` (a fresh process each) at each
  of `--sizes` studies; the larger manifests repeat the n-study export's files under new study
  and patient ids (every row is decoded and scored anew; generating 50,000 distinct images would
  take ~15 min and change nothing the pipeline does);
- decoding: `read_dicom` images/s in one process (one DataLoader worker's share) for native and
  compressed transfer syntaxes of the sample export;
- explaining: `clinfuse infer --explain positive` over `--explain-n` studies, explained in the
  main process (`--workers 0`, the model on every core) and in the decoding workers (on CPU
  each worker explains the batches it scored, on one thread), a fresh process each.

Writes `<out>.json` and `<out>.md`. Ratios are what to compare across machines: this one is
shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from clinfuse.allocator import reuse_freed_memory
from clinfuse.atomic import write_atomic
from clinfuse.data.batch import Collator, StudyDataset
from clinfuse.data.dicom import read_dicom
from clinfuse.data.manifest import load_manifest
from clinfuse.engine import available_cores, cpu_threads, iter_predictions
from clinfuse.machine import describe_machine
from clinfuse.model.checkpoint import load_checkpoint
from clinfuse.synthetic import make_sample_data


def forward_only(
    model_dir: Path, manifest: Path, batch_size: int, threads: tuple[int, ...], rounds: int = 3
) -> dict[int, float]:
    """Studies/s of the model alone on pre-collated batches (decoding excluded), for each
    thread count (the model loaded and the batches decoded once): the median of `rounds`
    passes, the thread counts alternating, so one pass slowed or sped by another job's load
    does not decide the efficiency's denominator."""
    model = load_checkpoint(model_dir)
    rows = list(load_manifest(manifest, labels=model.labels))
    loader = DataLoader(
        StudyDataset(rows, model.cfg),
        batch_size=batch_size,
        collate_fn=Collator(model.note_tokenizer, model.cfg),
    )
    batches = list(loader)
    device = torch.device("cpu")
    rates: dict[int, list[float]] = {count: [] for count in threads}
    for _ in range(rounds):
        for count in threads:
            with cpu_threads(count):
                for _ in iter_predictions(model, batches[:1], device):  # warm-up
                    pass
                started = time.perf_counter()
                n = sum(len(batch) for batch, *_ in iter_predictions(model, batches, device))
                rates[count].append(n / (time.perf_counter() - started))
    return {count: float(np.median(found)) for count, found in rates.items()}


def run_infer(
    model_dir: Path,
    manifest: Path,
    out: Path,
    batch_size: int,
    workers: int,
    extra: tuple[str, ...] = (),
) -> dict:
    """`clinfuse infer` in a fresh process: wall time, its own studies/s, and its peak RSS (MB).

    A wrapper process runs it and reports its own children's peak, so each run is measured
    alone (the largest single process: the one holding the model).
    """
    command = [
        sys.executable, "-m", "clinfuse", "infer", "--model", str(model_dir),
        "--manifest", str(manifest), "--out", str(out),
        "--batch-size", str(batch_size), "--workers", str(workers), *extra,
    ]  # fmt: skip
    wrapper = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *command], check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    studies = sum(1 for _ in open(out / "predictions.csv", encoding="utf-8")) - 1
    failures = out / "failures.csv"
    failed = sum(1 for _ in open(failures, encoding="utf-8")) - 1 if failures.is_file() else 0
    in_run = re.search(r"([0-9.]+) studies/s while streaming", done.stdout)
    peak = int(done.stdout.split()[-1]) / 1024  # ru_maxrss is in kB on Linux
    return {
        "studies": studies,
        "failed": failed,  # rows (or sides) that could not be read: a benchmark wants none
        "seconds": seconds,
        "studies_per_s": studies / seconds,
        "in_run_studies_per_s": float(in_run.group(1)) if in_run else None,
        "peak_rss_mb": peak,
    }


def repeated_manifest(source: Path, n: int, folder: Path) -> Path:
    """A manifest of `n` rows cycling through `source`'s studies under new ids, with absolute
    file paths (so it may live anywhere)."""
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    rows = table.iloc[[i % len(table) for i in range(n)]].reset_index(drop=True)
    copy = rows.index // len(table)
    rows["study_id"] = rows["study_id"] + "-" + copy.astype(str)
    rows["patient_id"] = rows["patient_id"] + "-" + copy.astype(str)
    for column in ("image", "note_path"):
        rows[column] = [str(source.parent.resolve() / p) if p else "" for p in rows[column]]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"manifest_{n}.csv"
    rows.to_csv(path, index=False)
    return path


def decode_throughput(manifest: Path) -> dict:
    """read_dicom images/s per transfer syntax group over the export's images."""
    root = manifest.parent
    timings: dict[str, list[float]] = defaultdict(list)
    for path in sorted((root / "images").glob("*.dcm")):
        started = time.perf_counter()
        image = read_dicom(path)
        elapsed = time.perf_counter() - started
        syntax = str(image.meta["transfer_syntax"])
        group = "native" if "Little Endian" in syntax or "Big Endian" in syntax else "compressed"
        timings[group].append(elapsed)
        timings[syntax].append(elapsed)
    return {k: {"images": len(v), "images_per_s": len(v) / sum(v)} for k, v in timings.items()}


def explain_runs(args: argparse.Namespace, export: Path) -> dict[str, dict]:
    """`clinfuse infer --explain positive` on the first `--explain-n` studies, explained in the
    main process and in the workers; each run's figures and its count of explanation files."""
    manifest = repeated_manifest(export, args.explain_n, args.work / "explain")
    found = {}
    for where, workers in (
        (f"the main process (0 workers, {available_cores()} threads)", 0),
        (f"{args.workers} workers (1 thread each)", args.workers),
    ):
        out = args.work / f"explain_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        run = run_infer(
            args.model, manifest, out, args.batch_size, workers, ("--explain", "positive")
        )
        found[where] = {**run, "explained": len(list((out / "explanations").glob("*.npz")))}
    return found


def main() -> None:
    reuse_freed_memory()  # as every clinfuse command does: forward-only runs as `infer` does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--n", type=int, default=1000, help="studies in the generated export")
    parser.add_argument("--sizes", default="1000,10000,50000", help="manifest sizes to run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--explain-n", type=int, default=200, help="studies of the explained runs (0: none)"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/bench_infer"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/infer"))
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]

    export = args.work / f"data_{args.n}"
    if not (export / "manifest.csv").exists():
        make_sample_data(export, n=args.n, seed=11, size=96)
    results: dict = {
        "command": "python pipelines/bench_infer.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1min": {"start": os.getloadavg()[0]},
        "workers": args.workers,
    }
    cores = available_cores()
    rates = forward_only(args.model, export / "manifest.csv", args.batch_size, (cores, 1))
    forward, forward_one = rates[cores], rates[1]
    runs = {}
    for n in sizes:
        manifest = repeated_manifest(export / "manifest.csv", n, args.work)
        out = args.work / f"run_{n}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
        runs[n] = run_infer(args.model, manifest, out, args.batch_size, args.workers)
    first, last = runs[sizes[0]], runs[sizes[-1]]
    headline = runs[sizes[min(1, len(sizes) - 1)]]  # the second size: long enough to stream
    results["efficiency"] = {
        "forward_only_studies_per_s": forward,
        "forward_only_threads": cores,
        "forward_only_one_thread_studies_per_s": forward_one,
        "in_run_studies_per_s": headline["in_run_studies_per_s"],
        "process_studies_per_s": headline["studies_per_s"],
        "ratio": headline["in_run_studies_per_s"] / forward,
        "studies": headline["studies"],
    }
    for r in runs.values():
        r["efficiency"] = r["in_run_studies_per_s"] / forward
    results["scaling"] = {str(n): r for n, r in runs.items()}
    results["memory_ratio"] = last["peak_rss_mb"] / first["peak_rss_mb"]
    results["decoding"] = decode_throughput(export / "manifest.csv")
    if args.explain_n:
        results["explain"] = explain_runs(args, export / "manifest.csv")
    results["load_average_1min"]["end"] = os.getloadavg()[0]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps(results, indent=2))
    e = results["efficiency"]
    load = results["load_average_1min"]
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}, {results['date']}; 1-min load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end",
        "",
        "| measure | value |",
        "|---|---|",
        f"| model forward only, {cores} threads (every core) | "
        f"{e['forward_only_studies_per_s']:.0f} studies/s |",
        f"| model forward only, 1 thread (one worker's model) | "
        f"{e['forward_only_one_thread_studies_per_s']:.0f} studies/s |",
        f"| `clinfuse infer`, while streaming ({e['studies']:,} studies, {args.workers} workers, "
        f"each decoding and scoring on 1 thread) | {e['in_run_studies_per_s']:.0f} studies/s |",
        f"| **pipeline efficiency** (streaming / forward only on every core) | {e['ratio']:.2f} |",
        f"| `clinfuse infer`, whole process incl. start-up | "
        f"{e['process_studies_per_s']:.0f} studies/s |",
    ]
    lines += [
        f"| decode, {k} | {v['images_per_s']:.0f} images/s ({v['images']} files) |"
        for k, v in results["decoding"].items()
    ]
    for where, r in results.get("explain", {}).items():
        lines.append(
            f"| `clinfuse infer --explain positive`, explained in {where} "
            f"({r['studies']} studies, {r['explained']} explained) | "
            f"{r['in_run_studies_per_s']:.1f} studies/s |"
        )
    lines += [
        "",
        "Scaling (a fresh `clinfuse infer` process per size):",
        "",
        "| studies | failures | wall time | s per 1,000 studies | streaming studies/s | "
        "efficiency | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in runs.items():
        lines.append(
            f"| {n:,} | {r['failed']} | {r['seconds']:.0f} s | {1000 * r['seconds'] / n:.1f} | "
            f"{r['in_run_studies_per_s']:.0f} | {r['efficiency']:.2f} | {r['peak_rss_mb']:.0f} MB |"
        )
    lines += [
        "",
        f"Peak memory at {sizes[-1]:,} vs {sizes[0]:,} studies: x{results['memory_ratio']:.2f}.",
    ]
    write_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
