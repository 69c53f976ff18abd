"""`clinfuse sample-data` and `clinfuse validate` end to end, as a user runs them."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from pydicom.data import get_testdata_file

from clinfuse.cli import main
from clinfuse.cli.stopping import StopSignals, Terminated, not_a_stop


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert main(["sample-data", str(out), "--n", "40", "--seed", "1", "--size", "64"]) == 0
    return out


def test_console_script_has_help_for_every_subcommand():
    for args in (["--help"], ["sample-data", "--help"], ["validate", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "clinfuse", *args], capture_output=True, text=True, check=True
        )
        assert "usage: clinfuse" in done.stdout


@pytest.mark.parametrize(
    "args, says",
    [
        (["--n", "0"], "--n: 0: give 1 to 1000000"),
        (["--n", "1000000000"], "--n: 1000000000: give 1 to 1000000"),  # not an hour of silence
        (["--size", "8"], "--size: 8: give 32 to 2048"),
        (["--size", "100000"], "--size: 100000: give 32 to 2048"),  # not a 75 GB array
        (["--seed", "-1"], "--seed: -1: give 0 or more"),
    ],
)
def test_sample_data_refuses_sizes_it_cannot_make_as_a_usage_error(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as stopped:
        main(["sample-data", str(tmp_path / "x"), *args])
    assert stopped.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_ctrl_c_is_one_line_and_exit_130_and_the_rerun_starts_over(tmp_path, capsys, monkeypatch):
    from clinfuse.synthetic import export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_readme", interrupt)
    assert main(["sample-data", str(tmp_path / "x"), "--n", "5", "--size", "32"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: the same command") and "Traceback" not in err
    monkeypatch.undo()
    assert main(["sample-data", str(tmp_path / "x"), "--n", "5", "--size", "32"]) == 0


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, a scheduler
def test_a_stopped_console_command_ends_by_its_signal_so_a_shell_loop_stops(tmp_path, stop):
    out = tmp_path / "big"
    command = [sys.executable, "-m", "clinfuse", "sample-data", str(out), "--n", "20000"]

    def as_at_a_terminal() -> None:  # a background job (CI's `... &`) inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=as_at_a_terminal)
    try:
        deadline = time.time() + 120
        while not (out / "images").is_dir() and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        run.send_signal(stop)  # once: a stop swallowed on the way (numpy did) is given again
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == -stop  # as bash needs it to stop a loop
    assert "interrupted: the same command" in err and "Traceback" not in err
    assert not (out / "manifest.csv").exists()


def test_a_ctrl_c_that_something_swallows_is_given_again():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopSignals():
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # as numpy's Generator.choice did: the command went on
        time.sleep(30)  # one blocking call: the stop given again wakes it
    assert signal.getsignal(signal.SIGINT) is before  # put back when the command ends


def test_a_stop_is_not_logged_as_an_error_by_a_library_it_passed_through():
    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("sqlalchemy.pool.impl.QueuePool", logging.ERROR, __file__, 1,
                                 "Exception during reset or similar", None,
                                 (type(error), error, None))  # fmt: skip

    assert not not_a_stop(record(Terminated(signal.SIGTERM)))
    assert not not_a_stop(record(KeyboardInterrupt()))
    assert not_a_stop(record(ValueError("a real error")))  # still shown


def test_a_ctrl_c_the_command_was_started_to_ignore_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # `nohup`, a script's background job
    try:
        with StopSignals():
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.5)  # nothing is raised
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_finished_command_ignores_a_late_stop_while_it_exits(monkeypatch):
    import importlib

    cli = importlib.import_module("clinfuse.cli.main")  # the module, not its `main`
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(cli, "main", lambda: 0)
    try:
        with pytest.raises(SystemExit) as done:
            cli.run()
        assert done.value.code == 0  # a scheduler's SIGTERM now no longer makes it 143
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_output_piped_into_a_reader_that_stopped_ends_quietly(export, tmp_path):
    """`clinfuse validate M | head -3`: the pipe's reader has gone; no false path error."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader stopped before the first line
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clinfuse",
            "validate",
            str(export / "manifest.csv"),
            "--out",
            str(tmp_path / "v.csv"),
        ],  # fmt: skip
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    os.close(write_end)
    assert done.returncode == 128 + signal.SIGPIPE, done.stderr
    assert "error" not in done.stderr.lower() and "Broken pipe" not in done.stderr


