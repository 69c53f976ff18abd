"""Benchmark against a peer: MONAI's Transchex next to clinfuse's four fusion modes, one run.

    python pipelines/bench_peers.py --manifest sample_data/manifest.csv --out benchmarks/peers \
        [--reuse runs/ablation] [--work runs/peers] [--config C] [--bootstrap 200] \
        [--heldout M2] [key=value ...]

`key=value` reaches the run config as in `clinfuse train` (`train.epochs=5`); `peer.KEY=VALUE`
sets a Transchex size (`peer.vision_layers=2`, see `clinfuse.peers.TranschexConfig`). All five
models share the patient-level split, the data layer, the epochs and the early-stopping rule,
and are calibrated on validation the same way. Written: `<out>.json` and `<out>.md`:

- accuracy on test: per-label and macro AUROC, ECE after temperature scaling, wall time;
- missing modality: macro AUROC on test with the note removed and with the image removed
  (clinfuse: `note_present` / `image_present` False, its missing-modality path; Transchex: the
  empty note / a black image), beside the unimodal models;
- speed at equal size: training samples/s and inference studies/s of clinfuse's cross-attention
  model and Transchex on the same pre-loaded studies, measured in alternation;
- with `--heldout M2` (a second export, e.g. `clinfuse sample-data DIR --n 1500 --seed 7`):
  accuracy and missing modality again on all of its rows, against its noise-free labels; the
  test split's 169 studies cannot resolve differences of ~0.01 macro AUROC.

clinfuse models are taken from `--reuse` (the ablation's folder) when one there was trained
with this configuration on this manifest, else trained into `--work`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from ablation import (
    MODES,
    add_heldout_argument,
    add_labels_argument,
    default_truth,
    train_and_evaluate,
)
from bench_model import flop_counter
from torch.utils.data import DataLoader

from clinfuse.allocator import reuse_freed_memory
from clinfuse.atomic import write_atomic
from clinfuse.config import RunConfig, apply_overrides, resolve_run_config
from clinfuse.data.batch import Batch, Collator, StudyDataset
from clinfuse.data.manifest import PatientSplit, StudyRow, load_manifest
from clinfuse.engine import predict, select_device
from clinfuse.evaluation.calibration import calibrated_probabilities
from clinfuse.evaluation.evaluate import measured_labels
from clinfuse.evaluation.metrics import evaluate_predictions
from clinfuse.machine import describe_machine
from clinfuse.model.checkpoint import load_checkpoint, read_checkpoint_config
from clinfuse.peers import TranschexConfig, count_parameters, train_transchex
from clinfuse.training.trainer import balanced_pos_weight, masked_bce, training_differences

PEER = "transchex"
SIDES = ("note", "image")


# -- choosing and training the models -------------------------------------------------------
def trained_with(folder: Path, cfg: RunConfig, manifest: Path) -> bool:
    """`folder` is a finished clinfuse model trained with `cfg` on this manifest."""
    if not (folder / "config.json").is_file():
        return False
    saved = read_checkpoint_config(folder)
    return "training" in saved and not training_differences(saved, manifest, cfg)


def clinfuse_folder(mode: str, cfg: RunConfig, args: argparse.Namespace) -> tuple[Path, bool]:
    """(folder, already trained): the ablation's model when it matches, else one in --work."""
    if args.reuse is not None and trained_with(args.reuse / mode, cfg, args.manifest):
        return args.reuse / mode, True
    folder = args.work / mode
    if trained_with(folder, cfg, args.manifest):
        return folder, True
    if (folder / "config.json").is_file():  # unfinished runs resume (or fail) in `train`
        sys.exit(f"{folder}: holds another finished run; delete it or choose another --work")
    return folder, False


# -- scoring ---------------------------------------------------------------------------------
def test_loader(model: torch.nn.Module, rows: list[StudyRow], batch_size: int = 32) -> DataLoader:
    """The test studies through clinfuse's data layer, with `model`'s own data settings."""
    return DataLoader(
        StudyDataset(rows, model.cfg),
        batch_size=batch_size,
        collate_fn=Collator(model.note_tokenizer, model.cfg),
    )


