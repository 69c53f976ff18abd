"""Explanation quality metrics, renderings and the `explain` / `explain-eval` commands.

Metrics are checked on hand-made maps, masks and curves whose answer is known; the commands
end to end on a tiny model trained on a small synthetic export.
"""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from clinfuse.cli import main
from clinfuse.config import PreprocessConfig
from clinfuse.data.manifest import load_manifest
from clinfuse.explain.attribution import black_image, note_words, reference_ids
from clinfuse.explain.metrics import (
    deletion_area,
    mask_auroc,
    note_share,
    pointing_game,
    rationale_first,
    rationale_mass,
    rationale_words,
    relevance_mass,
)
from clinfuse.explain.quality import (
    BARS,
    model_grid_order,
    pixel_deletion,
    quality_summary,
    study_batch,
    word_deletion,
    word_occlusion,
)
from clinfuse.explain.randomization import cascading_randomization
from clinfuse.explain.render import (
    DISPLAY_SIDE,
    _for_display,
    _overlay,
    note_html,
    overlay_png,
    quality_markdown,
)
from clinfuse.model import create_model, load_checkpoint, model_config
from clinfuse.synthetic import make_sample_data

FAST = ["model.name=tiny", "train.epochs=2", "train.bootstrap=20"]


def clinfuse(*args: str) -> int:
    return main(list(args))


# -- metrics against known answers ----------------------------------------------------------
def square_mask() -> np.ndarray:
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 2:5] = 1  # 9 pixels
    return mask


def test_pointing_game_hits_only_when_the_peak_is_inside_the_mask():
    mask, peak_inside, peak_outside = square_mask(), np.zeros((10, 10)), np.zeros((10, 10))
    peak_inside[3, 3] = 5.0
    peak_outside[8, 8] = 5.0
    assert pointing_game(peak_inside, mask) == 1.0
    assert pointing_game(peak_outside, mask) == 0.0
    assert pointing_game(np.ones((10, 10)), mask) == 0.0  # a flat map points nowhere


def test_pointing_game_tolerance_counts_a_peak_just_outside_the_mask():
    mask, near = square_mask(), np.zeros((10, 10))
    near[4, 7] = 5.0  # 3 pixels right of the mask's edge (column 4)
    assert pointing_game(near, mask) == 0.0  # strict
    assert pointing_game(near, mask, tolerance=2.9) == 0.0
    assert pointing_game(near, mask, tolerance=3.0) == 1.0


def test_relevance_mass_is_the_positive_share_inside_and_auroc_ranks_pixels():
    mask = square_mask()
    values = -np.ones((10, 10))  # negative attribution never counts as mass
    values[mask > 0] = 1.0  # 9 inside
    values[9, :3] = 3.0  # 9 outside
    assert relevance_mass(values, mask) == pytest.approx(0.5)
    assert relevance_mass(-np.ones((10, 10)), mask) == 0.0
    ideal = mask.astype(float)
    assert mask_auroc(ideal, mask) == 1.0 and mask_auroc(-ideal, mask) == 0.0
    assert np.isnan(mask_auroc(ideal, np.zeros((10, 10))))


def test_rationale_metrics_on_a_known_ranking():
    note = "History of COPD on home oxygen. No fever."
    spans = np.array([[0, 7], [8, 10], [11, 15], [16, 18], [19, 23], [24, 30], [30, 31]])
    inside = rationale_words(spans, [(11, 30)])  # "COPD on home oxygen"
    assert inside.tolist() == [False, False, True, True, True, True, False]
    assert note[11:30] == "COPD on home oxygen"
    perfect = np.array([0.0, 0.0, 3.0, 1.0, 1.0, 2.0, 0.0])
    assert rationale_first(perfect, inside) == 1.0
    assert rationale_mass(perfect, inside) == 1.0
    wrong = np.array([4.0, 0.0, 3.0, 1.0, -1.0, 0.0, 0.0])
    assert rationale_first(wrong, inside) == 0.0
    assert rationale_mass(wrong, inside) == pytest.approx(0.5)


def test_deletion_area_of_ideal_random_and_uninformative_orders():
    k = 16
    ideal = np.r_[0.9, np.full(k, 0.1)]  # the first feature deleted removes the evidence
    linear = np.linspace(0.9, 0.1, k + 1)  # what a random order gives on average
    assert deletion_area(ideal) == pytest.approx(1 / (2 * k))
    assert deletion_area(linear) == pytest.approx(0.5)
    assert deletion_area(ideal) <= 0.5 * deletion_area(linear)
    assert np.isnan(deletion_area(np.full(k + 1, 0.7)))  # deleting did not remove the evidence


