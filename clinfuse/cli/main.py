"""`clinfuse` subcommands. Each parses arguments, calls one library function, prints a result.

Exit status: 0 success; 1 the command ran but its verdict is negative (e.g. a manifest that
cannot be trained on); 2 a user error (bad arguments, a structural manifest error, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from clinfuse import __version__
from clinfuse.errors import ClinfuseError

Command = Callable[[argparse.Namespace], int]


def _sample_data(args: argparse.Namespace) -> int:
    from clinfuse.synthetic import make_sample_data

    summary = make_sample_data(args.out_dir, n=args.n, seed=args.seed, size=args.size)
    print(summary)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from clinfuse.data.manifest import PatientSplit
    from clinfuse.data.validate import validate_manifest

    report = validate_manifest(
        args.manifest,
        labels=args.labels.split(",") if args.labels else None,
        split=PatientSplit(val=args.val, test=args.test, seed=args.seed),
        workers=args.workers,
    )
    print(report.format_summary())
    out = args.out or Path(args.manifest).with_name(Path(args.manifest).stem + ".verdicts.csv")
    report.verdicts.to_csv(out, index=False)
    print(f"per-row verdicts: {out}")
    if args.json:
        print(json.dumps(report.summary(), indent=2))
    return 0 if report.trainable else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinfuse",
        description="Multimodal (DICOM + clinical note) decision support: train, infer, explain, "
        "review. Decision support, not a diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"clinfuse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "sample-data",
        help="write a deterministic synthetic hospital export (DICOM, notes, labels, truth)",
        description="Write a synthetic export: DICOM chest-radiograph-like images, notes, a "
        "manifest and explanation ground truth. Same arguments, same bytes.",
    )
    p.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    p.add_argument("--n", type=int, default=400, help="number of studies (default 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    p.set_defaults(run=_sample_data)

    p = commands.add_parser(
        "validate",
        help="check every row of a manifest; exit 0 when it can be trained on",
        description="Check a manifest's structure, then every row (image decodes, note "
        "readable, labels valid). Prints a summary, writes per-row verdicts. Exit status 0 when "
        "the manifest can be trained on, 1 when no usable row has a known label, 2 on a "
        "structural error.",
    )
    p.add_argument("manifest", type=Path, help="CSV, Parquet or JSONL manifest")
    p.add_argument("--out", type=Path, help="verdicts CSV (default MANIFEST.verdicts.csv)")
    p.add_argument("--labels", help="comma-separated label columns (default: all non-reserved)")
    p.add_argument("--val", type=float, default=0.15, help="validation share of patients")
    p.add_argument("--test", type=float, default=0.15, help="test share of patients")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    p.add_argument("--workers", type=int, default=1, help="processes reading files")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.set_defaults(run=_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except ClinfuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
