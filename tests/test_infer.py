"""`clinfuse infer`: every row ends exactly once as a prediction or a failure, resumable after
kill -9, exports that validate, no identifiers, the same results on PostgreSQL and on Ray."""

import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet
import pydicom
import pytest
from pydicom.data import get_testdata_file

from clinfuse.cli import main
from clinfuse.errors import NoteWarning
from clinfuse.explain import Explanation
from clinfuse.model import load_checkpoint

LABELS = ("cardiomegaly", "effusion", "copd", "diabetes", "pneumonia", "mass")


@pytest.fixture(scope="module")
def mixed_manifest(small_export, tmp_path_factory) -> Path:
    """The small export plus rows that must fail: corrupt, non-image, truncated, missing, and a
    real DICOM volume (an RT dose grid) given to a 2D model."""
    root = small_export.parent
    manifest = pd.read_csv(small_export, dtype=str, keep_default_na=False)
    bad = tmp_path_factory.mktemp("bad")
    (bad / "text.dcm").write_text("not dicom")
    shutil.copy(get_testdata_file("rtplan.dcm"), bad / "plan.dcm")
    real = (root / manifest.at[0, "image"]).read_bytes()
    (bad / "short.dcm").write_bytes(real[: len(real) // 2])
    shutil.copy(get_testdata_file("rtdose.dcm"), bad / "dose.dcm")
    extra = []
    for i, name in enumerate(["text.dcm", "plan.dcm", "short.dcm", "absent.dcm", "dose.dcm"]):
        row = manifest.iloc[i].copy()
        row["study_id"] = f"BAD{i}"
        row["image"] = str(bad / name)
        extra.append(row)
    mixed = pd.concat([manifest, pd.DataFrame(extra)], ignore_index=True)
    path = root / "mixed.csv"
    mixed.to_csv(path, index=False)
    return path


def absolute_rows(manifest: Path) -> pd.DataFrame:
    """The manifest's rows with absolute file paths, to be written anywhere."""
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    for column in ("image", "note_path"):
        rows[column] = [str(manifest.parent / p) if p else "" for p in rows[column]]
    return rows


def infer(model, manifest, out, *extra):
    return main(
        [
            "infer",
            "--model",
            str(model),
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--workers",
            "1",
            *extra,
        ]
    )


def test_every_row_ends_as_one_prediction_or_one_failure(
    tiny_model, mixed_manifest, tmp_path, capsys
):
    assert infer(tiny_model, mixed_manifest, tmp_path / "run") == 0
    rows = pd.read_csv(mixed_manifest, dtype=str, keep_default_na=False)
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    failures = pd.read_csv(tmp_path / "run" / "failures.csv")
    assert sorted(predictions["study_id"]) == sorted(rows["study_id"])  # each exactly once
    predicted = predictions[predictions["status"] == "predicted"]
    assert set(failures["study_id"]) == set(
        predictions.loc[predictions["status"] == "failed", "study_id"]
    )
    reasons = dict(zip(failures["study_id"], failures["reason"], strict=True))
    assert reasons["BAD0"] == "image:not_dicom"
    assert reasons["BAD1"] == "image:no_pixel_data"
    assert reasons["BAD2"] == "image:truncated"
    assert reasons["BAD3"] == "image:missing"
    assert reasons["BAD4"] == "image:wrong_dimensions"  # typed, not a crash of the run
    for label in LABELS:
        assert predicted[f"p_{label}"].between(0, 1).all()
        assert predicted[f"decision_{label}"].isin([True, False]).all()
    assert set(predicted["modalities"]) <= {"image+note", "image", "note"}
    assert predicted["model_version"].str.startswith("tiny@").all()
    parquet = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert len(parquet) == len(predictions)
    metadata = pyarrow.parquet.read_schema(tmp_path / "run" / "predictions.parquet").metadata
    assert metadata[b"clinfuse.notice"].startswith(b"Decision support, not a diagnosis")
    printed = capsys.readouterr().out
    assert f"{len(predicted)} predicted, 5 failed, 0 skipped" in printed
    assert "failed image:truncated: 1" in printed


def test_rerunning_a_finished_run_skips_everything(
    tiny_model, small_export, tmp_path, capsys, monkeypatch
):
    assert infer(tiny_model, small_export, tmp_path / "run") == 0
    before = pd.read_csv(tmp_path / "run" / "predictions.csv")
    capsys.readouterr()
    assert infer(tiny_model, small_export, tmp_path / "run") == 0
    assert "0 predicted, 0 failed, 64 skipped as already done" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "predictions.csv"), before)
    # the same store named by a relative URL is the same run, not a new one scoring all again
    monkeypatch.chdir(tmp_path)
    assert infer(tiny_model, small_export, "run", "--store", "sqlite:///run/clinfuse.db") == 0
    assert "0 predicted, 0 failed, 64 skipped as already done" in capsys.readouterr().out


def long_run(tiny_model, small_export, tmp_path, workers: int) -> tuple[list[str], int]:
    """An `infer` command line over ten copies of the export under new ids (long enough for a
    kill to land mid-run), and its study count."""
    rows = absolute_rows(small_export)
    copies = []
    for k in range(10):
        copy = rows.copy()
        copy["study_id"] += f"-{k}"
        copies.append(copy)
    manifest = tmp_path / "long.csv"
    pd.concat(copies).to_csv(manifest, index=False)
    args = [sys.executable, "-m", "clinfuse", "infer", "--model", str(tiny_model),
            "--manifest", str(manifest), "--out", str(tmp_path / "run"),
            "--batch-size", "2", "--workers", str(workers)]  # fmt: skip
    return args, 10 * len(rows)