def without(batches: Iterable[Batch], side: str | None) -> Iterator[Batch]:
    """The batches with `side` ("note" / "image") marked absent in every study."""
    for batch in batches:
        if side is not None:
            flag = f"{side}_present"
            batch = dataclasses.replace(batch, **{flag: torch.zeros_like(getattr(batch, flag))})
        yield batch


def score(
    model: torch.nn.Module,
    rows: list[StudyRow],
    labels: Path | None,
    side: str | None = None,
    bootstrap: int = 0,
) -> dict:
    """Metrics on `rows` at the model's saved temperature and thresholds, `side` removed,
    against the `labels` table (None: the manifest's labels)."""
    device = next(model.parameters()).device
    predictions = predict(model, without(test_loader(model, rows), side), device)
    probs = calibrated_probabilities(model, predictions.logits)
    thresholds = model.thresholds.cpu().numpy()
    y = measured_labels(predictions, model.labels, labels)
    return evaluate_predictions(
        y, probs, thresholds, model.labels, n_bootstrap=bootstrap, patients=predictions.patient_ids
    )


def peer_entry(args: argparse.Namespace, cfg: RunConfig, rows: list[StudyRow]) -> tuple:
    """Train (or reuse) Transchex in --work and score it on test like the clinfuse models."""
    peer = apply_overrides(TranschexConfig(), args.peer_overrides)
    trained = train_transchex(args.manifest, args.work / PEER, cfg, peer, args.device)
    trained.model.to(select_device(args.device))
    metrics = score(trained.model, rows, args.labels, bootstrap=args.bootstrap)
    training, validation = trained.info["training"], trained.info["metrics"]["validation"]
    entry = {
        "train_seconds": training["seconds"],
        "epochs": training["epochs"],
        "macro_auroc": metrics["macro"]["auroc"],
        "macro_ece": metrics["macro"]["ece"],
        "val_ece_before_temperature": validation["macro"].get("ece_before_temperature"),
        "val_ece": validation["macro"]["ece"],
        "labels": {name: m["auroc"] for name, m in metrics["labels"].items()},
        "n_test": metrics["n"],
        "folder": str(trained.folder),
        "reused": trained.reused,
        "config": peer.model_dump(mode="json"),
        "note_tokens": trained.model.seq_len,
    }
    return entry, trained.model


# -- speed ------------------------------------------------------------------------------------
def preload(model: torch.nn.Module, rows: list[StudyRow], batch_size: int) -> list[Batch]:
    device = next(model.parameters()).device
    return [b.to(device) for b in test_loader(model, rows, batch_size) if len(b)]


