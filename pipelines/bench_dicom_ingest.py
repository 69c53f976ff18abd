"""Benchmark DICOM ingestion over every file pydicom ships: what decodes, how each failure is
typed, and decode throughput per transfer syntax.

    python pipelines/bench_dicom_ingest.py [--out results.json] [--min-seconds 0.05]

Walks pydicom's bundled `data/test_files` folder (a few non-DICOM files such as README.txt are
in there on purpose; they must come out as typed `not_dicom` errors). Nothing is downloaded.
Exits non-zero if any file raises something other than `DicomError`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pydicom
from pydicom.uid import UID

from clinfuse.atomic import write_atomic
from clinfuse.data.dicom import read_dicom
from clinfuse.errors import DicomError
from clinfuse.machine import describe_machine

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def shipped_files() -> list[Path]:
    """Every file in pydicom's bundled test data (never the downloadable extras)."""
    return sorted(p for p in TEST_FILES.rglob("*") if p.is_file())


def transfer_syntax(path: Path) -> UID | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return ds.file_meta.get("TransferSyntaxUID")
    except Exception:
        return None


def time_read(path: Path, min_seconds: float) -> float:
    """Seconds per read_dicom call: the best of at least 3 runs lasting `min_seconds` in all."""
    best, runs, started = float("inf"), 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        read_dicom(path)
        best, runs = min(best, time.perf_counter() - t0), runs + 1
    return best


def run(min_seconds: float) -> dict:
    files = shipped_files()
    reasons: Counter[str] = Counter()
    failures: dict[str, str] = {}
    others: dict[str, str] = {}
    by_syntax: dict[str, dict] = defaultdict(
        lambda: {"files": 0, "frames": 0, "bytes": 0, "seconds": 0.0, "group": "native"}
    )
    for path in files:
        name = str(path.relative_to(TEST_FILES))
        try:
            image = read_dicom(path)
        except DicomError as err:
            reasons[err.reason] += 1
            failures[name] = err.reason
            continue
        except Exception as exc:  # the contract says this never happens
            others[name] = f"{type(exc).__name__}: {exc}"
            continue
        seconds = time_read(path, min_seconds)
        syntax = transfer_syntax(path)
        key = syntax.name if syntax else "(none: raw data set)"
        row = by_syntax[key]
        row["group"] = "compressed" if syntax is not None and syntax.is_encapsulated else "native"
        row["files"] += 1
        row["frames"] += int(image.meta["n_frames"])
        row["bytes"] += path.stat().st_size
        row["seconds"] += seconds
    for row in by_syntax.values():
        row["images_per_s"] = row["frames"] / row["seconds"]
        row["mb_per_s"] = row["bytes"] / 1e6 / row["seconds"]
    return {
        "pydicom": pydicom.__version__,
        "python": platform.python_version(),
        "machine": describe_machine(),
        "files": len(files),
        "decoded": len(files) - sum(reasons.values()) - len(others),
        "errors_by_reason": dict(sorted(reasons.items())),
        "other_exceptions": others,
        "failures": failures,
        "by_syntax": dict(sorted(by_syntax.items(), key=lambda kv: (kv[1]["group"], kv[0]))),
    }


def markdown(results: dict) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in results["errors_by_reason"].items()) or "none"
    lines = [
        f"pydicom {results['pydicom']}, Python {results['python']}, {results['machine']}",
        "",
        "| files | decoded | typed errors (by reason) | other exceptions |",
        "|---:|---:|---|---:|",
        f"| {results['files']} | {results['decoded']} | {errors} "
        f"| {len(results['other_exceptions'])} |",
        "",
        "| group | transfer syntax | files | images (frames) | images/s | MB/s (file bytes) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for group in ("native", "compressed"):
        rows = {k: v for k, v in results["by_syntax"].items() if v["group"] == group}
        for name, row in rows.items():
            lines.append(
                f"| {group} | {name} | {row['files']} | {row['frames']} "
                f"| {row['images_per_s']:,.0f} | {row['mb_per_s']:,.1f} |"
            )
        if rows:
            frames = sum(r["frames"] for r in rows.values())
            seconds = sum(r["seconds"] for r in rows.values())
            size = sum(r["bytes"] for r in rows.values())
            lines.append(
                f"| **{group}** | **all** | {sum(r['files'] for r in rows.values())} | {frames} "
                f"| {frames / seconds:,.0f} | {size / 1e6 / seconds:,.1f} |"
            )
    for name, problem in results["other_exceptions"].items():
        lines.append(f"\nOTHER EXCEPTION {name}: {problem}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--min-seconds", type=float, default=0.05, help="time each file for at least this long"
    )
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the malformed files on purpose
        results = run(args.min_seconds)
    print(markdown(results))
    if args.out:
        write_atomic(args.out, json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 1 if results["other_exceptions"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