def wait_for_studies(run: Path, at_least: int) -> int:
    """Poll the run's store until it holds `at_least` studies (or 120 s pass); how many."""
    db = run / "clinfuse.db"
    deadline = time.time() + 120
    written = 0
    while time.time() < deadline and written < at_least:
        time.sleep(0.05)
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as con:
                    written = con.execute("select count(*) from studies").fetchone()[0]
            except sqlite3.Error:
                pass
    return written


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_run_killed_mid_way_resumes_and_writes_each_study_once(
    tiny_model, small_export, tmp_path, engine
):
    if engine == "ray":
        pytest.importorskip("ray")
    run = tmp_path / "run"
    args, total = long_run(tiny_model, small_export, tmp_path, workers=0)
    args += ["--engine", engine]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written = wait_for_studies(run, 8)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 8 <= written < total, "the kill should land mid-run"
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    assert "skipped as already done" in done.stdout
    predictions = pd.read_csv(run / "predictions.csv")
    assert len(predictions) == total and predictions["study_id"].is_unique
    with sqlite3.connect(run / "clinfuse.db") as con:
        assert con.execute("select count(*) from studies").fetchone()[0] == total
        assert con.execute("select count(distinct study_id) from studies").fetchone()[0] == total


def test_a_second_invocation_of_a_running_command_is_refused_not_run_twice(
    tiny_model, small_export, tmp_path, capsys
):
    args, total = long_run(tiny_model, small_export, tmp_path, workers=0)
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_studies(tmp_path / "run", 4) >= 4
        assert main(args[3:]) == 2  # the same command, as an overlapping cron job starts it
        assert "another clinfuse infer is writing this run folder" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert main(args[3:]) == 0  # the folder is free once the first has ended, even by a kill
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert len(predictions) == total and predictions["study_id"].is_unique


