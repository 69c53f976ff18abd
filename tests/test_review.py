"""The review library on real SQLite and PostgreSQL stores: the worklist against a brute-force
reference, append-only verdicts under concurrent reviewers, the reviewed manifest that
`clinfuse train` trains on, agreement and monitoring numbers, the CLI, and `clinfuse demo`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import threading
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from clinfuse.cli import main as clinfuse_main
from clinfuse.cli.review_commands import QUICK_SCORED, DashboardError, dashboard_command
from clinfuse.data.manifest import file_sha256, load_manifest
from clinfuse.data.study import study_note
from clinfuse.errors import ClinfuseError, ManifestError
from clinfuse.review import (
    WorklistQuery,
    export_reviewed_manifest,
    manifest_index,
    page_statement,
    review_agreement,
    save_review,
    score_distributions,
    study_view,
    worklist,
)
from clinfuse.review.monitoring import population_stability
from clinfuse.store import (
    ExplanationRecord,
    FailureRecord,
    PredictionRecord,
    ReviewEvent,
    Store,
    StoreError,
)

LABELS = ["copd", "flu"]
THRESHOLDS = {"copd": 0.3, "flu": 0.5}
EDGES = np.linspace(0.0, 1.0, 21)


# -- stores -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """The URL of a new, empty store on the parametrised backend (its own PostgreSQL schema)."""
    if request.param == "sqlite":
        return Store.default_url(tmp_path / "run")
    database = request.getfixturevalue("postgres_database")
    schema = f"s_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(database)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    engine.dispose()
    return f"{database}?options=-csearch_path%3D{schema}"


@pytest.fixture
def store(store_url):
    with Store(store_url) as opened:
        yield opened


def reference_distribution() -> dict:
    """A validation reference as `clinfuse train` saves it: every score in bin 10."""
    counts = [0] * 20
    counts[10] = 40
    labels = {name: {"counts": counts, "positive_rate": 0.5} for name in LABELS}
    return {"bins": EDGES.tolist(), "n": 40, "labels": labels}


def make_run(store: Store, folder: Path, n: int = 30, n_failed: int = 3, seed: int = 0) -> dict:
    """A hand-made run: n scored studies (with ties), failures, explanations and a manifest.

    Returns what the worklist should find: {"run_id", "studies": {study_id: facts}, ...}.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    rows, predictions, explanations, facts = [], [], [], {}
    for i in range(n):
        study_id, patient = f"S{i:03d}", f"PAT-SECRET-{i % 11:03d}"
        probs = {name: round(rng.random(), 2) for name in LABELS}  # 2 decimals: many ties
        decisions = {name: probs[name] >= THRESHOLDS[name] for name in LABELS}
        modalities = rng.choice(["image+note", "image", "note"])
        predictions.append(
            PredictionRecord(
                study_id,
                store.pseudonym(patient),
                probs,
                dict(THRESHOLDS),
                decisions,
                modalities,
                "m-1",
            )
        )
        record = None
        if i % 3:  # two studies in three are explained, on a varying subset of labels
            explained = [x for x in LABELS if rng.random() < 0.7] or ["flu"]
            shapley = [[rng.uniform(-1, 1), rng.uniform(-1, 1), 0.0] for _ in explained]
            record = {"labels": explained, "modality": shapley}
            explanations.append(ExplanationRecord(study_id, record, str(folder / f"{i}.npz")))
        facts[study_id] = dict(
            probs=probs,
            decisions=decisions,
            modalities=modalities,
            record=record,
            pseudonym=store.pseudonym(patient),
            patient=patient,
        )
        rows.append(
            dict(
                study_id=study_id,
                patient_id=patient,
                image=f"images/{study_id}.dcm",
                note=f"Note of study {i}: cough.",
                **{x: int(decisions[x]) for x in LABELS},
            )
        )
    failures = []
    for j in range(n_failed):
        study_id, patient = f"F{j:03d}", f"PAT-SECRET-F{j}"
        failures.append(
            FailureRecord(study_id, store.pseudonym(patient), f"image:r{j % 2}", f"detail {j}")
        )
        rows.append(dict(study_id=study_id, patient_id=patient, image=f"images/{study_id}.dcm"))
    pd.DataFrame(rows).to_csv(manifest, index=False)
    validation = {"score_distribution": reference_distribution()}
    store.register_model("m-1", "tiny", LABELS, THRESHOLDS, {}, validation)
    run_id, _ = store.start_run(f"run-{seed}", "m-1", str(manifest), file_sha256(manifest), {})
    store.write_batch(run_id, predictions, failures, explanations)
    return {
        "run_id": run_id,
        "studies": facts,
        "failures": [f.study_id for f in failures],
        "manifest": manifest,
    }


# -- the worklist, against a brute-force reference ---------------------------------------------
def expected_ids(made: dict, reviews: dict[str, list[tuple[str, str]]], q: WorklistQuery) -> list:
    """What `worklist` must return for `q`, computed in Python from the facts."""
    if q.failures:
        keep = [s for s in made["failures"] if _status_ok(s, reviews, q)]
        return sorted(keep)
    rows = []
    for study_id, f in made["studies"].items():
        probs = f["probs"]
        p = probs[q.label] if q.label else max(probs.values())
        if not q.p_min <= p <= q.p_max:
            continue
        if q.uncertain is not None:
            names = [q.label] if q.label else LABELS
            if not any(abs(probs[x] - THRESHOLDS[x]) <= q.uncertain + 1e-9 for x in names):
                continue
        if q.disagreement:
            record = f["record"]
            pairs = [] if record is None else zip(record["labels"], record["modality"], strict=True)
            if not any((q.label in (None, x)) and m[0] * m[1] < 0 for x, m in pairs):
                continue
        if _status_ok(study_id, reviews, q):
            rows.append((study_id, _sort_value(study_id, f, reviews, q.sort)))
    known = [r for r in rows if r[1] is not None]
    known.sort(key=lambda r: r[0])
    known.sort(key=lambda r: r[1], reverse=q.descending)  # stable: ties by study id
    return [r[0] for r in known] + sorted(r[0] for r in rows if r[1] is None)