def synchronize(model: torch.nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(model: torch.nn.Module, batches: list[Batch], pos_weight: torch.Tensor) -> float:
    """Training samples/s: forward, backward and AdamW step on pre-loaded batches."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start, seen = time.perf_counter(), 0
    for batch in batches:
        loss = masked_bce(model(*batch.model_inputs()), batch.labels, pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(batch)
    synchronize(model)
    return seen / (time.perf_counter() - start)


def infer_rate(model: torch.nn.Module, batches: list[Batch]) -> float:
    """Inference studies/s: `forward` under inference mode on pre-loaded batches."""
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(*batch.model_inputs())
    synchronize(model)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def forward_flops(model: torch.nn.Module, batch: Batch) -> float:
    """Forward FLOPs per study (`bench_model.flop_counter`: convolutions, matmuls and
    attention, as bench_model counts them)."""
    model.eval()
    # not under inference mode: the counter's module tracker hooks every tensor that requires
    # grad, and a parameter used directly (label attention's queries) has no graph there
    with flop_counter() as counter:
        model(*batch.model_inputs())
    return counter.get_total_flops() / len(batch)


def speed(
    models: dict[str, torch.nn.Module], rows: list[StudyRow], cfg: RunConfig, repeats: int
) -> dict:
    """Median rates over `repeats` rounds, the models measured in alternation each round."""
    pos_weight = balanced_pos_weight(
        np.stack([r.labels for r in rows]).astype(float), cfg.train.max_pos_weight
    ).to(next(iter(models.values())).temperature.device)
    train_batches = {n: preload(m, rows, cfg.train.batch_size) for n, m in models.items()}
    infer_batches = {n: preload(m, rows, 32) for n, m in models.items()}
    rates: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in models}
    for name, model in models.items():  # warm-up
        train_rate(model, train_batches[name][:1], pos_weight)
        infer_rate(model, infer_batches[name][:1])
    for _ in range(repeats):
        for name, model in models.items():
            rates[name]["train"].append(train_rate(model, train_batches[name], pos_weight))
            rates[name]["infer"].append(infer_rate(model, infer_batches[name]))
    return {
        name: {
            "parameters": count_parameters(model),
            "forward_mflops_per_study": forward_flops(model, infer_batches[name][0]) / 1e6,
            "train_samples_per_s": statistics.median(r["train"]),
            "infer_studies_per_s": statistics.median(r["infer"]),
            "studies": len(rows),
            "repeats": repeats,
        }
        for (name, model), r in zip(models.items(), rates.values(), strict=True)
    }


# -- the run ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    results: dict = {
        "command": "python pipelines/bench_peers.py " + " ".join(args.argv),
        "machine": describe_machine(),
        "date": time.strftime("%Y-%m-%d"),
        "labels_from": str(args.labels) if args.labels else "manifest",
        "load_average_1min": {"start": os.getloadavg()[0]},  # a shared machine distorts times
        "models": {},
        "robustness": {},
    }
    loaded: dict[str, torch.nn.Module] = {}
    for mode in MODES:
        cfg = resolve_run_config(args.config, [*args.overrides, f"model.fusion.mode={mode}"])
        folder, reused = clinfuse_folder(mode, cfg, args)
        entry, _ = train_and_evaluate(args.manifest, folder, cfg, args.bootstrap, args.labels)
        loaded[mode] = load_checkpoint(folder, select_device(args.device))
        entry.update(folder=str(folder), reused=reused, parameters=count_parameters(loaded[mode]))
        results["models"][mode] = entry
    cfg = resolve_run_config(args.config, args.overrides)  # the default mode's, for the peer
    manifest = load_manifest(
        args.manifest,
        labels=cfg.data.labels,
        split=PatientSplit(cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed),
    )
    test_rows = list(manifest.rows("test"))
    entry, loaded[PEER] = peer_entry(args, cfg, test_rows)
    entry["parameters"] = count_parameters(loaded[PEER])
    results["models"][PEER] = entry
    for name, model in loaded.items():
        results["robustness"][name] = {
            f"no_{side}": score(model, test_rows, args.labels, side)["macro"]["auroc"]
            for side in SIDES
        }
    if args.heldout is not None:
        results["heldout"] = heldout_scores(loaded, args.heldout, cfg.data.labels)
        results["bar_heldout"] = accuracy_bar(results["heldout"]["models"]) | robustness_bar(
            results["heldout"]["models"]
        )
    speed_rows = list(manifest.rows("train"))[: args.speed_studies]
    results["speed"] = speed(
        {"cross_attention": loaded["cross_attention"], PEER: loaded[PEER]},
        speed_rows,
        cfg,
        args.repeats,
    )
    results["bar"] = check_bar(results)
    results["seconds"] = time.perf_counter() - started
    results["load_average_1min"]["end"] = os.getloadavg()[0]
    return results


def heldout_scores(
    loaded: dict[str, torch.nn.Module], manifest: Path, labels: tuple[str, ...] | None
) -> dict:
    """Every model on all rows of a second export: macro AUROC with both sides, without the
    note and without the image, against its noise-free labels when it has them."""
    rows = list(load_manifest(manifest, labels=labels).rows(None))
    truth = default_truth(manifest)
    scores = {
        name: {
            key: score(model, rows, truth, side)["macro"]["auroc"]
            for key, side in (("macro_auroc", None), ("no_note", "note"), ("no_image", "image"))
        }
        for name, model in loaded.items()
    }
    return {"manifest": str(manifest), "n": len(rows), "models": scores}


def accuracy_bar(macro: dict[str, dict]) -> dict[str, bool]:
    """Cross-attention against Transchex, from {model: {"macro_auroc": ...}}."""
    return {
        "cross-attention macro AUROC > Transchex": above(
            macro["cross_attention"]["macro_auroc"], macro[PEER]["macro_auroc"]
        )
    }


def robustness_bar(scores: dict[str, dict]) -> dict[str, bool]:
    """Each fused model with a side removed against the unimodal model of the side it keeps,
    from {model: {"macro_auroc", "no_note", "no_image"}}."""
    bar = {}
    for name in (n for n in ("cross_attention", "late", PEER) if n in scores):
        for side, other in (("note", "image_only"), ("image", "text_only")):
            reference = scores[other]["macro_auroc"]
            bar[f"{NAMES[name]}, {side} removed >= the {other.replace('_', '-')} model"] = above(
                scores[name][f"no_{side}"], reference, strict=False
            )
    return bar


def test_scores(results: dict) -> dict[str, dict]:
    """{model: {"macro_auroc", "no_note", "no_image"}} on the test split."""
    return {
        name: {"macro_auroc": m["macro_auroc"], **results["robustness"][name]}
        for name, m in results["models"].items()
    }


def check_bar(results: dict) -> dict[str, bool]:
    """The benchmark issue's bar, as measured here."""
    models, fast = results["models"], results["speed"]
    ours, theirs = fast["cross_attention"], fast[PEER]
    bar = {
        **accuracy_bar(models),
        "cross-attention inference studies/s >= Transchex's": above(
            ours["infer_studies_per_s"], theirs["infer_studies_per_s"], strict=False
        ),
        "cross-attention training samples/s >= Transchex's": above(
            ours["train_samples_per_s"], theirs["train_samples_per_s"], strict=False
        ),
    }
    return bar | robustness_bar(test_scores(results))


def above(value: float | None, reference: float | None, strict: bool = True) -> bool:
    """`value` > `reference` (>= unless `strict`); an undefined metric never passes."""
    if value is None or reference is None:
        return False
    return value > reference if strict else value >= reference


# -- the report -------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


NAMES = {
    "cross_attention": "clinfuse cross-attention",
    "late": "clinfuse late fusion",
    "image_only": "clinfuse image-only",
    "text_only": "clinfuse text-only",
    PEER: "MONAI Transchex",
}


def markdown(results: dict) -> str:
    models, fast = results["models"], results["speed"]
    labels = list(models["cross_attention"]["labels"])
    header = " | ".join(["model", "parameters", *labels, "macro AUROC", "ECE", "train s", "epochs"])
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}, {results['date']}; whole run {results['seconds']:.0f} s"
        + load_note(results.get("load_average_1min")),
        "",
        "Accuracy on the test split against "
        f"{results.get('labels_from', 'manifest')} labels (AUROC; ECE after temperature "
        "scaling fitted on validation):",
        "",
        f"| {header} |",
        "|---" * (len(labels) + 6) + "|",
    ]
    for name, m in models.items():
        cells = " | ".join(fmt(m["labels"][label]) for label in labels)
        reused = " *" if m["reused"] else ""
        lines.append(
            f"| {NAMES[name]} | {m['parameters']:,} | {cells} | **{fmt(m['macro_auroc'])}** | "
            f"{fmt(m['macro_ece'])} | {m['train_seconds']:.0f}{reused} | {m['epochs']} |"
        )
    if any(m["reused"] for m in models.values()):
        lines += [
            "",
            "\\* trained by an earlier run (folder in the JSON); its time as measured then.",
        ]
    lines += ["", *robustness_lines(test_scores(results), "on test")]
    if "heldout" in results:
        held = results["heldout"]
        lines += [
            "",
            *robustness_lines(
                held["models"], f"on all {held['n']} studies of `{held['manifest']}`"
            ),
            "",
            "Bar on the held-out export:",
            "",
        ]
        lines += [f"- [{'x' if ok else ' '}] {k}" for k, ok in results["bar_heldout"].items()]
    lines += [
        "",
        "Speed at equal size (model compute only, the same pre-loaded studies, median of "
        f"{fast[PEER]['repeats']} alternating rounds over {fast[PEER]['studies']} studies):",
        "",
        "| model | parameters | forward MFLOPs/study | training samples/s | inference studies/s |",
        "|---|---|---|---|---|",
    ]
    for name, s in fast.items():
        lines.append(
            f"| {NAMES[name]} | {s['parameters']:,} | {s['forward_mflops_per_study']:.1f} | "
            f"{s['train_samples_per_s']:.1f} | {s['infer_studies_per_s']:.1f} |"
        )
    lines += ["", "Bar on the test split:", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in results["bar"].items()]
    peer = models[PEER]
    lines += [
        "",
        "Transchex ran offline: its BERT (normally `bert-base-uncased` from the hub) is a small "
        "randomly initialised `BertConfig` saved to a local folder with a WordPiece tokenizer "
        "trained on the training notes, so neither side starts from pretrained weights. Its "
        "architecture is MONAI's, unchanged; sizes: "
        + ", ".join(f"{k}={v}" for k, v in peer["config"].items())
        + f". Inputs adapted: grey channel repeated to 3, images at its img_size, notes padded "
        f"to a fixed {peer['note_tokens']} tokens (Transchex attends to padding), a missing note "
        "is the empty note and a missing image is black.",
    ]
    return "\n".join(lines) + "\n"