def test_a_main_process_killed_with_sigkill_leaves_no_worker_behind(
    tiny_model, small_export, tmp_path
):
    args, total = long_run(tiny_model, small_export, tmp_path, workers=2)
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        written = wait_for_studies(tmp_path / "run", 8)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.kill(process.pid, signal.SIGKILL)  # the main process alone, as the OOM killer does
        process.wait(timeout=60)
        deadline = time.time() + 10
        while group_alive(process.pid) and time.time() < deadline:
            time.sleep(0.1)
        left = group_alive(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if group_alive(process.pid) else None
    assert 8 <= written < total and len(children) >= 2  # the two workers were running
    assert not left  # they ended with it instead of blocking on a pipe nobody reads


def test_a_schedulers_kill_of_the_whole_job_ends_it_quietly_and_leaves_no_worker(
    tiny_model, small_export, tmp_path
):
    args, total = long_run(tiny_model, small_export, tmp_path, workers=2)
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        written = wait_for_studies(tmp_path / "run", 8)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.killpg(process.pid, signal.SIGTERM)  # the main process and its DataLoader workers
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert 8 <= written < total and len(children) >= 2  # the two workers were running
    assert process.returncode == -signal.SIGTERM
    assert "interrupted: the same command continues" in err
    assert "Traceback" not in err and "Exception ignored" not in err, err[-1500:]
    deadline = time.time() + 10
    while group_alive(process.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not group_alive(process.pid)  # no process of the job is left running


def group_alive(group: int) -> list[int]:
    """The running processes (not zombies) of a process group, read from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)"
        except OSError:  # it ended while being read
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            alive.append(int(stat.parent.name))
    return alive


def test_an_output_folder_that_cannot_be_made_is_a_clear_error(
    tiny_model, small_export, tmp_path, capsys
):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"  # a folder inside a file: the OS refuses it
    code = main(["infer", "--model", str(tiny_model), "--manifest", str(small_export),
                 "--out", str(out)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err  # names the file in the way, not the folder asked for
    assert f"error: {tmp_path / 'a_file'}: a file is where this command makes a folder" in err


def test_an_export_that_cannot_be_written_is_an_error_before_any_study_is_scored(
    tiny_model, small_export, tmp_path, capsys
):
    run = tmp_path / "run"
    (run / "predictions.csv").mkdir(parents=True)
    assert infer(tiny_model, small_export, run) == 2
    assert f"error: {run / 'predictions.csv'}: is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["predictions.csv"]  # nothing scored


def test_links_planted_where_the_exports_were_written_are_not_followed(
    tiny_model, small_export, tmp_path
):
    """The tables went through fixed temporary names: links planted there made a run overwrite
    the files they aimed at, then put the links in the tables' place."""
    run = tmp_path / "run"
    run.mkdir()
    victims = []
    for name in ("predictions.csv", "predictions.parquet", "failures.csv"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("keep")
        (run / f".{name}.tmp").symlink_to(victim)
        victims.append(victim)
    rows = absolute_rows(small_export).head(4).copy()
    rows.loc[rows.index[0], "study_id"] = '=HYPERLINK("http://x.example","open")'
    rows.to_csv(tmp_path / "m.csv", index=False)
    assert infer(tiny_model, tmp_path / "m.csv", run) == 0
    assert all(victim.read_text() == "keep" for victim in victims)
    assert not any((run / name).is_symlink() for name in ("predictions.csv", "failures.csv"))
    # the CSV people open in a spreadsheet runs no study id; the Parquet file keeps it as given
    assert "'=HYPERLINK" in set(pd.read_csv(run / "predictions.csv").study_id.str[:11])
    assert rows.study_id.iloc[0] in set(pd.read_parquet(run / "predictions.parquet").study_id)


def test_an_export_that_fails_midway_leaves_no_temporary_to_block_the_next(
    tiny_model, small_export, tmp_path, monkeypatch
):
    """One table's temporary could not be made (a full disk): the ones made before it are
    removed, and the next export in the same process writes all three."""
    from clinfuse.inference import outputs
    from clinfuse.store import Store

    rows = absolute_rows(small_export).head(4)
    rows.to_csv(tmp_path / "m.csv", index=False)
    run = tmp_path / "run"
    assert infer(tiny_model, tmp_path / "m.csv", run) == 0
    real, calls = outputs.open_temporary, []

    def full_disk_at_the_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path)

    monkeypatch.setattr(outputs, "open_temporary", full_disk_at_the_second)
    with Store(Store.default_url(run)) as store, pytest.raises(OSError, match="No space"):
        outputs.write_exports(store, 1, run)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(outputs, "open_temporary", real)
    with Store(Store.default_url(run)) as store:
        written = outputs.write_exports(store, 1, run)
    assert [p.name for p in written] == list(outputs.EXPORTS)


def test_a_per_study_folder_that_is_a_link_is_refused(tiny_model, small_export, tmp_path, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    (run / "fhir").symlink_to(elsewhere)
    assert infer(tiny_model, small_export, run, "--standards", "fhir") == 2
    assert f"{run / 'fhir'}: is a link; a run writes its per-study files" in capsys.readouterr().err
    assert not any(elsewhere.iterdir())


def test_no_patient_name_id_or_birth_date_in_any_output(tiny_model, small_export, tmp_path):
    assert infer(tiny_model, small_export, tmp_path / "run", "--standards", "fhir,sr") == 0
    root = small_export.parent
    manifest = pd.read_csv(small_export, dtype=str, keep_default_na=False)
    secrets = set(manifest["patient_id"])
    for image in manifest["image"][manifest["image"] != ""][:20]:
        ds = pydicom.dcmread(root / image)
        secrets |= {
            str(ds.PatientName),
            str(ds.PatientName).replace("^", " "),
            str(ds.PatientBirthDate),
            str(ds.PatientID),
        }
    secrets.discard("")
    outputs = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".json" for p in outputs) and any(p.suffix == ".dcm" for p in outputs)
    for path in outputs:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} found in {path.name}"
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    pseudonyms = predictions.set_index("study_id")["patient_pseudonym"]
    by_patient = manifest.set_index("study_id")["patient_id"]
    for _patient, studies in by_patient.groupby(by_patient):  # a patient's studies stay linked
        assert pseudonyms[studies.index].nunique() == 1


def test_a_path_naming_the_patient_stays_out_of_failures_the_store_and_the_log(
    tiny_model, small_export, tmp_path, capfd, recwarn
):
    """Exports are often laid out by patient: a failure or a repaired note names its manifest
    row, never its path."""
    folder = tmp_path / "P0023_DOE^JANE_19610304"
    folder.mkdir()
    rows = absolute_rows(small_export).head(3).copy()
    good = Path(rows["image"].iloc[0]).read_bytes()
    (folder / "cut.dcm").write_bytes(good[: len(good) // 2])
    (folder / "note.txt").write_bytes("fièvre 38,9 °C".encode("cp1252"))
    rows.loc[rows.index[0], "image"] = str(folder / "cut.dcm")
    rows.loc[rows.index[1], "note_path"] = str(folder / "note.txt")
    manifest = tmp_path / "m.csv"
    rows.to_csv(manifest, index=False)
    assert infer(tiny_model, manifest, tmp_path / "run", "--workers", "0") == 0
    said = capfd.readouterr()
    failures = pd.read_csv(tmp_path / "run" / "failures.csv")
    assert failures["reason"].tolist() == ["image:truncated"]
    assert failures["detail"].iloc[0].startswith("image:truncated: manifest row 1's image: ")
    warned = [str(w.message) for w in recwarn]  # the CLI prints each as a warning line
    assert any(w.startswith("manifest row 2's note: not UTF-8") for w in warned)
    outputs = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    texts = [said.out, said.err, *warned, *(p.read_bytes().decode("latin-1") for p in outputs)]
    for text in texts:
        assert "DOE^JANE" not in text and "19610304" not in text


def test_an_image_a_report_cannot_reference_never_stops_a_standards_run(
    tiny_model, small_export, tmp_path, caplog
):
    """A vendor's private SOP class: the SR references it as other evidence (highdicom refused
    it as the SR's own study's evidence, and every rerun stopped at that study)."""
    pytest.importorskip("highdicom")
    rows = absolute_rows(small_export).head(2).copy()
    ds = pydicom.dcmread(rows["image"].iloc[0])
    ds.SOPClassUID = "1.2.840.113619.4.1234"  # private: no IOD highdicom knows
    ds.save_as(tmp_path / "private.dcm")
    rows.loc[rows.index[0], "image"] = str(tmp_path / "private.dcm")
    rows.to_csv(tmp_path / "m.csv", index=False)
    run = tmp_path / "run"
    assert infer(tiny_model, tmp_path / "m.csv", run, "--standards", "fhir,sr") == 0
    assert len(list((run / "sr").glob("*.dcm"))) == 2
    study = rows["study_id"].iloc[0]
    sr = pydicom.dcmread(run / "sr" / f"{study}.dcm")
    referenced = sr.PertinentOtherEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPClassUID == ds.SOPClassUID
    assert "its DICOM SR does not reference its image" not in caplog.text
    report = json.loads((run / "fhir" / f"{study}.json").read_text())  # FHIR has no such rule:
    assert "imagingStudy" in report and "FHIR report does not" not in caplog.text  # kept whole


def test_a_full_disk_while_explaining_stops_the_run_and_the_same_command_explains_again(
    tiny_model, small_export, tmp_path, monkeypatch, capsys
):
    """Not: the predictions committed and their explanations lost for good (a rerun skips
    the studies it has)."""
    import errno

    import numpy as np

    from clinfuse.store import Store

    few = tmp_path / "few.csv"
    absolute_rows(small_export).head(4).to_csv(few, index=False)
    real = np.savez_compressed

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full)
    args = (tiny_model, few, tmp_path / "run", "--explain", "all", "--workers", "0")
    assert infer(*args) == 2
    assert "error: the disk is full" in capsys.readouterr().err
    monkeypatch.setattr(np, "savez_compressed", real)
    assert infer(*args) == 0
    assert "4 explained" in capsys.readouterr().out
    assert len(list((tmp_path / "run" / "explanations").glob("*"))) == 4  # no temporary left
    with Store(Store.default_url(tmp_path / "run")) as store:
        (run,) = store.runs()
        assert all(store.explanation(run["id"], s) for s in store.done_study_ids(run["id"]))


def test_a_manifest_reached_through_a_link_is_shown_and_exported_from_the_links_folder(
    tiny_model, small_export, tmp_path
):
    """Its rows' paths are relative to the folder of the path given, as `infer` read them; the
    dashboard and `export` looked in the link target's folder instead."""
    from clinfuse.review import export_reviewed_manifest, save_review, study_view
    from clinfuse.store import Store

    shutil.copytree(small_export.parent, tmp_path / "x")  # images and notes live here
    (tmp_path / "y").mkdir()
    rows = pd.read_csv(small_export, dtype=str, keep_default_na=False).head(3)
    rows.to_csv(tmp_path / "y" / "manifest.csv", index=False)
    (tmp_path / "x" / "manifest.csv").unlink()
    (tmp_path / "x" / "manifest.csv").symlink_to(tmp_path / "y" / "manifest.csv")
    assert infer(tiny_model, tmp_path / "x" / "manifest.csv", tmp_path / "run") == 0
    with Store(Store.default_url(tmp_path / "run")) as store:
        (run,) = store.runs()
        study = rows["study_id"].iloc[0]
        view = study_view(store, run["id"], study)
        assert view.source_error is None and view.note
        assert view.image_path == tmp_path / "x" / rows["image"].iloc[0]
        save_review(store, run["id"], study, "dr.a", "agree", {}, "")
        export_reviewed_manifest(store, run["id"], tmp_path / "reviewed.csv")
    reviewed = pd.read_csv(tmp_path / "reviewed.csv", dtype=str, keep_default_na=False)
    assert Path(reviewed["image"].iloc[0]).is_file()


def test_retry_failed_scores_again_what_failed_when_the_file_was_missing(
    tiny_model, small_export, tmp_path, capsys
):
    """Storage that was not mounted: the rerun skips the failed study unless asked to retry
    it; then it ends predicted, once, and the run's failures are gone."""
    rows = absolute_rows(small_export).head(3).copy()
    late = Path(rows["image"].iloc[1])
    rows.loc[rows.index[1], "image"] = str(tmp_path / "mounted" / late.name)
    rows.to_csv(tmp_path / "m.csv", index=False)
    assert infer(tiny_model, tmp_path / "m.csv", tmp_path / "run") == 0
    assert len(pd.read_csv(tmp_path / "run" / "failures.csv")) == 1
    (tmp_path / "mounted").mkdir()
    shutil.copy(late, tmp_path / "mounted" / late.name)  # the storage is back
    assert infer(tiny_model, tmp_path / "m.csv", tmp_path / "run") == 0
    assert "0 predicted, 0 failed, 3 skipped" in capsys.readouterr().out  # failures are final
    assert infer(tiny_model, tmp_path / "m.csv", tmp_path / "run", "--retry-failed") == 0
    out = capsys.readouterr().out
    assert "1 predicted, 0 failed, 2 skipped" in out and "1 retried after failing" in out
    assert "whole run: 3 predicted, 0 failed" in out
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert sorted(predictions["study_id"]) == sorted(rows["study_id"])  # each once
    assert (predictions["status"] == "predicted").all()
    assert pd.read_csv(tmp_path / "run" / "failures.csv").empty


def test_files_of_a_killed_attempt_go_when_the_study_then_fails(
    tiny_model, small_export, tmp_path, monkeypatch
):
    """A kill between a batch's FHIR/SR/explanation files and its commit, then the image gone
    before the rerun: the study ends failed, and no file reports a prediction it lacks."""
    from clinfuse.inference.pipeline import InferenceSettings, run_inference
    from clinfuse.store import Store

    rows = absolute_rows(small_export).head(2).copy()
    image = tmp_path / "mounted" / "first.dcm"
    image.parent.mkdir()
    shutil.copy(rows["image"].iloc[0], image)
    rows.loc[rows.index[0], "image"] = str(image)
    rows.to_csv(tmp_path / "m.csv", index=False)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the kill, after the files and before the commit

    settings = InferenceSettings(standards=("fhir", "sr"), explain="all", workers=0)
    with monkeypatch.context() as patched:
        patched.setattr(Store, "write_batch", killed)
        with pytest.raises(KeyboardInterrupt):
            run_inference(tiny_model, tmp_path / "m.csv", tmp_path / "run", None, settings)
    first, second = rows["study_id"]
    assert (tmp_path / "run" / "fhir" / f"{first}.json").is_file()  # the killed attempt's
    image.unlink()  # the storage went away
    assert (
        infer(
            tiny_model,
            tmp_path / "m.csv",
            tmp_path / "run",
            "--standards",
            "fhir,sr",
            "--explain",
            "all",
        )
        == 0
    )
    assert list(pd.read_csv(tmp_path / "run" / "failures.csv")["study_id"]) == [first]
    files = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*")}
    assert not [f for f in files if first in f]
    assert {f"fhir/{second}.json", f"sr/{second}.dcm", f"explanations/{second}.npz"} <= files


def raw_data_set(source: Path, target: Path) -> Path:
    """`source` written as a raw data set: no preamble, no "DICM", no file meta (older
    systems write these; the reader accepts them)."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    with target.open("wb") as f:
        out = DicomFileLike(f)
        out.is_little_endian, out.is_implicit_VR = True, False
        write_dataset(out, pydicom.dcmread(source))
    return target


def test_exports_validate_as_fhir_and_dicom_sr(tiny_model, small_export, tmp_path, capsys):
    fhir = pytest.importorskip("fhir.resources.R4B.diagnosticreport")
    pytest.importorskip("highdicom")
    rows = absolute_rows(small_export)
    native = next(  # a raw data set has no transfer syntax to say the pixels are compressed
        i
        for i, image in enumerate(rows.image)
        if image and not pydicom.dcmread(image).file_meta.TransferSyntaxUID.is_compressed
    )
    raw = raw_data_set(Path(rows.at[native, "image"]), tmp_path / "raw.dcm")
    rows.at[native, "image"] = str(raw)  # scored like the others; its SR still names its image
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(SystemExit):  # a mistyped format is a usage error before any work
        infer(tiny_model, tmp_path / "manifest.csv", tmp_path / "run", "--standards", "fhir,pdf")
    assert "pdf: not one of fhir, sr" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    standards = ("--standards", "FHIR, sr")
    assert infer(tiny_model, tmp_path / "manifest.csv", tmp_path / "run", *standards) == 0
    reports = sorted((tmp_path / "run" / "fhir").glob("*.json"))
    assert len(reports) == 64
    report = fhir.DiagnosticReport.model_validate(json.loads(reports[0].read_text()))
    assert report.status == "preliminary"
    srs = sorted((tmp_path / "run" / "sr").glob("*.dcm"))
    assert len(srs) == 64 and pydicom.dcmread(srs[0]).Modality == "SR"
    study_id = rows.at[native, "study_id"]
    sr = pydicom.dcmread(tmp_path / "run" / "sr" / f"{study_id}.dcm")
    source = pydicom.dcmread(raw, force=True).StudyInstanceUID  # referenced, not joined
    assert sr.PertinentOtherEvidenceSequence[0].StudyInstanceUID == source != sr.StudyInstanceUID


def test_postgresql_store_gives_the_same_predictions(
    tiny_model, small_export, tmp_path, postgres_database
):
    assert infer(tiny_model, small_export, tmp_path / "pg", "--store", postgres_database) == 0
    assert infer(tiny_model, small_export, tmp_path / "lite") == 0
    ours = pd.read_csv(tmp_path / "pg" / "predictions.csv").drop(columns="patient_pseudonym")
    theirs = pd.read_csv(tmp_path / "lite" / "predictions.csv").drop(columns="patient_pseudonym")
    pd.testing.assert_frame_equal(ours, theirs)


def test_ray_actors_take_one_gpu_each_where_the_cluster_has_gpus():
    """The same command on a GPU cluster scores on its GPUs; on CPU, --workers actors."""
    from clinfuse.inference.pipeline import InferenceSettings
    from clinfuse.inference.ray_engine import actor_pool

    assert actor_pool(InferenceSettings(workers=2), cluster_gpus=0) == (2, 0.0)
    assert actor_pool(InferenceSettings(workers=0), cluster_gpus=0) == (1, 0.0)
    assert actor_pool(InferenceSettings(workers=8), cluster_gpus=4) == (4, 1.0)  # one GPU each
    assert actor_pool(InferenceSettings(workers=2), cluster_gpus=4) == (2, 1.0)
    assert actor_pool(InferenceSettings(workers=2, device="cpu"), cluster_gpus=4) == (2, 0.0)


def test_ray_engine_gives_the_same_predictions_as_local(tiny_model, mixed_manifest, tmp_path):
    pytest.importorskip("ray")
    assert infer(tiny_model, mixed_manifest, tmp_path / "local") == 0
    assert infer(tiny_model, mixed_manifest, tmp_path / "ray", "--engine", "ray") == 0
    local = pd.read_csv(tmp_path / "local" / "predictions.csv").drop(columns="patient_pseudonym")
    ray = pd.read_csv(tmp_path / "ray" / "predictions.csv").drop(columns="patient_pseudonym")
    pd.testing.assert_frame_equal(ray, local, atol=1e-5, check_exact=False)
    failures = pd.read_csv(tmp_path / "ray" / "failures.csv")
    assert len(failures) == 5


def test_ray_masks_the_patient_id_in_notes_as_local_does(tiny_model, small_export, tmp_path):
    """Ray's actors never see the store's pseudonym key, but they mask the manifest's patient
    id in the note as the local engine does: the same scores, no id in any explanation; and a
    note an actor repairs is said in the driver's output as a local run says it."""
    pytest.importorskip("ray")
    rows = absolute_rows(small_export).head(8)
    rows["note"] = [
        f"MRN {patient} confirmed. " + Path(path).read_text(encoding="utf-8")
        for patient, path in zip(rows["patient_id"], rows["note_path"], strict=True)
    ]
    rows.loc[2, "note"] += "\x07"  # a control character: replaced, with a warning
    rows["note_path"] = ""
    manifest = tmp_path / "named.csv"
    rows.to_csv(manifest, index=False)
    for engine in ("local", "ray"):  # the local run in this process, to catch its warning
        workers = ("--workers", "0") if engine == "local" else ()
        with pytest.warns(NoteWarning, match=r"manifest row 3's note: .*control character"):
            assert infer(tiny_model, manifest, tmp_path / engine, "--engine", engine,
                         "--explain", "all", *workers) == 0  # fmt: skip
    local, ray = (
        pd.read_csv(tmp_path / e / "predictions.csv").drop(columns="patient_pseudonym")
        for e in ("local", "ray")
    )
    pd.testing.assert_frame_equal(ray, local, atol=1e-5, check_exact=False)
    for engine in ("local", "ray"):
        for path in (tmp_path / engine / "explanations").glob("*.npz"):
            note = Explanation.load_npz(path).note
            assert "MRN " in note and not any(p in note for p in rows["patient_id"]), path


def test_workers_and_threads_change_speed_not_predictions(tiny_model, mixed_manifest, tmp_path):
    import torch

    threads = torch.get_num_threads()
    assert infer(tiny_model, mixed_manifest, tmp_path / "inline", "--workers", "0") == 0
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    assert (
        infer(tiny_model, mixed_manifest, tmp_path / "two", "--workers", "2", "--threads", "1") == 0
    )

    def read(run):  # each run has its own store, so its own pseudonym key
        table = pd.read_csv(tmp_path / run / "predictions.csv").sort_values("study_id")
        return table.drop(columns="patient_pseudonym").reset_index(drop=True)

    inline, two = read("inline"), read("two")
    model = load_checkpoint(tiny_model)
    for label, threshold in zip(model.labels, model.thresholds.tolist(), strict=True):
        # The untrained tiny model scores some labels a hair from their threshold; there float
        # round-off may decide the call. Everywhere else the calls must agree.
        on_edge = (inline[f"p_{label}"] - threshold).abs() < 1e-5
        inline.loc[on_edge, f"decision_{label}"] = two.loc[on_edge, f"decision_{label}"]
    pd.testing.assert_frame_equal(  # batches are cut differently: float round-off only
        inline, two, rtol=1e-4, atol=1e-6
    )


def test_workers_the_main_process_and_ray_save_the_same_explanations(
    tiny_model, mixed_manifest, tmp_path
):
    """`--explain` in CPU workers (each explains the batches it scored), in the main process
    (`--workers 0`) and in Ray actors saves the same files and records; a study that failed is
    not explained."""
    import numpy as np

    from clinfuse.explain import Explanation
    from clinfuse.store import Store

    rows = absolute_rows(mixed_manifest)
    few = tmp_path / "few.csv"  # explaining every label is slow: six studies and a corrupt file
    pd.concat([rows.head(6), rows[rows["study_id"] == "BAD0"]]).to_csv(few, index=False)
    runs = {"inline": ["--workers", "0"], "workers": ["--workers", "2", "--batch-size", "2"]}
    if importlib.util.find_spec("ray"):  # Ray actors explain too (skipped without the extra)
        runs["ray"] = ["--engine", "ray", "--batch-size", "4"]
    for name, extra in runs.items():
        assert infer(tiny_model, few, tmp_path / name, "--explain", "all", *extra) == 0
    predictions = pd.read_csv(tmp_path / "inline" / "predictions.csv")
    predicted = set(predictions.loc[predictions["status"] == "predicted", "study_id"])
    for name in runs:
        files = sorted((tmp_path / name / "explanations").iterdir())
        assert {f.name for f in files} == {f"{s}.npz" for s in predicted}  # no .tmp left behind
        with Store(Store.default_url(tmp_path / name)) as store:
            (run,) = store.runs()
            for study_id in predicted:
                record = store.explanation(run["id"], study_id)
                assert record["path"] == str(tmp_path / name / "explanations" / f"{study_id}.npz")
                assert record["record"]["labels"] == list(LABELS)
    for study_id in sorted(predicted):
        inline, *others = (
            Explanation.load_npz(tmp_path / name / "explanations" / f"{study_id}.npz")
            for name in runs
        )
        assert inline.labels == LABELS and inline.model_version != ""
        for other in others:
            assert other.labels == inline.labels and other.model_version == inline.model_version
            for part in ("probabilities", "modality", "image", "gradcam", "words", "attention"):
                ours, theirs = getattr(inline, part), getattr(other, part)
                assert (ours is None) == (theirs is None), (study_id, part)
                if ours is not None:  # float16 files: compare at float16's precision
                    scale = max(float(np.abs(ours).max()), 1e-6)
                    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-3 * scale)
            if inline.spans is not None:
                assert np.array_equal(inline.spans, other.spans)


def test_explain_positive_explains_exactly_the_labels_decided_positive(
    tiny_model, small_export, tmp_path, capsys
):
    from clinfuse.explain import Explanation

    few = tmp_path / "few.csv"
    absolute_rows(small_export).head(12).to_csv(few, index=False)
    assert infer(tiny_model, few, tmp_path / "run", "--explain", "positive") == 0
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    explained = 0
    for row in predictions.itertuples():
        positive = tuple(n for n in LABELS if getattr(row, f"decision_{n}"))
        path = tmp_path / "run" / "explanations" / f"{row.study_id}.npz"
        assert path.exists() == bool(positive), row.study_id
        if positive:
            assert Explanation.load_npz(path).labels == positive
            explained += 1
    assert explained > 0
    assert f"0 skipped as already done, {explained} explained" in capsys.readouterr().out


def test_a_study_whose_explanation_fails_keeps_its_prediction_and_the_run_goes_on(
    tiny_model, small_export, tmp_path, monkeypatch, caplog
):
    import clinfuse.explain

    real = clinfuse.explain.explain
    few = tmp_path / "few.csv"
    rows = absolute_rows(small_export).head(4)
    rows.to_csv(few, index=False)
    unlucky = rows["study_id"].iloc[1]

    def explain(model, batch, labels, **kwargs):  # an internal failure on one study only
        if batch.study_ids == [unlucky]:
            raise RuntimeError("out of memory while explaining")
        return real(model, batch, labels, **kwargs)

    monkeypatch.setattr(clinfuse.explain, "explain", explain)
    assert infer(tiny_model, few, tmp_path / "run", "--explain", "all", "--workers", "0") == 0
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert (predictions["status"] == "predicted").all() and len(predictions) == 4
    explained = {p.stem for p in (tmp_path / "run" / "explanations").glob("*.npz")}
    assert explained == set(rows["study_id"]) - {unlucky}
    assert f"study {unlucky}: not explained (RuntimeError: out of memory" in caplog.text


def test_a_batch_crosses_processes_by_value_not_by_shared_memory_handle():
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch
    import torch.multiprocessing  # noqa: F401  registers torch's shared-memory reducers

    from clinfuse.data.batch import Batch

    batch = Batch(
        study_ids=["S1", "S2"],
        image=torch.rand(2, 1, 8, 8),
        image_present=torch.tensor([True, False]),
        input_ids=torch.randint(0, 50, (2, 5)),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        note_present=torch.tensor([True, True]),
        offsets=torch.zeros(2, 5, 2, dtype=torch.long),
        labels=torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
        notes=["a", "b"],
        original_shapes=[(8, 8), None],
        failures=[("S3", "image:missing: x")],
        patient_ids={"S1": "P1"},
    )
    data = bytes(ForkingPickler.dumps(batch))  # what a DataLoader worker sends
    assert len(data) > batch.image.numel() * 4  # the pixels travel in the message itself
    back = pickle.loads(data)
    for name in ("image", "image_present", "input_ids", "attention_mask", "offsets"):
        assert torch.equal(getattr(back, name), getattr(batch, name))
        assert getattr(back, name).dtype == getattr(batch, name).dtype
    assert torch.equal(back.labels.isnan(), batch.labels.isnan())
    assert (back.notes, back.failures, back.patient_ids) == (
        batch.notes,
        batch.failures,
        batch.patient_ids,
    )


def test_a_cpu_worker_scores_its_batch_as_the_main_process_would(tiny_model, small_export):
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from clinfuse.data.batch import Collator
    from clinfuse.engine import iter_predictions
    from clinfuse.inference.pipeline import ManifestStream, ScoringCollator
    from clinfuse.model import load_checkpoint

    model = load_checkpoint(tiny_model)
    collate = Collator(model.note_tokenizer, model.cfg)
    stream = ManifestStream(small_export, model, set(), chunk_rows=16)
    # one worker process: it decodes and scores; numpy arrays come back through the pipe
    scored = list(
        DataLoader(stream, batch_size=8, collate_fn=ScoringCollator(collate, model), num_workers=1)
    )
    assert sum(len(batch) for batch, *_ in scored) == 64
    assert all(isinstance(x, np.ndarray) for _, *arrays, _ in scored for x in arrays)
    inline = list(DataLoader(stream, batch_size=8, collate_fn=collate))
    for (batch, logits, image_used, note_used, explained), (same, *expected) in zip(
        scored, iter_predictions(model, inline, torch.device("cpu")), strict=True
    ):
        assert batch.study_ids == same.study_ids
        np.testing.assert_allclose(logits, expected[0].numpy(), rtol=1e-4, atol=1e-5)
        assert image_used.tolist() == expected[1].tolist()
        assert note_used.tolist() == expected[2].tolist()
        assert explained == []  # not asked to explain


FAULTS_PER_FORWARD = """
import resource, sys, torch
from clinfuse.allocator import reuse_freed_memory
from clinfuse.model import create_model, model_config
tuned = sys.argv[1] == "tuned" and reuse_freed_memory()
torch.set_num_threads(1)
model = create_model(model_config("small", ["a", "b"]), ["crackles at the left base"] * 20).eval()
enc = model.note_tokenizer(["crackles at the left base, fever"] * 32)
present = torch.ones(32, dtype=torch.bool)
inputs = (torch.rand(32, 1, 96, 96), enc.input_ids, enc.attention_mask, present, enc.note_present)
with torch.inference_mode():
    for _ in range(3):
        model(*inputs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        model(*inputs)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(tuned, faults)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)
def test_batches_after_the_first_reuse_freed_memory_instead_of_faulting_it_in():
    """The CPU default's forward pass faults its activations in afresh from the OS each batch
    under glibc's defaults; with `reuse_freed_memory` (every command, inference workers) it
    reuses the freed memory: the pass's time halved on the CPU default."""
    counts = {}
    for mode in ("default", "tuned"):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_PER_FORWARD, mode],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        counts[mode] = (out[0], float(out[1]))
    assert counts["tuned"][0] == "True", counts  # it applied
    # pages faulted in per batch of 32 at 96 x 96: 450-15,000 by default (it varies with the
    # machine's load and memory), 0-120 with it
    assert counts["default"][1] > 200, counts
    assert counts["tuned"][1] * 10 < counts["default"][1], counts


