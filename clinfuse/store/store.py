"""`Store`: models, runs, predictions, failures, explanations and reviews in one database.

SQLite by default (a file in the run folder), any PostgreSQL URL for shared deployments. Opening
a store migrates it to the newest schema, so a newer clinfuse opens an older store. Plain
dataclasses go in, plain dicts and data frames come out; no ORM object leaves this module.

Writes are idempotent: a batch is one transaction keyed on (run, study), so a run killed at any
moment and started again skips what is done and never writes a study twice. Reviews are
append-only events. Patient ids never reach the database: callers store `pseudonym(patient_id)`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from clinfuse.store.migrations import (
    STORE_FILE,
    connect,
    current_revision,
    head_revision,
    migrate,
    sqlite_url,
)
from clinfuse.store.migrations import write_transaction as _write
from clinfuse.store.schema import (
    Base,
    Explanation,
    ExplanationRecord,
    Failure,
    FailureRecord,
    Model,
    Prediction,
    PredictionRecord,
    Review,
    ReviewEvent,
    Run,
    Setting,
    StoreError,
    Study,
    utcnow,
)

SECRET_KEY = "pseudonym_secret"  # settings row: the store's HMAC key for pseudonyms, hex


class Store:
    """The clinfuse database; thread-safe, one instance may serve many threads."""

    def __init__(self, url: str, create: bool = True) -> None:
        """Open (upgrading as needed) the store at a SQLAlchemy URL; a SQLite file that does
        not exist is created; with `create=False` (readers: review, export) a missing file or a
        database without a clinfuse store is an error, not a new empty store."""
        self._engine = connect(str(url), create)
        postgres = self._engine.dialect.name == "postgresql"
        self._insert = postgresql.insert if postgres else sqlite.insert
        self._run_models: dict[int, tuple[str, frozenset[str]]] = {}
        try:
            with self._engine.connect() as conn:
                revision = current_revision(conn)
                if revision is None:
                    self._check_new(conn, create)
                ready = revision == head_revision() and self._read_secret(conn)
            if not ready:
                migrate(self._engine)
                with _write(self._engine) as conn:  # the first opener's secret wins
                    row = dict(key=SECRET_KEY, value=secrets.token_hex(32))
                    insert = self._insert(Setting).values(**row)
                    conn.execute(insert.on_conflict_do_nothing(index_elements=["key"]))
            with self._engine.connect() as conn:
                secret = self._read_secret(conn)
            if not secret:
                raise StoreError("the store has no pseudonym secret (settings table)")
            self._secret = bytes.fromhex(secret)
        except sa.exc.DatabaseError as exc:  # server down, no such user or database, not a database
            self._engine.dispose()
            shown = self._engine.url.render_as_string(hide_password=True)
            reason = " ".join(str(exc.orig or exc).split())[:300]
            raise StoreError(
                f"cannot open the store {shown} ({reason}). Check the URL, that the database "
                "server is running, and that this user may connect and create tables"
            ) from exc
        except BaseException:
            self._engine.dispose()
            raise

    def _check_new(self, conn: sa.Connection, create: bool) -> None:
        """Refuse to turn a database without clinfuse's schema into a store when asked only to
        read one, or when it holds another application's tables of the same names."""
        shown = self._engine.url.render_as_string(hide_password=True)
        if not create:
            raise StoreError(
                f"{shown} holds no clinfuse store: check the URL (`clinfuse infer --store URL` "
                "creates one)"
            )
        clash = sorted(set(sa.inspect(conn).get_table_names()) & set(Base.metadata.tables))
        # read again: another process opening the same new store may have made it meanwhile
        # (each statement sees what was committed before it, on PostgreSQL)
        if clash and current_revision(conn) is None:
            raise StoreError(
                f"{shown} already has tables named {', '.join(clash)} that are not a clinfuse "
                "store: give clinfuse a database of its own"
            )

    @staticmethod
    def _read_secret(conn: sa.Connection) -> str | None:
        if not sa.inspect(conn).has_table("settings"):
            return None
        return conn.scalar(sa.select(Setting.value).where(Setting.key == SECRET_KEY))

    @staticmethod
    def default_url(run_dir: str | Path) -> str:
        """The SQLite store of a run folder: sqlite:///<run_dir>/clinfuse.db."""
        return sqlite_url(Path(run_dir) / STORE_FILE)

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine, for read queries this API does not cover (the review worklist).

        Write through the methods above: they keep results idempotent and reviews append-only.
        """
        return self._engine

    def close(self) -> None:
        """Close every pooled connection (the store may be opened again)."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self._engine.url.render_as_string(hide_password=True)!r})"

    def schema_version(self) -> str:
        """The store's Alembic revision (the newest one once opened)."""
        with self._engine.connect() as conn:
            return str(current_revision(conn))

    def pseudonym(self, patient_id: str) -> str:
        """'PSN-' + HMAC-SHA256(store secret, patient id)[:16 hex]; "" for an empty id."""
        patient_id = str(patient_id).strip()
        if not patient_id:
            return ""
        digest = hmac.new(self._secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return f"PSN-{digest[:16]}"

    # -- models and runs ----------------------------------------------------------------------
    def register_model(
        self,
        version: str,
        name: str,
        labels: list[str],
        thresholds: dict[str, float],
        config: dict[str, Any],
        validation: dict[str, Any],
    ) -> int:
        """The model's id; registers it on first sight (a version is registered once)."""
        row = dict(name=name, labels=list(labels), thresholds=dict(thresholds), config=config)
        with _write(self._engine) as conn:
            conn.execute(
                self._insert(Model)
                .values(version=version, validation=validation, created_at=utcnow(), **row)
                .on_conflict_do_nothing(index_elements=["version"])
            )
            return int(conn.scalar(sa.select(Model.id).where(Model.version == version)))

    def model(self, version: str) -> dict[str, Any]:
        """A registered model as a dict (labels, thresholds, config, validation ...)."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(Model).where(Model.version == version)).mappings().first()
        if row is None:
            raise StoreError(f"model version {version!r} is not registered in this store")
        return dict(row)

    def start_run(
        self,
        run_key: str,
        model_version: str,
        manifest: str,
        manifest_sha256: str,
        settings: dict[str, Any],
    ) -> tuple[int, bool]:
        """(run_id, resumed): a new run, or the one with this key (reopened) to continue."""
        with _write(self._engine) as conn:
            model_id = conn.scalar(sa.select(Model.id).where(Model.version == model_version))
            if model_id is None:
                raise StoreError(
                    f"model version {model_version!r} is not registered; call register_model first"
                )
            row = dict(
                run_key=run_key,
                model_id=model_id,
                manifest=str(manifest),
                status="running",
                manifest_sha256=manifest_sha256,
                settings=settings,
                started_at=utcnow(),
            )
            insert = (
                self._insert(Run).values(**row).on_conflict_do_nothing(index_elements=["run_key"])
            )
            run_id = conn.scalar(insert.returning(Run.id))
            if run_id is not None:
                return int(run_id), False
            old = conn.execute(sa.select(Run).where(Run.run_key == run_key)).mappings().one()
            if old["model_id"] != model_id or old["manifest_sha256"] != manifest_sha256:
                raise StoreError(
                    f"run {run_key!r} was started with another model or manifest; resuming would "
                    "mix their results: use a new output folder (run key) for this one"
                )
            reopen = sa.update(Run).where(Run.id == old["id"])  # its first settings are kept
            conn.execute(reopen.values(status="running", finished_at=None))
            return int(old["id"]), True

    def finish_run(self, run_id: int, summary: dict[str, Any]) -> None:
        """Mark the run finished with its summary (done, failed by reason, skipped ...)."""
        with _write(self._engine) as conn:
            done = conn.execute(
                sa.update(Run)
                .where(Run.id == run_id)
                .values(status="finished", finished_at=utcnow(), summary=summary)
            )
            if done.rowcount != 1:
                raise StoreError(f"no run with id {run_id} in this store")

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, as dicts (see `run`)."""
        return self._runs(None)

    def run(self, run_id: int) -> dict[str, Any]:
        """One run: id, run_key, model_version, labels, manifest, status, times, summary ..."""
        found = self._runs(run_id)
        if not found:
            ids = ", ".join(str(run["id"]) for run in self._runs(None))
            held = f"its runs: {ids}" if ids else "it holds no run yet"
            raise StoreError(f"no run with id {run_id} in this store ({held})")
        return found[0]

    def _runs(self, run_id: int | None) -> list[dict[str, Any]]:
        query = (
            sa.select(Run, Model.version.label("model_version"), Model.labels)
            .join(Model, Model.id == Run.model_id)
            .order_by(Run.id)
        )
        if run_id is not None:
            query = query.where(Run.id == run_id)
        with self._engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    # -- results ------------------------------------------------------------------------------
    def forget_failures(self, run_id: int) -> int:
        """Drop the run's failed studies (their failure and study rows, in one transaction), so
        the same run scores them again; returns how many. One a reviewer already gave a verdict
        on keeps its failure: its review events, which are never changed, refer to it."""
        reviewed = sa.select(Review.study_id).where(Review.run_id == run_id)
        with _write(self._engine) as conn:
            # chosen once, their rows locked in one order (PostgreSQL): a verdict saved from now
            # on waits, and no study loses its failure row while keeping its failed status
            chosen = sa.select(Study.study_id).where(
                Study.run_id == run_id, Study.status == "failed", Study.study_id.not_in(reviewed)
            )
            ids = list(conn.scalars(chosen.order_by(Study.study_id).with_for_update()))
            # a verdict committed while the lock was awaited: read again, after it, and kept
            ids = sorted(set(ids) - set(conn.scalars(reviewed)))
            for start in range(0, len(ids), 500):  # bound parameters: SQLite takes ~32k
                some = ids[start : start + 500]
                conn.execute(
                    sa.delete(Failure).where(Failure.run_id == run_id, Failure.study_id.in_(some))
                )
                conn.execute(
                    sa.delete(Study).where(Study.run_id == run_id, Study.study_id.in_(some))
                )
            return len(ids)

    def done_study_ids(self, run_id: int) -> set[str]:
        """Study ids this run has already predicted or recorded as failed."""
        with self._engine.connect() as conn:
            return set(conn.scalars(sa.select(Study.study_id).where(Study.run_id == run_id)))

    def write_batch(
        self,
        run_id: int,
        predictions: Sequence[PredictionRecord],
        failures: Sequence[FailureRecord],
        explanations: Sequence[ExplanationRecord] = (),
    ) -> Counter[str]:
        """Write a batch in ONE transaction; returns how many studies it newly wrote, by status
        ("predicted", "failed"), and how many explanations ("explained", when any).

        A study the run already has is skipped with its prediction or failure, never written
        twice; within a batch a study's first record wins (predictions before failures). An
        explanation is kept once, for a study of this batch or of the store. Nothing at all is
        written if anything fails: a malformed record, a database error, an interruption.
        """
        version, labels = self._run_model(run_id)
        for pred in predictions:
            pred.check(version, labels)
        for fail in failures:
            fail.check()
        now = utcnow()
        studies: dict[str, dict[str, Any]] = {}  # study_id -> its studies row
        results: dict[str, list[dict[str, Any]]] = {}  # study_id -> prediction or failure rows
        for record in [*predictions, *failures]:
            if record.study_id not in studies:  # the first record of a study wins
                studies[record.study_id], results[record.study_id] = record.rows(run_id)
                studies[record.study_id]["created_at"] = now
        explained = {
            e.study_id: dict(run_id=run_id, study_id=e.study_id, record=e.record, path=e.path)
            for e in reversed(explanations)  # the first record of a study wins
        }
        with _write(self._engine) as conn:
            new = set()
            if studies:
                insert = self._insert(Study).on_conflict_do_nothing(
                    index_elements=["run_id", "study_id"]
                )
                new = set(conn.scalars(insert.returning(Study.study_id), list(studies.values())))
            for status, table, key in (
                ("predicted", Prediction, ["run_id", "study_id", "label"]),
                ("failed", Failure, ["run_id", "study_id"]),
            ):
                rows = [r for s in new if studies[s]["status"] == status for r in results[s]]
                self._insert_new(conn, table, rows, key)
            unknown = set(explained) - set(studies)
            if unknown:
                known = sa.select(Study.study_id).where(
                    Study.run_id == run_id, Study.study_id.in_(unknown)
                )
                unknown -= set(conn.scalars(known))
            if unknown:
                raise StoreError(
                    f"run {run_id}: explanations for studies it has no prediction or failure "
                    f"for: {sorted(unknown)[:5]}"
                )
            n_explained = self._insert_new(
                conn, Explanation, list(explained.values()), ["run_id", "study_id"], count=True
            )
        written = Counter(studies[s]["status"] for s in new)
        if n_explained:
            written["explained"] = n_explained
        return written

    def _insert_new(
        self,
        conn: sa.Connection,
        table: type,
        rows: list[dict[str, Any]],
        key: list[str],
        count: bool = False,
    ) -> int:
        """INSERT .. ON CONFLICT (key) DO NOTHING: rows already stored stay as they are. With
        `count`, returns how many rows were new (a RETURNING the prediction rows, six a study,
        do without), else 0."""
        if not rows:
            return 0
        insert = self._insert(table).on_conflict_do_nothing(index_elements=key)
        if not count:
            conn.execute(insert, rows)
            return 0
        return len(conn.execute(insert.returning(getattr(table, key[0])), rows).all())

    def _run_model(self, run_id: int) -> tuple[str, frozenset[str]]:
        """(model version, labels) of a run, remembered: a run's model never changes."""
        if run_id not in self._run_models:
            found = self.run(run_id)
            self._run_models[run_id] = (found["model_version"], frozenset(found["labels"]))
        return self._run_models[run_id]

    def counts(self, run_id: int) -> dict[str, Any]:
        """{"predicted": n, "failed": n, "by_reason": {reason: n}} for a run."""
        with self._engine.connect() as conn:
            by_status = dict(
                conn.execute(
                    sa.select(Study.status, sa.func.count())
                    .where(Study.run_id == run_id)
                    .group_by(Study.status)
                ).all()
            )
            by_reason = dict(
                conn.execute(
                    sa.select(Failure.reason, sa.func.count())
                    .where(Failure.run_id == run_id)
                    .group_by(Failure.reason)
                    .order_by(Failure.reason)
                ).all()
            )
        return {
            "predicted": int(by_status.get("predicted", 0)),
            "failed": int(by_status.get("failed", 0)),
            "by_reason": {reason: int(n) for reason, n in by_reason.items()},
        }

    def iter_predictions(self, run_id: int, chunk: int = 5000) -> Iterator[pd.DataFrame]:
        """The run's studies as wide frames of at most `chunk` rows, ordered by study id.

        Columns: study_id, status, p_<label>..., decision_<label>... (in the model's label
        order; NaN / <NA> for a failed study), modalities, model_version, patient_pseudonym.
        One empty frame when the run has no studies. Memory is bounded by `chunk`.
        """
        found = self.run(run_id)
        labels = list(found["labels"])
        columns = ["study_id", "status", *(f"p_{x}" for x in labels)]
        columns += [*(f"decision_{x}" for x in labels), "modalities", "model_version"]
        columns += ["patient_pseudonym"]
        study = sa.select(Study.study_id, Study.status, Study.modalities, Study.patient_pseudonym)
        study = study.where(Study.run_id == run_id).order_by(Study.study_id).limit(chunk)
        pred = sa.select(
            Prediction.study_id, Prediction.label, Prediction.probability, Prediction.decision
        ).where(Prediction.run_id == run_id)
        last: str | None = None
        while True:  # keyset pagination: each chunk is one short read, however long the run
            with self._engine.connect() as conn:
                query = study if last is None else study.where(Study.study_id > last)
                names = list(query.selected_columns.keys())
                frame = pd.DataFrame(conn.execute(query).all(), columns=names)
                if frame.empty and last is not None:
                    return
                span = Prediction.study_id.between(frame.study_id.min(), frame.study_id.max())
                rows = conn.execute(pred.where(span)).all() if len(frame) else []
            frame = frame.set_index("study_id")
            preds = pd.DataFrame(rows, columns=["study_id", "label", "probability", "decision"])
            for label in labels:
                mine = preds[preds.label == label].set_index("study_id")
                frame[f"p_{label}"] = mine.probability.reindex(frame.index).astype("float64")
                frame[f"decision_{label}"] = mine.decision.reindex(frame.index).astype("boolean")
            frame["model_version"] = found["model_version"]
            yield frame.reset_index()[columns]
            if len(frame) < chunk:
                return
            last = str(frame.index[-1])

    def failures(self, run_id: int) -> pd.DataFrame:
        """The run's failures: study_id, reason, detail, ordered by study id."""
        query = (
            sa.select(Failure.study_id, Failure.reason, Failure.detail)
            .where(Failure.run_id == run_id)
            .order_by(Failure.study_id)
        )
        with self._engine.connect() as conn:
            return pd.DataFrame(conn.execute(query).all(), columns=["study_id", "reason", "detail"])

    def explanation(self, run_id: int, study_id: str) -> dict[str, Any] | None:
        """{"study_id", "record", "path"} of a study's explanation, or None."""
        query = sa.select(Explanation.study_id, Explanation.record, Explanation.path).where(
            Explanation.run_id == run_id, Explanation.study_id == study_id
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else dict(row)

    # -- reviews (append-only) ----------------------------------------------------------------
    def add_review(self, review: ReviewEvent) -> int:
        """Append a review event; its id. Reviews are never updated or deleted."""
        review.check()
        with _write(self._engine) as conn:
            known = conn.scalar(  # locked (PostgreSQL): a retry of the run cannot drop it now
                sa.select(Study.id)
                .where(Study.run_id == review.run_id, Study.study_id == review.study_id)
                .with_for_update(key_share=True)
            )
            if known is None:
                raise StoreError(f"run {review.run_id} has no study {review.study_id!r} to review")
            labels = conn.scalar(
                sa.select(Model.labels)
                .join(Run, Run.model_id == Model.id)
                .where(Run.id == review.run_id)
            )
            foreign = sorted({*review.labels_before, *review.labels_after} - set(labels or ()))
            if foreign:
                raise StoreError(
                    f"review of {review.study_id!r}: labels {foreign} are not run "
                    f"{review.run_id}'s labels {list(labels or ())}"
                )
            event = dict(asdict(review), created_at=review.created_at or utcnow())
            return int(conn.scalar(sa.insert(Review).values(**event).returning(Review.id)))

    def reviews(self, run_id: int, study_id: str | None = None) -> list[dict[str, Any]]:
        """A run's (or one study's) review events, oldest first."""
        query = sa.select(Review).where(Review.run_id == run_id)
        if study_id is not None:
            query = query.where(Review.study_id == study_id)
        query = query.order_by(Review.created_at, Review.id)
        with self._engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]
