"""Time the default training on the bundled sample data (the bar: under 5 minutes on two CPU
cores), in a fresh model folder, and record the model it made.

    python pipelines/bench_train.py [--config pipelines/train_default.yaml] \
        [--out benchmarks/train] [--work runs/bench_train] [key=value ...]

Written: `<out>.json` and `<out>.md`: the wall time of `train()` (note-encoder pretraining,
the epochs, calibration, the save), the epochs run, the model's version (its weights' sha256:
the same seed gives the same model on the same machine and torch build), and the machine with
its 1-minute load average before and after (other jobs slow training: run it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from clinfuse.allocator import reuse_freed_memory
from clinfuse.atomic import write_atomic
from clinfuse.config import resolve_run_config
from clinfuse.machine import describe_machine
from clinfuse.model.checkpoint import model_version, read_checkpoint_config
from clinfuse.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
BAR_SECONDS = 300


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # as `clinfuse train` does
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "sample_data" / "manifest.csv")
    parser.add_argument("--config", type=Path, default=ROOT / "pipelines" / "train_default.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "train")
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "runs" / "bench_train",
        help="the model folder to train into (deleted first, so the run starts fresh)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = resolve_run_config(args.config, args.overrides)
    shutil.rmtree(args.work, ignore_errors=True)  # a fresh run, never a reused folder
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    train(args.manifest, args.work, cfg, device="cpu")
    seconds = time.perf_counter() - started
    training = read_checkpoint_config(args.work)["training"]
    results = {
        "command": " ".join(["python", "pipelines/bench_train.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "seconds": round(seconds, 1),
        "epochs": training["epochs"],
        "best_epoch": training["best_epoch"],
        "model_version": model_version(args.work),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "bar_seconds": BAR_SECONDS,
        "met": seconds < BAR_SECONDS,
    }
    table = (
        f"Command: `{results['command']}`  \n{results['machine']}, {results['date']}\n\n"
        "| seconds | epochs (best) | model | 1-min load before → after | bar |\n"
        "|---|---|---|---|---|\n"
        f"| {results['seconds']} | {results['epochs']} ({results['best_epoch']}) | "
        f"{results['model_version']} | {results['load_average'][0]} → "
        f"{results['load_average'][1]} | < {BAR_SECONDS} s: "
        f"{'met' if results['met'] else 'NOT met'} |\n"
    )
    write_atomic(args.out.with_suffix(".json"), json.dumps(results, indent=2))
    write_atomic(args.out.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