def test_study_ids_that_are_not_file_names_are_explained_inside_the_run_folder(
    tiny_model, small_export, tmp_path, monkeypatch, capsys
):
    """An id with a slash, "../" or 300 characters is one file inside RUN_DIR/explanations (it
    once escaped the folder, and a too-long name stopped the run); the store records where
    each file is whatever folder the run was started from, and another --out on the same
    store is a run of its own, not a resume of this one."""
    from clinfuse.explain import Explanation
    from clinfuse.store import Store

    rows = absolute_rows(small_export).head(4)
    rows["study_id"] = ["../escape", "2024/00123", "x" * 300, "S-plain"]
    odd = tmp_path / "odd.csv"
    rows.to_csv(odd, index=False)
    monkeypatch.chdir(tmp_path)
    url = Store.default_url(tmp_path / "shared")
    assert infer(tiny_model, odd, "run", "--explain", "all", "--store", url) == 0
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv", dtype={"study_id": str})
    assert sorted(predictions["study_id"]) == sorted(rows["study_id"])
    assert (predictions["status"] == "predicted").all()
    files = list(tmp_path.rglob("*.npz"))
    assert len(files) == 4 and {f.parent for f in files} == {tmp_path / "run" / "explanations"}
    assert "S-plain.npz" in {f.name for f in files}
    with Store(url, create=False) as store:
        for study_id in rows["study_id"]:
            path = Path(store.explanation(1, study_id)["path"])
            assert path.is_absolute() and Explanation.load_npz(path).study_id == study_id
    assert f"export: {tmp_path / 'run' / 'explanations'}/" in capsys.readouterr().out
    assert infer(tiny_model, odd, "run2", "--explain", "all", "--store", url) == 0
    assert "0 skipped as already done, 4 explained" in capsys.readouterr().out
    with Store(url, create=False) as store:
        assert [r["id"] for r in store.runs()] == [1, 2]