def _status_ok(study_id: str, reviews: dict, q: WorklistQuery) -> bool:
    return q.status == "all" or (study_id in reviews) == (q.status == "reviewed")


def _sort_value(study_id: str, f: dict, reviews: dict, sort: str):
    probs = f["probs"]
    top = max(probs.values())
    mine = reviews.get(study_id, [])
    return {
        "study_id": study_id,
        "patient_pseudonym": f["pseudonym"],
        "modalities": f["modalities"],
        "top_probability": top,
        "top_label": min(x for x in LABELS if probs[x] == top),
        "n_positive": sum(f["decisions"].values()),
        "p_copd": probs["copd"],
        "p_flu": probs["flu"],
        "reviews": len(mine),
        "last_reviewer": mine[-1][0] if mine else None,
        "explained": int(f["record"] is not None),
    }[sort]


QUERIES = [
    dict(),
    dict(label="flu", p_min=0.2, p_max=0.6),
    dict(p_min=0.5, p_max=0.9),  # on the top probability
    dict(uncertain=0.1),
    dict(label="copd", uncertain=0.15),
    dict(disagreement=True),
    dict(disagreement=True, label="copd"),
    dict(status="reviewed"),
    dict(status="unreviewed", label="flu", p_min=0.3),
    dict(failures=True),
    dict(failures=True, status="reviewed"),
]
SORTS = [
    "top_probability",
    "study_id",
    "p_flu",
    "top_label",
    "n_positive",
    "reviews",
    "last_reviewer",
    "patient_pseudonym",
    "modalities",
    "explained",
]


def review_some(store: Store, made: dict) -> dict[str, list[tuple[str, str]]]:
    """Reviews of a few studies and a failure: {study_id: [(reviewer, verdict)...] oldest first}."""
    run_id, done = made["run_id"], {}
    plan = [
        ("S003", "dr.b", "agree"),
        ("S007", "dr.a", "disagree"),
        ("S003", "dr.c", "corrected"),
        ("S011", "dr.a", "agree"),
        ("F001", "dr.b", "disagree"),
    ]
    for study_id, reviewer, verdict in plan:
        facts = made["studies"].get(study_id)
        labels = {} if facts is None else {x: int(v) for x, v in facts["decisions"].items()}
        if verdict == "corrected" or (verdict == "disagree" and labels):
            labels["flu"] = 1 - labels["flu"]
        save_review(store, run_id, study_id, reviewer, verdict, labels, "")
        done.setdefault(study_id, []).append((reviewer, verdict))
    return done


def test_worklist_filters_sorts_and_pages_like_the_reference(store, tmp_path):
    made = make_run(store, tmp_path / "data")
    reviews = review_some(store, made)
    checked = 0
    for spec, sort, descending in itertools.product(QUERIES, SORTS, (True, False)):
        query = WorklistQuery(made["run_id"], sort=sort, descending=descending, **spec)
        want = expected_ids(made, reviews, query)
        frame, total = worklist(store, query, page=0, page_size=100)
        assert total == len(want), (spec, sort)
        if not query.failures:
            assert frame.study_id.tolist() == want, (spec, sort, descending)
        else:  # a sort the failure page lacks falls back to the study id
            assert sorted(frame.study_id) == want, (spec, sort)
            if sort not in ("patient_pseudonym", "reviews", "last_reviewer"):
                assert frame.study_id.tolist() == sorted(want, reverse=descending)
        checked += total
    assert checked > 1000  # the queries are not all empty

    for status in ("all", "unreviewed", "reviewed"):  # the default view, page by small page
        query = WorklistQuery(made["run_id"], status=status)
        want = expected_ids(made, reviews, query)
        pages = [worklist(store, query, page=k, page_size=4)[0] for k in range(len(want) // 4 + 1)]
        assert pd.concat(pages).study_id.tolist() == want, status

    query = WorklistQuery(made["run_id"], sort="p_flu", descending=False)
    whole, total = worklist(store, query, page=0, page_size=1000)
    pages = [worklist(store, query, page=k, page_size=7) for k in range(5)]
    assert [t for _, t in pages] == [total] * 5 == [30] * 5
    assert pd.concat([f for f, _ in pages]).study_id.tolist() == whole.study_id.tolist()
    assert len(pages[4][0]) == 2 and worklist(store, query, page=9, page_size=7)[0].empty


def test_worklist_page_shows_scores_reviews_and_no_patient_id(store, tmp_path):
    made = make_run(store, tmp_path / "data")
    review_some(store, made)
    frame, _ = worklist(store, WorklistQuery(made["run_id"], sort="study_id", descending=False))
    row = frame.set_index("study_id").loc["S003"]
    facts = made["studies"]["S003"]
    assert row.p_flu == facts["probs"]["flu"] and row.p_copd == facts["probs"]["copd"]
    assert row.top_probability == max(facts["probs"].values())
    assert row.n_positive == sum(facts["decisions"].values())
    assert (row.reviews, row.last_verdict, row.last_reviewer) == (2, "corrected", "dr.c")
    assert row.patient_pseudonym == facts["pseudonym"] and row.explained == (
        facts["record"] is not None
    )
    assert frame.set_index("study_id").loc["S000"].reviews == 0
    failures, total = worklist(store, WorklistQuery(made["run_id"], failures=True, sort="reason"))
    assert total == 3 and failures.reason.tolist() == ["image:r1", "image:r0", "image:r0"]
    assert failures.set_index("study_id").loc["F001"].last_verdict == "disagree"
    text = frame.to_csv() + failures.to_csv()
    assert "PAT-SECRET" not in text and "PSN-" in text


def test_the_page_is_cut_filtered_and_sorted_in_sql(store, tmp_path):
    made = make_run(store, tmp_path / "data")
    postgres = store.engine.dialect.name == "postgresql"
    dialect = postgresql.dialect() if postgres else sqlite.dialect()

    def sql(page: int, **spec) -> str:
        query = WorklistQuery(made["run_id"], **spec)
        statement, _ = page_statement(store, query, page=page, page_size=50)
        return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))

    def plan(text: str) -> str:
        with store.engine.connect() as conn:
            return str(conn.exec_driver_sql("EXPLAIN QUERY PLAN " + text).all())

    ranged = sql(3, label="flu", p_min=0.2, p_max=0.6, sort="p_flu")
    assert "LIMIT 50 OFFSET 150" in ranged and "BETWEEN 0.2 AND 0.6" in ranged
    # the default view reads the top of each label's probability index, never the whole run
    default = sql(0)
    assert default.count("ORDER BY cut.probability DESC") == len(LABELS)
    assert "LIMIT 1 OFFSET 49" in default and "LIMIT 50 OFFSET 0" in default
    deep = sql(100)  # deeper than TOP_FIRST_DEPTH: the run's maxima, grouped once
    assert "GROUP BY scored.study_id" in deep and "LIMIT 50 OFFSET 5000" in deep
    if not postgres:
        for text in (ranged, default):
            found = plan(text)
            assert "ix_predictions_run_id_label_probability" in found, found
            assert "SCAN predictions" not in found and "SCAN ranked" not in found, found


