"""The review worklist: one page of a run's studies, filtered, sorted and paginated in SQL.

A page is a few short queries however long the run: one finds the page's study ids (every
filter and the sort run in the database, cut with LIMIT/OFFSET: see `selection`), one counts
the matches, and the rest fetch what the page shows for those ids only. Nothing here names a
patient: studies carry the store's pseudonym.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import pandas as pd
import sqlalchemy as sa

from clinfuse.review.selection import REVIEW_COLUMNS, select_page
from clinfuse.store import Store
from clinfuse.store.schema import Explanation, Failure, Prediction, Review, Study

Status = Literal["all", "unreviewed", "reviewed"]
STATUSES = ("all", "unreviewed", "reviewed")
STUDY_COLUMNS = ("study_id", "patient_pseudonym", "modalities")
SUMMARY_COLUMNS = ("top_label", "top_probability", "n_positive")
FAILURE_COLUMNS = ("study_id", "patient_pseudonym", "reason", "detail", *REVIEW_COLUMNS)
MAX_PAGE_SIZE = 1000


@dataclass
class WorklistQuery:
    """What a reviewer asked the worklist for; round-trips through URL query parameters."""

    run_id: int
    label: str | None = None  # restrict to a label: the probability filters then apply to it
    p_min: float = 0.0  # probability range, on `label` (or on the top probability)
    p_max: float = 1.0
    uncertain: float | None = None  # |p - threshold| <= margin, on `label` or on any label
    disagreement: bool = False  # image and note Shapley values of opposite sign (explained only)
    status: Status = "all"
    failures: bool = False  # list the run's failures instead of its predictions
    sort: str = "top_probability"  # any column of the page
    descending: bool = True

    def __post_init__(self) -> None:
        self.run_id = int(self.run_id)
        self.p_min, self.p_max = float(self.p_min), float(self.p_max)
        if not 0.0 <= self.p_min <= self.p_max <= 1.0:
            raise ValueError(f"need 0 <= p_min <= p_max <= 1, got {self.p_min}, {self.p_max}")
        if self.uncertain is not None:
            self.uncertain = float(self.uncertain)
            if not (math.isfinite(self.uncertain) and self.uncertain >= 0):
                raise ValueError(f"uncertain is a margin >= 0, got {self.uncertain}")
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
        self.label = self.label or None

    def to_params(self) -> dict[str, str]:
        """The fields that differ from their defaults, as strings keyed by field name."""
        default = WorklistQuery(run_id=0)
        params = {}
        for name, value in asdict(self).items():
            if name == "run_id" or value != getattr(default, name):
                params[name] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, Any], run_id: int | None = None) -> WorklistQuery:
        """Parse `to_params` output (unknown keys ignored; lists take their last value).

        `run_id` is used when the parameters hold none (0 when neither does: set it before use).
        Raises ValueError naming the parameter with a bad value.
        """
        values: dict[str, Any] = {"run_id": run_id or 0}
        known = {f.name for f in fields(cls)}
        for name, raw in params.items():
            if name not in known:
                continue
            text = str(raw[-1] if isinstance(raw, (list, tuple)) else raw).strip()
            try:
                values[name] = _parse(name, text)
            except ValueError as exc:
                raise ValueError(f"worklist parameter {name}={text!r}: {exc}") from None
        return cls(**values)


def _parse(name: str, text: str) -> Any:
    if name in ("disagreement", "failures", "descending"):
        if text.lower() not in ("1", "0", "true", "false"):
            raise ValueError("expected 1 or 0")
        return text.lower() in ("1", "true")
    if name == "run_id":
        return int(text)
    if name in ("p_min", "p_max"):
        return float(text)
    if name == "uncertain":
        return float(text) if text and text.lower() != "none" else None
    if name == "label":
        return None if text.lower() in ("", "none") else text
    return text


def page_columns(labels: list[str], failures: bool = False) -> list[str]:
    """The columns of a worklist page (and so the names `WorklistQuery.sort` accepts)."""
    if failures:
        return list(FAILURE_COLUMNS)
    probabilities = [f"p_{x}" for x in labels]
    return [*STUDY_COLUMNS, *SUMMARY_COLUMNS, *probabilities, *REVIEW_COLUMNS, "explained"]


def worklist(
    store: Store, query: WorklistQuery, page: int = 0, page_size: int = 50
) -> tuple[pd.DataFrame, int]:
    """One page of the run's studies matching `query`, and how many match in all.

    Columns: see `page_columns` (p_<label> per model label; reviews = the number of review
    events, last_* = the latest one; explained = an explanation is stored). With
    `query.failures`: study_id, patient_pseudonym, reason, detail and the review columns.
    """
    statement, matches, labels = _plan(store, query, page, page_size)
    with store.engine.connect() as conn:
        total = int(conn.scalar(sa.select(sa.func.count()).select_from(matches.subquery())))
        ids = [str(x) for x in conn.scalars(statement)]
        if query.failures:
            frame = _failure_rows(conn, query.run_id, ids)
        else:
            frame = _study_rows(conn, query.run_id, ids, labels)
    return frame, total


def page_statement(
    store: Store, query: WorklistQuery, page: int = 0, page_size: int = 50
) -> tuple[sa.Select, list[str]]:
    """(SELECT of the page's study ids in page order, the run's labels): what `worklist` runs."""
    statement, _, labels = _plan(store, query, page, page_size)
    return statement, labels


def ordered_ids(store: Store, query: WorklistQuery) -> list[str]:
    """Every study id matching `query`, in the worklist's order (what "next" walks)."""
    statement, _, _ = _plan(store, query, 0, None)
    with store.engine.connect() as conn:
        return [str(x) for x in conn.scalars(statement)]