def test_label_columns_are_not_read_for_scoring(tiny_model, small_export, tmp_path):
    rows = absolute_rows(small_export).head(3)
    rows["copd"] = ["yes", "pending", ""]  # a label column a night's run never uses
    odd = tmp_path / "odd_labels.csv"
    rows.to_csv(odd, index=False)
    assert infer(tiny_model, odd, tmp_path / "run") == 0
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert (predictions["status"] == "predicted").sum() == 3


def test_a_run_where_every_study_failed_exits_1_naming_the_failures(
    tiny_model, small_export, tmp_path, capsys
):
    rows = absolute_rows(small_export).head(3)
    rows["image"] = [str(tmp_path / f"absent{i}.dcm") for i in range(3)]
    bad = tmp_path / "bad.csv"
    rows.to_csv(bad, index=False)
    assert infer(tiny_model, bad, tmp_path / "run") == 1  # a scheduler sees it
    captured = capsys.readouterr()
    assert "whole run: 0 predicted, 3 failed" in captured.out
    assert f"every study of run 1 failed; the reasons are in {tmp_path / 'run'}" in captured.err
    assert len(pd.read_csv(tmp_path / "run" / "failures.csv")) == 3


def test_a_manifest_with_no_study_rows_is_an_error_not_an_empty_success(
    tiny_model, small_export, tmp_path, capsys
):
    header_only = tmp_path / "header_only.csv"
    absolute_rows(small_export).head(0).to_csv(header_only, index=False)
    assert infer(tiny_model, header_only, tmp_path / "run") == 2
    assert "header_only.csv: no study rows below the header" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the store: no empty folder left
    assert infer(tmp_path / "no_model", small_export, tmp_path / "run") == 2
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made is never removed
    assert infer(tmp_path / "no_model", small_export, tmp_path / "kept") == 2
    assert (tmp_path / "kept").is_dir()