def test_a_study_exactly_at_the_uncertainty_margin_is_listed(store, tmp_path):
    """0.4 is 0.1 from the threshold 0.3 to a reader (0.10000000000000003 to a float)."""
    store.register_model("m-1", "tiny", ["copd"], {"copd": 0.3}, {}, {})
    manifest = tmp_path / "m.csv"
    manifest.write_text("study_id,patient_id\nA,P1\nB,P2\n")
    run_id, _ = store.start_run("r", "m-1", str(manifest), file_sha256(manifest), {})
    store.write_batch(
        run_id,
        [
            PredictionRecord(
                s, store.pseudonym(s), {"copd": p}, {"copd": 0.3}, {"copd": p >= 0.3}, "note", "m-1"
            )  # fmt: skip
            for s, p in (("A", 0.4), ("B", 0.41))
        ],
        [],
    )
    rows, total = worklist(store, WorklistQuery(run_id, uncertain=0.1))
    assert list(rows.study_id) == ["A"] and total == 1


def test_worklist_query_round_trips_through_url_parameters():
    query = WorklistQuery(
        4,
        label="flu",
        p_min=0.25,
        uncertain=0.1,
        disagreement=True,
        status="unreviewed",
        sort="p_flu",
        descending=False,
    )
    params = query.to_params()
    assert all(isinstance(v, str) for v in params.values())
    assert WorklistQuery.from_params(params) == query
    assert WorklistQuery.from_params({**params, "run_id": ["1", "4"], "page": "3"}) == query
    assert WorklistQuery.from_params({"status": "reviewed"}, run_id=2).run_id == 2
    assert WorklistQuery(1).to_params() == {"run_id": "1"}
    for bad in (
        {"p_min": "x"},
        {"p_min": "0.8", "p_max": "0.2"},
        {"status": "later"},
        {"failures": "maybe"},
        {"uncertain": "-1"},
    ):
        with pytest.raises(ValueError):
            WorklistQuery.from_params(bad, run_id=1)


def test_worklist_refuses_unknown_labels_and_sorts(store, tmp_path):
    made = make_run(store, tmp_path / "data", n=3)
    for query in (
        WorklistQuery(made["run_id"], label="gout"),
        WorklistQuery(made["run_id"], sort="patient_id"),
    ):
        with pytest.raises(ValueError, match="gout|patient_id"):
            worklist(store, query)


# -- one study, and its verdicts -----------------------------------------------------------
def test_study_view_and_append_only_history(store, tmp_path):
    made = make_run(store, tmp_path / "data")
    run_id, facts = made["run_id"], made["studies"]["S001"]
    first = save_review(store, run_id, "S001", "dr.a", "agree", {}, "looks right")
    second = save_review(store, run_id, "S001", " dr.b ", "corrected", {"flu": 0, "copd": 1}, "x")
    view = study_view(store, run_id, "S001")
    assert [e["id"] for e in view.history] == [first, second]  # both kept, oldest first
    assert [e["reviewer"] for e in view.history] == ["dr.a", "dr.b"]
    before = {x: int(v) for x, v in facts["decisions"].items()}
    assert view.history[0]["labels_before"] == before == view.history[0]["labels_after"]
    assert view.history[1]["labels_after"] == {"copd": 1, "flu": 0}
    assert [x["label"] for x in view.labels] == LABELS
    assert view.labels[1] == dict(
        label="flu",
        probability=facts["probs"]["flu"],
        threshold=0.5,
        decision=facts["decisions"]["flu"],
    )
    assert view.explanation == facts["record"] and view.explanation_path.endswith("1.npz")
    assert view.note == "Note of study 1: cough." and view.image_path.name == "S001.dcm"
    assert view.model_version == "m-1" and view.failure is None and view.source_error is None
    assert "PAT-SECRET" not in repr(view)
    failed = study_view(store, run_id, "F002")
    assert failed.status == "failed" and failed.failure == ("image:r0", "detail 2")
    assert failed.labels == [] and failed.note is None

    with pytest.raises(ValueError, match="reviewer"):
        save_review(store, run_id, "S001", "  ", "agree", {}, "")
    with pytest.raises(ValueError, match="verdict"):
        save_review(store, run_id, "S001", "dr.a", "maybe", {}, "")
    with pytest.raises(ValueError, match="not the run's labels"):
        save_review(store, run_id, "S001", "dr.a", "corrected", {"gout": 1}, "")
    with pytest.raises(ValueError, match="use 'corrected'"):
        save_review(store, run_id, "S001", "dr.a", "agree", {"flu": 1 - before["flu"]}, "")
    with pytest.raises(ValueError, match="'corrected' needs at least one label changed"):
        save_review(store, run_id, "S001", "dr.a", "corrected", before, "")
    # a 'disagree' that keeps every call would become training labels equal to the model's
    with pytest.raises(ValueError, match="'disagree' with every label as the model called it"):
        save_review(store, run_id, "S001", "dr.a", "disagree", before, "")
    with pytest.raises(ValueError, match="label 'flu': 2 is not 1, 0 or None"):
        save_review(store, run_id, "S001", "dr.a", "disagree", {"flu": 2}, "")
    with pytest.raises(ClinfuseError, match="no study"):
        save_review(store, run_id, "S999", "dr.a", "disagree", {}, "")
    assert len(store.reviews(run_id, "S001")) == 2
    read = pd.DataFrame({"flu": [np.int64(1 - before["flu"])], "copd": [np.nan]}).iloc[0]
    save_review(store, run_id, "S001", "dr.c", "disagree", read.to_dict(), "from a CSV")
    last = store.reviews(run_id, "S001")[-1]  # numpy values and NaN (unknown), as pandas reads
    assert last["labels_after"] == {"flu": 1 - before["flu"], "copd": None}


