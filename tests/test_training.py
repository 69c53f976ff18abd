"""`clinfuse train` and `clinfuse evaluate` end to end on a small synthetic export (tiny model)."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clinfuse.cli import main
from clinfuse.data.manifest import PatientSplit, load_manifest
from clinfuse.engine import select_device
from clinfuse.errors import ConfigError
from clinfuse.evaluation.calibration import MIN_CLASS_CELLS
from clinfuse.model import load_checkpoint
from clinfuse.synthetic import make_sample_data
from clinfuse.training.trainer import Workers, balanced_pos_weight, epoch_order, masked_bce

FAST = [
    "model.name=tiny",
    "model.fusion.combine=naive_bayes",  # the default's combination: evidence weights fitted
    "train.epochs=2",
    "train.bootstrap=20",
    "train.batch_size=16",
]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    make_sample_data(out, n=96, seed=3, size=64)
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def trained(export, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["train", "--manifest", str(export), "--out", str(out), *FAST]) == 0
    return out


def with_unreadable_images(export: Path, folder: Path, study_ids: list[str]) -> Path:
    """A copy of the export's manifest (absolute paths) whose `study_ids` point at no image."""
    table = pd.read_csv(export, dtype=str)
    for column in ("image", "note_path"):
        table[column] = table[column].map(lambda p: p if pd.isna(p) else str(export.parent / p))
    table.loc[table.study_id.isin(study_ids), "image"] = str(folder / "gone.dcm")
    table.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def clinfuse(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "clinfuse", *args], **kwargs)


def test_train_writes_a_calibrated_model_folder(trained, export):
    names = {p.name for p in trained.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer",
        "MODEL_CARD.md",
        "history.csv",
        "failures.csv",
    } <= names
    assert ".train_state" not in names  # snapshots are removed once the model is final
    config = json.loads((trained / "config.json").read_text())
    assert config["manifest_sha256"] and config["training"]["epochs"] == 2
    assert len(config["training"]["history"]) == 2
    validation = config["metrics"]["validation"]
    assert set(validation["labels"]) == set(config["model"]["labels"])
    assert "ece_before_temperature" in validation["macro"]
    model = load_checkpoint(trained)
    assert model.temperature.gt(0).all()  # fitted, or 1 where validation has < 5 of a class
    assert not torch.equal(model.offset, torch.zeros(len(model.labels)))  # fitted either way
    assert model.thresholds.gt(0).all() and model.thresholds.lt(1).all()
    assert [c["threshold"] for c in config["calibration"].values()] == pytest.approx(
        model.thresholds.tolist()
    )
    recorded = config["evidence_weights"]  # fitted on validation before the temperature
    assert list(recorded) == list(model.labels)
    saved = torch.tensor([list(w.values()) for w in recorded.values()])
    torch.testing.assert_close(saved, model.evidence_weights)
    assert model.evidence_weights.ge(0).all() and model.evidence_weights.le(4).all()


def test_evidence_weights_are_fitted_where_validation_has_the_cases(export, tmp_path):
    out = tmp_path / "half"  # half the patients in validation: enough cases for most labels
    args = ["train", "--manifest", str(export), "--out", str(out), *FAST]
    assert main([*args, "data.val_fraction=0.5", "train.epochs=1"]) == 0
    model = load_checkpoint(out)
    split = PatientSplit(0.5, 0.15, 0)
    rows = [r for r in load_manifest(export, split=split).rows("val") if r.image and r.note_path]
    labels = np.stack([r.labels for r in rows])  # (N, L) the studies with both sides
    fitted = 0
    for j, weights in enumerate(model.evidence_weights):
        known = labels[~np.isnan(labels[:, j]), j]
        cases = min(int(known.sum()), int(len(known) - known.sum()))
        as_trained = torch.equal(weights, torch.ones(3))
        assert as_trained == (cases < MIN_CLASS_CELLS), model.labels[j]  # too few: kept as is
        fitted += not as_trained
    assert fitted >= 3  # the weights were fitted, not skipped


def test_rerunning_a_finished_training_does_nothing(trained, export, capsys, tmp_path):
    before = (trained / "model.safetensors").read_bytes()
    assert main(["train", "--manifest", str(export), "--out", str(trained), *FAST]) == 0
    assert "already trained" in capsys.readouterr().out
    # another command into the same folder is refused, not answered with the old model
    assert main(["train", "--manifest", str(export), "--out", str(trained), *FAST,
                 "train.lr=0.002"]) == 2  # fmt: skip
    refused = capsys.readouterr().err
    assert "already holds a model trained otherwise than this command asks" in refused
    assert "train.lr: 0.001 -> 0.002" in refused  # the folder's -> this command's
    other = tmp_path / "other.csv"
    other.write_bytes(export.read_bytes() + b"\n")  # the same rows, other bytes
    assert main(["train", "--manifest", str(other), "--out", str(trained), *FAST]) == 2
    assert "the manifest's contents (its SHA-256)" in capsys.readouterr().err
    assert (trained / "model.safetensors").read_bytes() == before


def test_a_model_folder_from_before_a_new_setting_is_still_the_same_command(
    trained, export, capsys, tmp_path
):
    older = tmp_path / "older"
    shutil.copytree(trained, older)
    config = json.loads((older / "config.json").read_text())
    del config["train"]["label_smoothing"]  # saved before the setting existed
    (older / "config.json").write_text(json.dumps(config))
    assert main(["train", "--manifest", str(export), "--out", str(older), *FAST]) == 0
    assert "already trained" in capsys.readouterr().out
    # its value today is the default: asking for another is another command
    assert main(["train", "--manifest", str(export), "--out", str(older), *FAST,
                 "train.label_smoothing=0.1"]) == 2  # fmt: skip
    assert "train.label_smoothing: 0.0 -> 0.1" in capsys.readouterr().err


