"""`clinfuse explain` and `clinfuse explain-eval`: thin shells over `clinfuse.explain`.

`add_commands(commands)` registers both on the subparsers of `clinfuse.cli.main`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clinfuse.cli.args import at_least


def _explain(args: argparse.Namespace) -> int:
    from clinfuse.explain.render import explain_studies
    from clinfuse.exports.files import new_folder

    def report(study) -> None:
        if study.failure:
            print(f"{study.study_id}: not explained: {study.failure}")
        else:
            names = ", ".join(p.name for p in study.files)
            print(f"{study.study_id}: {', '.join(study.labels)} -> {names}")

    with new_folder(args.out):  # checked before any study is explained; gone again if refused
        done = explain_studies(
            args.model,
            args.manifest,
            args.study_id,
            args.out,
            labels=args.labels,
            steps=args.steps,
            device=args.device,
            progress=report,
        )
    print(f"explanations: {args.out}")
    return 1 if any(s.failure for s in done) else 0


def _explain_eval(args: argparse.Namespace) -> int:
    from clinfuse.atomic import write_atomic
    from clinfuse.data.manifest import PatientSplit
    from clinfuse.engine import select_device
    from clinfuse.evaluation.evaluate import model_version
    from clinfuse.explain.quality import evaluate_explanations
    from clinfuse.explain.render import quality_markdown
    from clinfuse.exports.files import new_folder
    from clinfuse.model.checkpoint import load_checkpoint, read_checkpoint_config

    out = Path(args.out)
    with new_folder(out):  # checked before the studies are explained, not after
        model = load_checkpoint(args.model, select_device(args.device))
        data = read_checkpoint_config(args.model).get("data", {})
        summary = evaluate_explanations(
            model,
            args.manifest,
            args.truth,
            split=args.split,
            patient_split=PatientSplit(
                data.get("val_fraction", 0.15),
                data.get("test_fraction", 0.15),
                data.get("split_seed", 0),
            ),
            steps=args.steps,
            sanity=not args.no_sanity,
            max_studies=args.max_studies,
            progress=print,
        )
        summary["model_version"] = model_version(args.model)
        write_atomic(out / "explain_eval.json", json.dumps(summary, indent=2))
        write_atomic(out / "explain_eval.md", quality_markdown(summary))
    default = summary["default_method"] or "n/a (no image map to measure: the model reads no image)"
    print(f"default image method: {default}")
    for bar in summary["bars"]:
        value = "n/a" if bar["value"] is None else f"{bar['value']:.3f}"
        sign = ">=" if bar["direction"] == "min" else "<="
        where = f" ({bar['label']})" if bar["label"] else ""
        verdict = "pass" if bar["passed"] else "FAIL" if bar["value"] is not None else "n/a "
        print(f"{verdict}  {bar['bar']}: {value}{where}, bar {sign} {bar['threshold']}")
    print(f"results: {out / 'explain_eval.json'}  table: {out / 'explain_eval.md'}")
    return 0 if all(bar["passed"] for bar in summary["bars"]) else 1


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `explain` and `explain-eval` on `clinfuse`'s subcommands."""
    p = commands.add_parser(
        "explain",
        help="explain studies per label: image maps, note words, modality shares (npz, png, html)",
        description="Explain why a model scored each study as it did: integrated gradients and "
        "Grad-CAM on the DICOM's own pixel grid, word attributions with character spans, "
        "Shapley shares of image and note. Writes OUT/<study_id>.npz, .png and .html. "
        "Exit status 1 when a study could not be read.",
    )
    p.add_argument("--model", required=True, type=Path, help="model folder (clinfuse train)")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument(
        "--study-id", required=True, action="append", help="study to explain (repeat for more)"
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    p.add_argument(
        "--labels",
        default="positive",
        help="positive (called at the saved thresholds, default), all, or names: a,b",
    )
    p.add_argument("--steps", type=at_least(1), default=32, help="integrated-gradients steps")
    p.add_argument("--device", help="cpu, cuda, ... (default: a GPU when present)")
    p.set_defaults(run=_explain)

    p = commands.add_parser(
        "explain-eval",
        help="measure explanation quality against ground-truth masks and rationales",
        description="Score explanations on the true positives of a split against lesion masks "
        "and rationale spans (pointing game, relevance mass, rationale rank, deletion curves, "
        "randomisation sanity check, modality shares). Writes explain_eval.json and "
        "explain_eval.md. Exit status 1 when one of the quality bars fails (README, Explanations: "
        "pointing game, relevance mass, rationale rank, deletion, randomisation, note share).",
    )
    p.add_argument("--model", required=True, type=Path, help="model folder (clinfuse train)")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--truth", required=True, type=Path, help="ground_truth folder (sample-data)")
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="the split whose true positives are explained",
    )
    p.add_argument("--steps", type=at_least(1), default=32, help="integrated-gradients steps")
    p.add_argument("--max-studies", type=at_least(1), help="explain at most this many studies")
    p.add_argument("--no-sanity", action="store_true", help="skip the randomisation check")
    p.add_argument("--device", help="cpu, cuda, ... (default: a GPU when present)")
    p.set_defaults(run=_explain_eval)
