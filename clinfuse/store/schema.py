"""What the store holds: its tables (SQLAlchemy 2 ORM), their column types, and the plain
records the API takes, each checked before anything is written.

The table classes describe the schema at the newest migration (`migrations/versions/`); the
migrations, not `create_all`, build and upgrade a real store, and a test checks the two agree.
Every result hangs off a `studies` row (composite foreign keys on `(run_id, study_id)`), so a
prediction, failure, explanation or review can never point at a study the run does not have.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from clinfuse.errors import ClinfuseError, printable

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
RUN_STATUSES = ("running", "finished")
STUDY_STATUSES = ("predicted", "failed")
MODALITIES = ("image+note", "image", "note", "")
VERDICTS = ("agree", "disagree", "corrected")
PSEUDONYM = re.compile(r"PSN-[0-9a-f]{16}")  # what Store.pseudonym returns

# Study ids sort by code point on every backend, so exports and pagination order alike: the
# migrations declare them COLLATE "C" on PostgreSQL (whatever the database's locale). Not here:
# SQLAlchemy would cast every bound study id with the collation, which PostgreSQL rejects.
StudyId = sa.String()


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores no zone; naive = UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


def _plain(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (PostgreSQL's json rejects them), numpy -> Python."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return _plain(value.tolist())
    return value


def dumps_json(value: Any) -> str:
    """The engines' JSON serializer: strict JSON, so both backends store the same document."""
    return json.dumps(_plain(value), allow_nan=False)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: sa.JSON, list[Any]: sa.JSON}


class Model(Base):
    """A model version that scored runs: its labels, thresholds and validation results."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(sa.String(), unique=True)
    name: Mapped[str] = mapped_column(sa.String())
    labels: Mapped[list[Any]]
    thresholds: Mapped[dict[str, Any]]
    config: Mapped[dict[str, Any]]
    validation: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class Run(Base):
    """One `clinfuse infer` over one manifest with one model; resumed by its `run_key`."""

    __tablename__ = "runs"
    __table_args__ = (sa.CheckConstraint(sa.column("status").in_(RUN_STATUSES), name="status"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_key: Mapped[str] = mapped_column(sa.String(), unique=True)
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.id"))
    manifest: Mapped[str] = mapped_column(sa.Text())
    manifest_sha256: Mapped[str] = mapped_column(sa.String(64))
    settings: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(16))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    summary: Mapped[dict[str, Any] | None]


class Study(Base):
    """One manifest row of a run; exists exactly when its prediction or failure does."""

    __tablename__ = "studies"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "study_id"),
        sa.CheckConstraint(sa.column("status").in_(STUDY_STATUSES), name="status"),
        sa.CheckConstraint(sa.column("modalities").in_(MODALITIES), name="modalities"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id"))
    study_id: Mapped[str] = mapped_column(StudyId)
    patient_pseudonym: Mapped[str] = mapped_column(sa.String())
    status: Mapped[str] = mapped_column(sa.String(16))
    modalities: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime]


def _study_fk() -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["run_id", "study_id"], ["studies.run_id", "studies.study_id"])


class Prediction(Base):
    """One label's calibrated probability for one study (long format: filter in SQL)."""

    __tablename__ = "predictions"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "study_id", "label"),
        sa.Index(None, "run_id", "label", "probability"),
        _study_fk(),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id"))
    study_id: Mapped[str] = mapped_column(StudyId)
    label: Mapped[str] = mapped_column(sa.String())
    probability: Mapped[float] = mapped_column(sa.Float())
    threshold: Mapped[float] = mapped_column(sa.Float())
    decision: Mapped[bool] = mapped_column(sa.Boolean(create_constraint=False))
    model_version: Mapped[str] = mapped_column(sa.String())


class Explanation(Base):
    """A study's explanation summary (`Explanation.to_record()`) and its `.npz` file."""

    __tablename__ = "explanations"
    __table_args__ = (sa.UniqueConstraint("run_id", "study_id"), _study_fk())
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id"))
    study_id: Mapped[str] = mapped_column(StudyId)
    record: Mapped[dict[str, Any]]
    path: Mapped[str | None] = mapped_column(sa.Text())


class Failure(Base):
    """Why a study could not be scored: a short reason code and the detail."""

    __tablename__ = "failures"
    __table_args__ = (sa.UniqueConstraint("run_id", "study_id"), _study_fk())
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id"))
    study_id: Mapped[str] = mapped_column(StudyId)
    reason: Mapped[str] = mapped_column(sa.String())
    detail: Mapped[str] = mapped_column(sa.Text())