def test_manifest_index_follows_the_file(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame([dict(study_id="A", patient_id="PAT-1", note_path="n/a.txt", flu=1)]).to_csv(
        path, index=False
    )
    index = manifest_index(path)
    assert index["A"].note_path == tmp_path / "n" / "a.txt" and index["A"].image is None
    assert manifest_index(path) is index  # cached
    assert not hasattr(index["A"], "patient_id")
    pd.DataFrame([dict(study_id="B", patient_id="PAT-2", image="b.dcm", flu=0)]).to_csv(
        path, index=False
    )
    os.utime(path, ns=(1, 1))  # a new mtime, however fast the rewrite
    assert list(manifest_index(path)) == ["B"]


def test_concurrent_reviewers_lose_no_event(store_url, tmp_path):
    with Store(store_url) as store:
        run_id = make_run(store, tmp_path / "data", n=4)["run_id"]
    reviewers, events = 4, 8
    start, errors = threading.Barrier(reviewers), []

    def review(k: int) -> None:
        try:
            with Store(store_url) as mine:  # each reviewer its own connection pool
                start.wait()
                for i in range(events):
                    save_review(mine, run_id, f"S{i % 2:03d}", f"dr.{k}", "disagree", {}, str(i))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=review, args=(k,)) for k in range(reviewers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    with Store(store_url) as store:
        got = store.reviews(run_id)
        assert sorted((e["reviewer"], e["comment"]) for e in got) == sorted(
            (f"dr.{k}", str(i)) for k in range(reviewers) for i in range(events)
        )
        for study_id in ("S000", "S001"):
            history = store.reviews(run_id, study_id)
            assert len(history) == len({e["id"] for e in history}) == reviewers * events // 2
        frame, _ = worklist(store, WorklistQuery(run_id, status="reviewed", sort="study_id"))
        assert frame.reviews.tolist() == [16, 16]


# -- labels flowing back -------------------------------------------------------------------
def test_reviewed_manifest_loads_and_trains_with_the_latest_labels(tmp_path, small_export):
    truth = load_manifest(small_export)
    labels = list(truth.labels)
    with Store(Store.default_url(tmp_path / "run")) as store:
        store.register_model("m-1", "tiny", labels, {x: 0.5 for x in labels}, {}, {})
        run_id, _ = store.start_run("r", "m-1", str(small_export), file_sha256(small_export), {})
        records, rng = [], random.Random(1)
        for row in truth:
            probs = {x: rng.random() for x in labels}
            records.append(
                PredictionRecord(
                    row.study_id,
                    store.pseudonym(row.patient_id),
                    probs,
                    {x: 0.5 for x in labels},
                    {x: p >= 0.5 for x, p in probs.items()},
                    "image+note",
                    "m-1",
                )
            )
        store.write_batch(run_id, records, [])
        expected = {}
        for i, row in enumerate(truth):
            if i % 8 == 7:
                continue  # not reviewed: left out of the export
            true = {
                x: None if np.isnan(v) else int(v) for x, v in zip(labels, row.labels, strict=True)
            }
            wrong = {x: 1 - v if v is not None else 0 for x, v in true.items()}
            save_review(store, run_id, row.study_id, "dr.a", "corrected", wrong, "first look")
            if i % 8 == 3:
                true[labels[0]] = None  # the latest review leaves a label unknown
            save_review(store, run_id, row.study_id, "dr.b", "corrected", true, "on reflection")
            expected[row.study_id] = true
        out = export_reviewed_manifest(store, run_id, tmp_path / "reviewed" / "manifest.csv")
        pseudonyms = {row.patient_id: store.pseudonym(row.patient_id) for row in truth}

    exported = load_manifest(out, labels=labels)
    sources = {row.study_id: row for row in truth}
    assert any(row.image for row in exported) and any(row.note for row in exported)
    assert len(exported) == len(expected) == 56
    for row in exported:
        got = {x: None if np.isnan(v) else int(v) for x, v in zip(labels, row.labels, strict=True)}
        assert got == expected[row.study_id], row.study_id
        source = sources[row.study_id]  # the same files, by absolute path
        # the same image by absolute path; the note inline, as the model read it
        assert (row.image, row.note_path, row.note) == (source.image, None, study_note(source))
        assert row.patient_id == pseudonyms[source.patient_id]
        assert row.split == source.split  # the patient's split by its real id, not pseudonym
    text = out.read_text()
    assert not [row.patient_id for row in truth if row.patient_id in text]
    model = tmp_path / "retrained"
    args = [
        "train",
        "--manifest",
        str(out),
        "--out",
        str(model),
        "model.name=tiny",
        "train.epochs=1",
        "train.bootstrap=20",
    ]
    assert clinfuse_main(args) == 0
    assert (model / "model.safetensors").is_file()


def test_review_agreement_on_a_hand_made_example(store, tmp_path):
    made = make_run(store, tmp_path / "data", n=6)
    run_id = made["run_id"]
    assert review_agreement(store, run_id).empty
    decisions = {
        s: {x: int(v) for x, v in f["decisions"].items()} for s, f in made["studies"].items()
    }
    flip = {"S000": {"flu"}, "S001": {"flu", "copd"}, "S002": set(), "S003": {"copd"}}
    for study_id, flipped in flip.items():
        save_review(store, run_id, study_id, "dr.a", "agree", {}, "")  # superseded below
        after = {x: 1 - v if x in flipped else v for x, v in decisions[study_id].items()}
        save_review(store, run_id, study_id, "dr.b", "corrected" if flipped else "agree", after, "")
    save_review(
        store, run_id, "S004", "dr.c", "disagree", {"copd": 1 - decisions["S004"]["copd"]}, ""
    )
    table = review_agreement(store, run_id).set_index("label")
    for label in LABELS:
        pairs = [(decisions[s][label], decisions[s][label] ^ (label in f)) for s, f in flip.items()]
        if label == "copd":  # S004: flu unknown (not counted), copd flipped
            pairs.append((decisions["S004"]["copd"], 1 - decisions["S004"]["copd"]))
        row = table.loc[label]
        assert row.reviewed == len(pairs)
        assert row.agreed == sum(m == h for m, h in pairs)
        assert row.agreement == pytest.approx(row.agreed / row.reviewed)
        assert row.false_positives == sum(m == 1 and h == 0 for m, h in pairs)
        assert row.false_negatives == sum(m == 0 and h == 1 for m, h in pairs)
    assert table.loc["flu"].reviewed == 4 and table.loc["copd"].reviewed == 5
    assert table.loc["flu"].agreed == 2 and table.loc["copd"].agreed == 2


def test_score_distributions_against_the_validation_reference(store, tmp_path):
    made = make_run(store, tmp_path / "data", n=40)
    found = score_distributions(store, made["run_id"])
    assert found["has_reference"] and found["n"] == 40 and found["reference_n"] == 40
    assert found["bins"] == pytest.approx(EDGES.tolist())
    for label in LABELS:
        probs = np.array([f["probs"][label] for f in made["studies"].values()])
        entry = found["labels"][label]
        assert entry["counts"] == np.histogram(probs, EDGES)[0].tolist()
        assert entry["positive_rate"] == pytest.approx(np.mean(probs >= THRESHOLDS[label]))
        assert entry["reference"][10] == 40 and entry["reference_positive_rate"] == 0.5
        r = np.maximum(np.histogram(probs, EDGES)[0] / 40, 1e-4)
        q = np.maximum(np.array(entry["reference"]) / 40, 1e-4)
        assert entry["psi"] == pytest.approx(float(np.sum((r - q) * np.log(r / q))))
        assert entry["shift"] == "major"  # uniform scores against a spike at 0.5
    assert population_stability([5, 5], [5, 5]) == 0.0
    assert population_stability([0, 0], [5, 5]) is None


# -- privacy: nothing these functions return names a patient -----------------------------
def test_no_patient_id_in_anything_returned(store, tmp_path):
    made = make_run(store, tmp_path / "data", n=12)
    run_id = made["run_id"]
    review_some(store, made)
    texts = [worklist(store, WorklistQuery(run_id, **q))[0].to_csv() for q in QUERIES]
    texts += [repr(study_view(store, run_id, s)) for s in ("S003", "F001")]
    texts.append(export_reviewed_manifest(store, run_id, tmp_path / "out.csv").read_text())
    texts.append(review_agreement(store, run_id).to_csv())
    texts.append(json.dumps(score_distributions(store, run_id)))
    for text in texts:
        assert "PAT-SECRET" not in text


# -- the commands --------------------------------------------------------------------------
def test_dashboard_binds_to_localhost_unless_oidc_is_configured(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    url = Store.default_url(tmp_path / "run")
    with pytest.raises(DashboardError, match="OIDC"):
        dashboard_command(url, "0.0.0.0", 8501)
    assert clinfuse_main(["dashboard", "--store", url, "--host", "0.0.0.0"]) == 2
    assert "refusing --host 0.0.0.0" in capsys.readouterr().err
    argv, env = dashboard_command(url, "127.0.0.1", 8600)
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4].endswith("dashboard/app.py")
    assert argv[-3:] == ["--", "--store", url] and env["CLINFUSE_STORE"] == url
    assert "8600" in argv
    secret = "postgresql+psycopg://dr:s3cret@db.example/clinfuse"
    argv, env = dashboard_command(secret, "localhost", 8501)
    assert not any("s3cret" in a for a in argv) and env["CLINFUSE_STORE"] == secret
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "secrets.toml").write_text('[auth]\nclient_id = "x"\n')
    argv, _ = dashboard_command(url, "0.0.0.0", 8501)
    assert "0.0.0.0" in argv
    path = tmp_path / "run" / "clinfuse.db"  # a SQLite store by its path, not only its URL
    argv, env = dashboard_command(str(path), "127.0.0.1", 8501)
    assert argv[-1] == env["CLINFUSE_STORE"] == f"sqlite:///{path}"