def robustness_lines(scores: dict[str, dict], where: str) -> list[str]:
    """The missing-modality table from {model: {"macro_auroc", "no_note", "no_image"}}."""
    image_alone = scores["image_only"]["macro_auroc"]
    text_alone = scores["text_only"]["macro_auroc"]
    lines = [
        f"Missing modality (macro AUROC {where} over all labels; the unimodal models alone: "
        f"image-only {fmt(image_alone)}, text-only {fmt(text_alone)}):",
        "",
        "| model | both sides | note removed | vs image-only | image removed | vs text-only |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in scores.items():
        lines.append(
            f"| {NAMES[name]} | {fmt(r['macro_auroc'])} | {fmt(r['no_note'])} | "
            f"{delta(r['no_note'], image_alone)} | {fmt(r['no_image'])} | "
            f"{delta(r['no_image'], text_alone)} |"
        )
    return lines


def load_note(load: dict | None) -> str:
    return "" if not load else f"; 1-min load average {load['start']:.1f} → {load['end']:.1f}"


def delta(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return "—"
    return f"{value - reference:+.3f}"


def main() -> None:
    reuse_freed_memory()  # as every clinfuse command does (both models alike)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("sample_data/manifest.csv"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/peers"))
    parser.add_argument("--reuse", type=Path, help="the ablation's folder (runs/ablation)")
    parser.add_argument("--work", type=Path, default=Path("runs/peers"))
    parser.add_argument("--config", type=Path)
    parser.add_argument("--device", help="cpu, cuda, ... (default: a GPU when present)")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--speed-studies", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    add_heldout_argument(parser)
    add_labels_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.labels = args.labels or default_truth(args.manifest)
    args.peer_overrides = [o.removeprefix("peer.") for o in args.overrides if o.startswith("peer.")]
    args.overrides = [o for o in args.overrides if not o.startswith("peer.")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, allow_nan=False)
    write_atomic(args.out.with_suffix(".json"), text)
    table = markdown(results)
    write_atomic(args.out.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