def test_training_is_seeded_and_reproducible_on_cpu(export, trained, tmp_path):
    assert main(["train", "--manifest", str(export), "--out", str(tmp_path / "again"), *FAST]) == 0
    first = json.loads((trained / "config.json").read_text())["training"]["history"]
    again = json.loads((tmp_path / "again" / "config.json").read_text())["training"]["history"]
    assert [h["train_loss"] for h in again] == [h["train_loss"] for h in first]
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        trained / "model.safetensors"
    ).read_bytes()


def test_a_killed_run_resumes_with_the_same_command(export, tmp_path, capsys):
    out = tmp_path / "killed"
    args = [
        "train",
        "--manifest",
        str(export),
        "--out",
        str(out),
        "model.name=tiny",
        "train.epochs=4",
        "train.batch_size=8",  # 4 steps an epoch: a snapshot every 2 lands mid-epoch too
        "train.checkpoint_every=2",
        "train.bootstrap=20",
    ]
    run = clinfuse(*args, "train.workers=2", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob(".train_state/step-*/COMPLETE")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert list(out.glob(".train_state/step-*/COMPLETE")), "no snapshot before the kill"

    def left() -> list[str]:  # the killed run's DataLoader workers (forked: its command line)
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if str(out).encode() in (proc / "cmdline").read_bytes():
                    found.append(proc.name)
        return found

    deadline = time.time() + 3  # the kernel's death signal; torch's own watchdog takes ~5 s
    while left() and time.time() < deadline:
        time.sleep(0.2)
    assert not left(), "workers outlived the killed run"
    assert not (out / "config.json").exists()
    edited = tmp_path / "edited.csv"  # the manifest changed since: not a resume of that run
    edited.write_bytes(export.read_bytes() + b"\n")
    refused = subprocess.run(
        [sys.executable, "-m", "clinfuse", *args[:2], str(edited), *args[3:]],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert "holds an unfinished run with a different configuration or manifest" in refused.stderr
    other = tmp_path / "other_count"  # the run as if torchrun had started it with 2 processes
    shutil.copytree(out, other)
    for state in other.glob(".train_state/step-*/state.json"):
        saved = json.loads(state.read_text())
        assert saved["settings"]["processes"] == 1
        saved["settings"]["processes"] = 2
        state.write_text(json.dumps(saved))
    assert main([*args[:4], str(other), *args[5:]]) == 2  # its schedule is not one process's
    assert "started by 2 training process(es), resumed here by 1" in capsys.readouterr().err
    resumed = subprocess.run(
        [sys.executable, "-m", "clinfuse", *args], capture_output=True, text=True, check=True
    )
    assert "resuming from step-" in resumed.stderr and "(resumed)" in resumed.stdout
    config = json.loads((out / "config.json").read_text())
    assert [h["epoch"] for h in config["training"]["history"]] == [1, 2, 3, 4]
    assert load_checkpoint(out).labels == tuple(config["model"]["labels"])
    # the same run as one never stopped, to the byte, whichever step it resumed from, and
    # whether DataLoader workers read the studies or the main process did
    whole = tmp_path / "whole"
    assert main([*args[:4], str(whole), *args[5:], "train.workers=2"]) == 0
    assert (whole / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    losses = [h["train_loss"] for h in config["training"]["history"]]
    whole_config = json.loads((whole / "config.json").read_text())
    assert [h["train_loss"] for h in whole_config["training"]["history"]] == losses


# A training run killed while it saves its model folder: after the weights, the tokenizer and
# history.csv are written, before config.json (the marker of a finished folder).
KILLED_SAVING = """
import os, sys
import clinfuse.model.checkpoint as checkpoint
card = checkpoint.model_card
def killed(model, config):
    if "training" in config:  # the model folder's save, not a snapshot's
        os._exit(137)
    return card(model, config)
checkpoint.model_card = killed
from clinfuse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_while_saving_its_model_resumes_and_finishes(export, tmp_path):
    out = tmp_path / "m"
    args = ["train", "--manifest", str(export), "--out", str(out), *FAST]
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVING, *args], capture_output=True)
    assert killed.returncode == 137
    assert (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert main(args) == 0  # not "already trained": it resumes from its last snapshot
    assert {"config.json", "MODEL_CARD.md", "history.csv", "failures.csv"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / ".train_state").exists() and load_checkpoint(out).labels


def test_a_run_killed_after_early_stopping_ends_as_the_run_never_killed(
    export, tmp_path, monkeypatch
):
    from clinfuse.config import resolve_run_config
    from clinfuse.training import trainer

    split = PatientSplit(0.15, 0.15, 0)
    rows = {part: [r.study_id for r in load_manifest(export, split=split).rows(part)]
            for part in ("train", "val")}  # fmt: skip
    unread = [rows["train"][0], rows["val"][0]]  # one of each split cannot be read
    manifest = with_unreadable_images(export, tmp_path, unread)
    steps = -(-len(rows["train"]) // 16)  # an epoch's steps: the step snapshot at its end too
    cfg = resolve_run_config(None, [
        *FAST[:2], "train.epochs=8", "train.patience=1", "train.batch_size=16",
        "train.bootstrap=0", "model.text.mlm_epochs=0", f"train.checkpoint_every={steps}",
    ])  # fmt: skip
    whole = trainer.train(manifest, tmp_path / "whole", cfg, device="cpu")
    assert whole.epochs < 8  # early stopping ended it

    def killed(*args, **kwargs):  # the process dies once training has stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "calibrate", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(manifest, tmp_path / "killed", cfg, device="cpu")
    monkeypatch.undo()
    snapshots = sorted(p.parent.name for p in (tmp_path / "killed").glob(".train_state/*/COMPLETE"))
    assert snapshots == [f"step-{whole.epochs * steps:08d}-end"]  # the epoch's end, kept apart
    again = trainer.train(manifest, tmp_path / "killed", cfg, device="cpu")
    assert again.resumed and again.epochs == whole.epochs  # not one epoch more
    for name in ("model.safetensors", "failures.csv"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    failures = pd.read_csv(tmp_path / "killed" / "failures.csv")
    assert sorted(failures.study_id) == sorted(unread)  # the validation study too


def test_labels_come_from_the_manifest_and_old_folders_compare_on_what_they_used(
    trained, export, tmp_path, capsys
):
    from clinfuse.config import resolve_run_config
    from clinfuse.training.trainer import training_differences

    args = ["train", "--manifest", str(export), "--out", str(tmp_path / "m"), *FAST]
    assert main([*args, "model.labels=[copd]"]) == 2  # not silently trained on all six
    assert "data.labels=[...]" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    done = json.loads((trained / "config.json").read_text())
    head = [*FAST, "model.fusion.combine=head"]
    done["model"]["fusion"]["combine"] = "head"
    del done["train"]["evidence_ridge"]  # a folder from before the evidence weights
    cfg = resolve_run_config(None, head)
    # the ridge weighs nothing without the naive-Bayes combination: the same training
    assert training_differences(done, export, cfg) == []
    done["model"]["fusion"]["combine"] = "naive_bayes"
    cfg = resolve_run_config(None, FAST)
    assert training_differences(done, export, cfg) == ["train"]  # there it did
    # a folder from before the vocabulary rule took every word: not today's command's model
    before = json.loads((trained / "config.json").read_text())
    del before["model"]["text"]["min_word_patients"]
    assert training_differences(before, export, cfg) == ["model"]


def test_two_process_ddp_on_cpu(export, tmp_path):
    out = tmp_path / "ddp"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            "-m",
            "clinfuse",
            "train",
            "--manifest",
            str(export),
            "--out",
            str(out),
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("validation: macro AUROC") == 1  # rank 0 reports, for the model
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    assert len(config["training"]["history"]) == 2
    assert load_checkpoint(out).labels == tuple(config["model"]["labels"])


def test_ddp_says_how_many_readable_studies_sat_out_a_step_another_rank_could_not_load(
    export, tmp_path
):
    """A rank whose whole batch failed makes every rank skip that step (they step together):
    the other rank's readable studies of it are counted in a warning, never dropped silently."""
    data = tmp_path / "data"
    shutil.copytree(export.parent, data)
    rows = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    for image in rows["image"][rows["image"] != ""][:12]:
        (data / image).write_bytes(b"not a DICOM file")
    out = tmp_path / "ddp"
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", "29533", "-m", "clinfuse", "train", "--manifest",
            str(data / "manifest.csv"), "--out", str(out), *FAST, "train.batch_size=1",
            "train.epochs=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = re.findall(r"epoch 1: (\d+) readable training studies were left out", done.stderr)
    assert len(said) == 1 and int(said[0]) > 0  # rank 0 says it once, for every rank
    history = json.loads((out / "config.json").read_text())["training"]["history"]
    train = set(load_manifest(data / "manifest.csv").table.query("split == 'train'").study_id)
    failed = train & set(pd.read_csv(out / "failures.csv").study_id)
    # every study either trained, failed, sat out, or repeated to even the shards (at most 1)
    trained_on = history[0]["studies_per_s"] * history[0]["seconds"]
    assert abs(trained_on + int(said[0]) - (len(train) - len(failed))) <= 1 + 1e-6


def test_evaluate_writes_metrics_predictions_and_a_report(trained, export, tmp_path, capsys):
    out = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(trained),
                "--manifest",
                str(export),
                "--out",
                str(out),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    labels = json.loads((trained / "config.json").read_text())["model"]["labels"]
    assert set(metrics["labels"]) == set(labels) and metrics["n"] > 0
    for name in labels:
        entry = metrics["labels"][name]
        assert {"auroc", "auprc", "ece", "sensitivity", "specificity", "f1", "brier"} <= set(entry)
    assert metrics["split"] == "test" and metrics["model_version"].startswith("tiny@")
    # the intervals resample the split's patients, each with all their studies
    rows = pd.read_csv(export)
    scored = set(pd.read_csv(out / "predictions.csv").study_id)
    patients = rows[rows.study_id.isin(scored)].patient_id.nunique()
    assert (metrics["resampled"], metrics["n_resampled"]) == ("patients", patients)
    assert metrics["n"] > patients  # the sample data's patients have several studies
    html = (out / "report.html").read_text()
    assert f"{metrics['n']} studies of {patients} patients" in html
    assert "bootstrap percentiles over patients" in html
    assert all(name in html for name in labels) and "<img" in html
    assert (out / "predictions.csv").read_text().startswith("study_id,modalities,p_")


def test_train_never_writes_its_model_into_a_run_a_report_or_the_exports_folder(
    export, tmp_path, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "predictions.parquet").write_bytes(b"PAR1")
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text("{}")
    (report / "report.html").write_text("<html>")
    for out, says in (
        (run, "is a `clinfuse infer` run folder"),
        (report, "is a `clinfuse evaluate` report folder"),
        (export.parent, "is the folder of the manifest it trains on"),
    ):
        before = sorted(p.name for p in out.iterdir())
        assert main(["train", "--manifest", str(export), "--out", str(out), *FAST]) == 2
        assert says in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == before


def test_evaluate_never_writes_its_report_into_a_model_folder(trained, export, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    args = ["evaluate", "--model", str(trained), "--manifest", str(export), "--out", str(trained)]
    assert main(args) == 2
    assert "is a `clinfuse train` model folder; its failures.csv is the training run's" in (
        capsys.readouterr().err
    )
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before
    run = trained.parent / "run"  # nor into an inference run's folder, over its exports
    run.mkdir(exist_ok=True)
    (run / "predictions.parquet").write_bytes(b"PAR1")
    (run / "predictions.csv").write_text("study_id,status\n")
    assert main([*args[:-1], str(run)]) == 2
    assert "is a `clinfuse infer` run folder" in capsys.readouterr().err
    assert (run / "predictions.csv").read_text() == "study_id,status\n"
    with pytest.raises(SystemExit) as usage:  # argparse, before anything runs
        main([*args[:-1], str(trained.parent / "r"), "--bootstrap", "-5"])
    assert usage.value.code == 2 and "--bootstrap: -5: give 0 or more" in capsys.readouterr().err


def test_evaluate_names_unread_studies_and_keeps_same_named_folders_apart(
    trained, export, tmp_path, capsys
):
    split = PatientSplit(0.15, 0.15, 0)  # the trained model's split
    test_ids = [r.study_id for r in load_manifest(export, split=split).rows("test")]
    broken = with_unreadable_images(export, tmp_path, [test_ids[0]])
    copies = [tmp_path / run / "seed0" / "tiny" for run in ("run1", "run2")]
    for copy in copies:
        shutil.copytree(trained, copy)
    args = ["evaluate", "--manifest", str(broken), "--out", str(tmp_path / "ev")]
    models = ["--model", str(copies[0]), "--model", str(copies[1])]
    assert main([*args, *models, "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    for run in ("run1", "run2"):
        assert f"n={len(test_ids) - 1} (1 not read: failures_{run}-seed0-tiny.csv)" in printed
        failures = pd.read_csv(tmp_path / "ev" / f"failures_{run}-seed0-tiny.csv")
        assert failures.study_id.tolist() == [test_ids[0]] and failures.reason.notna().all()
    first = (tmp_path / "ev" / "failures_run1-seed0-tiny.csv").read_text()
    assert (tmp_path / "ev" / "failures.csv").read_text() == first  # as metrics.json: the first
    compare = json.loads((tmp_path / "ev" / "compare.json").read_text())
    assert set(compare) == {"run1-seed0-tiny", "run2-seed0-tiny"}  # neither dropped
    assert (
        "1 more could not be read and are not counted: failures_run2-seed0-tiny.csv"
        in (tmp_path / "ev" / "report.html").read_text()
    )


def test_evaluate_compares_model_folders_side_by_side(trained, export, tmp_path, caplog):
    other = tmp_path / "late"
    assert (
        main(
            [
                "train",
                "--manifest",
                str(export),
                "--out",
                str(other),
                *FAST,
                "model.fusion.mode=late",
            ]
        )
        == 0
    )
    out = tmp_path / "compare"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(trained),
                "--model",
                str(other),
                "--manifest",
                str(export),
                "--out",
                str(out),
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    compare = json.loads((out / "compare.json").read_text())
    assert set(compare) == {"tiny", "late"}
    html = (out / "report.html").read_text()
    assert "tiny" in html and "late" in html
    assert "do not compare" not in caplog.text  # same labels, same split
    pair = tmp_path / "pair"  # two labels, and its own patient split
    args = ["--manifest", str(export), *FAST, "data.labels=[copd,mass]", "data.split_seed=1"]
    assert main(["train", "--out", str(pair), *args[:2], *args[2:]]) == 0
    evaluate = ["evaluate", "--manifest", str(export), "--bootstrap", "20"]
    assert main([*evaluate, "--model", str(trained), "--model", str(pair), "--out", str(out)]) == 0
    assert "pair and tiny were scored on different labels (copd, mass against" in caplog.text
    assert "and studies (" in caplog.text and "another split): their macro figures" in caplog.text
    said = json.loads((out / "compare.json").read_text())["pair"]["not_comparable"]
    assert said.startswith("pair and tiny were scored on different labels")  # in the files too
    assert "pair and tiny were scored on different labels" in (out / "report.html").read_text()
    assert "not_comparable" not in json.loads((out / "compare.json").read_text())["tiny"]


def test_a_wrong_manifest_path_says_so_also_into_a_finished_model_folder(trained, capsys):
    missing = trained.parent / "no-such-manifest.csv"
    assert main(["train", "--manifest", str(missing), "--out", str(trained), *FAST]) == 2
    assert "no-such-manifest.csv: manifest file not found" in capsys.readouterr().err


def test_an_unknown_override_key_is_an_error_naming_it(export, tmp_path, capsys):
    code = main(["train", "--manifest", str(export), "--out", str(tmp_path / "x"), "train.epoch=3"])
    assert code == 2
    assert "'train.epoch': unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["train", "val"])
def test_a_split_none_of_whose_studies_can_be_read_stops_training_saying_why(
    export, trained, tmp_path, capsys, broken
):
    rows = pd.read_csv(export, dtype=str, keep_default_na=False)
    rows = rows.assign(split=np.where(np.arange(len(rows)) % 4 == 0, "val", "train"))
    rows["split"] = rows.groupby("patient_id")["split"].transform("first")  # one per patient
    chosen = rows["split"] == broken
    rows.loc[chosen, ["image", "note", "note_path"]] = ["images/gone.dcm", "", ""]
    manifest = export.parent / f"broken_{broken}.csv"
    rows.to_csv(manifest, index=False)
    out = tmp_path / "model"
    assert main(["train", "--manifest", str(manifest), "--out", str(out), *FAST]) == 2
    split = {"train": "training", "val": "validation"}[broken]
    err = capsys.readouterr().err
    assert f"none of the {chosen.sum()} studies ({split}) could be read" in err
    assert "image:missing" in err and f"clinfuse validate {manifest}" in err
    assert not (out / "model.safetensors").exists()
    args = ["evaluate", "--model", str(trained), "--manifest", str(manifest), "--split", broken]
    assert main([*args, "--out", str(tmp_path / "report")]) == 2  # nor does evaluate crash
    assert f"none of the {chosen.sum()} studies ({broken}) could be read" in capsys.readouterr().err


def test_unknown_labels_are_masked_out_of_the_loss():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, float("nan")], [float("nan"), 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0])
    )
    torch.testing.assert_close(masked_bce(logits, labels, torch.ones(2)), expected)


def test_label_smoothing_moves_targets_in_by_half_and_keeps_unknowns_out():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, float("nan")], [float("nan"), 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 3.0]), torch.tensor([0.95, 0.05])
    )
    torch.testing.assert_close(masked_bce(logits, labels, torch.ones(2), 0.1), expected)
    # the loss is smallest at a finite logit: log(0.95 / 0.05) for a positive
    best = torch.log(torch.tensor(0.95 / 0.05))
    grid = best + torch.tensor([-0.5, 0.0, 0.5])
    losses = [masked_bce(z.view(1, 1), torch.ones(1, 1), torch.ones(1), 0.1) for z in grid]
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_class_imbalance_weights_are_negatives_over_positives():
    labels = np.array([[1, 0], [0, 0], [0, np.nan], [0, 1], [np.nan, 0]], dtype=np.float32)
    weights = balanced_pos_weight(labels, max_weight=2.5)
    torch.testing.assert_close(weights, torch.tensor([2.5, 2.5]))  # 3/1 clipped, 3/1 clipped
    weights = balanced_pos_weight(labels, max_weight=10)
    torch.testing.assert_close(weights, torch.tensor([3.0, 3.0]))


