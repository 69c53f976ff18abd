"""The store on real databases: SQLite files and a PostgreSQL server (skipped when none answers).

Each PostgreSQL test gets its own schema in a database made for this session (with an ICU
English collation, so ordering bugs show) and dropped at the end.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from datetime import datetime, timedelta, timezone
from fnmatch import fnmatch
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from clinfuse.store import (
    ExplanationRecord,
    FailureRecord,
    PredictionRecord,
    ReviewEvent,
    Store,
    StoreError,
    head_revision,
    migrate,
    store_url,
)
from clinfuse.store.migrations import connect
from clinfuse.store.schema import Base

LABELS = ["flu", "copd"]
THRESHOLDS = {"flu": 0.5, "copd": 0.3}
REPO = Path(__file__).resolve().parents[1]


# -- databases --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request, tmp_path):
    """A factory of URLs to new, empty stores on the parametrised backend."""
    made: list[str] = []

    def make() -> str:
        if request.param == "sqlite":
            made.append("")
            return Store.default_url(tmp_path / f"store{len(made)}")
        database = request.getfixturevalue("postgres_database")
        schema = f"s_{uuid.uuid4().hex[:12]}"
        engine = sa.create_engine(database)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        engine.dispose()
        made.append(schema)
        return f"{database}?options=-csearch_path%3D{schema}"

    yield make
    if request.param == "postgresql" and made:
        engine = sa.create_engine(request.getfixturevalue("postgres_database"))
        with engine.begin() as conn:
            for schema in made:
                conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        engine.dispose()


@pytest.fixture
def open_store(new_url):
    """Open stores (a new one, or at a given URL) and close them all afterwards."""
    stores: list[Store] = []

    def open_(url: str | None = None) -> Store:
        stores.append(Store(url or new_url()))
        return stores[-1]

    yield open_
    for store in stores:
        store.close()


def run_of(store: Store, key: str = "run") -> int:
    store.register_model("m-1", "tiny", LABELS, THRESHOLDS, {"width": 8}, {"auroc": 0.9})
    return store.start_run(key, "m-1", "/data/manifest.csv", "a" * 64, {"batch_size": 4})[0]


def pred(store: Store, study_id: str, flu: float = 0.7, patient: str = "P1") -> PredictionRecord:
    probs = {"flu": flu, "copd": 0.1}
    return PredictionRecord(
        study_id=study_id,
        patient_pseudonym=store.pseudonym(patient),
        probabilities=probs,
        thresholds=dict(THRESHOLDS),
        decisions={k: p >= THRESHOLDS[k] for k, p in probs.items()},
        modalities="image+note",
        model_version="m-1",
    )


def fail(store: Store, study_id: str, reason: str = "image:truncated") -> FailureRecord:
    return FailureRecord(study_id, store.pseudonym("P2"), reason, "file ends early")


def rows(store: Store, table: str) -> int:
    with store._engine.connect() as conn:
        return conn.scalar(sa.text(f"SELECT count(*) FROM {table}"))


# -- writing results --------------------------------------------------------------------------
def test_overlapping_batches_never_duplicate_a_study(open_store):
    store = open_store()
    run_id = run_of(store)
    first = [pred(store, f"S{i}", flu=0.9) for i in range(4)]
    assert store.write_batch(run_id, first, [fail(store, "F1")]) == {"predicted": 4, "failed": 1}
    again = [pred(store, f"S{i}", flu=0.1) for i in range(2, 6)]  # S2, S3 already written
    written = store.write_batch(run_id, again, [fail(store, "F1"), fail(store, "F2")])
    assert written == {"predicted": 2, "failed": 1}  # S4, S5, F2
    assert rows(store, "studies") == 8  # S0-S5, F1, F2
    assert rows(store, "predictions") == 6 * len(LABELS)
    assert rows(store, "failures") == 2
    wide = pd.concat(store.iter_predictions(run_id))
    assert wide.set_index("study_id").loc["S3", "p_flu"] == pytest.approx(0.9)  # first write kept


def test_forgetting_a_runs_failures_lets_it_score_them_again_and_keeps_their_reviews(
    open_store,
):
    store = open_store()
    run_id = run_of(store)
    store.write_batch(run_id, [pred(store, "S1")], [fail(store, "F1"), fail(store, "F2")])
    store.write_batch(run_id, [], [fail(store, "F3")])
    store.add_review(ReviewEvent(run_id, "F3", "dr.a", "agree"))  # a verdict on a failure
    assert store.forget_failures(run_id) == 2
    assert store.done_study_ids(run_id) == {"S1", "F3"}  # F3's reviews still refer to it
    assert list(store.failures(run_id)["study_id"]) == ["F3"]
    assert store.write_batch(run_id, [pred(store, "F1")], [fail(store, "F2")]) == {
        "predicted": 1,
        "failed": 1,
    }
    assert [r["study_id"] for r in store.reviews(run_id)] == ["F3"]  # the audit trail stays


def test_a_failed_batch_leaves_nothing_behind(open_store):
    store = open_store()
    run_id = run_of(store)
    good = [pred(store, f"S{i}") for i in range(3)]
    broken = [ExplanationRecord("S0", {"attribution": object()})]  # fails after the inserts
    with pytest.raises((TypeError, sa.exc.StatementError)):
        store.write_batch(run_id, good, [fail(store, "F1")], broken)
    for table in ("studies", "predictions", "failures", "explanations"):
        assert rows(store, table) == 0, table
    assert store.done_study_ids(run_id) == set()
    # the retried batch (as after a crash) writes everything, once
    explanation = ExplanationRecord("S0", {"top_words": {"flu": [["fever", 0.4]]}}, "S0.npz")
    written = store.write_batch(run_id, good, [fail(store, "F1")], [explanation])
    assert written == {"predicted": 3, "failed": 1, "explained": 1}
    # the same batch again (a resume that re-reads it) writes nothing and counts nothing
    assert store.write_batch(run_id, good, [fail(store, "F1")], [explanation]) == {}
    assert store.explanation(run_id, "S0") == {
        "study_id": "S0",
        "record": {"top_words": {"flu": [["fever", 0.4]]}},
        "path": "S0.npz",
    }
    assert store.explanation(run_id, "S1") is None


def test_a_full_disk_is_one_store_error_and_the_retried_batch_writes_once(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'clinfuse.db'}")
    run_id = run_of(store)

    def full(connection, _record):  # no page past the current size: what a full disk does
        connection.execute("PRAGMA max_page_count = 1")  # SQLite keeps its size as the floor

    sa.event.listen(store.engine, "connect", full)
    store.engine.dispose()  # new connections meet the limit
    batch = [pred(store, f"S{i}-{'x' * 200}") for i in range(200)]
    with pytest.raises(StoreError, match=r"refused a write \(database or disk is full\).*again"):
        store.write_batch(run_id, batch, [])
    sa.event.remove(store.engine, "connect", full)
    store.engine.dispose()
    assert rows(store, "studies") == 0  # nothing of the refused write
    assert store.write_batch(run_id, batch, []).total() == 200


def test_a_store_locked_by_another_writer_says_so_and_the_retry_writes(tmp_path):
    path = tmp_path / "clinfuse.db"
    store = Store(f"sqlite:///{path}")
    run_id = run_of(store)

    def impatient(connection, _record):  # wait 50 ms for a lock, not the default minute
        connection.execute("PRAGMA busy_timeout = 50")

    sa.event.listen(store.engine, "connect", impatient)
    store.engine.dispose()
    other = sqlite3.connect(path, isolation_level=None)  # another process writing
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match=r"database is locked.*another process held the store"):
        store.write_batch(run_id, [pred(store, "S1")], [])
    other.execute("ROLLBACK")
    other.close()
    assert store.write_batch(run_id, [pred(store, "S1")], []) == {"predicted": 1}


def test_malformed_records_are_refused_before_anything_is_written(open_store):
    store = open_store()
    run_id = run_of(store)
    raw_id = pred(store, "S1")
    raw_id.patient_pseudonym = "P1"  # a patient id where a pseudonym belongs
    wrong_model = pred(store, "S2")
    wrong_model.model_version = "m-0"
    not_a_probability = pred(store, "S3", flu=float("nan"))
    for bad in (raw_id, wrong_model, not_a_probability):
        with pytest.raises(ValueError):
            store.write_batch(run_id, [pred(store, "S0"), bad], [])
    with pytest.raises(StoreError, match="no prediction or failure"):
        store.write_batch(run_id, [pred(store, "S0")], [], [ExplanationRecord("S9", {})])
    assert rows(store, "studies") == 0
    store.write_batch(run_id, [pred(store, "S0")], [])
    for nobody in ("   ", "\u200b", "\u200b \u2060"):  # spaces or invisible characters only
        with pytest.raises(ValueError, match="needs a reviewer's name"):
            store.add_review(ReviewEvent(run_id, "S0", nobody, "agree"))
    assert rows(store, "reviews") == 0


def test_done_study_ids_and_resuming_a_run(open_store):
    store = open_store()
    run_id = run_of(store)
    store.write_batch(run_id, [pred(store, "S1"), pred(store, "S2")], [fail(store, "S3")])
    other = run_of(store, key="other run")
    store.write_batch(other, [pred(store, "S9")], [])
    assert store.done_study_ids(run_id) == {"S1", "S2", "S3"}
    assert store.start_run("run", "m-1", "/data/manifest.csv", "a" * 64, {}) == (run_id, True)
    with pytest.raises(StoreError, match="another model or manifest"):
        store.start_run("run", "m-1", "/data/manifest.csv", "b" * 64, {})
    store.finish_run(run_id, {"done": 3})
    assert store.run(run_id)["status"] == "finished"
    assert [r["run_key"] for r in store.runs()] == ["run", "other run"]


def test_iter_predictions_is_wide_ordered_by_study_id_and_chunked(open_store):
    store = open_store()
    run_id = run_of(store)
    ids = ["b1", "B2", "a10", "a9", "_x", "Z", "é1"]  # collations disagree on these
    store.write_batch(run_id, [pred(store, s, flu=0.1 * (i + 1)) for i, s in enumerate(ids)], [])
    store.write_batch(run_id, [], [fail(store, "a2")])
    columns = ["study_id", "status", "p_flu", "p_copd", "decision_flu", "decision_copd"]
    columns += ["modalities", "model_version", "patient_pseudonym"]
    for chunk in (3, 4, 8):  # with a remainder, an exact multiple (8 = 2 x 4), one chunk
        frames = list(store.iter_predictions(run_id, chunk=chunk))
        assert all(0 < len(f) <= chunk and list(f.columns) == columns for f in frames)
        wide = pd.concat(frames, ignore_index=True)
        assert list(wide.study_id) == sorted([*ids, "a2"])  # code point order on every backend
    wide = wide.set_index("study_id")
    assert wide.loc["a9", "p_flu"] == pytest.approx(0.4)
    assert bool(wide.loc["a9", "decision_flu"]) is False and bool(wide.loc["Z", "decision_flu"])
    assert wide.loc["a2", "status"] == "failed" and pd.isna(wide.loc["a2", "p_flu"])
    assert pd.isna(wide.loc["a2", "decision_copd"])
    assert set(wide.model_version) == {"m-1"}
    assert wide.loc["b1", "patient_pseudonym"] == store.pseudonym("P1")
    empty = list(store.iter_predictions(run_of(store, key="empty")))
    assert len(empty) == 1 and empty[0].empty and list(empty[0].columns) == columns


def test_counts_by_status_and_reason(open_store):
    store = open_store()
    run_id = run_of(store)
    failures = [fail(store, "F1"), fail(store, "F2", "note:empty"), fail(store, "F3")]
    store.write_batch(run_id, [pred(store, "S1")], failures)
    assert store.counts(run_id) == {
        "predicted": 1,
        "failed": 3,
        "by_reason": {"image:truncated": 2, "note:empty": 1},
    }
    assert list(store.failures(run_id).columns) == ["study_id", "reason", "detail"]
    assert list(store.failures(run_id).study_id) == ["F1", "F2", "F3"]


def test_a_failure_detail_with_a_nul_or_an_undecodable_name_is_written(open_store):
    """Such a detail (a damaged header, a file name that is not UTF-8) once stopped a
    PostgreSQL run at the same batch on every attempt."""
    store = open_store()
    run_id = run_of(store)
    damaged = FailureRecord("F1", store.pseudonym("P2"), "image:x", "uid 1.2\x003 in M\udcfcller")
    store.write_batch(run_id, [pred(store, "S1")], [damaged])
    (detail,) = store.failures(run_id).detail
    assert detail == "uid 1.2\ufffd3 in M\\xfcller"


# -- privacy ----------------------------------------------------------------------------------
def test_pseudonyms_and_no_patient_id_anywhere(open_store, new_url):
    url = new_url()
    store = open_store(url)
    patients = ["P-000123", "Doe^Jane", "PSN-0000000000000000"]
    names = [store.pseudonym(p) for p in patients]
    assert names == [store.pseudonym(p) for p in patients]  # stable within a store
    assert names == [open_store(url).pseudonym(p) for p in patients]  # and when reopened
    assert all(
        n != p and n.startswith("PSN-") and len(n) == 20
        for n, p in zip(names, patients, strict=True)
    )
    assert len(set(names)) == 3
    assert not set(names) & {open_store().pseudonym(p) for p in patients}  # another store
    run_id = run_of(store)
    store.write_batch(
        run_id,
        [pred(store, f"S{i}", patient=p) for i, p in enumerate(patients)],
        [FailureRecord("F1", store.pseudonym(patients[0]), "image:missing", "no file")],
        [ExplanationRecord("S0", {"note": "fever and cough"})],
    )
    store.add_review(ReviewEvent(run_id, "S0", "dr.a", "agree", comment="fine"))
    text = []
    with store._engine.connect() as conn:
        inspector = sa.inspect(conn)
        for table in inspector.get_table_names():
            for column in inspector.get_columns(table):
                query = sa.text(f'SELECT CAST("{column["name"]}" AS TEXT) FROM {table}')
                text += [v for v in conn.scalars(query) if v is not None]
    assert len(text) > 50
    for patient in patients:
        assert not [v for v in text if patient in v], patient


# -- reviews ----------------------------------------------------------------------------------
def test_reviews_are_append_only_events_oldest_first(open_store):
    store = open_store()
    words = ("review", "update", "delete", "remove", "edit")  # no way to change a review
    assert [n for n in dir(Store) if any(w in n for w in words)] == ["add_review", "reviews"]
    run_id = run_of(store)
    store.write_batch(run_id, [pred(store, "S1"), pred(store, "S2")], [])
    t0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
    first = store.add_review(
        ReviewEvent(run_id, "S1", "dr.a", "agree", {"flu": 1}, {"flu": 1}, "", "m-1", t0)
    )
    second = store.add_review(
        ReviewEvent(run_id, "S1", "dr.b", "corrected", {"flu": 1}, {"flu": 0}, "no fever", "m-1")
    )
    earlier = store.add_review(  # recorded last, happened first (e.g. an imported paper form)
        ReviewEvent(run_id, "S1", "dr.c", "disagree", created_at=t0 - timedelta(hours=1))
    )
    store.add_review(ReviewEvent(run_id, "S2", "dr.a", "agree"))
    history = store.reviews(run_id, "S1")
    assert [r["id"] for r in history] == [earlier, first, second]
    assert history[1]["created_at"] == t0 and history[2]["created_at"].tzinfo is not None
    assert history[2]["labels_after"] == {"flu": 0} and history[2]["comment"] == "no fever"
    assert len(store.reviews(run_id)) == 4
    with pytest.raises(StoreError, match="no study"):
        store.add_review(ReviewEvent(run_id, "S404", "dr.a", "agree"))
    with pytest.raises(ValueError):
        store.add_review(ReviewEvent(run_id, "S1", "dr.a", "maybe"))
    # refused alike on both backends (PostgreSQL's text cannot hold NUL; ids are text)
    with pytest.raises(ValueError, match="review comment holds a NUL character"):
        store.add_review(ReviewEvent(run_id, "S1", "dr.a", "agree", comment="ok\x00"))
    with pytest.raises(ValueError, match="review study_id must be text, got int"):
        store.add_review(ReviewEvent(run_id, 1, "dr.a", "agree"))
    for statement in ("UPDATE reviews SET verdict = 'agree'", "DELETE FROM reviews"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):  # the database refuses too
            with store._engine.begin() as conn:
                conn.exec_driver_sql(statement)
    assert len(store.reviews(run_id)) == 4


def test_concurrent_writers_lose_no_event(new_url):
    url = new_url()  # a new store: the writers also race to create it
    writers, events = 4, 12
    start = threading.Barrier(writers)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            start.wait()
            store = Store(url)
            run_id = run_of(store)
            for i in range(events):
                ids = [f"S{j:03d}" for j in range(k * 5 + i, k * 5 + i + 6)]  # overlaps others
                store.write_batch(run_id, [pred(store, s) for s in ids], [])
                store.add_review(
                    ReviewEvent(run_id, ids[0], f"reviewer{k}", "agree", comment=str(i))
                )
            store.close()
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "writers deadlocked"
    assert not errors, errors
    with Store(url) as store:
        run_id = store.runs()[0]["id"]
        assert len(store.runs()) == 1
        got = {(r["reviewer"], r["comment"]) for r in store.reviews(run_id)}
        assert got == {(f"reviewer{k}", str(i)) for k in range(writers) for i in range(events)}
        expected = {f"S{j:03d}" for k in range(writers) for j in range(k * 5, k * 5 + events + 5)}
        assert store.done_study_ids(run_id) == expected
        assert rows(store, "studies") == len(expected)
        assert rows(store, "predictions") == len(expected) * len(LABELS)


# -- schema versions --------------------------------------------------------------------------
def test_new_stores_opened_at_once_in_one_process(new_url):
    urls = [new_url() for _ in range(4)]  # e.g. a server opening several stores
    opened: list[str] = []
    start = threading.Barrier(len(urls))

    def work(url: str) -> None:
        start.wait()
        with Store(url) as store:
            opened.append(store.schema_version())

    threads = [threading.Thread(target=work, args=(u,), daemon=True) for u in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert opened == [head_revision()] * len(urls)


def test_a_store_another_process_made_between_two_reads_is_opened(new_url, monkeypatch):
    """Two runs open one new shared store at once: the other's migration commits between this
    one's "no revision yet" and its look at the tables, which are then clinfuse's own."""
    from clinfuse.store import store as module

    url = new_url()
    Store(url).close()  # the other process's store, made meanwhile
    reads = iter([None])  # what this process read first: no store yet
    real = module.current_revision
    monkeypatch.setattr(module, "current_revision", lambda conn: next(reads, real(conn)))
    with Store(url) as store:
        assert store.schema_version() == head_revision()


OLD_ROWS = [  # a run as the first release wrote it (table, columns, values)
    ("models", "version, name, labels, thresholds, config, validation, created_at",
     """'m-1', 'tiny', '["flu", "copd"]', '{}', '{}', '{}', :t"""),
    ("runs", "run_key, model_id, manifest, manifest_sha256, settings, status, started_at",
     "'old', 1, 'm.csv', 'x', '{}', 'finished', :t"),
    ("studies", "run_id, study_id, patient_pseudonym, status, modalities, created_at",
     "1, 'S1', '', 'failed', '', :t"),
    ("failures", "run_id, study_id, reason, detail", "1, 'S1', 'image:missing', ''"),
    ("reviews", "run_id, study_id, reviewer, created_at, verdict, labels_before, labels_after, "
     "comment, model_version", "1, 'S1', 'dr.a', :t, 'agree', '{}', '{}', '', 'm-1'"),
]  # fmt: skip


def test_a_newer_clinfuse_opens_an_older_store(new_url):
    url = new_url()
    engine = connect(url)
    migrate(engine, "0001")  # a store written by the first release
    now = datetime(2025, 12, 1, tzinfo=timezone.utc)
    with engine.begin() as conn:
        for table, columns, values in OLD_ROWS:
            conn.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({values})"), {"t": now})
    engine.dispose()
    with Store(url) as store:
        assert store.schema_version() == head_revision() == "0002"
        assert store.counts(1) == {"predicted": 0, "failed": 1, "by_reason": {"image:missing": 1}}
        assert store.reviews(1)[0]["created_at"] == now
        with store._engine.connect() as conn:
            indexes = {i["name"] for i in sa.inspect(conn).get_indexes("reviews")}
        assert "ix_reviews_run_id_study_id_created_at" in indexes  # added by 0002
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            with store._engine.begin() as conn:
                conn.exec_driver_sql("DELETE FROM reviews")
        store.add_review(ReviewEvent(1, "S1", "dr.b", "disagree"))
        assert len(store.reviews(1)) == 2


def test_a_store_newer_than_clinfuse_is_refused(open_store, new_url):
    url = new_url()
    open_store(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    engine.dispose()
    with pytest.raises(StoreError, match="newer than this clinfuse"):
        Store(url)


def test_tables_match_the_migrations(open_store):
    store = open_store()
    assert store.schema_version() == head_revision()
    with store._engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        if conn.dialect.name == "postgresql":  # study ids sort by code point (COLLATE "C")
            query = "SELECT DISTINCT collation_name FROM information_schema.columns WHERE "
            query += "column_name = 'study_id' AND table_schema = current_schema()"
            assert conn.exec_driver_sql(query).scalars().all() == ["C"]


def test_migrations_ship_inside_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["clinfuse.store"]
    package = REPO / "clinfuse" / "store"
    shipped = [p.relative_to(package).as_posix() for p in (package / "migrations").rglob("*")]
    shipped = [p for p in shipped if p.endswith((".py", ".mako"))]
    assert "migrations/env.py" in shipped and "migrations/versions/0001_initial.py" in shipped
    assert all(any(fnmatch(p, pattern) for pattern in patterns) for p in shipped), shipped


@pytest.mark.parametrize(
    "url, says",
    [
        # a PostgreSQL server that cannot be reached (nothing listens on port 1)
        ("postgresql+psycopg://reader:topsecret@127.0.0.1:1/clinical", "cannot open the store"),
        ("postgres//reader:topsecret@host/db", "is not a database URL"),  # a typo: not echoed
        ("mysql://reader@host/db", "a clinfuse store is SQLite"),
        ("postgres://reader:topsecret@host/db", r"postgresql\+psycopg://.*\(postgresql, not"),
        # a driver that is not installed: say which URL form works
        ("postgresql+pg8000://reader:topsecret@host/db", r"driver \(pg8000\) is not installed"),
    ],
)
def test_a_store_that_cannot_be_opened_is_one_store_error_without_the_password(url, says):
    with pytest.raises(StoreError, match=says) as caught:
        Store(url)
    assert "topsecret" not in str(caught.value)
    if "127.0.0.1:1" in url:
        assert "reader:***@127.0.0.1:1/clinical" in str(caught.value)


def test_a_run_folder_given_as_the_store_opens_its_own_store(tmp_path):
    run = tmp_path / "night1"
    with Store(Store.default_url(run)) as store:
        store.pseudonym("P1")  # something in it
    assert store_url(run) == Store.default_url(run)  # `--store runs/night1` as users type it
    with Store(str(run), create=False) as store:
        assert store.schema_version() == head_revision()
    with pytest.raises(StoreError, match="no store at"):  # a folder without one: not a store
        Store(str(tmp_path), create=False)


def test_a_reader_never_creates_a_store_where_none_is(tmp_path):
    """Review and export open a store with create=False: a mistyped path is an error naming it,
    and no empty database is left behind."""
    path = tmp_path / "runs" / "nigth1" / "clinfuse.db"
    with pytest.raises(StoreError, match=f"no store at {path}: check the path"):
        Store(f"sqlite:///{path}", create=False)
    assert not path.exists() and not path.parent.exists()
    Store(f"sqlite:///{path}").close()  # inference creates it
    with Store(f"sqlite:///{path}", create=False) as store:
        assert store.runs() == []


def test_a_database_without_a_store_is_refused_not_taken_over(new_url):
    """Review and export never turn an empty database into a store; no command creates one
    in a database that holds another application's tables of the same names."""
    url = new_url()
    database = sa.make_url(url).database
    if url.startswith("sqlite"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url)
    with engine.connect():  # an empty database (on SQLite: an empty file)
        pass
    with pytest.raises(StoreError, match="holds no clinfuse store: check the URL"):
        Store(url, create=False)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE runs (id integer primary key, ward text)")
    with pytest.raises(StoreError, match="already has tables named runs that are not a clinfuse"):
        Store(url)
    with pytest.raises(StoreError, match="holds no clinfuse store"):
        Store(url, create=False)
    assert sa.inspect(engine).get_table_names() == ["runs"]  # nothing of clinfuse's was made
    engine.dispose()