def _plan(
    store: Store, query: WorklistQuery, page: int, page_size: int | None
) -> tuple[sa.Select, sa.Select, list[str]]:
    """(the page's ids, ordered and cut, or all with `page_size` None; all matching ids, to
    count; the run's labels)."""
    if page < 0 or not (page_size is None or 1 <= page_size <= MAX_PAGE_SIZE):
        raise ValueError(f"need page >= 0 and 1 <= page_size <= {MAX_PAGE_SIZE}")
    run = store.run(query.run_id)
    labels = list(run["labels"])
    if query.label is not None and query.label not in labels:
        raise ValueError(f"label {query.label!r} is not one of the run's labels {labels}")
    if not query.failures and query.sort not in page_columns(labels):
        raise ValueError(f"cannot sort by {query.sort!r}: the columns are {page_columns(labels)}")
    thresholds = store.model(run["model_version"])["thresholds"]
    statement, matches = select_page(query, thresholds, page, page_size)
    return statement, matches, labels


# -- the second read: what the page shows, for its ids only ----------------------------------
def _study_rows(
    conn: sa.Connection, run_id: int, ids: list[str], labels: list[str]
) -> pd.DataFrame:
    """The page's rows in `ids` order, in `page_columns(labels)`."""
    columns = page_columns(labels)
    if not ids:
        return _empty(columns)
    studies = conn.execute(
        sa.select(Study.study_id, Study.patient_pseudonym, Study.modalities).where(
            Study.run_id == run_id, Study.study_id.in_(ids)
        )
    ).all()
    frame = pd.DataFrame(studies, columns=list(STUDY_COLUMNS)).set_index("study_id")
    scores = pd.DataFrame(
        conn.execute(
            sa.select(
                Prediction.study_id, Prediction.label, Prediction.probability, Prediction.decision
            ).where(Prediction.run_id == run_id, Prediction.study_id.in_(ids))
        ).all(),
        columns=["study_id", "label", "probability", "decision"],
    )
    # the top label: highest probability, ties to the first label name (as the SQL sort does)
    ranked = scores.sort_values(["study_id", "probability", "label"], ascending=[True, False, True])
    top = ranked.drop_duplicates("study_id").set_index("study_id")
    frame["top_label"] = top.label
    frame["top_probability"] = top.probability.astype("float64")
    frame["n_positive"] = scores.groupby("study_id").decision.sum().astype("int64")
    wide = scores.pivot(index="study_id", columns="label", values="probability")
    for label in labels:
        frame[f"p_{label}"] = wide[label].astype("float64") if label in wide else float("nan")
    frame = frame.join(_review_summary(conn, run_id, ids))
    explained = set(
        conn.scalars(
            sa.select(Explanation.study_id).where(
                Explanation.run_id == run_id, Explanation.study_id.in_(ids)
            )
        )
    )
    frame["explained"] = [i in explained for i in frame.index]
    return frame.reindex(ids).rename_axis("study_id").reset_index()[columns]


def _failure_rows(conn: sa.Connection, run_id: int, ids: list[str]) -> pd.DataFrame:
    if not ids:
        return _empty(list(FAILURE_COLUMNS))
    rows = conn.execute(
        sa.select(Failure.study_id, Study.patient_pseudonym, Failure.reason, Failure.detail)
        .join(Study, sa.and_(Study.run_id == Failure.run_id, Study.study_id == Failure.study_id))
        .where(Failure.run_id == run_id, Failure.study_id.in_(ids))
    ).all()
    frame = pd.DataFrame(rows, columns=list(FAILURE_COLUMNS[:4])).set_index("study_id")
    frame = frame.join(_review_summary(conn, run_id, ids))
    return frame.reindex(ids).rename_axis("study_id").reset_index()[list(FAILURE_COLUMNS)]


def _review_summary(conn: sa.Connection, run_id: int, ids: list[str]) -> pd.DataFrame:
    """Per study of `ids`: reviews (count), last_verdict, last_reviewer, last_review."""
    events = conn.execute(
        sa.select(Review.study_id, Review.verdict, Review.reviewer, Review.created_at)
        .where(Review.run_id == run_id, Review.study_id.in_(ids))
        .order_by(Review.study_id, Review.created_at, Review.id)
    ).all()
    frame = pd.DataFrame(events, columns=["study_id", "verdict", "reviewer", "created_at"])
    last = frame.drop_duplicates("study_id", keep="last").set_index("study_id")
    summary = pd.DataFrame(index=pd.Index(ids, name="study_id"))
    summary["reviews"] = frame.groupby("study_id").size().reindex(ids).fillna(0).astype("int64")
    summary["last_verdict"] = last.verdict
    summary["last_reviewer"] = last.reviewer
    summary["last_review"] = last.created_at
    return summary


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype="object") for name in columns})