def test_ranks_see_disjoint_equal_shards_of_a_seeded_order():
    shards = [epoch_order(11, epoch=2, seed=0, workers=Workers(rank, 2)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(shards[0]) | set(shards[1]) == set(range(11))
    assert epoch_order(11, 2, 0, Workers()) == epoch_order(11, 2, 0, Workers())
    assert epoch_order(11, 2, 0, Workers()) != epoch_order(11, 3, 0, Workers())


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.lr=-1", "'train.lr': Input should be greater than 0"),
        ("train.batch_size=0", "'train.batch_size': Input should be greater than or equal to 1"),
        ("train.epochs=0", "'train.epochs': Input should be greater than or equal to 1"),
        ("train.checkpoint_every=0", "'train.checkpoint_every': Input should be greater"),
        ("train.target_sensitivity=1.5", "'train.target_sensitivity': Input should be less"),
        ("train.max_pos_weight=0", "'train.max_pos_weight': Input should be greater"),
        ("train.seed=-1", "'train.seed': Input should be greater than or equal to 0"),
        ("data.val_fraction=0.9", "'data': val_fraction + test_fraction must leave"),
        ("train.lr=.inf", "'train.lr': Input should be a finite number"),
        ("model.fusion.heads=3", "'model.fusion': width (64) must be a multiple"),
        ("model.text.heads=5", "'model.text': hidden (64) must be a multiple"),
        ("model.fusion.dropout=1.5", "'model.fusion.dropout': Input should be less than 1"),
        ("model.fusion.modality_dropout=2", "'model.fusion.modality_dropout': Input should be"),
        ("model.text.max_length=1", "'model.text.max_length': Input should be greater than or"),
        ("model.preprocess.normalize=[0.5,0]", "'model.preprocess': normalize is"),
        ("model.preprocess.spatial_size=[4,4]", "'model.preprocess': spatial_size"),
        # true is not 1, and a network's stages are positive counts (they trained nothing, or
        # failed in the first step as a clinfuse bug)
        ("train.epochs=true", "'train.epochs': true is not a number"),
        ("model.image.block_config=[-1,2]", "'model.image.block_config.0': Input should be"),
        ("model.image.block_config=[true,2]", "'model.image.block_config.0': Input should be"),
        ("model.image.layers=[]", "'model.image.layers': Tuple should have at least 1 item"),
        ("model.text.vocab_size=0", "'model.text.vocab_size': Input should be greater than"),
    ],
)
def test_a_value_out_of_range_is_an_error_before_any_data_is_read(tmp_path, capsys, override, says):
    missing = tmp_path / "not-read.csv"  # a ConfigError comes first, so this is never opened
    assert main(["train", "--manifest", str(missing), "--out", str(tmp_path / "m"), override]) == 2
    assert f"error: config key {says}" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_image_size_too_small_for_the_backbone_is_an_error_naming_the_setting(
    export, tmp_path, capsys
):
    args = ["--manifest", str(export), "--out", str(tmp_path / "m"), *FAST]
    small = ["model.image.backbone=resnet", "model.preprocess.spatial_size=[32,32]"]
    assert main(["train", *args, *small]) == 2  # a 1x1 last feature map: batch norm on one value
    err = capsys.readouterr().err
    assert "'model.preprocess.spatial_size': (32, 32) is too small for this resnet" in err
    assert main(["train", *args[:4], "model.name='nope'"]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err  # quoted as YAML reads it


def test_a_diverging_run_stops_with_an_error_saying_what_to_do(export, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["--manifest", str(export), "--out", str(out), *FAST, "train.lr=1e6"]
    assert main(["train", *args, "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "training diverged at epoch 1" in err and "lower learning rate (train.lr=1e+06" in err
    assert not (out / "config.json").exists()


@pytest.mark.parametrize(
    ("blank", "says", "validate_says"),
    [
        ("all", "no known label in the train split", "no usable row with a known label"),
        ("val", *["no label of the val split has both a positive and a negative"] * 2),
    ],
)
def test_labels_that_cannot_train_a_model_are_refused_by_train_and_validate(
    export, tmp_path, capsys, blank, says, validate_says
):
    rows = pd.read_csv(export, dtype=str, keep_default_na=False)
    rows["image"] = [str(export.parent / p) for p in rows["image"]]
    rows["note_path"] = [str(export.parent / p) if p else "" for p in rows["note_path"]]
    rows["split"] = np.where(rows.patient_id.str[-1].isin(list("01")), "val", "train")
    labels = ["cardiomegaly", "effusion", "copd", "diabetes", "pneumonia", "mass"]
    rows.loc[rows.split.eq("val") | (blank == "all"), labels] = ""
    manifest = tmp_path / "unlabelled.csv"
    rows.to_csv(manifest, index=False)
    out = tmp_path / "m"
    assert main(["train", "--manifest", str(manifest), "--out", str(out), *FAST]) == 2
    assert f"unlabelled.csv: {says}" in capsys.readouterr().err and not out.exists()
    verdicts = str(tmp_path / "v.csv")
    assert main(["validate", str(manifest), "--out", verdicts, "--workers", "0"]) == 1
    assert validate_says in capsys.readouterr().out


def test_example_configs_in_pipelines_load():
    from clinfuse.config import resolve_run_config

    for path in sorted((Path(__file__).parents[1] / "pipelines").glob("*.yaml")):
        assert resolve_run_config(path).model.labels == ()


def test_the_image_cache_changes_no_item_and_keeps_the_fitted_image(export):
    from clinfuse.data.batch import StudyDataset
    from clinfuse.data.manifest import load_manifest
    from clinfuse.model.registry import model_config

    rows = list(load_manifest(export).rows())[:6]
    cfg = model_config("tiny")
    plain = StudyDataset(rows, cfg, train=True)
    cached = StudyDataset(rows, cfg, train=True, cache=True)
    plain.transforms.set_random_state(7)
    cached.transforms.set_random_state(7)
    for _epoch in range(2):  # the second epoch reads from the cache, augmented afresh
        for i in range(len(rows)):
            a, b = plain[i], cached[i]
            assert a.keys() == b.keys() and a["failure"] == b["failure"]
            assert (a["image"] is None) == (b["image"] is None)
            if a["image"] is not None:
                assert torch.equal(a["image"], b["image"])
    fitted = [item["image"] for item in cached.cache.values() if item["image"] is not None]
    assert len(cached.cache) == len(rows) and fitted
    assert all(0.0 <= float(img.min()) and float(img.max()) <= 1.0 for img in fitted)


def test_evaluate_measures_against_another_labels_table(
    trained, export, tmp_path, capsys, monkeypatch
):
    import pandas as pd

    truth = export.parent / "ground_truth" / "truth.csv"
    base = ["evaluate", "--model", str(trained), "--manifest", str(export), "--split", "all"]
    base += ["--bootstrap", "0"]
    assert main([*base, "--out", str(tmp_path / "truth"), "--labels", str(truth)]) == 0
    metrics = json.loads((tmp_path / "truth" / "metrics.json").read_text())
    assert metrics["labels_from"] == str(truth)
    scored = pd.read_csv(tmp_path / "truth" / "predictions.csv", dtype={"study_id": str})
    expected = pd.read_csv(truth, dtype={"study_id": str}).set_index("study_id")
    assert (scored["y_copd"].to_numpy() == expected.loc[scored.study_id, "copd"].to_numpy()).all()

    flipped = expected.copy()  # the same scores against inverted labels: AUROC mirrors
    flipped["copd"] = 1 - flipped["copd"]
    flipped.to_csv(tmp_path / "flipped.csv")
    assert (
        main([*base, "--out", str(tmp_path / "f"), "--labels", str(tmp_path / "flipped.csv")]) == 0
    )
    mirrored = json.loads((tmp_path / "f" / "metrics.json").read_text())["labels"]["copd"]
    assert mirrored["auroc"] == pytest.approx(1 - metrics["labels"]["copd"]["auroc"])

    # an export without (or with unreadable) label columns is measured against the table alone
    rows = pd.read_csv(export, dtype=str, keep_default_na=False).drop(columns=["copd", "mass"])
    rows["effusion"] = "?"
    rows.to_csv(export.parent / "unlabelled.csv", index=False)
    unlabelled = [*base[:4], str(export.parent / "unlabelled.csv"), *base[5:]]
    assert main([*unlabelled, "--out", str(tmp_path / "u"), "--labels", str(truth)]) == 0
    again = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert again["macro"]["auroc"] == pytest.approx(metrics["macro"]["auroc"])

    expected.iloc[1:].to_csv(tmp_path / "short.csv")  # a scored study left out: an error
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "s"), "--labels", str(tmp_path / "short.csv")]) == 2
    err = capsys.readouterr().err
    assert "short.csv" in err and "study_id" in err and expected.index[0] in err

    def never(*args, **kwargs):
        raise AssertionError("scored before --labels was checked")

    # label names where a file belongs: said before any study is scored
    monkeypatch.setattr("clinfuse.evaluation.evaluate.predict", never)
    assert main([*base, "--out", str(tmp_path / "n"), "--labels", "copd"]) == 2
    assert "copd: unsupported manifest type ''" in capsys.readouterr().err


def test_optimiser_state_round_trips_without_pickle_and_old_snapshots_are_refused(tmp_path):
    from clinfuse.errors import ModelFolderError
    from clinfuse.training.state import load_snapshot, load_tree, save_tree

    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(net.parameters(), betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    tree = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    tree["rng"] = torch.get_rng_state()
    save_tree(tree, tmp_path / "optimizer")
    assert {p.name for p in tmp_path.iterdir()} == {"optimizer.json", "optimizer.safetensors"}
    back = load_tree(tmp_path / "optimizer")
    fresh = torch.optim.AdamW(net.parameters())
    fresh.load_state_dict(back["optimizer"])  # integer parameter keys survive JSON
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state_dict()["state"][0][key], optimizer.state[net.weight][key])
    assert back["scheduler"]["last_epoch"] == 1 and torch.equal(back["rng"], tree["rng"])

    old = tmp_path / "state" / "step-00000002"  # an older clinfuse's snapshot: a pickle
    old.mkdir(parents=True)
    torch.save(tree, old / "optimizer.pt")
    with pytest.raises(ModelFolderError, match="delete .*state to train from the start"):
        load_snapshot(old)


def test_a_step_saved_twice_never_deletes_its_only_complete_snapshot(tmp_path):
    from clinfuse.model import create_model, model_config
    from clinfuse.training.state import Progress, latest_snapshot, save_snapshot

    model = create_model(model_config("tiny", ("copd",)), ["history of copd"] * 5)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    progress = Progress(config_sha256="x", epoch=3, step=40)  # an epoch's end
    first = save_snapshot(tmp_path, model, None, optimizer, scheduler, progress)
    # after a resume, an epoch that took no step (every study unreadable) ends at the same step
    second = save_snapshot(tmp_path, model, None, optimizer, scheduler, progress)
    assert first.name == "step-00000040-end" and second.name == "step-00000040-end-001"
    assert latest_snapshot(tmp_path) == second and [p.name for p in tmp_path.iterdir()] == [
        second.name
    ]
    third = save_snapshot(tmp_path, model, None, optimizer, scheduler, progress)
    assert third.name == "step-00000040-end-002" and latest_snapshot(tmp_path) == third


def test_note_encoder_pretraining_learns_the_notes_and_touches_nothing_else():
    from clinfuse.model.registry import create_model, model_config
    from clinfuse.training.pretrain import pretrain_note_encoder

    notes = [
        "Fever and productive cough; crackles at the left base.",
        "No history of COPD. Denies fever or cough.",
        "Type 2 diabetes on metformin. Decreased breath sounds on the right.",
        "Emphysema on home oxygen. Chest clear.",
    ] * 8
    torch.manual_seed(0)
    model = create_model(model_config("tiny", labels=["copd"]), notes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = pretrain_note_encoder(model, notes, epochs=12, batch_size=8, lr=3e-3)
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]  # it learns to fill the gaps
    after = model.state_dict()
    assert after.keys() == before.keys()  # the borrowed MLM head is not kept
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("text_encoder.model.") for k in changed)
    assert pretrain_note_encoder(model, notes, epochs=0) == []
    # two-word notes four at a time: a quarter of the batches have no piece masked (skipped)
    short = pretrain_note_encoder(model, ["history copd", "dry cough"] * 20, epochs=3, batch_size=4)
    assert all(np.isfinite(loss) for loss in short)  # not NaN: nothing learnt is not a loss
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_a_batch_whose_every_row_failed_is_skipped_and_recorded(export, tmp_path):
    table = pd.read_csv(export, dtype=str, keep_default_na=False)
    bad = {**table.iloc[0].to_dict(), "study_id": "BAD1", "patient_id": "PBAD"}
    bad.update(image=str(tmp_path / "gone.dcm"), note_path="")
    table = pd.concat([table, pd.DataFrame([bad])], ignore_index=True)
    table["split"] = ["train" if s == "BAD1" else "" for s in table["study_id"]]
    manifest = export.parent / "with_bad_row.csv"  # beside the export: its paths stay valid
    table.to_csv(manifest, index=False)
    out = tmp_path / "model"
    # batch size 1: the bad row is a batch of its own, with nothing left to train on
    args = ["--manifest", str(manifest), "--out", str(out), *FAST, "train.batch_size=1"]
    assert main(["train", *args, "train.epochs=1"]) == 0
    failures = pd.read_csv(out / "failures.csv")
    assert failures["study_id"].tolist() == ["BAD1"]
    assert failures["reason"].str.startswith("image:missing").all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine lacks")
@pytest.mark.parametrize(
    "device, says", [("cuda", "no CUDA GPU is available here"), ("gpu0", "'gpu0' is not a device")]
)
def test_a_device_the_machine_lacks_is_a_config_error(export, tmp_path, capsys, device, says):
    args = ["train", "--manifest", str(export), "--out", str(tmp_path / "m"), "--device", device]
    assert main([*args, *FAST]) == 2
    err = capsys.readouterr().err
    assert f"option --device: {says}" in err and "leave --device out" in err


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Two GPUs, two processes: "cuda" (or no --device) is each process's own GPU, an index
    is refused (both would train on it), a process beyond the GPUs is told. The machine has no
    GPU, so torch is told it has two; the choice is what is tested, not a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert select_device("cuda") == select_device(None) == torch.device("cuda", 1)
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'cuda:0' under torchrun: every process would train"):
        select_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="process 2 of torchrun has no GPU of its own"):
        select_device(None)
    with pytest.raises(ConfigError, match="this machine has 2 GPU"):
        select_device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: any GPU it is given
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert select_device("cuda:1") == torch.device("cuda", 1)


