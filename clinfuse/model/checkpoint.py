"""A checkpoint is a folder that carries everything needed to predict; loading never unpickles.

config.json        model config (architecture, labels, preprocessing spec), the text
                   encoder's transformers config, calibration, metrics, provenance
model.safetensors  every weight and buffer (temperatures and thresholds included)
tokenizer/         the note tokenizer (tokenizer.json)
MODEL_CARD.md      generated: what the model is for, its labels, calibration and metrics
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from clinfuse import __version__
from clinfuse.atomic import current_umask, write_atomic
from clinfuse.config import ModelConfig, parse_config
from clinfuse.errors import ConfigError, ModelFolderError
from clinfuse.model.model import FusionModel
from clinfuse.model.text_encoder import load_tokenizer

FORMAT_VERSION = 1
NOTICE = "Decision support, not a diagnosis: every output is for review by a clinician."


def save_checkpoint(
    model: FusionModel, folder: str | Path, info: dict[str, Any] | None = None
) -> Path:
    """Write `model` to `folder` (created); `info` (metrics, manifest hash, ...) is recorded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    config = {
        "format_version": FORMAT_VERSION,
        "clinfuse_version": __version__,
        "model": model.cfg.model_dump(mode="json"),
        "text_model": model.text_encoder.saved_config() if model.text_encoder else None,
        "calibration": calibration_table(model),
        **evidence_table(model),
        **(info or {}),
    }
    tmp = folder / "model.safetensors.tmp"
    save_model(model, str(tmp), force_contiguous=True)  # a loaded (channels-last) model too
    os.chmod(tmp, 0o666 & ~current_umask())  # safetensors makes it 0600; the rest, umask
    tmp.replace(folder / "model.safetensors")  # atomic: a crash never leaves half a file
    model.note_tokenizer.tokenizer.save_pretrained(str(folder / "tokenizer"))
    write_atomic(folder / "MODEL_CARD.md", model_card(model, config))
    # last: a folder with its config.json is complete (training's "done" marker)
    write_atomic(folder / "config.json", json.dumps(config, indent=2))
    return folder


def calibration_table(model: nn.Module) -> dict[str, dict[str, float]]:
    """{label: {"temperature", "offset", "threshold"}}: what config.json records."""
    return {
        name: {"temperature": float(t), "offset": float(b), "threshold": float(th)}
        for name, t, b, th in zip(
            model.labels, model.temperature, model.offset, model.thresholds, strict=True
        )
    }


def evidence_table(model: FusionModel) -> dict[str, dict[str, dict[str, float]]]:
    """{"evidence_weights": {label: {"image", "note", "correction"}}} for a naive-Bayes model
    (what config.json records), else {}."""
    if not model.weighs_evidence:
        return {}
    names = ("image", "note", "correction")
    return {
        "evidence_weights": {
            label: dict(zip(names, map(float, weights), strict=True))
            for label, weights in zip(model.labels, model.evidence_weights, strict=True)
        }
    }