def test_reviewed_manifest_keeps_the_notes_identifiers_masked_and_the_given_split(tmp_path):
    """The export names patients by pseudonym, so the next run could no longer mask a note's
    patient id: the note goes out masked as the model read it, whether inline or a file."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.txt").write_text("MRN 75483485: fever, crackles at the left base.")
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {
            "study_id": ["A", "B"],
            "patient_id": ["75483485", "75483485"],
            "note": ["Inline: patient 75483485 has a cough.", ""],
            "note_path": ["", "notes/b.txt"],
            "split": ["val", "val"],
            "copd": ["1", "0"],
        }
    ).to_csv(manifest, index=False)
    with Store(Store.default_url(tmp_path / "run")) as store:
        store.register_model("m-1", "tiny", ["copd"], {"copd": 0.5}, {}, {})
        run_id, _ = store.start_run("r", "m-1", str(manifest), file_sha256(manifest), {})
        pseudonym = store.pseudonym("75483485")
        store.write_batch(
            run_id,
            [
                PredictionRecord(
                    s, pseudonym, {"copd": 0.9}, {"copd": 0.5}, {"copd": True}, "note", "m-1"
                )  # fmt: skip
                for s in ("A", "B")
            ],
            [],
        )
        for study_id in ("A", "B"):
            save_review(store, run_id, study_id, "dr.a", "agree", {"copd": 1}, "")
        out = export_reviewed_manifest(store, run_id, tmp_path / "reviewed.csv")
    assert "75483485" not in out.read_text()
    exported = {row.study_id: row for row in load_manifest(out, labels=["copd"])}
    for study_id, kept in (("A", "Inline: patient "), ("B", "MRN ")):
        note = exported[study_id].note
        assert note.startswith(kept) and "75483485" not in note and len(note) > len(kept) + 8
        assert exported[study_id].note_path is None and exported[study_id].split == "val"


def test_a_note_is_not_exported_where_its_image_header_cannot_be_read(tmp_path, caplog):
    """A study whose image header cannot be read (its scoring failed) may have names in its
    note that only that header gives: the export leaves an inline note out and keeps a note
    file's path, and says so, rather than write the note with only the patient id masked."""
    (tmp_path / "broken.dcm").write_bytes(b"not a DICOM file at all" * 10)
    (tmp_path / "note.txt").write_text("Mr Paul Davis has a fever.")
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {
            "study_id": ["A", "B"],
            "patient_id": ["P1", "P1"],
            "image": ["broken.dcm", "broken.dcm"],
            "note": ["Mr Paul Davis (born 18/05/1947) has a fever.", ""],
            "note_path": ["", "note.txt"],
            "copd": ["1", "0"],
        }
    ).to_csv(manifest, index=False)
    with Store(Store.default_url(tmp_path / "run")) as store:
        store.register_model("m-1", "tiny", ["copd"], {"copd": 0.5}, {}, {})
        run_id, _ = store.start_run("r", "m-1", str(manifest), file_sha256(manifest), {})
        pseudonym = store.pseudonym("P1")
        failed = [FailureRecord(s, pseudonym, "image:not_dicom", "no preamble") for s in "AB"]
        store.write_batch(run_id, [], failed)
        for study_id in "AB":
            save_review(store, run_id, study_id, "dr.a", "corrected", {"copd": 1}, "")
        with caplog.at_level(logging.WARNING, logger="clinfuse.review.export"):
            out = export_reviewed_manifest(store, run_id, tmp_path / "reviewed.csv")
    assert "Davis" not in out.read_text() and "1947" not in out.read_text()
    exported = pd.read_csv(out, keep_default_na=False).set_index("study_id")
    assert exported.at["A", "note"] == "" and exported.at["A", "note_path"] == ""
    assert exported.at["B", "note"] == "" and exported.at["B", "note_path"] == str(
        tmp_path / "note.txt"
    )
    assert "study A: its image's header cannot be read" in caplog.text
    assert "its inline note is left out (manifest row 1 holds it" in caplog.text
    assert "study B: its image's header cannot be read" in caplog.text


