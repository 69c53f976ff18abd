"""Batch-inference benchmark: pipeline efficiency, flat memory, DICOM decoding throughput.

    python pipelines/bench_infer.py --model MODEL_DIR [--n 400] [--scale 10] \
        [--out benchmarks/infer]

- efficiency: `clinfuse infer` end to end (studies/s) divided by the model's forward pass alone
  on the same collated batches (studies/s), measured in the same run, one after the other;
- memory: peak resident memory of `clinfuse infer` on n and on scale x n studies (fresh
  processes; generated with `clinfuse sample-data`), and their ratio;
- decoding: `read_dicom` images/s in one process (one DataLoader worker's share) for native and
  compressed transfer syntaxes of the sample export.

Writes `<out>.json` and `<out>.md`. Ratios are what to compare across machines: this one is
shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clinfuse.data.batch import Collator, StudyDataset
from clinfuse.data.dicom import read_dicom
from clinfuse.data.manifest import load_manifest
from clinfuse.engine import iter_predictions
from clinfuse.model.checkpoint import load_checkpoint
from clinfuse.synthetic import make_sample_data


def forward_only(model_dir: Path, manifest: Path, batch_size: int) -> float:
    """Studies/s of the model alone on pre-collated batches (decoding excluded)."""
    model = load_checkpoint(model_dir)
    rows = list(load_manifest(manifest, labels=model.labels))
    loader = DataLoader(
        StudyDataset(rows, model.cfg),
        batch_size=batch_size,
        collate_fn=Collator(model.note_tokenizer, model.cfg),
    )
    batches = list(loader)
    device = torch.device("cpu")
    for _ in iter_predictions(model, batches[:1], device):  # warm-up
        pass
    started = time.perf_counter()
    n = sum(len(batch) for batch, *_ in iter_predictions(model, batches, device))
    return n / (time.perf_counter() - started)


def run_infer(model_dir: Path, manifest: Path, out: Path, batch_size: int, workers: int) -> dict:
    """`clinfuse infer` in a fresh process: studies/s and its peak RSS (MB).

    A wrapper process runs it and reports its own children's peak, so each run is measured
    alone (the largest single process: the one holding the model).
    """
    command = [
        sys.executable,
        "-m",
        "clinfuse",
        "infer",
        "--model",
        str(model_dir),
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
        "--workers",
        str(workers),
    ]
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *command], check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    studies = sum(1 for _ in open(out / "predictions.csv", encoding="utf-8")) - 1
    peak = int(done.stdout.split()[-1]) / 1024  # ru_maxrss is in kB on Linux
    return {
        "studies": studies,
        "seconds": seconds,
        "studies_per_s": studies / seconds,
        "peak_rss_mb": peak,
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_infer"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/infer"))
    args = parser.parse_args()

    small, large = args.work / f"data_{args.n}", args.work / f"data_{args.n * args.scale}"
    for folder, n in ((small, args.n), (large, args.n * args.scale)):
        if not (folder / "manifest.csv").exists():
            make_sample_data(folder, n=n, seed=11, size=96)
    results: dict = {
        "command": "python pipelines/bench_infer.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    forward = forward_only(args.model, small / "manifest.csv", args.batch_size)
    end_to_end = run_infer(
        args.model, small / "manifest.csv", args.work / "run_small", args.batch_size, args.workers
    )
    results["efficiency"] = {
        "forward_only_studies_per_s": forward,
        "end_to_end_studies_per_s": end_to_end["studies_per_s"],
        "ratio": end_to_end["studies_per_s"] / forward,
    }
    scaled = run_infer(
        args.model, large / "manifest.csv", args.work / "run_large", args.batch_size, args.workers
    )
    results["memory"] = {
        "n": args.n,
        "peak_rss_mb_n": end_to_end["peak_rss_mb"],
        "n_scaled": args.n * args.scale,
        "peak_rss_mb_scaled": scaled["peak_rss_mb"],
        "ratio": scaled["peak_rss_mb"] / end_to_end["peak_rss_mb"],
        "seconds_n": end_to_end["seconds"],
        "seconds_scaled": scaled["seconds"],
    }
    results["decoding"] = decode_throughput(small / "manifest.csv")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    e, m = results["efficiency"], results["memory"]
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}, {results['date']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| model forward only | {e['forward_only_studies_per_s']:.1f} studies/s |",
        f"| `clinfuse infer` end to end | {e['end_to_end_studies_per_s']:.1f} studies/s |",
        f"| pipeline efficiency (end to end / forward only) | {e['ratio']:.2f} |",
        f"| peak RSS, {m['n']} studies | {m['peak_rss_mb_n']:.0f} MB |",
        f"| peak RSS, {m['n_scaled']} studies | {m['peak_rss_mb_scaled']:.0f} MB "
        f"(x{m['ratio']:.2f}) |",
        f"| wall time, {m['n']} / {m['n_scaled']} studies | {m['seconds_n']:.0f} s / "
        f"{m['seconds_scaled']:.0f} s |",
    ]
    lines += [
        f"| decode, {k} | {v['images_per_s']:.0f} images/s ({v['images']} files) |"
        for k, v in results["decoding"].items()
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