@pytest.mark.parametrize("folder", ["run%20A", "night?1", "a#b"])
def test_a_run_folders_store_lies_in_it_whatever_its_name(tmp_path, folder):
    """A folder name holding URL syntax ("%20", "?") once moved the store to another file."""
    url = Store.default_url(tmp_path / folder)
    with Store(url) as store:
        run_of(store)
    assert [p.name for p in (tmp_path / folder).iterdir()] == ["clinfuse.db"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]
    with Store(str(tmp_path / folder / "clinfuse.db")) as again:  # by its path, the same store
        assert again.run(1)["id"] == 1


def test_a_sqlite_store_is_also_opened_by_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Store(Store.default_url(tmp_path / "run")).close()
    assert store_url("run/clinfuse.db") == f"sqlite:///{tmp_path / 'run' / 'clinfuse.db'}"
    with Store("run/clinfuse.db", create=False) as store:
        assert store.runs() == []
    for url in ("postgresql+psycopg://dr@db.example/clinfuse", "sqlite:///run/clinfuse.db"):
        assert store_url(url) == url
    with pytest.raises(StoreError, match="no store at .*other.db: check the path"):
        Store("other.db", create=False)
    with pytest.raises(StoreError, match="no store at run/notes.txt: no such file or folder"):
        Store("run/notes.txt")  # neither a URL nor a database file: not made into one
    (tmp_path / "predictions.db").write_text("study_id,status\n")
    with pytest.raises(StoreError, match=r"cannot open the store .* \(file is not a database\)"):
        Store("predictions.db", create=False)


def test_a_new_sqlite_store_is_readable_by_its_owner_alone(tmp_path):
    """It holds the key its pseudonyms are made with: whoever reads the file can re-identify
    them by trying ids (a hospital's ids are few), so it is not made world-readable."""
    import stat

    with Store(Store.default_url(tmp_path / "run")) as store:
        store.pseudonym("P1")
    mode = stat.S_IMODE((tmp_path / "run" / "clinfuse.db").stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)
