"""How much the ablation's numbers move with the training seed: several `ablation.py` runs, one
table.

    for s in 0 1 2; do
        python pipelines/ablation.py --config pipelines/train_default.yaml \
            --out runs/ablation_seed$s train.seed=$s
    done
    python pipelines/seed_spread.py runs/ablation_seed0 runs/ablation_seed1 runs/ablation_seed2 \
        [--labels pneumonia,mass] [--out benchmarks/seeds] [--heldout]

The split (`data.split_seed`) stays fixed; the training seed changes the initial weights, the
order of the studies and the augmentation. Per mode: macro AUROC, ECE and the chosen labels'
AUROC for each run (and, when the runs have them, ECE against the export's own labels and the
side-matching AUROC, also on each model's own training studies), then their mean and range.
With `--heldout`, the same from the scores on the second export (runs made with
`ablation.py --heldout`). Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from clinfuse.atomic import write_atomic
from clinfuse.machine import describe_machine

# (column, ablation.json key) shown when the runs carry them
OPTIONAL = (
    ("ECE, export's labels", "macro_ece_export_labels"),
    ("side matching", "side_matching_auroc"),
    ("side matching, training studies", "side_matching_train"),
)


def spread(runs: list[dict], labels: list[str], part: str | None = None) -> dict:
    """{mode: {metric: [value per run]}} for macro AUROC, ECE and each of `labels`; `part`:
    from each mode's scores on the held-out export instead."""
    table: dict = {}
    for run in runs:
        for mode, entry in run["modes"].items():
            entry = entry[part] if part else entry
            row = table.setdefault(mode, {})
            row.setdefault("macro AUROC", []).append(entry["macro_auroc"])
            row.setdefault("ECE", []).append(entry["macro_ece"])
            for label in labels:
                row.setdefault(label, []).append(entry["labels"][label])
            for name, key in OPTIONAL:
                if entry.get(key) is not None:
                    row.setdefault(name, []).append(entry[key])
    return table


def markdown(table: dict, folders: list[Path], labels: list[str], heldout: bool = False) -> str:
    metrics = ["macro AUROC", "ECE", *labels]
    for name, _ in OPTIONAL:  # newer ablation runs only; side matching only where both sides
        if any(len(row.get(name, [])) == len(folders) for row in table.values()):
            metrics.append(name)
    where = "every row of the held-out export" if heldout else "the test split"
    lines = [
        f"Runs: {', '.join(f'`{f}`' for f in folders)} (one training seed each, same split), "
        f"scored on {where}. Each cell: the runs' values, then mean [min, max].",
        "",
        "| mode | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for mode, row in table.items():
        cells = []
        for metric in metrics:
            values = row.get(metric, [])
            if len(values) != len(folders):
                cells.append("—")
                continue
            each = " / ".join("—" if v is None else f"{v:.3f}" for v in values)
            known = [v for v in values if v is not None]  # None: no positives in a run's split
            if not known:
                cells.append(each)
                continue
            mean, low, high = statistics.mean(known), min(known), max(known)
            over = "" if len(known) == len(values) else f" of {len(known)} runs"
            cells.append(f"{each}; **{mean:.3f}**{over} [{low:.3f}, {high:.3f}]")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="ablation.py --out folders")
    parser.add_argument("--labels", default="pneumonia,mass", help="labels to show")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/seeds"))
    parser.add_argument("--heldout", action="store_true", help="the scores on the held-out export")
    args = parser.parse_args()
    labels = [x for x in args.labels.split(",") if x]
    runs = [json.loads((f / "ablation.json").read_text(encoding="utf-8")) for f in args.folders]
    for folder, run in zip(args.folders, runs, strict=True):
        if args.heldout and any("heldout" not in e for e in run["modes"].values()):
            raise SystemExit(f"{folder}: no held-out scores; rerun ablation.py with --heldout M2")
    table = spread(runs, labels, "heldout" if args.heldout else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "pipelines/seed_spread.py", *sys.argv[1:]])
    made = f"{datetime.now(timezone.utc):%Y-%m-%d}, {describe_machine()}"
    summary = {"runs": [str(f) for f in args.folders], "modes": table, "command": command}
    summary["made"] = made  # the runs themselves: each ablation.json's machine and date
    write_atomic(args.out.with_suffix(".json"), json.dumps(summary, indent=2))
    text = f"Command: `{command}` ({made})\n\n" + markdown(
        table, args.folders, labels, args.heldout
    )
    write_atomic(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
