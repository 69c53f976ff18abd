"""The manifest contract: formats, relative paths, labels, splits and the errors that guard it."""

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from clinfuse.data.manifest import PatientSplit, iter_manifest, load_manifest, short_rows
from clinfuse.errors import ManifestError

ROWS = [
    {
        "study_id": "S1",
        "patient_id": "P1",
        "image": "img/a.dcm",
        "note": "fever",
        "flu": "1",
        "copd": "0",
    },
    {"study_id": "S2", "patient_id": "P1", "image": "", "note": "", "flu": "", "copd": "1"},
    {
        "study_id": "S3",
        "patient_id": "P2",
        "image": "img/c.dcm",
        "note": "cough",
        "flu": "0",
        "copd": "",
    },
]


def write(tmp_path, rows, name="manifest.csv"):
    path = tmp_path / name
    frame = pd.DataFrame(rows)
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    elif name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.jsonl"])
def test_every_format_reads_the_same(tmp_path, name):
    manifest = load_manifest(write(tmp_path, ROWS, name))
    assert manifest.labels == ("flu", "copd")
    np.testing.assert_array_equal(
        manifest.label_matrix(), np.array([[1, 0], [np.nan, 1], [0, np.nan]], dtype=np.float32)
    )
    rows = list(manifest)
    assert rows[0].image == tmp_path / "img/a.dcm"  # relative to the manifest's folder
    assert rows[1].image is None and rows[1].note is None
    assert [r.row for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_spreadsheets_semicolon_or_tab_separated_csv_reads_the_same(tmp_path, sep):
    rows = [dict(r, note=r["note"] and r["note"] + ", 38.5 C") for r in ROWS]  # commas in cells
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", sep=sep, index=False, encoding="utf-8-sig")
    manifest = load_manifest(tmp_path / "m.csv")
    assert manifest.labels == ("flu", "copd")
    assert [r.note for r in manifest] == ["fever, 38.5 C", None, "cough, 38.5 C"]
    assert next(iter(manifest)).image == tmp_path / "img/a.dcm"
    # a decimal-comma locale's labels, "1,0" and "0,0"
    comma = pd.DataFrame(rows).assign(flu=["1,0", "", "0,0"])
    comma.to_csv(tmp_path / "c.csv", sep=";", index=False)
    flu = load_manifest(tmp_path / "c.csv", labels=["flu"]).label_matrix()[:, 0]
    np.testing.assert_array_equal(flu, [1.0, np.nan, 0.0])


def test_a_header_ending_in_a_separator_makes_no_row_short(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("study_id,patient_id,note,flu,\nS1,P1,fever,1\nS2,P2,cough,0\n")
    assert short_rows(path) == {}
    assert [r.note for r in load_manifest(path)] == ["fever", "cough"]


def test_jsonl_numbers_and_nulls_are_labels(tmp_path):
    rows = [
        {"study_id": 7, "patient_id": 1, "note": "x", "flu": 1, "copd": None},
        {"study_id": 8, "patient_id": 2, "note": "y", "flu": 0.0, "copd": True},
    ]
    manifest = load_manifest(write(tmp_path, rows, "m.jsonl"))
    assert [r.study_id for r in manifest] == ["7", "8"]
    np.testing.assert_array_equal(manifest.label_matrix(), [[1, np.nan], [0, 1]])


def test_a_jsonl_key_only_one_line_has_is_named_in_a_warning(tmp_path, caplog):
    rows = [
        {"study_id": f"S{i}", "patient_id": f"P{i}", "note": "x", "flu": i % 2} for i in range(12)
    ]
    rows[7] = {**rows[7], "flue": 1}  # a typo: a label of one positive, unknown elsewhere
    path = write(tmp_path, rows, "m.jsonl")
    with caplog.at_level(logging.WARNING, logger="clinfuse.data.manifest"):
        load_manifest(path)
        load_manifest(path)  # once per file version
    moved = iter_manifest(path, ["flu"], chunk_rows=5)  # renamed while streamed: read whole
    first = next(moved)
    path.rename(tmp_path / "moved.jsonl")
    assert [first.study_id, *(row.study_id for row in moved)] == [r["study_id"] for r in rows]
    said = [r.getMessage() for r in caplog.records if "only one of its 12 lines" in r.getMessage()]
    assert (
        len(said) == 1
        and "the key 'flue' only one of its 12 lines has ('flue' on line 8)" in said[0]
    )


def test_labels_named_in_config_restrict_columns(tmp_path):
    manifest = load_manifest(write(tmp_path, ROWS), labels=["copd"])
    assert manifest.labels == ("copd",)


def test_patient_split_keeps_a_patients_studies_together_and_is_seeded(tmp_path):
    rows = [
        {"study_id": f"S{i}", "patient_id": f"P{i // 3}", "note": "n", "y": "1"} for i in range(300)
    ]
    path = write(tmp_path, rows)
    first = load_manifest(path, split=PatientSplit(seed=3)).table
    again = load_manifest(path, split=PatientSplit(seed=3)).table
    other = load_manifest(path, split=PatientSplit(seed=4)).table
    assert (first.groupby("patient_id")["split"].nunique() == 1).all()
    assert first["split"].tolist() == again["split"].tolist()
    assert first["split"].tolist() != other["split"].tolist()
    shares = first["split"].value_counts(normalize=True)
    assert 0.6 < shares["train"] < 0.8 and shares["val"] > 0.05 and shares["test"] > 0.05


def test_adding_rows_never_moves_an_existing_patient(tmp_path):
    rows = [{"study_id": f"S{i}", "patient_id": f"P{i}", "note": "n", "y": "0"} for i in range(50)]
    before = load_manifest(write(tmp_path, rows)).table["split"].tolist()
    extra = rows + [{"study_id": "S999", "patient_id": "P999", "note": "n", "y": "1"}]
    after = load_manifest(write(tmp_path, extra)).table["split"].tolist()
    assert after[:50] == before


def test_given_split_is_kept_and_empty_cells_are_assigned(tmp_path):
    rows = [dict(r, split=s) for r, s in zip(ROWS, ["test", "test", ""], strict=True)]
    splits = load_manifest(write(tmp_path, rows)).table["split"].tolist()
    assert splits[:2] == ["test", "test"] and splits[2] in ("train", "val", "test")


@pytest.mark.parametrize(
    "header", ["study_id,patient_id,note,flu,flu", "study_id,patient_id,note,flu, flu "]
)
def test_a_column_named_twice_is_an_error_not_a_renamed_label(tmp_path, header):
    path = tmp_path / "m.csv"
    path.write_text(f"{header}\nS1,P1,fever,1,0\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="column 'flu': column named twice in the header"):
        load_manifest(path)


def test_a_label_named_twice_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="column 'flu': label named twice"):
        load_manifest(write(tmp_path, ROWS), labels=["flu", "flu"])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda rows: [{k: v for k, v in r.items() if k != "patient_id"} for r in rows],
            "column 'patient_id': missing required column",
        ),
        (
            lambda rows: rows + [dict(rows[0], patient_id="P9")],
            r"row 4 column 'study_id': duplicate study_id 'S1' \(rows 1, 4\)",
        ),
        (  # its files would be one file on a case-insensitive disk
            lambda rows: rows + [dict(rows[0], study_id="s1", patient_id="P9")],
            r"row 4 column 'study_id': duplicate study_id 'S1' \(in other cases\) \(rows 1, 4\)",
        ),
        (
            lambda rows: [dict(r, split="training") for r in rows],
            "row 1 column 'split': unknown split 'training'",
        ),
        (
            lambda rows: [rows[0], dict(rows[1], flu="yes"), rows[2]],
            "row 2 column 'flu': label value 'yes' is not 1, 0 or empty",
        ),
        (
            lambda rows: [rows[0], dict(rows[1], flu="2"), rows[2]],
            "row 2 column 'flu': label value '2'",
        ),
        (  # a record number in a column taken for a label: its length alone
            lambda rows: [rows[0], dict(rows[1], flu="40817"), rows[2]],
            r"row 2 column 'flu': label value \(a text of 5 characters, not shown",
        ),
        (  # a column of the export that is not a label: say how to name the labels
            lambda rows: [dict(r, ward="ICU") for r in rows],
            r"column 'ward': label value \(a text of 3 characters, not shown: it may identify a "
            r"patient\) .* if 'ward' is not a label .* data.labels=\[a,b\]",
        ),
        (
            lambda rows: [dict(rows[0], split="train"), dict(rows[1], split="test"), rows[2]],
            r"row 1 column 'split': a patient's studies straddle splits \(rows 1 \(train\), "
            r"2 \(test\)\)",
        ),
        (  # an empty split names what the seeded split chose for that row
            lambda rows: [
                dict(rows[0], split="train"),
                rows[1],
                dict(rows[2], patient_id="P1", split="test"),
            ],
            r"straddle splits \(rows 1 \(train\), 2 \(empty: the seeded split gives "
            r"(train|val|test)\), 3 \(test\)\)",
        ),
        (
            lambda rows: [rows[0], dict(rows[1], study_id=""), rows[2]],
            "row 2 column 'study_id': empty value",
        ),
        (
            lambda rows: [{k: v for k, v in r.items() if k not in ("image", "note")} for r in rows],
            "no input column",
        ),
        (
            lambda rows: [{k: r[k] for k in ("study_id", "patient_id", "note")} for r in rows],
            "no label columns",
        ),
    ],
)
def test_structural_errors_name_row_and_column(tmp_path, change, match):
    with pytest.raises(ManifestError, match=match):
        load_manifest(write(tmp_path, change([dict(r) for r in ROWS])))


