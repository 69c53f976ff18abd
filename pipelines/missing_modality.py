"""Missing-modality robustness over training seeds: each fused model with a side removed
against the unimodal model of the side it keeps, per seed and on average.

    python pipelines/missing_modality.py runs/ablation_seed0 runs/ablation_seed1 \
        runs/ablation_seed2 --heldout runs/heldout/manifest.csv [--out benchmarks/missing_modality]

Takes the four fusion modes each `ablation.py` run trained (same split, one training seed per
run) and scores them like `bench_peers.py --heldout` does (`heldout_scores`: macro AUROC on every
row of the second export against its noise-free labels, with both sides, without the note and
without the image). One seed's difference of a few thousandths is within what the seed moves
the unimodal models themselves, so the bar is judged on the mean over the seeds too. Writes
`<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ablation import MODES
from bench_peers import heldout_scores, robustness_bar

from clinfuse.allocator import reuse_freed_memory
from clinfuse.atomic import write_atomic
from clinfuse.machine import describe_machine
from clinfuse.model.checkpoint import load_checkpoint

FUSED = ("cross_attention", "late")
KEPT = {"note": "image_only", "image": "text_only"}  # side removed -> the model of the other


def gaps(scores: dict[str, dict]) -> dict[str, float]:
    """{"<fused> no_<side>": fused model without the side - the unimodal model it keeps}."""
    return {
        f"{name} no_{side}": scores[name][f"no_{side}"] - scores[kept]["macro_auroc"]
        for name in FUSED
        for side, kept in KEPT.items()
    }


def markdown(results: dict) -> str:
    keys = list(results["mean_gap"])
    lines = [
        f"`{results['command']}`, {results['machine']}",
        "",
        f"Held-out export `{results['heldout']}` ({results['n']} studies), macro AUROC with a "
        "side removed minus the unimodal model of the side that is left (>= 0: not worse).",
        "",
        "| run | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for run in results["runs"]:
        lines.append(
            f"| `{run['folder']}` | " + " | ".join(f"{run['gap'][k]:+.4f}" for k in keys) + " |"
        )
    lines.append("| **mean** | " + " | ".join(f"**{results['mean_gap'][k]:+.5f}**" for k in keys))
    lines[-1] += " |"
    lines += ["", "Bar (mean over the runs):", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in results["bar"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    reuse_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="ablation.py --out folders")
    parser.add_argument("--heldout", type=Path, required=True, help="the second export")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/missing_modality"))
    args = parser.parse_args()
    results: dict = {
        "command": "python pipelines/missing_modality.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "heldout": str(args.heldout),
        "runs": [],
    }
    for folder in args.runs:
        loaded = {mode: load_checkpoint(folder / mode) for mode in MODES}
        scored = heldout_scores(loaded, args.heldout, None)
        results["n"] = scored["n"]
        results["runs"].append(
            {"folder": str(folder), "scores": scored["models"], "gap": gaps(scored["models"])}
        )
        print(
            f"{folder}: "
            + ", ".join(f"{k} {v:+.3f}" for k, v in results["runs"][-1]["gap"].items())
        )
    mean = {  # {mode: {metric: mean over the runs}}
        mode: {
            metric: statistics.mean(run["scores"][mode][metric] for run in results["runs"])
            for metric in ("macro_auroc", "no_note", "no_image")
        }
        for mode in MODES
    }
    results["mean_gap"] = gaps(mean)
    results["bar"] = robustness_bar(mean)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps(results, indent=2))
    write_atomic(args.out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