def test_a_label_validation_cannot_calibrate_is_a_warning_at_the_end(export, tmp_path, caplog):
    rows = pd.read_csv(export, dtype=str, keep_default_na=False)
    rows["copd"] = "0"  # nobody has it: no threshold can be fitted
    rows["image"] = [str(export.parent / p) for p in rows["image"]]
    rows["note_path"] = [str(export.parent / p) if p else "" for p in rows["note_path"]]
    manifest = tmp_path / "no_copd.csv"
    rows.to_csv(manifest, index=False)
    fast = [*FAST[:1], "train.epochs=1", *FAST[2:]]
    assert main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "m"), *fast]) == 0
    assert "label 'copd': no positives (validation): its threshold and calibration" in caplog.text
    assert "label 'effusion': no positives" not in caplog.text  # it has some: not said so
    assert "studies: early stopping, calibration and thresholds are fitted on them" in caplog.text


def test_a_config_file_is_read_as_written_or_refused_naming_what_to_mend(tmp_path):
    from clinfuse.config import resolve_run_config
    from clinfuse.errors import ConfigError

    twice = tmp_path / "twice.yaml"  # YAML keeps the last: the first section would be dropped
    twice.write_text("train:\n  epochs: 3\n  lr: 0.0003\ntrain:\n  bootstrap: 10\n")
    with pytest.raises(ConfigError, match="line 4 gives the key 'train' a second time"):
        resolve_run_config(twice)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# réglages\ntrain:\n  epochs: 2\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml'?: is not UTF-8 text.*save it as UTF-8"):
        resolve_run_config(latin)
    own = tmp_path / "tiny.yaml"  # checked on its own architecture (2 heads), not the default's
    own.write_text("model:\n  name: tiny\n  fusion:\n    width: 34\n")
    assert resolve_run_config(own).model.fusion.width == 34
    odd = tmp_path / "odd.yaml"
    odd.write_text("model:\n")  # an empty section sets nothing
    assert resolve_run_config(odd, ["model.name=tiny"]).model.name == "tiny"
    for text in ("model: tiny\n", "? [a, b]\n: 1\n"):  # refused naming it, never a crash
        odd.write_text(text)
        with pytest.raises(ConfigError):
            resolve_run_config(odd, ["model.name=tiny"])
    rate = tmp_path / "rate.yaml"
    rate.write_text("train:\n  lr: 0.0003\n")
    cfg = resolve_run_config(rate, ["train={epochs: 2}"])  # a section's mapping sets its keys
    assert (cfg.train.epochs, cfg.train.lr) == (2, 0.0003)
    cfg = resolve_run_config(None, ["model.name=tiny", "model.fusion={mode: late}"])
    assert (cfg.model.fusion.mode, cfg.model.fusion.width) == ("late", 32)
    # the architecture named inside a whole section is the one built, not only its name
    assert (
        resolve_run_config(None, ["model={name: tiny}"]).model
        == resolve_run_config(None, ["model.name=tiny"]).model
    )