def test_missing_config_label_and_bad_file_type(tmp_path):
    with pytest.raises(ManifestError, match="column 'effusion': no such label column"):
        load_manifest(write(tmp_path, ROWS), labels=["effusion"])
    bad = tmp_path / "m.xlsx"
    bad.write_text("x")
    with pytest.raises(ManifestError, match="unsupported manifest type '.xlsx'"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "absent.csv")
    export = tmp_path / "export"  # the export's folder, given for its manifest
    export.mkdir()
    write(export, ROWS)
    manifest = next(p.name for p in export.iterdir())
    with pytest.raises(ManifestError, match=f"is a folder.*the manifest inside it .{manifest}"):
        load_manifest(export)


def test_manifest_error_never_prints_patient_ids(tmp_path):
    rows = [dict(ROWS[0], split="train"), dict(ROWS[1], split="test"), ROWS[2]]
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, rows))
    assert "P1" not in str(info.value)


def test_a_pipe_separated_or_utf16_manifest_says_what_to_fix(tmp_path):
    piped = tmp_path / "piped.csv"
    piped.write_text("study_id|patient_id|note|flu\nS1|P1|fever|1\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="header reads as one column: separate columns by"):
        load_manifest(piped)
    wide = tmp_path / "utf16.csv"
    wide.write_bytes("study_id,patient_id,note,flu\nS1,P1,fièvre,1\n".encode("utf-16"))
    with pytest.raises(ManifestError, match=r"utf16.csv: not UTF-8 text .*save it as UTF-8"):
        load_manifest(wide)


def test_a_broken_jsonl_line_is_named_by_its_line_number(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"study_id": "S1", "patient_id": "P1", "note": "fever", "flu": 1})
    path.write_text(f'{good}\n\n{{"study_id": "S2",\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m.jsonl: line 3 is not a JSON object"):
        load_manifest(path)


def test_rows_cut_short_are_read_with_a_warning_naming_them_once(tmp_path, caplog):
    path = tmp_path / "m.csv"
    path.write_text(
        "study_id,patient_id,image,note,flu,copd\nS1,P1,img/a.dcm,fever,1,0\nS2,P2,img/b.dcm\n"
        "S3,P3,img/c.dcm,cough,0,1\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="clinfuse.data.manifest"):
        manifest = load_manifest(path)
        rows = list(iter_manifest(path, manifest.labels))  # a run reads it twice: said once
    assert [r.study_id for r in rows] == ["S1", "S2", "S3"]
    assert rows[1].note is None and np.isnan(rows[1].labels).all()  # read as empty, kept
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert "m.csv: row 2 with fewer cells than the header's 6" in warned[0]
    assert "(row 2 has no note, flu, copd)" in warned[0]
    caplog.clear()
    path.write_text(path.read_text(encoding="utf-8") + "S4,P4,img/d.dcm,cough\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="clinfuse.data.manifest"):
        load_manifest(path)  # the file changed: its rows are named again
        load_manifest(path, warn_short_rows=False)
    assert len(caplog.records) == 1 and "2 rows (2, 4) with" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("body", "match"),
    [  # an unquoted comma in a note: in the first row pandas would shift every column
        ("S1,P1,,Fever, cough,1\nS2,P2,,ok,0\n", "row 1: has 6 cells where the header has 5"),
        ("S1,P1,,ok,1\nS2,P2,,Fever, cough,0\n", "row 2: has 6 cells where the header has 5"),
    ],
)
def test_a_row_with_more_cells_than_the_header_is_refused_not_shifted(tmp_path, body, match):
    path = tmp_path / "m.csv"
    path.write_text("study_id,patient_id,image,note,flu\n" + body, encoding="utf-8")
    with pytest.raises(ManifestError, match=match) as caught:
        load_manifest(path)
    assert "must be quoted" in str(caught.value)


def test_a_column_without_a_name_is_dropped_while_empty_and_refused_with_values(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("study_id,patient_id,note,flu,\nS1,P1,ok,1,\nS2,P2,ok,0,\n", encoding="utf-8")
    assert load_manifest(path).labels == ("flu",)  # a trailing separator: no phantom label
    path.write_text("study_id,patient_id,note,flu, ,  \nS1,P1,ok,1,,\n", encoding="utf-8")
    assert load_manifest(path).labels == ("flu",)  # two blank names
    path.write_text("study_id,patient_id,note,flu,\nS1,P1,ok,1,\nS2,P2,ok,0,7\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="column 5 has no name in the header but holds"):
        load_manifest(path)


@pytest.mark.parametrize("column", ["study_id", "patient_id", "note_path"])
def test_a_control_character_in_an_id_or_a_path_is_refused_naming_the_cell(tmp_path, column):
    rows = [dict(r) for r in ROWS]
    rows[1][column] = "S\x002" if column != "note_path" else "notes/a\x00.txt"
    path = write(tmp_path, rows, "m.jsonl")  # JSON keeps a NUL a CSV writer might drop
    with pytest.raises(ManifestError, match=f"row 2 column '{column}': a control character"):
        list(iter_manifest(path, ("flu", "copd")))


def test_scoring_refuses_a_study_id_again_in_another_chunk_or_case(tmp_path):
    path = write(tmp_path, [*ROWS, dict(ROWS[0], study_id="s1")])
    with pytest.raises(ManifestError, match=r"row 4 column 'study_id': duplicate study_id 's1'"):
        list(iter_manifest(path, ("flu", "copd"), chunk_rows=2, read_labels=False))


def test_a_column_named_row_is_refused_by_name(tmp_path):
    path = write(tmp_path, [dict(r, row=str(i)) for i, r in enumerate(ROWS, 1)])
    with pytest.raises(ManifestError, match="column 'row': a column named 'row' is reserved"):
        load_manifest(path)


def test_nulls_of_nullable_parquet_columns_are_empty_cells(tmp_path):
    frame = pd.DataFrame(
        {
            "study_id": ["S1", "S2"],
            "patient_id": ["P1", "P2"],
            "note": pd.array(["fever", None], dtype="string"),
            "note_path": pd.array([None, "n.txt"], dtype="string"),
            "flu": pd.array([1, None], dtype="Int64"),
            "copd": pd.array([None, False], dtype="boolean"),
        }
    )
    frame.to_parquet(tmp_path / "m.parquet")
    rows = list(load_manifest(tmp_path / "m.parquet").rows())
    assert rows[0].note == "fever" and rows[0].note_path is None
    assert rows[1].note is None and rows[1].note_path == tmp_path / "n.txt"
    np.testing.assert_array_equal(rows[0].labels, [1.0, np.nan])
    np.testing.assert_array_equal(rows[1].labels, [np.nan, 0.0])


def test_parquet_as_other_tools_write_it_reads_as_written(tmp_path):
    """Binary (not UTF-8-tagged) strings, as Hive, Impala or older Spark write them, and an
    index pandas saved with the table are read as the columns they hold."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "study_id": pa.array([b"S1", b"S2"], pa.binary()),
            "patient_id": pa.array([b"75483485", b"P2"], pa.binary()),
            "note": pa.array([b"MRN 75483485.\nFever", b""], pa.binary()),
            "flu": pa.array([1, 0]),
        }
    )
    pq.write_table(table, tmp_path / "binary.parquet")
    rows = list(load_manifest(tmp_path / "binary.parquet").rows())
    assert [(r.study_id, r.patient_id) for r in rows] == [("S1", "75483485"), ("S2", "P2")]
    assert rows[0].note == "MRN 75483485.\nFever"  # a line break, not a Python repr

    frame = pd.DataFrame(ROWS)
    frame.set_index("study_id").to_parquet(tmp_path / "indexed.parquet")  # a named index
    pd.concat([frame, frame.iloc[:0]]).set_index(pd.Index([5, 5, 7])).to_parquet(
        tmp_path / "repeated.parquet"  # an unnamed index with repeated labels
    )
    expected = load_manifest(write(tmp_path, ROWS)).label_matrix()
    for name in ("indexed.parquet", "repeated.parquet"):
        manifest = load_manifest(tmp_path / name)
        assert [r.study_id for r in manifest] == [r["study_id"] for r in ROWS], name
        np.testing.assert_array_equal(manifest.label_matrix(), expected)


def test_a_jsonl_line_naming_a_key_twice_or_not_an_object_is_an_error_naming_it(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"study_id": "S1", "patient_id": "P1", "flu": 1, "flu": 0}\n')
    with pytest.raises(ManifestError, match=r"column 'flu': line 1 names the key 'flu' twice"):
        load_manifest(path)
    path.write_text('{"study_id": "S1", "patient_id": "P1", "flu": 1}\n\n[1, 2]\n')
    with pytest.raises(ManifestError, match=r"line 3 is not a JSON object \(a list\)"):
        load_manifest(path)
    path.write_text('{"study_id": "S1", "patient_id": "P1", "note": "x"}\n{"study_id": \n')
    with pytest.raises(ManifestError, match=r"line 2 is not a JSON object \(Expecting value\)"):
        list(iter_manifest(path, ("flu",), chunk_rows=1))


def test_a_list_or_an_object_in_a_cell_of_a_read_column_is_an_error_naming_it(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [dict(ROWS[0], note={"text": "fever"}), ROWS[1]]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8-sig")  # a BOM too
    with pytest.raises(ManifestError, match=r"column 'note': holds a dict where a text is"):
        load_manifest(path)
    rows = [dict(r, tags=["icu", "night"]) for r in ROWS]  # a column the run does not read
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert len(load_manifest(path, labels=["flu"])) == 3
    with pytest.raises(ManifestError, match=r"column 'tags': label value"):  # taken for a label
        load_manifest(path)


@pytest.mark.parametrize("chunk_rows", [1, 4096])
def test_scoring_reads_no_label_or_split_cell_whatever_the_chunks(tmp_path, chunk_rows):
    # a label cell that is not 1/0, a split nobody defined, and a patient across two splits:
    # each stops training, none may stop (or, by where chunks fall, sometimes stop) scoring
    rows = [
        {**ROWS[0], "flu": "maybe", "split": "train"},
        {**ROWS[1], "split": "test"},
        {**ROWS[2], "split": "holdout"},
    ]
    path = write(tmp_path, rows)
    with pytest.raises(ManifestError):
        load_manifest(path)
    scored = list(iter_manifest(path, ("flu", "copd"), chunk_rows=chunk_rows, read_labels=False))
    assert [r.study_id for r in scored] == ["S1", "S2", "S3"]
    assert all(np.isnan(r.labels).all() for r in scored)


def test_a_stray_quote_that_swallows_the_rows_after_it_is_refused_naming_its_cell(tmp_path):
    """A quote opened at the start of a note and never closed reads the next rows into that
    note, until the next quote: those studies vanish, and the row takes a later row's labels."""
    header = "study_id,patient_id,note,flu,copd\n"
    rows = [f"S{i},P{i},plain note,1,0\n" for i in range(1, 9)]
    rows[2] = 'S3,P3,"Query pneumonia per ED,1,0\n'
    rows[6] = 'S7,P7,"Known COPD",0,1\n'
    path = tmp_path / "m.csv"
    path.write_text(header + "".join(rows), encoding="utf-8")
    for read in (load_manifest, lambda p: list(iter_manifest(p, ["flu", "copd"]))):
        with pytest.raises(ManifestError, match="row 3 column 'note': a quote opened") as caught:
            read(path)
        assert "4 line(s) later, and 3 of those lines read as rows" in str(caught.value)
        assert 'write a quote inside a cell twice ("")' in str(caught.value)
    # a column that is neither reserved nor a label (an age) does not hide the swallowed rows
    aged = ["study_id,patient_id,note,age,flu", 'S1,P1,"opened,61,1']
    aged += [f"S{i},P{i},plain,{60 + i},1" for i in range(2, 6)] + ['S6,P6,"closed",66,0']
    path.write_text("\n".join(aged) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="row 1 column 'note': a quote opened"):
        load_manifest(path, labels=["flu"])
    # a note of several lines, commas and all, is a note: a lab panel, a list of drugs
    notes = [
        "Vitals: BP 120/80, HR 88,\nRR 16, T 37.1, SpO2 96%\nplan: review",
        "Labs today:\nNa,K,Cl,HCO3,BUN\n140,4.1,102,24,18\nImpression: stable.",
        "Meds:\naspirin,metoprolol,lisinopril,atorvastatin,insulin",
    ]
    pd.DataFrame(
        {"study_id": ["S1", "S2", "S3"], "patient_id": ["P1", "P2", "P3"], "note": notes}
        | {"flu": ["1", "0", "1"], "copd": ["0", "0", "1"]}
    ).to_csv(path, index=False)
    assert load_manifest(path).table["note"].tolist() == notes


def test_a_header_less_manifest_is_told_so_without_repeating_its_first_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "S1,MRN75483485,images/DOE_JOHN_19470621/S1.dcm,1,0\n"
        "S2,MRN75483485,images/DOE_JOHN_19470621/S2.dcm,0,1\n",
        encoding="utf-8",
    )
    for body in (path.read_text(), "S1,P1,a.dcm,1,1\nS2,P2,b.dcm,0,0\n"):  # 1 named twice
        path.write_text(body, encoding="utf-8")
        with pytest.raises(ManifestError, match="the header row seems to be missing") as caught:
            load_manifest(path)
        assert "MRN" not in str(caught.value) and "DOE" not in str(caught.value)
        assert "add the header row first: study_id, patient_id" in str(caught.value)
    renamed = tmp_path / "renamed.csv"  # a header of other names: listed, as they help
    renamed.write_text("StudyID,PatientID,image,flu\nS1,P1,a.dcm,1\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="columns found: StudyID, PatientID, image, flu"):
        load_manifest(renamed)
    with pytest.raises(ManifestError, match="columns found: StudyID, PatientID, image, flu$"):
        list(iter_manifest(renamed, ["flu", "copd"]))  # not the labels asked for


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("sep=,\nstudy_id,patient_id,note,flu\nS1,P1,a,1\n", "first line 'sep=,' is a spread"),
        ("study_id,patient_id,note,flu\nS1,P1,a,1,,\n", "the row ends with separators the head"),
        (
            "study_id,patient_id,note,flu\nS1,P1,a,1\nstudy_id,patient_id,note,flu\nS2,P2,b,0\n",
            "row 2 column 'study_id': the row repeats the header",
        ),
    ],
)
def test_spreadsheet_habits_are_named_with_what_to_do(tmp_path, text, says):
    path = tmp_path / "m.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match=re.escape(says)):
        load_manifest(path)


def test_a_manifest_not_in_utf8_names_the_line_of_its_first_such_byte(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("study_id,patient_id,note,flu\nS1,P1,ok,1\nS2,P2,fièvre,0\n".encode("cp1252"))
    with pytest.raises(ManifestError, match=r"not UTF-8 text \(.*, first at line 3\)"):
        load_manifest(path)


def test_any_number_equal_to_one_or_zero_is_a_label_and_long_numbers_are_not_shown(tmp_path):
    rows = [dict(ROWS[0], flu="1.00", copd="0.000"), dict(ROWS[2], flu="1,00", copd="+0")]
    table = load_manifest(write(tmp_path, rows)).table
    assert table.flu.tolist() == [1.0, 1.0] and table.copd.tolist() == [0.0, 0.0]
    for value, shown in (
        ("0.50", "'0.50'"),
        ("1e0", "'1e0'"),  # not as spreadsheets write 1
        ("1,000", "'1,000'"),  # a thousand, where the comma groups digits
        ("75483485", "(a text of 8 characters"),
    ):
        with pytest.raises(ManifestError, match=re.escape(f"label value {shown}")):
            load_manifest(write(tmp_path, [dict(ROWS[0], flu=value)]))


def test_a_label_no_train_row_knows_is_refused_by_train_and_validate(tmp_path):
    from clinfuse.data.manifest import label_problem

    labels = np.array([[1, np.nan], [0, np.nan], [1, 0], [0, 1]], dtype=float)
    splits = np.array(["train", "train", "val", "val"])
    said = label_problem(labels, splits, ["flu", "sepsis"])
    assert said.startswith("label 'sepsis' has no known value in the train split")
    assert "data.labels=[...]" in said
    assert label_problem(labels[:, :1], splits, ["flu"]) == ""


def test_a_manifest_without_rows_is_one_error_for_every_command(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("study_id,patient_id,note,flu\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="m.csv: no study rows below the header"):
        load_manifest(path)
    path.write_text("", encoding="utf-8")
    for read in (load_manifest, lambda p: list(iter_manifest(p, ["flu"]))):
        with pytest.raises(ManifestError, match="m.csv: is empty: no header and no rows"):
            read(path)
