"""Which studies a worklist page holds, in which order: the SQL, built from a `WorklistQuery`.

Every filter is a semi- or anti-join on an index of the store ((run_id, label, probability) for
probability and uncertainty filters, the (run_id, study_id) keys otherwise), and the page is cut
with ORDER BY / LIMIT / OFFSET in the database. The default view (top probability, highest
first) reads only the top of each label's probability index; other sorts by the top
probability group the run's predictions once per request.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import sqlalchemy as sa

from clinfuse.store.schema import Explanation, Failure, Prediction, Review, Study

if TYPE_CHECKING:
    from clinfuse.review.worklist import WorklistQuery

REVIEW_COLUMNS = ("reviews", "last_verdict", "last_reviewer", "last_review")
TOP_FIRST_DEPTH = 2000  # pages reaching deeper into the default order group the whole run


def select_page(
    query: WorklistQuery, thresholds: dict[str, float], page: int, page_size: int | None
) -> tuple[sa.Select, sa.Select]:
    """(the page's study ids, ordered and cut; every matching study id, to count); with
    `page_size` None, every matching id in order.

    `thresholds` are the run model's, one per label. The sort is assumed valid.
    """
    depth = None if page_size is None else (page + 1) * page_size
    if query.failures:
        statement, key, sort = _failure_keys(query)
        matches = statement
    else:
        statement, matches, key, sort = _study_keys(query, thresholds, depth)
    order = [sort.desc() if query.descending else sort.asc()]
    if sort is not key:  # studies without a value last; ties by study id
        order = [order[0].nulls_last(), key.asc()]
    statement = statement.order_by(*order)
    if page_size is None:
        return statement, matches
    return statement.limit(page_size).offset(page * page_size), matches


def _study_keys(
    query: WorklistQuery, thresholds: dict[str, float], depth: int | None
) -> tuple[sa.Select, sa.Select, sa.ColumnElement, sa.ColumnElement]:
    """(ids to page, ids to count, the id column paged, the sort expression) of the run's
    predicted studies; `depth` = how many of the order the page reaches into (None: all)."""
    run_id = query.run_id
    matches = sa.select(Study.study_id).where(Study.run_id == run_id, Study.status == "predicted")
    matches = matches.where(*_filters(query, Study.study_id, thresholds))
    top_range = query.label is None and (query.p_min > 0.0 or query.p_max < 1.0)
    narrowed = query.uncertain is not None or query.disagreement or _label_range(query)
    shallow = depth is not None and depth <= TOP_FIRST_DEPTH
    if query.sort == "top_probability" and query.descending and shallow:
        if not (top_range or narrowed):  # the default view: read the top of each label's index
            statement, key, sort = _top_first(query, thresholds, depth)
            return statement, matches, key, sort
    if query.sort in ("top_probability", "n_positive") or top_range:
        statement, key, sort = _by_summary(query, thresholds, top_range)
        return statement, statement if top_range else matches, key, sort
    statement, key = matches, Study.study_id
    direct = {"patient_pseudonym": Study.patient_pseudonym, "modalities": Study.modalities}
    if query.sort.startswith("p_"):  # walk the (run_id, label, probability) index in order
        ranked = sa.orm.aliased(Prediction, name="ranked")
        on = [ranked.run_id == run_id, ranked.study_id == key, ranked.label == query.sort[2:]]
        if query.label == query.sort[2:]:  # the range filter narrows the walk
            on.append(ranked.probability.between(query.p_min, query.p_max))
        statement = statement.join(ranked, sa.and_(*on))
        direct[query.sort] = ranked.probability
    return statement, matches, key, _sort(query, key, direct)


def _top_first(
    query: WorklistQuery, thresholds: dict[str, float], depth: int
) -> tuple[sa.Select, sa.ColumnElement, sa.ColumnElement]:
    """The first `depth` matching studies by top probability, reading each label's index.

    A study among them has its top probability within the first `depth` matching rows of that
    label (every row above it belongs to a study ranked above it), so taking each label's rows
    down to its depth-th probability (ties included) and grouping them finds those studies
    with their exact top probability. Deep pages read more, up to the whole run.
    """
    rows = []
    for name in thresholds:
        p, q = (sa.orm.aliased(Prediction, name=alias) for alias in ("ranked", "cut"))
        of_label = [
            p.run_id == query.run_id,
            p.label == name,
            *_filters(query, p.study_id, thresholds),
        ]
        cut = sa.select(q.probability).where(
            q.run_id == query.run_id, q.label == name, *_filters(query, q.study_id, thresholds)
        )
        cut = cut.order_by(q.probability.desc()).offset(depth - 1).limit(1).scalar_subquery()
        floor = sa.func.coalesce(cut, -1.0)  # fewer rows than depth: take them all
        rows.append(sa.select(p.study_id, p.probability).where(*of_label, p.probability >= floor))
    candidates = sa.union_all(*rows).subquery("candidates")
    key = candidates.c.study_id
    top = sa.func.max(candidates.c.probability)
    return sa.select(key).group_by(key), key, top


def _by_summary(
    query: WorklistQuery, thresholds: dict[str, float], top_range: bool
) -> tuple[sa.Select, sa.ColumnElement, sa.ColumnElement]:
    """Ids over per-study maxima, grouped once from the predictions of the matching studies."""
    p = sa.orm.aliased(Prediction, name="scored")
    summary = (
        sa.select(
            p.study_id,
            sa.func.max(p.probability).label("top_probability"),
            sa.func.sum(sa.case((p.decision, 1), else_=0)).label("n_positive"),
        )
        .where(p.run_id == query.run_id, *_filters(query, p.study_id, thresholds))
        .group_by(p.study_id)
    )
    if top_range:
        summary = summary.having(sa.func.max(p.probability).between(query.p_min, query.p_max))
    base = summary.cte("summary").prefix_with("MATERIALIZED", dialect="postgresql")
    key = base.c.study_id
    direct = {"top_probability": base.c.top_probability, "n_positive": base.c.n_positive}
    return sa.select(key), key, _sort(query, key, direct)


def _sort(
    query: WorklistQuery, key: sa.ColumnElement, direct: dict[str, sa.ColumnElement]
) -> sa.ColumnElement:
    if query.sort == "study_id":
        return key
    if query.sort in direct:
        return direct[query.sort]
    return _correlated(query.sort, query.run_id, key)


def _filters(
    query: WorklistQuery, key: sa.ColumnElement, thresholds: dict[str, float]
) -> list[sa.ColumnElement[bool]]:
    """The query's conditions on a study id column, each a semi- or anti-join on an index."""
    run_id, conditions, p = query.run_id, [], Prediction
    if _label_range(query):
        in_range = sa.select(p.study_id).where(
            p.run_id == run_id,
            p.label == query.label,
            p.probability.between(query.p_min, query.p_max),
        )
        conditions.append(key.in_(in_range))
    if query.uncertain is not None:
        # the range narrows the index scan; abs() decides, with the same slack: 0.4 is 0.1 from
        # 0.3 to a reader, 0.10000000000000003 to a float
        margin, slack = query.uncertain, 1e-9
        near = [
            sa.select(p.study_id).where(
                p.run_id == run_id,
                p.label == name,
                p.probability.between(
                    thresholds[name] - margin - slack, thresholds[name] + margin + slack
                ),
                sa.func.abs(p.probability - p.threshold) <= margin + slack,
            )
            for name in ([query.label] if query.label else list(thresholds))
        ]
        conditions.append(key.in_(near[0] if len(near) == 1 else sa.union_all(*near)))
    if query.disagreement:
        conditions.append(key.in_(_disagreeing(run_id, query.label, len(thresholds))))
    reviewed = sa.select(Review.id).where(Review.run_id == run_id, Review.study_id == key)
    if query.status == "reviewed":
        conditions.append(reviewed.exists())
    elif query.status == "unreviewed":
        conditions.append(~reviewed.exists())
    return conditions


def _label_range(query: WorklistQuery) -> bool:
    return query.label is not None and (query.p_min > 0.0 or query.p_max < 1.0)


def _disagreeing(run_id: int, label: str | None, n_labels: int) -> sa.Select:
    """Explained studies whose image and note Shapley values have opposite signs on a label."""
    record = Explanation.record  # {"labels": [...], "modality": [[image, note, interaction], ...]}
    opposite = []
    for k in range(n_labels):  # the record's labels are a subset of the model's
        image = record[("modality", k, 0)].as_float()
        note = record[("modality", k, 1)].as_float()
        condition = image * note < 0
        if label is not None:
            condition = sa.and_(record[("labels", k)].as_string() == label, condition)
        opposite.append(condition)
    return sa.select(Explanation.study_id).where(Explanation.run_id == run_id, sa.or_(*opposite))


def _correlated(name: str, run_id: int, key: sa.ColumnElement) -> sa.ColumnElement:
    """A page column as a scalar subquery on the study id (an index lookup per study)."""
    p, r = Prediction, Review
    of_study = (p.run_id == run_id, p.study_id == key)
    reviews_of = (r.run_id == run_id, r.study_id == key)
    latest = (r.created_at.desc(), r.id.desc())
    if name in ("patient_pseudonym", "modalities"):
        column = getattr(Study, name)
        return (
            sa.select(column).where(Study.run_id == run_id, Study.study_id == key).scalar_subquery()
        )
    if name == "top_probability":
        return sa.select(sa.func.max(p.probability)).where(*of_study).scalar_subquery()
    if name == "n_positive":
        return (
            sa.select(sa.func.sum(sa.case((p.decision, 1), else_=0)))
            .where(*of_study)
            .scalar_subquery()
        )
    if name == "top_label":
        top = sa.select(p.label).where(*of_study).order_by(p.probability.desc(), p.label)
        return top.limit(1).scalar_subquery()
    if name.startswith("p_"):
        return sa.select(p.probability).where(*of_study, p.label == name[2:]).scalar_subquery()
    if name == "reviews":
        return sa.select(sa.func.count(r.id)).where(*reviews_of).scalar_subquery()
    if name in ("last_verdict", "last_reviewer", "last_review"):
        column = {
            "last_verdict": r.verdict,
            "last_reviewer": r.reviewer,
            "last_review": r.created_at,
        }
        return (
            sa.select(column[name]).where(*reviews_of).order_by(*latest).limit(1).scalar_subquery()
        )
    if name == "explained":
        explained = sa.select(Explanation.id).where(
            Explanation.run_id == run_id, Explanation.study_id == key
        )
        return sa.case((explained.exists(), 1), else_=0)
    raise ValueError(f"cannot sort by {name!r}")


def _failure_keys(query: WorklistQuery) -> tuple[sa.Select, sa.ColumnElement, sa.ColumnElement]:
    """(ids, id column, sort) of the run's failures (review status applies); a sort the
    failure page lacks orders by study id."""
    key = Failure.study_id
    statement = sa.select(key).where(Failure.run_id == query.run_id)
    statement = statement.where(*_filters(_status_only(query), key, {}))
    if query.sort in ("reason", "detail"):
        return statement, key, getattr(Failure, query.sort)
    if query.sort in ("patient_pseudonym", *REVIEW_COLUMNS):
        return statement, key, _correlated(query.sort, query.run_id, key)
    return statement, key, key


def _status_only(query: WorklistQuery) -> WorklistQuery:
    return dataclasses.replace(
        query, label=None, p_min=0.0, p_max=1.0, uncertain=None, disagreement=False
    )