def test_a_model_folder_given_as_config_reruns_its_settings(trained, export, tmp_path):
    """`--config MODEL_DIR` (or its config.json) is the run that made it: its model, data and
    train settings, the labels taken from the manifest given now."""
    from clinfuse.config import RunConfig, parse_config, resolve_run_config

    saved = json.loads((trained / "config.json").read_text())
    for given in (trained, trained / "config.json"):
        cfg = resolve_run_config(given, ["train.epochs=1"])
        run = parse_config(RunConfig, {k: saved[k] for k in ("model", "data", "train")})
        assert cfg.model == run.model.model_copy(update={"labels": ()})  # the manifest's, later
        assert cfg.data == run.data and cfg.train.epochs == 1
        assert cfg.train.model_copy(update={"epochs": run.train.epochs}) == run.train


def test_an_override_yaml_cannot_read_or_would_cut_short_is_refused_naming_it():
    from clinfuse.config import resolve_run_config
    from clinfuse.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'data.labels': cannot read the value '\[copd,mass'"):
        resolve_run_config(None, ["data.labels=[copd,mass"])
    with pytest.raises(ConfigError, match="'model.text.pretrained'.*start.*comment"):
        resolve_run_config(None, ["model.text.pretrained=/data/run #2/bert"])
    with pytest.raises(ConfigError, match="'train.lr': Input should be a finite number"):
        resolve_run_config(None, ["train.lr=.nan"])  # no '#' in it: the range check speaks
    quoted = resolve_run_config(None, ['model.text.pretrained="/data/run #2/bert"'])
    assert quoted.model.text.pretrained == "/data/run #2/bert"
    assert resolve_run_config(None, ["data.labels=[a, 'b #1']"]).data.labels == ("a", "b #1")
    from clinfuse.config import override_value

    assert override_value("k", "{2024-01-01: 'a#b'}") == {date(2024, 1, 1): "a#b"}  # not JSON