class Review(Base):
    """A clinician's verdict on a study: append-only, so the table is the audit trail."""

    __tablename__ = "reviews"
    __table_args__ = (
        sa.CheckConstraint(sa.column("verdict").in_(VERDICTS), name="verdict"),
        sa.Index(None, "run_id", "study_id", "created_at"),  # revision 0002
        _study_fk(),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id"))
    study_id: Mapped[str] = mapped_column(StudyId)
    reviewer: Mapped[str] = mapped_column(sa.String())
    created_at: Mapped[datetime]
    verdict: Mapped[str] = mapped_column(sa.String(16))
    labels_before: Mapped[dict[str, Any]]
    labels_after: Mapped[dict[str, Any]]
    comment: Mapped[str] = mapped_column(sa.Text())
    model_version: Mapped[str] = mapped_column(sa.String())


class Setting(Base):
    """Store-wide values, such as the pseudonym secret created when the store is first opened."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    value: Mapped[str] = mapped_column(sa.Text())


class StoreError(ClinfuseError):
    """The store cannot do what was asked: an unknown run or study, a newer schema, a clash."""


# -- the records the API takes --------------------------------------------------------------
@dataclass
class PredictionRecord:
    """One scored study: per-label calibrated probabilities, thresholds and decisions."""

    study_id: str
    patient_pseudonym: str  # Store.pseudonym(patient_id), or "" when the patient is unknown
    probabilities: dict[str, float]
    thresholds: dict[str, float]
    decisions: dict[str, bool]
    modalities: str  # 'image+note' | 'image' | 'note' | ''
    model_version: str

    def check(self, model_version: str, labels: frozenset[str]) -> None:
        """Raise ValueError unless this is a well-formed prediction of that model."""
        where = f"study {self.study_id!r}"
        check_pseudonym(self.study_id, self.patient_pseudonym)
        names = set(self.probabilities)
        if not names or names != set(self.thresholds) or names != set(self.decisions):
            raise ValueError(
                f"{where}: probabilities, thresholds and decisions must name "
                "the same, non-empty set of labels"
            )
        if not names <= labels:
            raise ValueError(f"{where}: labels {sorted(names - labels)} are not the model's")
        if self.model_version != model_version:
            raise ValueError(
                f"{where}: model_version {self.model_version!r} is not the run's {model_version!r}"
            )
        for label, prob in self.probabilities.items():
            if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
                raise ValueError(f"{where}: probability of {label!r} is {prob}, not in [0, 1]")
            if not math.isfinite(self.thresholds[label]):
                raise ValueError(f"{where}: threshold of {label!r} is not finite")
        if self.modalities not in MODALITIES:
            raise ValueError(f"{where}: modalities {self.modalities!r} is not one of {MODALITIES}")

    def rows(self, run_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Its `studies` row (without `created_at`) and its `predictions` rows."""
        key = dict(run_id=run_id, study_id=self.study_id)
        study = dict(key, patient_pseudonym=self.patient_pseudonym, modalities=self.modalities)
        return dict(study, status="predicted"), [
            dict(
                key,
                label=label,
                probability=probability,
                threshold=self.thresholds[label],
                decision=bool(self.decisions[label]),
                model_version=self.model_version,
            )
            for label, probability in self.probabilities.items()
        ]


@dataclass
class FailureRecord:
    """A study that could not be scored, with a short reason code like 'image:truncated'."""

    study_id: str
    patient_pseudonym: str
    reason: str
    detail: str

    def check(self) -> None:
        """Raise ValueError unless this is a well-formed failure."""
        check_pseudonym(self.study_id, self.patient_pseudonym)
        if not self.reason:
            raise ValueError(f"study {self.study_id!r}: a failure needs a reason code")

    def rows(self, run_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Its `studies` row (without `created_at`) and its `failures` row."""
        key = dict(run_id=run_id, study_id=self.study_id)
        study = dict(key, patient_pseudonym=self.patient_pseudonym, modalities="", status="failed")
        # a NUL would stop a PostgreSQL write, and with it the run, at every attempt
        failure = dict(key, reason=printable(self.reason), detail=printable(self.detail, 2000))
        return study, [failure]


@dataclass
class ExplanationRecord:
    """A study's `Explanation.to_record()` and the path of its full `.npz`, if saved."""

    study_id: str
    record: dict[str, Any]
    path: str | None = None


@dataclass
class ReviewEvent:
    """A clinician's verdict on one study; `created_at` is set by the store when None."""

    run_id: int
    study_id: str
    reviewer: str
    verdict: str  # 'agree' | 'disagree' | 'corrected'
    labels_before: dict[str, Any] = field(default_factory=dict)
    labels_after: dict[str, Any] = field(default_factory=dict)
    comment: str = ""
    model_version: str = ""
    created_at: datetime | None = None

    def check(self) -> None:
        """Raise ValueError unless the verdict is known, a reviewer is named and the texts are
        text every backend stores as given (PostgreSQL refuses a NUL character)."""
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")
        for name in ("study_id", "reviewer", "comment"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"review {name} must be text, got {type(value).__name__}")
            if "\x00" in value:
                raise ValueError(f"review {name} holds a NUL character: remove it and save again")
        if not named(self.reviewer):
            raise ValueError(
                "a review needs a reviewer's name (a letter or digit in it): the audit trail "
                "names who decided"
            )
        for side in ("labels_before", "labels_after"):
            for name, value in getattr(self, side).items():
                if not isinstance(name, str) or not (
                    value is None or (isinstance(value, (bool, int)) and value in (0, 1))
                ):
                    raise ValueError(
                        f"review {side}: label {name!r} = {value!r}; give 1, 0 or None (unknown)"
                    )


def named(name: str) -> bool:
    """Whether `name` can name a reviewer: a letter or digit in it (spaces alone, or an
    invisible character such as a zero-width space, name no one in an audit trail)."""
    return any(c.isalnum() for c in name)


def check_pseudonym(study_id: str, pseudonym: str) -> None:
    """Refuse anything but a pseudonym (or ""): a raw patient id must never be stored."""
    if pseudonym and not PSEUDONYM.fullmatch(pseudonym):
        raise ValueError(
            f"study {study_id!r}: patient_pseudonym must come from Store.pseudonym(patient_id)"
        )