def test_ray_address_without_the_ray_engine_is_refused(capsys, tmp_path):
    args = ["infer", "--model", "m", "--manifest", "x.csv", "--out", str(tmp_path / "r")]
    assert main([*args, "--ray-address", "auto"]) == 2
    assert "option --ray-address: is for --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_output_path_inside_a_file_names_the_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "export"):
        assert main(["sample-data", str(out), "--n", "2", "--size", "32"]) == 2
        err = capsys.readouterr().err
        assert (
            f"error: {tmp_path / 'notes.txt'}: a file is where this command makes a folder" in err
        )
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_validate_refuses_shares_training_would_refuse_and_a_config_file_is_named(
    export, tmp_path, capsys
):
    args = ["validate", str(export / "manifest.csv"), "--out", str(tmp_path / "v.csv")]
    assert main([*args, "--val", "0.9"]) == 2  # with the default --test 0.15: nothing to train
    err = capsys.readouterr().err
    assert "option --val/--test: 0.9 and 0.15: val_fraction + test_fraction must leave" in err
    assert not (tmp_path / "v.csv").exists()
    typo = tmp_path / "train_tny.yaml"
    assert main(["train", "--manifest", str(export / "manifest.csv"), "--out", str(tmp_path / "m"),
                 "--config", str(typo)]) == 2  # fmt: skip
    assert f"option --config: {typo}: cannot be read (No such file" in capsys.readouterr().err


def test_sample_data_then_validate_is_trainable(export, capsys):
    assert main(["validate", str(export / "manifest.csv"), "--out", str(export / "v.csv")]) == 0
    printed = capsys.readouterr().out
    assert "rows: 40  usable: 40" in printed and "trainable: yes" in printed
    verdicts = pd.read_csv(export / "v.csv", keep_default_na=False)
    assert list(verdicts.columns[:6]) == ["row", "study_id", "split", "status", "reason", "warning"]
    assert set(verdicts["status"]) <= {"ok", "image_only", "note_only"}
    assert len(verdicts) == 40
    # labels named as people type them, spaces after the commas, as train's data.labels
    out = str(export / "v2.csv")
    assert (
        main(["validate", str(export / "manifest.csv"), "--labels", "copd, mass", "--out", out])
        == 0
    )
    printed = capsys.readouterr().out
    assert "\ncopd " in printed and "\nmass " in printed and "pneumonia" not in printed