def test_note_share_is_the_notes_share_of_the_absolute_shapley_values():
    assert note_share(np.array([0.5, -1.5, 0.3])) == pytest.approx(0.75)
    assert np.isnan(note_share(np.zeros(3)))


def test_model_grid_order_covers_the_image_pixels_not_the_padding():
    spec = PreprocessConfig(spatial_size=(8, 8), fit="pad")
    values = np.zeros((4, 8))  # a wide image: resized to (4, 8), padded 2 rows above and below
    values[1, 5] = 1.0
    order = model_grid_order(values, (4, 8), spec)
    rows = order // 8
    assert len(order) == 32 and rows.min() == 2 and rows.max() == 5
    assert order[0] == (2 + 1) * 8 + 5


def test_worst_label_decides_the_bar():
    def record(label, pointing, share, random=0.5):
        metrics = {"pointing_game": pointing, "relevance_mass": 0.7, "mask_auroc": 0.9}
        metrics |= {"deletion_area": 0.1, "deletion_random": random}
        where = {"study_id": f"S-{label}", "label": label, "stage": "trained"}
        rows = [{**where, "method": "ig", "metric": k, "value": v} for k, v in metrics.items()]
        return [*rows, {**where, "method": "modality", "metric": "note_share", "value": share}]

    records = [*record("cardiomegaly", 1.0, 0.05), *record("effusion", 0.5, 0.05)]
    records += record("mass", 1.0, 0.5, random=0.01)  # deletion barely moves it: not judged
    labels = ["cardiomegaly", "effusion", "mass"]
    summary = quality_summary(records, labels, {"studies": 3, "explained": 3})
    bars = {b["bar"]: b for b in summary["bars"]}
    assert summary["default_method"] == "ig"
    assert bars["pointing_game"] == {**bars["pointing_game"], "label": "effusion", "value": 0.5}
    assert not bars["pointing_game"]["passed"]
    assert summary["labels"]["mass"]["ig"]["deletion_ratio"] is None
    assert bars["relevance_mass"]["passed"] and bars["deletion_pixels"]["value"] == 0.2
    assert bars["note_share_image_only"]["passed"]  # mass (both) is not an image-only label
    assert set(bars) <= set(BARS)
    # copd is in the split but the model called none of its studies positive: nothing of it
    # was explained, so no bar over note labels can pass, and the table says why
    present = {"cardiomegaly": 1, "effusion": 1, "mass": 1, "copd": 3}
    counts = {"studies": 6, "explained": 3, "truly_present": present}
    summary = quality_summary(records, [*labels, "copd"], counts)
    bars = {b["bar"]: b for b in summary["bars"]}
    for name in ("rationale_first", "deletion_words", "note_share_note_only"):
        assert bars[name]["unexplained"] == ["copd"] and not bars[name]["passed"]
    assert bars["relevance_mass"]["unexplained"] == [] and bars["relevance_mass"]["passed"]
    assert "FAIL** (no true positive of copd to explain)" in quality_markdown(summary)


# -- renderings -------------------------------------------------------------------------------
def test_note_html_marks_words_as_written_and_escapes_the_text():
    note = "Fever 39 °C & <cough>"
    spans = np.array([[0, 5], [6, 8], [9, 10], [10, 11], [12, 13], [14, 15], [15, 20], [20, 21]])
    words = np.array([[2.0, 0, 0, 0, 0, 0, -1.0, 0]])
    page = note_html(note, spans, words, ["pneumonia"])
    assert 'title="+2.000">Fever</mark>' in page and 'title="-1.000">cough</mark>' in page
    assert "&amp;" in page and "&lt;" in page and "<cough>" not in page
    # a note's lines stay lines: the page keeps its white space as written
    text = "Indication: cough.\r\nHistory: COPD."
    lines = note_html(text, np.array([[0, 10]]), np.ones((1, 1)), ["copd"])
    assert 'style="white-space: pre-wrap"' in lines and "cough.\r\nHistory" in lines