def test_export_command_writes_manifest_and_agreement(tmp_path, capsys):
    url = Store.default_url(tmp_path / "run")
    with Store(url) as store:
        made = make_run(store, tmp_path / "data", n=5)
        assert (
            clinfuse_main(
                ["export", "--store", url, "--format", "manifest", "--out", str(tmp_path / "m.csv")]
            )
            == 2
        )  # nothing reviewed yet
        save_review(store, made["run_id"], "S002", "dr.a", "agree", {}, "")
    assert (
        clinfuse_main(
            ["export", "--store", url, "--format", "manifest", "--out", str(tmp_path / "m.csv")]
        )
        == 0
    )
    assert load_manifest(tmp_path / "m.csv", labels=LABELS).table.study_id.tolist() == ["S002"]
    assert (
        clinfuse_main(
            [
                "export",
                "--store",
                url,
                "--run",
                str(made["run_id"]),
                "--format",
                "agreement",
                "--out",
                str(tmp_path / "a.csv"),
            ]
        )
        == 0
    )
    assert pd.read_csv(tmp_path / "a.csv").agreement.tolist() == [1.0, 1.0]
    assert "1 studies" in capsys.readouterr().out
    typo = Store.default_url(tmp_path / "rnu")  # a mistyped run folder: an error, no new store
    args = ["export", "--store", typo, "--format", "manifest", "--out", str(tmp_path / "t.csv")]
    assert clinfuse_main(args) == 2
    assert "no store at" in capsys.readouterr().err and not (tmp_path / "rnu").exists()