def test_validate_accounts_for_every_bad_row_and_keeps_going(export, tmp_path, capsys):
    manifest = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    shutil.copytree(export, tmp_path / "x")
    root = tmp_path / "x"
    (root / "bad").mkdir()
    (root / "bad" / "text.dcm").write_text("not an image at all")
    real = (root / manifest.at[0, "image"]).read_bytes()
    (root / "bad" / "short.dcm").write_bytes(real[: len(real) // 2])
    shutil.copy(get_testdata_file("rtplan.dcm"), root / "bad" / "plan.dcm")  # no pixel data
    shutil.copy(get_testdata_file("rtdose.dcm"), root / "bad" / "dose.dcm")  # a volume
    (root / "bad" / "latin1.txt").write_bytes("fi\xe8vre".encode("latin-1"))
    manifest.loc[0, "image"] = "bad/text.dcm"
    manifest.loc[1, "image"] = "bad/short.dcm"
    manifest.loc[2, "image"] = "bad/plan.dcm"
    manifest.loc[3, "image"] = "bad/absent.dcm"
    manifest.loc[4, ["image", "note_path"]] = ["", ""]
    manifest.loc[5, "note_path"] = "bad/latin1.txt"
    manifest.loc[6, "note_path"] = "bad/absent.txt"
    manifest.loc[7, "image"] = "bad/dose.dcm"
    manifest["note"] = ""
    manifest.loc[9, ["note", "note_path"]] = ["given inline", "bad/absent.txt"]  # two notes
    manifest.to_csv(root / "manifest.csv", index=False)

    assert main(["validate", str(root / "manifest.csv"), "--out", str(tmp_path / "v.csv")]) == 0
    verdicts = pd.read_csv(tmp_path / "v.csv", dtype=str, keep_default_na=False)
    verdicts = verdicts.set_index(verdicts["row"].astype(int))
    assert len(verdicts) == 40  # every row accounted for
    reasons = verdicts["reason"]
    assert reasons[1].startswith("image:not_dicom: manifest row 1's image: ")
    assert reasons[2].startswith("image:truncated: manifest row 2's image: ")
    assert reasons[3].startswith("image:no_pixel_data")
    assert reasons[4].startswith("image:missing")
    assert reasons[5].startswith("no_input")
    assert reasons[7].startswith("note:note_unreadable: manifest row 7's note: ")
    # never the file's path: an export laid out by patient has names in its folder names
    assert not any("bad/" in reason for reason in reasons)
    assert (verdicts.loc[[1, 2, 3, 4, 5, 7], "status"] == "failed").all()
    assert verdicts.at[6, "status"] != "failed" and "Windows-1252" in verdicts.at[6, "warning"]
    assert (verdicts.loc[8:, "status"] != "failed").all()
    assert verdicts.at[8, "image_dims"] == "3" and verdicts.at[9, "image_dims"] == "2"
    assert "the inline note is read, the file not" in verdicts.at[10, "warning"]
    assert verdicts.at[1, "image_dims"] == ""  # no readable image
    printed = capsys.readouterr().out
    assert "failed: 6" in printed and "failed image:truncated: 1" in printed
    assert "images: 33 2D, 1 volumes (3D)" in printed  # a 2D model would fail the volume


def test_validate_names_rows_with_fewer_cells_than_the_header(export, tmp_path, capsys, caplog):
    lines = (export / "manifest.csv").read_text(encoding="utf-8").splitlines()
    short = lines[2].rsplit(",", 3)[0]  # the last three label cells cut off
    text = "\n".join([lines[0], lines[1], short, *lines[3:]]) + "\n"
    (export / "short.csv").write_text(text, encoding="utf-8")  # beside its images
    assert main(["validate", str(export / "short.csv"), "--out", str(tmp_path / "v.csv")]) == 0
    assert "rows with fewer cells than the header: 1 (rows 2)" in capsys.readouterr().out
    verdicts = pd.read_csv(tmp_path / "v.csv", dtype=str, keep_default_na=False)
    assert "the row has 7 of the header's 10 cells" in verdicts.at[1, "warning"]
    assert verdicts["warning"].str.contains("of the header's").sum() == 1
    assert "fewer cells" not in caplog.text  # said in the summary, not a second time


def test_validate_exit_status_gates_a_pipeline(export, tmp_path, capsys):
    manifest = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    broken = manifest.drop(columns=["patient_id"])
    broken.to_csv(tmp_path / "broken.csv", index=False)
    assert main(["validate", str(tmp_path / "broken.csv")]) == 2
    assert "column 'patient_id': missing required column" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")  # where the verdicts cannot go: said before any row
    args = ["validate", str(export / "manifest.csv"), "--out", str(tmp_path / "a_file" / "v.csv")]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "a_file: is a file, not a folder" in captured.err and "rows:" not in captured.out
    shutil.copy(export / "manifest.csv", tmp_path / "kept.csv")  # --out naming the manifest
    before = (tmp_path / "kept.csv").read_bytes()
    assert main(["validate", str(tmp_path / "kept.csv"), "--out", str(tmp_path / "kept.csv")]) == 2
    assert "--out names the manifest itself" in capsys.readouterr().err
    assert (tmp_path / "kept.csv").read_bytes() == before
    model = tmp_path / "model"  # a model folder's own files are not the verdicts' to replace
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_text("{}")
    args = ["validate", str(tmp_path / "kept.csv"), "--out", str(model / "config.json")]
    assert main(args) == 2
    assert "--out would replace a file of a `clinfuse train` model folder" in (
        capsys.readouterr().err
    )
    assert (model / "config.json").read_text() == "{}"
    (model / "tokenizer").mkdir()  # nor are the files of its subfolders
    (model / "tokenizer" / "tokenizer.json").write_text("{}")
    args[-1] = str(model / "tokenizer" / "tokenizer.json")
    assert main(args) == 2 and (model / "tokenizer" / "tokenizer.json").read_text() == "{}"

    unlabeled = manifest.copy()
    for label in ("cardiomegaly", "effusion", "copd", "diabetes", "pneumonia", "mass"):
        unlabeled[label] = ""
    unlabeled["image"] = unlabeled["image"].map(lambda p: str(export / p) if p else "")
    unlabeled["note_path"] = unlabeled["note_path"].map(lambda p: str(export / p) if p else "")
    unlabeled.to_csv(tmp_path / "unlabeled.csv", index=False)
    assert main(["validate", str(tmp_path / "unlabeled.csv")]) == 1
    assert "trainable: NO (no usable row with a known label)" in capsys.readouterr().out

    no_val = manifest.copy()  # every row in train ("Train" as a spreadsheet capitalises it)
    no_val["split"] = "Train"
    for column in ("image", "note_path"):
        no_val[column] = no_val[column].map(lambda p: str(export / p) if p else "")
    no_val.to_csv(tmp_path / "no_val.csv", index=False)
    assert main(["validate", str(tmp_path / "no_val.csv")]) == 1  # as train would refuse it
    assert "trainable: NO (no usable row in the 'val' split; training needs both" in (
        capsys.readouterr().out
    )


def test_committed_sample_data_is_what_the_documented_command_writes(tmp_path):
    """sample_data/ in the repository = `clinfuse sample-data OUT --seed 0` (the defaults)."""
    from pathlib import Path

    committed = Path(__file__).parents[1] / "sample_data"
    assert main(["sample-data", str(tmp_path / "s"), "--seed", "0"]) == 0
    written = {p.relative_to(tmp_path / "s") for p in (tmp_path / "s").rglob("*") if p.is_file()}
    shipped = {
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and not p.name.endswith(".verdicts.csv")
    }
    assert written == shipped
    for name in sorted(written):
        assert (tmp_path / "s" / name).read_bytes() == (committed / name).read_bytes(), name


def test_an_unexpected_error_has_its_own_exit_status_and_its_traceback(export, monkeypatch, capsys):
    """A bug must not read as infer's "every study failed" (1) or a usage error (2)."""
    import clinfuse.data.validate

    def broken(*args, **kwargs):
        raise RuntimeError("something clinfuse did not expect")

    monkeypatch.setattr(clinfuse.data.validate, "validate_manifest", broken)
    assert main(["validate", str(export / "manifest.csv"), "--out", str(export / "v3.csv")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: something clinfuse did not expect" in err
    assert "error: unexpected RuntimeError (above): a clinfuse bug" in err