def test_overlay_png_writes_2d_and_3d(tmp_path):
    pixels = np.random.default_rng(0).random((6, 20, 20)).astype(np.float32)
    assert overlay_png(pixels[0], pixels[1], tmp_path / "a.png").stat().st_size > 0
    assert overlay_png(pixels, pixels, tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    # a large radiograph is drawn at the figure's size, its map averaged over the same pixels
    big = np.zeros((3000, 2400), np.float32)
    big[:1500] = 1.0  # the top half bright, and the map there
    shown, (values,) = _for_display(big, [big])
    assert shown.shape == (DISPLAY_SIDE, round(DISPLAY_SIDE / 1.25))  # the aspect kept
    assert values[: shown.shape[0] // 2].min() == 1 and values[shown.shape[0] // 2 :].max() == 0
    # a small lesion's evidence (under 0.5 % of the pixels) is drawn, not left out
    from clinfuse.explain.render import plt

    figure, axis = plt.subplots()
    lesion = np.zeros((200, 120), np.float32)
    lesion[50:55, 60:67] = 0.3
    assert _overlay(axis, lesion, lesion, 0.6) and len(axis.images) == 2
    assert not _overlay(axis, lesion, -lesion, 0.6)  # nothing raises it: said in the title
    plt.close(figure)


# A page written under a file-size limit (a full disk): the write fails, and the page written
# before it must still be whole.
TORN_PAGE = """
import resource, signal, sys
import numpy as np
from clinfuse.explain.attribution import note_words
from clinfuse.explain.explanation import Explanation
from clinfuse.explain.render import render_explanation

def page(note):
    spans = note_words(note)
    return Explanation("S1", ("copd",), np.array([0.7], np.float32), None, None, note, spans,
                       np.ones((1, len(spans)), np.float32), np.zeros((1, 3), np.float32), None,
                       np.zeros((1, 2), np.float32))

render_explanation(page("COPD."), None, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    render_explanation(page("History of COPD. " * 500), None, sys.argv[1])
except OSError as exc:
    print("failed:", exc.errno)
"""


def test_a_page_that_cannot_be_written_whole_leaves_the_one_before(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", TORN_PAGE, str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"failed: {errno.EFBIG}"
    page = (tmp_path / "S1.html").read_text(encoding="utf-8")
    assert page.rstrip().endswith("</html>") and "History" not in page
    assert [p.name for p in tmp_path.iterdir()] == ["S1.html"]  # no temporary left behind


# -- a tiny model on a small export ------------------------------------------------------------
@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain_export")
    make_sample_data(out, n=60, seed=11, size=64)
    return out


@pytest.fixture(scope="module")
def trained(export, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain_models") / "tiny"
    assert (
        main(["train", "--manifest", str(export / "manifest.csv"), "--out", str(out), *FAST]) == 0
    )
    return out


def test_randomization_cascades_to_every_weight_and_leaves_the_model_alone(trained):
    model = load_checkpoint(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages = []
    for stage, randomized in cascading_randomization(model):
        stages.append(stage)
        assert not torch.equal(randomized.head.weight, model.head.weight)
    assert stages[0] == "head" and stages[-1] == "image backbone all"
    after = dict(randomized.named_parameters())
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, after[k])]
    assert unchanged == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny", {"fusion": {"pooling": "label_attention"}}),
        ("tiny", {"fusion": {"mode": "late"}}),
        ("tiny", {"fusion": {"mode": "text_only"}}),
        ("tiny-3d", {}),
        ("vit-small", {"image": {"vit_layers": 1}, "text": {"layers": 1}}),
    ],
)
def test_randomization_reaches_every_parameter_of_every_architecture(name, overrides):
    labels = ("cardiomegaly", "effusion", "copd")
    model = create_model(model_config(name, labels, **overrides), ["no fever", "left effusion"])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1)  # away from any initialiser's value (ones, zeros)
    *_, (stage, randomized) = cascading_randomization(model)
    after = dict(randomized.named_parameters())
    assert [k for k, v in model.named_parameters() if torch.equal(v, after[k])] == []


def test_deletion_of_everything_equals_the_explanation_baselines(trained, export):
    model = load_checkpoint(trained)
    rows = list(load_manifest(export / "manifest.csv", labels=model.labels))
    row = next(r for r in rows if r.image is not None and r.note_path is not None)
    batch = study_batch(model, [row])
    with torch.no_grad():
        full = model.probabilities(model(*batch.model_inputs()))[0, 1]
        image, ids, mask, image_present, note_present = batch.model_inputs()
        black = model.probabilities(model(black_image(model, image), *batch.model_inputs()[1:]))
        reference = reference_ids(model, ids, mask)
        empty = model.probabilities(model(image, reference, mask, image_present, note_present))
    order = model_grid_order(
        np.ones(batch.original_shapes[0]), batch.original_shapes[0], model.cfg.preprocess
    )
    curve = pixel_deletion(model, batch, 1, order, steps=4)
    assert len(curve) == 5
    assert curve[0] == pytest.approx(float(full), abs=1e-5)
    assert curve[-1] == pytest.approx(float(black[0, 1]), abs=1e-5)
    spans = note_words(batch.notes[0])
    curve = word_deletion(model, batch, 1, spans, np.arange(len(spans)))
    assert len(curve) == len(spans) + 1
    assert curve[-1] == pytest.approx(float(empty[0, 1]), abs=1e-5)