def test_infer_never_writes_into_a_model_or_report_folder(
    tiny_model, small_export, tmp_path, capsys
):
    few = tmp_path / "few.csv"
    absolute_rows(small_export).head(2).to_csv(few, index=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    assert infer(model, few, model) == 2
    assert "is a `clinfuse train` model folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    report = tmp_path / "report"
    report.mkdir()
    for name in ("metrics.json", "report.html", "predictions.csv"):
        (report / name).write_text("kept")
    assert infer(model, few, report) == 2
    assert "is a `clinfuse evaluate` report folder" in capsys.readouterr().err
    assert sorted(p.name for p in report.iterdir()) == ["metrics.json", "predictions.csv",
                                                        "report.html"]  # fmt: skip
    assert (report / "predictions.csv").read_text() == "kept"


def test_on_a_shared_store_another_run_into_the_same_folder_is_told_and_refused_alike(
    tiny_model, small_export, tmp_path, caplog, capsys
):
    """A store that several run folders share: the runs of other folders are not this
    folder's, and a second run into this folder warns or is refused as with its own store."""
    from clinfuse.store import Store

    url = Store.default_url(tmp_path / "shared")
    few, other = tmp_path / "few.csv", tmp_path / "other.csv"
    absolute_rows(small_export).head(3).to_csv(few, index=False)
    absolute_rows(small_export).iloc[3:5].to_csv(other, index=False)
    run = tmp_path / "run"
    assert infer(tiny_model, few, tmp_path / "elsewhere", "--explain", "all", "--store", url) == 0
    assert infer(tiny_model, few, run, "--explain", "all", "--store", url) == 0
    assert "already holds run" not in caplog.text  # run 1 wrote another folder
    assert infer(tiny_model, few, run, "--explain", "all", "--store", url) == 0  # a resume
    assert "already holds run" not in caplog.text
    before = sorted(p.read_bytes() for p in (run / "explanations").iterdir())
    assert infer(tiny_model, other, run, "--store", url) == 0  # another manifest, same folder
    assert f"{run} already holds run 2 (this one: manifest {other}, not {few}; --explain none)" in (
        caplog.text
    )
    assert len(pd.read_csv(run / "predictions.csv")) == 2
    from clinfuse.folders import folder_kind
    from clinfuse.store import StoreError

    bare = tmp_path / "bare"  # a run folder before its first exports: runs.json alone tells
    bare.mkdir()
    shutil.copy(run / "runs.json", bare / "runs.json")
    assert folder_kind(bare) == "run" and folder_kind(run) == "run"
    with pytest.raises(StoreError, match="written to a shared store"):  # `--store run`
        Store(str(run), create=False)
    assert infer(tiny_model, other, run, "--explain", "all", "--store", url) == 2
    err = capsys.readouterr().err
    assert "the files in explanations/ belong to run 2, 3; this run's (--explain all)" in err
    assert sorted(p.read_bytes() for p in (run / "explanations").iterdir()) == before


def test_another_run_into_the_same_folder_says_whose_files_it_replaces(
    tiny_model, small_export, tmp_path, caplog, capsys
):
    few = tmp_path / "few.csv"
    absolute_rows(small_export).head(3).to_csv(few, index=False)
    assert infer(tiny_model, few, tmp_path / "run") == 0
    assert "already holds run" not in caplog.text
    assert infer(tiny_model, few, tmp_path / "run", "--standards", "fhir") == 0  # another run
    assert f"{tmp_path / 'run'} already holds run 1 (this one: --standards fhir)" in caplog.text
    assert "replaced by run 2's; the store keeps every run" in caplog.text
    assert infer(tiny_model, few, tmp_path / "run", "--explain", "all") == 0  # a third
    assert "replaced by run 3's while fhir/ may still hold the earlier run's files" in caplog.text
    # a fourth would write FHIR files over run 2's, which the store still points at: refused
    before = sorted(p.read_bytes() for p in (tmp_path / "run" / "fhir").iterdir())
    assert infer(tiny_model, few, tmp_path / "run", "--standards", "fhir", "--explain", "all") == 2
    err = capsys.readouterr().err
    assert "the files in explanations/ and fhir/ belong to run 1, 2, 3" in err
    assert "this run's (--standards fhir) would replace them" in err  # against run 3's
    assert "Use a new --out folder" in err
    assert sorted(p.read_bytes() for p in (tmp_path / "run" / "fhir").iterdir()) == before
    assert infer(tiny_model, few, tmp_path / "run", "--explain", "all") == 0  # run 3 resumes