def test_demo_quick_runs_every_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert clinfuse_main(["demo", "--quick", "--no-dashboard", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("model/MODEL_CARD.md", "evaluation/report.html", "run/predictions.csv"):
        assert str(out / name) in printed and (out / name).is_file()
    url = Store.default_url(out / "run")
    assert f"clinfuse dashboard --store {url}" in printed and "not a diagnosis" in printed
    auroc = json.loads((out / "model" / "config.json").read_text())["metrics"]["validation"]
    auroc = auroc["macro"]["auroc"]  # the tiny model after one epoch: any value, even 0.0
    shown = "n/a" if auroc is None else f"{auroc:.3f}"
    assert f"validation macro AUROC: {shown}\n" in printed
    with Store(url) as store:
        run = store.runs()[-1]
        assert run["status"] == "finished"
        frame, total = worklist(store, WorklistQuery(run["id"]))
        assert total == QUICK_SCORED == len(frame)
        assert score_distributions(store, run["id"])["has_reference"]
        assert frame.explained.tolist() == (frame.n_positive > 0).tolist()  # --explain positive


def test_a_manifest_changed_or_gone_since_the_run_is_never_shown_or_exported(tmp_path):
    """The study page and the export find a study's files through the run's manifest; once
    that file has changed its rows may name another study's image and note, so neither trusts
    it (the run recorded the manifest's SHA-256)."""
    with Store(Store.default_url(tmp_path / "run")) as store:
        made = make_run(store, tmp_path / "data", n=3, n_failed=0)
        run_id, manifest = made["run_id"], made["manifest"]
        save_review(store, run_id, "S001", "dr.a", "agree", {}, "")
        assert study_view(store, run_id, "S001").note == "Note of study 1: cough."
        rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        rows.loc[1, ["image", "note"]] = rows.loc[2, ["image", "note"]].to_numpy()  # swapped in
        rows.to_csv(manifest, index=False)
        view = study_view(store, run_id, "S001")
        assert view.note is None and view.image_path is None
        assert f"{manifest}: has changed since run {run_id} scored it" in view.source_error
        out = tmp_path / "reviewed.csv"
        with pytest.raises(ManifestError, match="has changed since run .* restore the manifest"):
            export_reviewed_manifest(store, run_id, out)
        manifest.unlink()
        with pytest.raises(ManifestError, match=f"the manifest run {run_id} scored cannot be read"):
            export_reviewed_manifest(store, run_id, out)
        assert "cannot be read" in study_view(store, run_id, "S001").source_error
        assert not out.exists()


def test_export_writes_into_a_folder_or_parquet_and_points_at_the_runs_with_reviews(
    tmp_path, capsys, caplog
):
    url = Store.default_url(tmp_path / "run")
    with Store(url) as store:
        first = make_run(store, tmp_path / "data", n=5)["run_id"]
        save_review(store, first, "S002", "dr.a", "agree", {}, "")
        make_run(store, tmp_path / "data2", n=3, seed=1)  # a later run, not reviewed
    export = ["export", "--store", url, "--format"]
    for kind in ("manifest", "agreement"):  # the later run has no review: nothing to export
        assert clinfuse_main([*export, kind, "--out", str(tmp_path)]) == 2
        assert "has no reviewed study to export: runs with reviews: 1 (choose one with --run)" in (
            capsys.readouterr().err
        )
    assert not (tmp_path / "agreement.csv").exists()
    folder = tmp_path / "exports"
    folder.mkdir()
    for out in (folder, tmp_path / "m.parquet"):
        assert clinfuse_main([*export, "manifest", "--run", str(first), "--out", str(out)]) == 0
    made = [folder / "reviewed_manifest.csv", tmp_path / "m.parquet"]
    for path in made:
        assert load_manifest(path, labels=LABELS).table.study_id.tolist() == ["S002"]
    assert clinfuse_main([*export, "agreement", "--run", str(first), "--out", str(folder)]) == 0
    assert pd.read_csv(folder / "agreement.csv").reviewed.tolist() == [1, 1]
    assert sorted(p.name for p in folder.iterdir()) == ["agreement.csv", "reviewed_manifest.csv"]
    # a folder not made yet (a trailing separator, or no suffix) is made, not written as a file
    for new in (f"{tmp_path / 'new'}/", str(tmp_path / "later")):
        assert clinfuse_main([*export, "manifest", "--run", str(first), "--out", new]) == 0
        assert (Path(new) / "reviewed_manifest.csv").is_file()
    capsys.readouterr()
    assert clinfuse_main([*export, "manifest", "--out", str(tmp_path / "m.txt")]) == 2
    assert "write a .csv or .parquet file" in capsys.readouterr().err
    assert not (tmp_path / "m.txt").exists()
    with Store(url) as store:  # the later run reviewed too: an export of one names the other
        save_review(store, 2, "S001", "dr.a", "agree", {}, "")
        with caplog.at_level(logging.WARNING, logger="clinfuse.review.export"):
            export_reviewed_manifest(store, 2, tmp_path / "second.csv")
    assert "runs 1 also have reviews; this export holds run 2's only" in caplog.text
    # a refused export (an unknown run, a mistyped store) leaves no folder behind
    never = tmp_path / "never"
    assert clinfuse_main([*export, "manifest", "--run", "99", "--out", str(never)]) == 2
    assert "no run with id 99 in this store (its runs: 1, 2)" in capsys.readouterr().err
    secret = "host=db user=clin password=S3cret dbname=x"  # a connection string: not repeated
    args = ["export", "--store", secret, "--format", "agreement", "--out", str(never / "x.csv")]
    assert clinfuse_main(args) == 2
    err = capsys.readouterr().err
    assert "not a database URL (not repeated here" in err and "S3cret" not in err
    for mistyped in (tmp_path / "nope", tmp_path / "run" / "typo"):  # a path: said as one
        args = ["export", "--store", str(mistyped), "--format", "agreement", "--out", "x.csv"]
        assert clinfuse_main(args) == 2
        assert f"no store at {mistyped}: no such file or folder" in capsys.readouterr().err
    typo = ["export", "--store", Store.default_url(tmp_path / "rnu"), "--format", "agreement"]
    assert clinfuse_main([*typo, "--out", f"{never}/"]) == 2
    with Store(url) as store:
        unreviewed = make_run(store, tmp_path / "data3", n=2, seed=2)["run_id"]
    args = [*export, "manifest", "--run", str(unreviewed), "--out", f"{never}/"]
    assert clinfuse_main(args) == 2  # nothing reviewed in that run: nothing to write
    assert not never.exists()


def test_review_labels_mean_what_the_export_trains_on(store, tmp_path):
    """A correction of one label keeps the model's others; a failed study has no call to agree
    with; a label the run lacks or a value not 1/0/unknown never reaches the store; a review
    leaving every label unknown trains nothing and is left out; the export never replaces the
    manifest the run scored."""
    made = make_run(store, tmp_path / "data", n=4, n_failed=1)
    run_id, study = made["run_id"], "S000"
    decisions = {x: int(v) for x, v in made["studies"][study]["decisions"].items()}
    first = LABELS[0]
    save_review(store, run_id, study, "dr.a", "corrected", {first: 1 - decisions[first]})
    (latest,) = store.reviews(run_id, study)
    assert latest["labels_after"] == {**decisions, first: 1 - decisions[first]}
    with pytest.raises(ValueError, match="was not scored .* no call to agree with"):
        save_review(store, run_id, made["failures"][0], "dr.a", "agree", {})
    for labels, says in (({"Flu": 1}, r"labels \['Flu'\] are not run"), ({first: 2}, "give 1, 0")):
        with pytest.raises((StoreError, ValueError), match=says):
            store.add_review(ReviewEvent(run_id, "S001", "dr.a", "corrected", {}, labels))
    save_review(store, run_id, "S002", "dr.a", "disagree", {x: None for x in LABELS})
    out = export_reviewed_manifest(store, run_id, tmp_path / "reviewed.csv")
    assert list(pd.read_csv(out)["study_id"]) == [study]  # S002: every label unknown
    with pytest.raises(ClinfuseError, match="is the manifest run .* scored"):
        export_reviewed_manifest(store, run_id, made["manifest"])
    assert "S000" in made["manifest"].read_text()
    # a run whose every review leaves every label unknown has nothing to train on: an error,
    # not a manifest of no rows
    other = make_run(store, tmp_path / "data2", n=2, n_failed=0, seed=1)["run_id"]
    save_review(store, other, "S000", "dr.a", "disagree", {x: None for x in LABELS})
    with pytest.raises(StoreError, match="no reviewed study with a known label .*1 leave every"):
        export_reviewed_manifest(store, other, tmp_path / "nothing.csv")
    assert not (tmp_path / "nothing.csv").exists()


def test_a_revision_keeps_the_corrections_made_before_it(store, tmp_path):
    """A reviewer correcting one more label of a study someone already corrected keeps that
    correction: a label left out of 'corrected' is the study's latest label, not the model's
    call; 'agree' is the model's calls again."""
    made = make_run(store, tmp_path / "data", n=3, n_failed=1)
    run_id, study, failed = made["run_id"], "S001", made["failures"][0]
    called = {x: int(v) for x, v in made["studies"][study]["decisions"].items()}
    first, second = LABELS
    save_review(store, run_id, study, "dr.a", "corrected", {first: 1 - called[first]})
    save_review(store, run_id, study, "dr.b", "corrected", {second: 1 - called[second]})
    latest = store.reviews(run_id, study)[-1]
    assert latest["labels_after"] == {first: 1 - called[first], second: 1 - called[second]}
    assert latest["labels_before"] == called  # what agreement is measured against
    save_review(store, run_id, study, "dr.c", "agree", {})
    assert store.reviews(run_id, study)[-1]["labels_after"] == called
    # a failed study (no call): its labels given one at a time add up
    save_review(store, run_id, failed, "dr.a", "corrected", {first: 1})
    save_review(store, run_id, failed, "dr.b", "corrected", {second: 0})
    assert store.reviews(run_id, failed)[-1]["labels_after"] == {first: 1, second: 0}
    out = export_reviewed_manifest(store, run_id, tmp_path / "reviewed.csv")
    exported = pd.read_csv(out).set_index("study_id")
    assert (exported.at[failed, first], exported.at[failed, second]) == (1, 0)


def test_an_empty_split_cell_is_exported_as_the_patients_split_not_the_pseudonyms(tmp_path):
    manifest = tmp_path / "manifest.csv"
    patients = [f"PAT-{i:02d}" for i in range(40)]
    pd.DataFrame(
        {
            "study_id": [f"S{i:02d}" for i in range(40)] + ["T00"],
            "patient_id": [*patients, "PAT-00"],
            "note": "cough",
            "split": [""] * 40 + ["test"],  # PAT-00's second study: given
            "copd": "1",
        }
    ).to_csv(manifest, index=False)
    with Store(Store.default_url(tmp_path / "run")) as store:
        store.register_model("m-1", "tiny", ["copd"], {"copd": 0.5}, {}, {})
        run_id, _ = store.start_run("r", "m-1", str(manifest), file_sha256(manifest), {})
        ids = pd.read_csv(manifest)[["study_id", "patient_id"]].itertuples(index=False)
        records = [
            PredictionRecord(s, store.pseudonym(p), {"copd": 0.9}, {"copd": 0.5}, {"copd": True},
                             "note", "m-1")
            for s, p in ids
        ]  # fmt: skip
        store.write_batch(run_id, records, [])
        for record in records:
            save_review(store, run_id, record.study_id, "dr.a", "agree", {})
        out = export_reviewed_manifest(store, run_id, tmp_path / "reviewed.csv")
    pd.read_csv(manifest).iloc[:40].to_csv(tmp_path / "first.csv", index=False)
    seeded = {row.study_id: row.split for row in load_manifest(tmp_path / "first.csv")}
    exported = {row.study_id: row.split for row in load_manifest(out)}  # trainable: one split
    assert exported == {**seeded, "S00": "test", "T00": "test"}  # a patient each, by real id
    assert seeded["S00"] != "test"  # the seeded split alone would have parted PAT-00