def test_occluding_one_word_is_the_first_step_of_deleting_it_first(trained, export):
    model = load_checkpoint(trained)
    rows = list(load_manifest(export / "manifest.csv", labels=model.labels))
    batch = study_batch(model, [next(r for r in rows if r.note_path is not None)])
    spans = note_words(batch.notes[0])
    dropped = word_occlusion(model, batch, 1, spans)
    assert dropped.shape == (len(spans),) and np.abs(dropped).max() > 0
    for w in (0, len(spans) // 2, len(spans) - 1):
        order = np.r_[w, np.delete(np.arange(len(spans)), w)]
        curve = word_deletion(model, batch, 1, spans, order)
        assert dropped[w] == pytest.approx(curve[0] - curve[1], abs=1e-5)


def identifiers(export) -> set[str]:
    """Every patient name, id and birth date in the export's DICOM headers and manifest."""
    found = set(pd.read_csv(export / "manifest.csv", dtype=str)["patient_id"])
    for path in (export / "images").glob("*.dcm"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(header.PatientName), header.PatientID, header.PatientBirthDate}
        found |= {part for part in str(header.PatientName).split("^") if len(part) > 3}
    return {value for value in found if value}


def test_explain_says_an_image_is_stored_mirrored_once_by_its_row(trained, export, tmp_path):
    """It read the image twice (to explain, to draw), and said it twice, once without the row."""
    import warnings

    import pydicom

    from clinfuse.errors import ImageWarning

    table = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    row = table[table.image != ""].iloc[0]
    ds = pydicom.dcmread(export / row.image)
    ds.PatientOrientation = ["R", "F"]
    ds.save_as(tmp_path / "mirrored.dcm")
    table.loc[row.name, "image"] = str(tmp_path / "mirrored.dcm")
    table.loc[row.name, "note_path"] = str(export / row.note_path) if row.note_path else ""
    table.head(row.name + 1).to_csv(tmp_path / "m.csv", index=False)
    args = ["explain", "--model", str(trained), "--manifest", str(tmp_path / "m.csv")]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert clinfuse(*args, "--out", str(tmp_path / "out"), "--study-id", row.study_id) == 0
    mirrored = [str(w.message) for w in said if w.category is ImageWarning]
    assert len(mirrored) == 1 and mirrored[0].startswith(f"manifest row {row.name + 1}'s image")


def test_explain_writes_npz_png_html_without_identifiers(trained, export, tmp_path, capsys):
    table = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    both = table[(table.image != "") & (table.note_path != "")].study_id.iloc[0]
    no_image = table[table.image == ""].study_id.iloc[0]
    out = tmp_path / "explained"
    manifest = str(export / "manifest.csv")
    args = ["explain", "--model", str(trained), "--manifest", manifest, "--out", str(out)]
    studies = ["--study-id", both, "--study-id", no_image]
    assert clinfuse(*args, *studies, "--labels", "all", "--steps", "8") == 0
    assert both in capsys.readouterr().out

    with np.load(out / f"{both}.npz", allow_pickle=False) as data:
        L = len(data["labels"])
        assert data["labels"].dtype.kind == "U" and L == 6
        assert data["image"].dtype == np.float16 and data["image"].shape == (L, 64, 64)
        assert data["spans"].dtype == np.int32 and data["spans"].shape[1] == 2
        assert data["words"].dtype == np.float16
        assert data["words"].shape == (L, len(data["spans"]))
        assert data["modality"].dtype == np.float32 and data["modality"].shape == (L, 3)
        strings = " ".join(str(data[k]) for k in data.files if data[k].dtype.kind == "U")
    with np.load(out / f"{no_image}.npz", allow_pickle=False) as data:
        assert "image" not in data.files and "words" in data.files
    assert not (out / f"{no_image}.png").exists()

    page = (out / f"{both}.html").read_text(encoding="utf-8")
    assert "Decision support, not a diagnosis" in page and f"{both}.png" in page
    png = (out / f"{both}.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    for value in identifiers(export):
        assert value not in page and value not in strings and value.encode() not in png


def test_a_study_that_now_fails_says_its_files_are_an_earlier_explanations(
    trained, export, tmp_path, caplog
):
    table = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    study = table[table.image != ""].study_id.iloc[0]
    out = tmp_path / "explained"
    args = ["explain", "--model", str(trained), "--out", str(out), "--study-id", study]
    manifest = str(export / "manifest.csv")
    assert clinfuse(*args, "--manifest", manifest, "--labels", "all", "--steps", "2") == 0
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    table.loc[table.study_id == study, "image"] = str(tmp_path / "gone.dcm")  # deleted since
    table.to_csv(tmp_path / "now.csv", index=False)
    assert clinfuse(*args, "--manifest", str(tmp_path / "now.csv"), "--steps", "2") == 1
    assert f"study {study}: {study}.npz, {study}.png, {study}.html in {out} are an earlier" in (
        caplog.text
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written


def test_a_note_repeating_the_patients_identifiers_is_masked_in_every_output(
    trained, export, tmp_path
):
    """A note that names the patient, the record number and the birth date (as real notes do)
    shows none of them in explain's files, infer's explanation files and the store, or the
    dashboard's study view; the clinical text stays, and offsets into the note stay valid."""
    from datetime import datetime

    from clinfuse.data.identifiers import MASK
    from clinfuse.review import study_view
    from clinfuse.store import Store

    table = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    row = table[(table.image != "") & (table.note_path != "")].iloc[0]
    header = pydicom.dcmread(export / row.image, stop_before_pixels=True)
    family, given = str(header.PatientName).split("^")[:2]
    born = datetime.strptime(header.PatientBirthDate, "%Y%m%d")
    clinical = (export / row.note_path).read_text(encoding="utf-8")
    secrets = [
        f"{given} {family.upper()}",
        header.PatientID,
        row.patient_id,
        f"{born:%d/%m/%Y}",
        f"{born:%B} {born.day}, {born.year}",
    ]
    said = (
        f"{secrets[0]} (MRN {secrets[1]}; {secrets[2]}), born {secrets[3]}. {clinical} "
        f"Date of birth {secrets[4]}; Mr {family}son is not the patient."
    )
    manifest = tmp_path / "manifest.csv"
    one = row.to_dict() | {"image": str(export / row.image), "note_path": "", "note": said}
    pd.DataFrame([one]).to_csv(manifest, index=False)
    base = ["--model", str(trained), "--manifest", str(manifest)]
    assert clinfuse("explain", *base, "--study-id", row.study_id, "--out", str(tmp_path / "x"),
                    "--labels", "all", "--steps", "8") == 0  # fmt: skip
    assert clinfuse("infer", *base, "--out", str(tmp_path / "run"), "--explain", "all") == 0

    files = [tmp_path / "x" / f"{row.study_id}.npz", tmp_path / "run" / "explanations" /
             f"{row.study_id}.npz"]  # fmt: skip
    for path in files:
        with np.load(path, allow_pickle=False) as data:
            shown, spans = str(data["note"]), data["spans"]
        assert len(shown) == len(said) and clinical in shown and f"Mr {family}son" in shown
        assert shown.count(MASK) == sum(map(len, secrets)) - 1  # the space in the name stays
        words = {shown[a:b] for a, b in spans}
        assert "crackles" in words or "afebrile" in {w.lower() for w in words}
    with Store(Store.default_url(tmp_path / "run")) as store:
        (run,) = store.runs()
        view = study_view(store, run["id"], row.study_id)
    page = (tmp_path / "x" / f"{row.study_id}.html").read_text(encoding="utf-8")
    stored = json.dumps(view.explanation)
    for secret in [*secrets, given, family.upper()]:  # "Mr Jacksonson" is someone else
        assert secret not in page and secret not in view.note and secret not in stored, secret
    assert view.note == shown


def test_explain_positive_labels_and_user_errors(trained, export, tmp_path, capsys):
    manifest = str(export / "manifest.csv")
    base = ["--model", str(trained), "--manifest", manifest, "--out", str(tmp_path / "x")]
    study = pd.read_csv(export / "manifest.csv", dtype=str).study_id.iloc[0]
    assert clinfuse("explain", *base, "--study-id", study) == 0
    with np.load(tmp_path / "x" / f"{study}.npz") as data:
        assert 1 <= len(data["labels"]) <= 6
    capsys.readouterr()
    assert clinfuse("explain", *base, "--study-id", study, "--study-id", f" {study}",
                    "--labels", "copd,copd") == 0  # fmt: skip
    assert capsys.readouterr().out.count(f"{study}: copd ->") == 1  # once, one label
    with np.load(tmp_path / "x" / f"{study}.npz") as data:
        assert list(data["labels"]) == ["copd"]
    (tmp_path / "a_file").write_text("")
    for command in ("explain", "explain-eval"):
        args = [*base[:4], "--out", str(tmp_path / "a_file"), "--study-id", study]
        if command == "explain-eval":
            args = [*base[:4], "--truth", str(export / "ground_truth"), "--out", args[5]]
        assert clinfuse(command, *args) == 2
        assert "a_file: is a file, not a folder" in capsys.readouterr().err
    unlabelled = export / "new_studies.csv"  # new studies: no label columns yet
    table = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    table[["study_id", "patient_id", "image", "note_path"]].to_csv(unlabelled, index=False)
    out = tmp_path / "unlabelled"
    assert clinfuse("explain", *base[:2], "--manifest", str(unlabelled), "--out", str(out),
                    "--study-id", study) == 0  # fmt: skip
    with np.load(out / f"{study}.npz") as data:
        assert 1 <= len(data["labels"]) <= 6
    assert clinfuse("explain", *base, "--study-id", "NO-SUCH-STUDY") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'NO-SUCH-STUDY' is not in the manifest" in err
    base[1] = str(tmp_path / "missing-model")
    assert clinfuse("explain", *base, "--study-id", study) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing-model'}: not a clinfuse model folder" in err
    assert "config key" not in err
    never = tmp_path / "never" / "made"  # a refused command leaves no empty output folder
    refused = [("explain", ["--study-id", study])]
    refused.append(("explain-eval", ["--truth", str(export / "ground_truth")]))
    for command, extra in refused:
        assert clinfuse(command, *base[:4], "--out", str(never), *extra) == 2
        assert not (tmp_path / "never").exists()
    capsys.readouterr()
    base[1] = str(trained)
    assert clinfuse("explain", *base, "--study-id", "NO-SUCH-STUDY", "--labels", "copd,nope") == 2
    err = capsys.readouterr().err  # the label is judged first: before any study is looked up
    assert "error: option --labels: unknown label(s) nope. use positive, all, or names" in err


def test_explain_eval_writes_results_and_judges_the_bar(trained, export, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--model", str(trained), "--manifest", str(export / "manifest.csv")]
    args += ["--truth", str(export / "ground_truth"), "--out", str(out)]
    code = clinfuse("explain-eval", *args, "--split", "all", "--max-studies", "4", "--steps", "4")
    summary = json.loads((out / "explain_eval.json").read_text())
    assert code == (0 if all(b["passed"] for b in summary["bars"]) else 1)
    assert summary["explained"] == 4 and summary["default_method"] in summary["image_methods"]
    assert set(summary["labels"]) == set(load_checkpoint(trained).labels)
    stages = next(
        m["randomized_relevance_mass"]
        for e in summary["labels"].values()
        for m in e.values()
        if isinstance(m, dict) and m.get("randomized_relevance_mass")
    )
    assert list(stages)[0] == "trained" and list(stages)[-1] == "image backbone all"
    table = (out / "explain_eval.md").read_text()
    assert "| bar | needs | worst label | value | verdict |" in table
    modality = next(e["modality"] for e in summary["labels"].values() if "modality" in e)
    assert {"phi_image", "phi_note", "interaction", "note_share"} <= set(modality)
    assert "| label | depends on | phi_image | phi_note | interaction | note share |" in table
    assert ("FAIL" in capsys.readouterr().out) == (code == 1)


def test_studies_lacking_a_side_do_not_count_in_the_notes_share(trained, export, tmp_path):
    # the same studies with their notes removed: each gives the image all the credit by
    # construction, so none of them may vote on the note-share bars
    manifest = pd.read_csv(export / "manifest.csv", dtype=str)
    manifest["note_path"] = ""
    manifest.to_csv(tmp_path / "images_only.csv", index=False)
    shutil.copytree(export / "images", tmp_path / "images")
    out = tmp_path / "eval"
    args = ["--model", str(trained), "--manifest", str(tmp_path / "images_only.csv")]
    args += ["--truth", str(export / "ground_truth"), "--out", str(out), "--no-sanity"]
    clinfuse("explain-eval", *args, "--split", "all", "--max-studies", "4", "--steps", "4")
    summary = json.loads((out / "explain_eval.json").read_text())
    assert summary["explained"] == summary["one_sided"] == 4
    assert not any("modality" in entry for entry in summary["labels"].values())
    shares = [b for b in summary["bars"] if b["bar"].startswith("note_share")]
    assert len(shares) == 2 and all(b["value"] is None and not b["passed"] for b in shares)
    assert "4 explained studies left out" in (out / "explain_eval.md").read_text()


def test_ground_truth_that_knows_none_of_the_models_labels_is_refused(trained, export, tmp_path):
    from clinfuse.errors import ManifestError
    from clinfuse.explain.quality import evaluate_explanations, load_ground_truth
    from clinfuse.model import load_checkpoint

    model = load_checkpoint(trained)
    assert set(model.labels) <= load_ground_truth(export / "ground_truth").known_labels()
    other = tmp_path / "ground_truth"  # another data set's: masks and rationales of a nodule
    other.mkdir()
    np.savez_compressed(other / "masks.npz", **{"S1/nodule": np.ones((4, 4), np.uint8)})
    (other / "rationales.jsonl").write_text('{"study_id": "S1", "label": "nodule", "spans": []}\n')
    with pytest.raises(ManifestError, match="holds no ground truth for any of the model's labels"):
        evaluate_explanations(model, export / "manifest.csv", other)


def test_damaged_ground_truth_is_one_error_naming_file_and_line(export, tmp_path):
    from clinfuse.errors import ManifestError
    from clinfuse.explain.quality import load_ground_truth

    def damaged(name: str, content: bytes) -> Path:
        folder = tmp_path / name
        shutil.copytree(export / "ground_truth", folder)
        (folder / name).write_bytes(content)
        return folder

    with pytest.raises(ManifestError, match=r"masks.npz: not a NumPy .npz of lesion masks"):
        load_ground_truth(damaged("masks.npz", b"PK\x03\x04 cut short"))
    lines = (export / "ground_truth" / "rationales.jsonl").read_bytes().splitlines(keepends=True)
    with pytest.raises(ManifestError, match=r"rationales.jsonl: line 2 is not a rationale record"):
        load_ground_truth(damaged("rationales.jsonl", b"".join([lines[0], b"{cut\n", *lines[1:]])))
    latin = tmp_path / "latin"  # one line saved in another encoding
    shutil.copytree(export / "ground_truth", latin)
    first = lines[0].replace(b"}", b', "note": "r\xe9sum\xe9"}')
    (latin / "rationales.jsonl").write_bytes(b"".join([first, *lines[1:]]))
    with pytest.raises(ManifestError, match=r"rationales.jsonl: is not UTF-8 text"):
        load_ground_truth(latin)
    truth = pd.read_csv(export / "ground_truth" / "truth.csv", dtype=str)
    truth.loc[0, "copd"] = "yes"
    folder = damaged("truth.csv", truth.to_csv(index=False).encode())
    load_ground_truth(folder)  # a column no model label names is not read
    with pytest.raises(ManifestError, match=r"truth.csv column 'copd': truth values must be 1, 0"):
        load_ground_truth(folder, ("cardiomegaly", "copd"))


def test_another_exports_ground_truth_is_refused_before_any_study_is_explained(
    trained, export, tmp_path, monkeypatch
):
    from clinfuse.errors import ManifestError
    from clinfuse.explain.quality import evaluate_explanations

    def never(*args, **kwargs):
        raise AssertionError("explained before the ground truth was checked")

    monkeypatch.setattr("clinfuse.explain.quality.explain", never)
    model = load_checkpoint(trained)
    small, shifted = tmp_path / "small", tmp_path / "shifted"
    for folder in (small, shifted):
        shutil.copytree(export / "ground_truth", folder)
    with np.load(export / "ground_truth" / "masks.npz") as data:
        np.savez_compressed(small / "masks.npz", **{k: data[k][::2, ::2] for k in data.files})
    records = [json.loads(x) for x in (shifted / "rationales.jsonl").read_text().splitlines()]
    records = [{**r, "spans": [[s + 3, e + 3] for s, e in r["spans"]]} for r in records]
    (shifted / "rationales.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for folder, says in (
        (small, r"the mask of \S+ is 32x32 pixels but the study's image is 64x64"),
        (shifted, r"the rationale of \S+ does not match the study's note: its char"),
    ):
        with pytest.raises(ManifestError, match=says):
            evaluate_explanations(
                model, export / "manifest.csv", folder, split="all", steps=2, sanity=False
            )


def test_ground_truth_of_another_export_or_split_is_refused_not_scored(trained, export, tmp_path):
    from clinfuse.errors import ManifestError
    from clinfuse.explain.quality import evaluate_explanations

    model = load_checkpoint(trained)
    manifest = export / "manifest.csv"

    def changed(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(export / "ground_truth", folder)
        edit(folder)
        return folder

    def renamed(folder: Path) -> None:  # ids that name none of the manifest's studies
        truth = pd.read_csv(folder / "truth.csv", dtype=str)
        truth["study_id"] = "X" + truth["study_id"]
        truth.to_csv(folder / "truth.csv", index=False)
        with np.load(folder / "masks.npz") as data:
            np.savez_compressed(folder / "masks.npz", **{f"X{k}": data[k] for k in data.files})
        lines = (folder / "rationales.jsonl").read_text().splitlines()
        records = [{**json.loads(line), "study_id": "X" + json.loads(line)["study_id"]}
                   for line in lines]  # fmt: skip
        (folder / "rationales.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def nothing_present(folder: Path) -> None:  # no label truly present anywhere
        truth = pd.read_csv(folder / "truth.csv", dtype=str)
        for label in model.labels:
            truth[label] = "0"
        truth.to_csv(folder / "truth.csv", index=False)

    cases = {
        "renamed": (renamed, "speaks of none of the .* studies of the 'all' split"),
        "nothing": (nothing_present, r"no study of the 'all' split .* nothing to explain"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(ManifestError, match=message):
            evaluate_explanations(
                model, manifest, changed(name, edit), split="all", steps=2, sanity=False
            )


def test_explain_eval_measures_a_text_only_model(export, tmp_path, capsys):
    model = tmp_path / "text_only"
    data = ["--manifest", str(export / "manifest.csv")]
    assert clinfuse("train", *data, "--out", str(model), *FAST, "model.fusion.mode=text_only") == 0
    out = tmp_path / "eval"
    args = ["--model", str(model), *data, "--truth", str(export / "ground_truth")]
    code = clinfuse(
        "explain-eval", *args, "--out", str(out), "--split", "all", "--max-studies", "4",
        "--steps", "2", "--no-sanity",
    )  # fmt: skip
    summary = json.loads((out / "explain_eval.json").read_text())
    assert code in (0, 1) and summary["explained"] >= 1  # the image bars are n/a, not a crash
    assert summary["default_method"] is None and summary["image_methods"] == {}
    assert "default image method: n/a (no image map to measure" in capsys.readouterr().out


def test_a_note_the_model_read_in_part_says_so_on_its_page():
    note = "Denies fever. " + "Long history. " * 20 + "FINAL: emphysema."
    spans = note_words(note)
    words = np.linspace(1, 0, len(spans))[None]  # (1, N): every word scored
    read = 30  # the model's token limit cut the note here
    page = note_html(note, spans, words, ["copd"], read=read)
    shown, rest = page.split('<p class="notice">')
    assert "Denies" in shown and "emphysema" not in shown  # no unread word is scored
    assert f"read the first {read} of {len(note)} characters" in rest
    assert "FINAL: emphysema." in rest and "<mark" not in rest
    whole = note_html(note, spans, words, ["copd"])
    assert "notice" not in whole and whole.count("<mark") > page.count("<mark")


def test_studies_explain_eval_cannot_read_are_named_and_counted(trained, export, tmp_path, caplog):
    """A missing image is a warning naming the study and a count in the report; a split none
    of whose studies can be read is one error saying so, not a crash."""
    from clinfuse.errors import ClinfuseError
    from clinfuse.explain.quality import evaluate_explanations

    model = load_checkpoint(trained)
    rows = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    for column in ("image", "note_path"):
        rows[column] = [str(export / p) if p else "" for p in rows[column]]
    rows.loc[0, ["image", "note", "note_path"]] = [str(tmp_path / "gone.dcm"), "", ""]
    rows.to_csv(tmp_path / "one_gone.csv", index=False)
    args = dict(split="all", steps=2, sanity=False, max_studies=2)
    summary = evaluate_explanations(
        model, tmp_path / "one_gone.csv", export / "ground_truth", **args
    )
    assert summary["unreadable"] == 1
    assert f"study {rows.study_id[0]} could not be read, so it is not explained" in caplog.text
    assert "1 could not be read" in quality_markdown(summary)
    rows[["image", "note", "note_path"]] = [str(tmp_path / "gone.dcm"), "", ""]
    rows.to_csv(tmp_path / "all_gone.csv", index=False)
    with pytest.raises(ClinfuseError, match=f"none of the {len(rows)} studies .* could be read"):
        evaluate_explanations(model, tmp_path / "all_gone.csv", export / "ground_truth", **args)


def test_a_study_that_fails_while_explained_is_recorded_and_the_rest_explained(
    trained, export, tmp_path, monkeypatch
):
    """Its image replaced by an unreadable file between the model's read and the display's."""
    from clinfuse.errors import DicomError
    from clinfuse.explain import render

    first, second = pd.read_csv(export / "manifest.csv", dtype=str)["study_id"][:2]
    real = render.read_dicom

    def replaced(path):
        if Path(path).stem == first:
            raise DicomError(path, "decode_failed", "replaced since it was scored")
        return real(path)

    monkeypatch.setattr(render, "read_dicom", replaced)
    done = render.explain_studies(
        trained, export / "manifest.csv", [first, second], tmp_path, steps=2
    )
    assert [d.failure for d in done] == ["explain_failed: image:decode_failed", None]
    assert done[1].files and all(p.is_file() for p in done[1].files)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}  # the second study's

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render.Explanation, "save_npz", full)
    with pytest.raises(OSError):  # a full disk stops the batch, and keeps what was written
        render.explain_studies(trained, export / "manifest.csv", [second], tmp_path, steps=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