def model_version(folder: str | Path) -> str:
    """`<folder name>@<first 12 hex of the weights' sha256>`: names the exact weights."""
    digest = hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()
    return f"{Path(folder).resolve().name}@{digest[:12]}"


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if Path(folder).is_file():
        raise ModelFolderError(
            folder,
            "is a file, not a model folder",
            hint="Pass the folder `clinfuse train --out` wrote (it holds config.json)",
        )
    if not path.is_file():
        raise ModelFolderError(
            folder,
            "not a clinfuse model folder (no config.json)",
            hint="Pass the folder `clinfuse train --out` wrote",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(
            folder,
            f"config.json is not valid JSON ({exc})",
            hint="the file was edited or cut short; copy the model folder again from its source",
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ModelFolderError(
            folder,
            "not a clinfuse model folder (its config.json has no 'model' section)",
            hint="Pass the folder `clinfuse train --out` wrote; a pretrained note encoder's "
            "folder goes in text.pretrained",
        )
    return config


def load_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu", channels_last: bool = True
) -> FusionModel:
    """Rebuild the model from `folder` in eval mode: config, tokenizer, safetensors weights;
    for inference the image trunk laid out channels-last (see `ImageEncoder.channels_last`),
    for more training (`channels_last=False`) in the layout training uses."""
    folder = Path(folder)
    config = read_checkpoint_config(folder)
    try:
        cfg = parse_config(ModelConfig, config["model"], "model")
    except ConfigError as exc:  # an edited file, or one another clinfuse wrote
        raise ModelFolderError(
            folder,
            f"its config.json does not hold a model this clinfuse builds ({exc})",
            hint="score it with the clinfuse that wrote it (config.json's clinfuse_version), "
            "or train it again",
        ) from None
    # The weights come from model.safetensors; never re-read the user's pretrained files.
    cfg = cfg.model_copy(update={"image": cfg.image.model_copy(update={"pretrained": None})})
    try:  # a folder, never a hub name: an absent one must not be looked up online
        if not (folder / "tokenizer").is_dir():
            raise OSError("no tokenizer folder")
        tokenizer = load_tokenizer(str(folder / "tokenizer"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(
            folder,
            f"its tokenizer cannot be read ({str(exc).splitlines()[0]})",
            hint="copy the model folder again from its source, tokenizer/ included",
        ) from None
    model = FusionModel(cfg, tokenizer, config.get("text_model"))
    weights = folder / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device="cpu")
    except (OSError, SafetensorError) as exc:  # absent, cut short, not a safetensors file
        raise ModelFolderError(
            folder,
            f"model.safetensors cannot be read ({exc})",
            hint="copy the model folder again from its source (the weights must be complete)",
        ) from None
    except RuntimeError as exc:  # tensors of other shapes: another model's weights or config
        mismatch = next((x.strip() for x in str(exc).splitlines() if "size mismatch" in x), "")
        if not mismatch:
            raise
        raise ModelFolderError(
            folder,
            f"model.safetensors does not match config.json ({mismatch})",
            hint="the folder was edited or mixes two models; use the folder training wrote",
        ) from None
    # folders from before the offset predict b = 0, from before evidence weights weigh 1
    if unexpected or set(missing) - {"offset", "evidence_weights"}:
        raise ModelFolderError(
            folder,
            f"model.safetensors does not match config.json (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})",
            hint="the folder was edited or mixes two models; use the folder training wrote",
        )
    _check_calibration(folder, model)
    if channels_last and model.image_encoder is not None:
        model.image_encoder.channels_last()
    return model.to(device).eval()


def _check_calibration(folder: Path, model: FusionModel) -> None:
    """The fitted temperatures (finite, > 0), offsets and evidence weights (finite) and
    thresholds (in [0, 1]): an edited or damaged file would silently invert or void every
    probability (a negative temperature reverses a label's ranking)."""
    problems = [
        name
        for name, bad in (
            ("temperature", ~torch.isfinite(model.temperature) | (model.temperature <= 0)),
            ("offset", ~torch.isfinite(model.offset)),
            ("thresholds", ~((model.thresholds >= 0) & (model.thresholds <= 1))),
            ("evidence_weights", ~torch.isfinite(model.evidence_weights)),
        )
        if bool(bad.any())
    ]
    if problems:
        raise ModelFolderError(
            folder,
            f"model.safetensors holds calibration no training writes ({', '.join(problems)}: "
            "not finite, or out of range)",
            hint="the file was edited or damaged; copy the model folder again from its source",
        )


def as_markdown(text: str) -> str:
    """A label name in the model card's Markdown as written: HTML escaped (a viewer that
    renders it would run `<img onerror=...>`), Markdown's marks backslashed (a `|` splits a
    table row, `[x](url)` is a link)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|])", r"\\\1", html.escape(text, quote=False))


def evidence_text(config: dict[str, Any]) -> str:
    """The model card's table of evidence weights ("" for a model without them)."""
    weights = config.get("evidence_weights")
    if not weights:
        return ""
    rows = "\n".join(
        f"| {as_markdown(name)} | {w['image']:.2f} | {w['note']:.2f} | {w['correction']:.2f} |"
        for name, w in weights.items()
    )
    return f"""A study with both sides is scored `prior + w_image * (image head - prior) + w_note *
(note head - prior) + w_correction * fused correction`, one with a single side by that side's
term alone; the weights were fitted on validation after training (a weight near 0: that side
does not inform the label).

| label | w_image | w_note | w_correction |
|---|---|---|---|
{rows}

"""


def metrics_table(name: str, metrics: dict[str, Any]) -> str:
    """One split's metrics (`evaluate_predictions`' result) as a Markdown table: the macro
    average, then every label, with AUROC's 95% interval where it was bootstrapped."""

    def number(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    def row(label: str, m: dict[str, Any]) -> str:
        ci = m.get("auroc_ci")
        shown = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " (too few cases for an interval)"
        auroc = number(m.get("auroc")) + (shown if ci or m.get("ci_note") else "")
        counts = f"{m['n_positive']} of {m['n_known']}" if "n_known" in m else ""
        cells = [
            as_markdown(label),
            auroc,
            *(number(m.get(k)) for k in ("auprc", "sensitivity", "specificity", "ece")),
        ]
        return "| " + " | ".join([*cells, counts]) + " |"

    labels = metrics.get("labels", {})
    of_patients = (
        f" of {metrics['n_resampled']} patients, intervals by patient"
        if metrics.get("resampled") == "patients"
        else ""
    )
    return "\n".join(
        [
            f"{name} ({metrics.get('n', '?')} studies{of_patients}):",
            "",
            "| label | AUROC [95% CI] | AUPRC | sensitivity | specificity | ECE | positives |",
            "|---|---|---|---|---|---|---|",
            row("macro", metrics.get("macro", {})),
            *(row(label, m) for label, m in labels.items()),
        ]
    )


def model_card(model: FusionModel, config: dict[str, Any]) -> str:
    """A Markdown card a person reads before trusting the model."""
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    rows = "\n".join(
        f"| {as_markdown(name)} | {c['temperature']:.3f} | {c.get('offset', 0.0):+.3f} | "
        f"{c['threshold']:.3f} |"
        for name, c in config["calibration"].items()
    )
    metrics = config.get("metrics")
    metrics_text = (
        "\n\n".join(metrics_table(name, split) for name, split in metrics.items())
        + "\n\nEvery figure, with the score distributions, is in `config.json` (`metrics`)."
        if metrics
        else "Not yet evaluated: run `clinfuse evaluate` before relying on this model."
    )
    text_source = cfg.text.pretrained or "built in memory, WordPiece tokenizer trained on the notes"
    return f"""# clinfuse model card: {cfg.name}

**{NOTICE}**

- clinfuse version: {config["clinfuse_version"]} (checkpoint format {config["format_version"]})
- fusion: `{cfg.fusion.mode}` (width {cfg.fusion.width}, depth {cfg.fusion.depth}, \
heads {cfg.fusion.heads}); parameters: {n_params:,}
- image encoder: MONAI {cfg.image.backbone}, {cfg.image.spatial_dims}D, \
{cfg.image.in_channels} channel(s), input {tuple(cfg.preprocess.spatial_size)}, \
window `{cfg.preprocess.window}`
- note encoder: {text_source}; {cfg.text.max_length} tokens, long notes: {cfg.text.long_notes}
- training manifest sha256: {config.get("manifest_sha256", "not recorded")}
- written on: Python {platform.python_version()}, torch {torch.__version__}

## Labels, calibration and operating points

Probabilities are `sigmoid(logit / temperature + offset)`; a label is called at or above its
threshold.

| label | temperature | offset | threshold |
|---|---|---|---|
{rows}

{evidence_text(config)}## Validation metrics

{metrics_text}

## Intended use and limits

Scores studies of the kind it was trained on (modality, view, population, note style) for a
clinician to review. A study without its image or its note is scored from the side it has,
which is less reliable; every prediction records which sides it used. It has not been
validated for clinical use.
"""