def test_speed_only_settings_reuse_a_finished_folder(trained, export, capsys):
    """A run killed for memory goes on with train.cache=false: workers, cache and checkpoint
    spacing change how fast a model trains, not the model."""
    args = ["train", "--manifest", str(export), "--out", str(trained), *FAST]
    assert main([*args, "train.cache=false", "train.checkpoint_every=7"]) == 0
    assert main([*args, "train.lr=0.01"]) == 2
    assert "train.lr: 0.001 -> 0.01" in capsys.readouterr().err


def test_validation_rows_that_could_not_be_read_leave_no_label_to_fit_on(export, tmp_path, capsys):
    """The val rows giving a label both outcomes are the unreadable ones: train stops, not a
    model with no early stopping, calibration or thresholds."""
    rows = pd.read_csv(export, dtype=str, keep_default_na=False)
    for column in ("image", "note_path"):
        rows[column] = [str(export.parent / p) if p else "" for p in rows[column]]
    rows["split"] = np.where(rows.patient_id.str[-1].isin(list("01")), "val", "train")
    labels = ["cardiomegaly", "effusion", "copd", "diabetes", "pneumonia", "mass"]
    val = rows.index[rows.split.eq("val")]
    rows.loc[val[2:], labels] = ""  # the readable val rows: no label known
    rows.loc[val[:2], ["image", "note", "note_path"]] = [str(tmp_path / "gone.dcm"), "", ""]
    rows.loc[val[:2], labels] = [["1"] * 6, ["0"] * 6]
    manifest = tmp_path / "m.csv"
    rows.to_csv(manifest, index=False)
    out = tmp_path / "model"
    assert main(["train", "--manifest", str(manifest), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"no label of the {len(val) - 2} validation studies that could be read" in err
    assert "`clinfuse validate`" in err and not (out / "config.json").exists()


@pytest.mark.parametrize(("mode", "side"), [("text_only", "note"), ("image_only", "image")])
def test_a_mode_whose_only_side_no_row_has_is_refused(export, tmp_path, capsys, mode, side):
    rows = pd.read_csv(export, dtype=str, keep_default_na=False)
    for column in ("image", "note_path"):
        rows[column] = [str(export.parent / p) if p else "" for p in rows[column]]
    rows[["note", "note_path"] if side == "note" else ["image"]] = ""
    manifest = tmp_path / "m.csv"
    rows.to_csv(manifest, index=False)
    args = ["train", "--manifest", str(manifest), "--out", str(tmp_path / "m"), *FAST]
    assert main([*args, f"model.fusion.mode={mode}"]) == 2
    assert (
        f"no row of the train split has a{'n' * (side == 'image')} {side}"
        in capsys.readouterr().err
    )


def test_the_model_card_gives_every_labels_validation_metrics(trained):
    card = (trained / "MODEL_CARD.md").read_text(encoding="utf-8")
    # the validation intervals resample patients, as evaluate's do
    assert re.search(r"\(\d+ studies of \d+ patients, intervals by patient\):", card)
    metrics = card.split("| label | AUROC [95% CI] |", 1)[1]
    for label in load_checkpoint(trained).labels:
        auroc = r"(n/a|[0-9.]+ (\[[0-9.]+, [0-9.]+\]|\(too few cases for an interval\)))"
        assert re.search(rf"^\| {label} \| {auroc} \|.* of \d+ \|$", metrics, re.M)
