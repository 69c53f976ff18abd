"""Benchmark explanations on the bundled sample data: quality against ground truth, and cost.

    python pipelines/bench_explain.py [--model DIR] [--work DIR] [--out benchmarks/explain]
                                      [--cost-studies N] [--steps N] [--max-studies 60]

1. Trains the default model (`pipelines/train_default.yaml`, the `small` architecture) on
   `sample_data/manifest.csv` into WORK/model, unless --model names a trained folder (a
   finished WORK/model is reused: training never runs twice).
2. Runs `evaluate_explanations` on the test split (the model's saved patient split): every
   true positive explained, localisation, deletion, cascading randomisation, modality shares,
   five image methods compared; the default method is the one passing most image bars.
3. Measures the cost of explaining one study for all its positive labels (every method
   `explain` runs by default) on CPU: seconds and the multiple of one forward pass of the same
   study, each the median of repeats, then the median over studies.
4. Checks the issue's bar (cost included) and writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from clinfuse.allocator import reuse_freed_memory
from clinfuse.atomic import write_atomic
from clinfuse.config import resolve_run_config
from clinfuse.data.manifest import PatientSplit, load_manifest
from clinfuse.evaluation.evaluate import model_version
from clinfuse.explain.attribution import explain
from clinfuse.explain.quality import check_bars, evaluate_explanations, study_batch
from clinfuse.explain.render import quality_markdown, select_labels
from clinfuse.machine import describe_machine
from clinfuse.model.checkpoint import load_checkpoint, read_checkpoint_config
from clinfuse.model.model import FusionModel
from clinfuse.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


def median_seconds(run, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process-CPU seconds of `run()` over `repeats` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def explanation_cost(
    model: FusionModel, rows: list, steps: int, repeats: int = 3
) -> dict[str, float | int]:
    """Median over studies of: seconds to explain all positive labels (wall clock and process
    CPU), one forward pass, and their ratio (each per study the median of `repeats`; forward
    passes 5x as many). The machine's load average is recorded: other jobs inflate wall time."""
    explain_s, cpu_s, forward_s, ratios, labels = [], [], [], [], []
    load_before = os.getloadavg()[0]
    for row in rows:
        batch = study_batch(model, [row])
        if not len(batch):
            continue
        inputs = batch.model_inputs()
        with torch.no_grad():
            names = select_labels(model, model.probabilities(model(*inputs))[0], "positive")

        def forward(inputs=inputs) -> None:
            with torch.no_grad():
                model(*inputs)

        forward()  # warm-up
        one, _ = median_seconds(forward, 5 * repeats)
        total, cpu = median_seconds(
            lambda b=batch, n=names: explain(model, b, n, steps=steps), repeats
        )
        explain_s.append(total)
        cpu_s.append(cpu)
        forward_s.append(one)
        ratios.append(total / one)
        labels.append(len(names))
    if not explain_s:  # no row of `rows` could be read, or none was asked for
        raise SystemExit("no study to time: give --cost-studies 1 or more readable test studies")
    return {
        "studies": len(explain_s),
        "positive_labels_median": statistics.median(labels),
        "seconds_per_study_median": statistics.median(explain_s),
        "seconds_per_study_max": max(explain_s),
        "cpu_seconds_per_study_median": statistics.median(cpu_s),
        "forward_seconds_median": statistics.median(forward_s),
        "multiple_of_forward_median": statistics.median(ratios),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # as `clinfuse explain` does
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a trained model folder (default: train one)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_explain")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "explain")
    parser.add_argument("--cost-studies", type=int, default=20)
    parser.add_argument("--steps", type=int, default=32, help="integrated-gradients steps")
    parser.add_argument(
        "--max-studies",
        type=int,
        default=0,
        help="explain at most this many test studies with a true positive (0: all of them)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    manifest = SAMPLE / "manifest.csv"

    model_dir = args.model
    if model_dir is None:
        model_dir = args.work / "model"
        cfg = resolve_run_config(ROOT / "pipelines" / "train_default.yaml")
        train(manifest, model_dir, cfg, device="cpu")  # a finished folder is reused as is
    model = load_checkpoint(model_dir, "cpu")
    saved = read_checkpoint_config(model_dir)
    data, training = saved.get("data", {}), saved.get("training", {})
    split = PatientSplit(
        data.get("val_fraction", 0.15), data.get("test_fraction", 0.15), data.get("split_seed", 0)
    )

    started = time.perf_counter()
    summary = evaluate_explanations(
        model,
        manifest,
        SAMPLE / "ground_truth",
        split="test",
        patient_split=split,
        steps=args.steps,
        max_studies=args.max_studies or None,
        progress=lambda message: print(message, flush=True),
    )
    eval_seconds = time.perf_counter() - started
    rows = list(load_manifest(manifest, labels=model.labels, split=split).rows("test"))
    cost = explanation_cost(model, rows[: args.cost_studies], args.steps)
    summary["model_version"] = model_version(model_dir)
    summary["bars"] = check_bars(summary, cost["seconds_per_study_median"])
    summary["cost"] = cost
    summary["run"] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.cfg.name,
        "train_seconds": round(training.get("seconds", float("nan")), 1),
        "train_epochs": training.get("epochs"),
        "validation_macro_auroc": saved.get("metrics", {})
        .get("validation", {})
        .get("macro", {})
        .get("auroc"),
        "evaluation_seconds": round(eval_seconds, 1),
        "steps": args.steps,
        "python": platform.python_version(),
        "machine": describe_machine(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "command": " ".join(["python", "pipelines/bench_explain.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps(summary, indent=2))
    cost_md = (
        f"\n## Cost (CPU, {cost['studies']} test studies, all positive labels, every method)\n\n"
        f"Median {cost['seconds_per_study_median']:.2f} s wall clock per study (max "
        f"{cost['seconds_per_study_max']:.2f} s; {cost['cpu_seconds_per_study_median']:.2f} s of "
        f"process CPU), {cost['multiple_of_forward_median']:.0f}x one forward pass of the same "
        f"study ({1000 * cost['forward_seconds_median']:.1f} ms); median "
        f"{cost['positive_labels_median']} positive labels per study. {summary['run']['machine']}, "
        f"shared: 1-min load average {cost['load_average'][0]} before and "
        f"{cost['load_average'][1]} after; wall times are upper bounds.\n"
    )
    write_atomic(args.out.with_suffix(".md"), quality_markdown(summary) + cost_md)
    for bar in summary["bars"]:
        print(
            f"{'pass' if bar['passed'] else 'FAIL'}  {bar['bar']}: {bar['value']} ({bar['label']})"
        )
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
