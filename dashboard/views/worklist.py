"""Worklist: one page of the run's studies, filtered, sorted and paginated in the database.

Every filter lives in the URL, so a link opens the same list. The widgets are seeded from the
URL (or from the last list this session showed) whenever they are absent: on the first visit
and after coming back from another page.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from session import (
    PAGE_SIZES,
    QUERY_FIELDS,
    as_written,
    current,
    link_params,
    page_from_params,
    query_from_params,
)

from clinfuse.review import WorklistQuery, page_columns, worklist

STUDY_PAGE = Path(__file__).resolve().parent / "study.py"
STATUSES = {"all": "all", "unreviewed": "not reviewed yet", "reviewed": "reviewed"}
ANY = "(any label)"


def seed_widgets(query: WorklistQuery, page: int, size: int) -> None:
    """Put a query's values into the filter widgets' state (only when they are absent)."""
    values: dict[str, Any] = {
        "wl_label": query.label or ANY,
        "wl_prange": (float(query.p_min), float(query.p_max)),
        "wl_uncertain": min(float(query.uncertain or 0.0), 1.0),  # 1: every study, as more
        "wl_disagreement": bool(query.disagreement),
        "wl_status": query.status,
        "wl_failures": bool(query.failures),
        "wl_sort": query.sort,
        "wl_desc": bool(query.descending),
        "wl_page": page + 1,
        "wl_size": size,
    }
    for key, value in values.items():
        st.session_state.setdefault(key, value)


def initial_view(run_id: int, labels: list[str]) -> tuple[WorklistQuery, int, int]:
    """The list to show first: the URL's when it names one, else this session's last list."""
    params = st.query_params.to_dict()
    if not (set(params) & (QUERY_FIELDS | {"page", "size"})):
        params = {**st.session_state.get("worklist_params", {}), **params}
    query, problem = query_from_params(run_id, params)
    if problem:
        st.warning(as_written(problem))
    if query.label is not None and query.label not in labels:  # e.g. another model's link
        st.warning(
            f"This run has no label {as_written(repr(query.label))}: its filter is left out."
        )
        query = dataclasses.replace(query, label=None)
    return (query, *page_from_params(params))


def filters(labels: list[str], run_id: int) -> WorklistQuery:
    """The filter and sort widgets; the query they describe."""
    failures = bool(st.session_state["wl_failures"])
    sort_options = page_columns(labels, failures=failures)
    default = WorklistQuery(run_id).sort
    default = default if default in sort_options else sort_options[0]
    before = st.session_state.get("wl_failures_before", failures)
    if before != failures:  # toggled: the reviewer's sort if this list has it, else its last
        current = st.session_state[f"wl_sort_of_{before}"] = st.session_state["wl_sort"]
        chosen = current != st.session_state.get("wl_sort_set")  # not the one set at a toggle
        last = st.session_state.get(f"wl_sort_of_{failures}", default)
        kept = current if chosen and current in sort_options else last
        st.session_state["wl_sort"] = st.session_state["wl_sort_set"] = kept
    elif st.session_state["wl_sort"] not in sort_options:  # a link made for another model
        wanted = as_written(repr(st.session_state["wl_sort"]))
        st.warning(f"This list has no column {wanted} to sort by.")
        st.session_state["wl_sort"] = default
    st.session_state["wl_failures_before"] = failures
    top = st.columns([2, 3, 2, 2])
    label = top[0].selectbox(
        "Label",
        [ANY, *labels],
        key="wl_label",
        help="The label the probability range, the uncertainty margin and 'Image and note "
        "disagree' apply to (alone it filters nothing; sort by its column to rank by it).",
    )
    p_min, p_max = top[1].slider(
        "Probability (of the label, or the top label)", 0.0, 1.0, step=0.01, key="wl_prange"
    )
    top[2].selectbox(
        "Review status", list(STATUSES), format_func=STATUSES.__getitem__, key="wl_status"
    )
    margin = top[3].number_input(
        "Uncertain: |p - threshold| ≤",
        0.0,
        1.0,  # a link's margin is any distance a probability can be (above 1: the widget's)
        step=0.05,
        key="wl_uncertain",
        help="0 = off. Studies whose probability is this close to the label's threshold.",
    )
    row = st.columns([2, 2, 2, 2, 1])
    row[0].toggle("Image and note disagree", key="wl_disagreement")
    row[1].toggle("Failures instead", key="wl_failures", help="Studies that could not be scored")
    row[2].selectbox("Sort by", sort_options, key="wl_sort")
    row[3].toggle("Descending", key="wl_desc")
    row[4].selectbox("Per page", PAGE_SIZES, key="wl_size")
    return WorklistQuery(
        run_id=run_id,
        label=None if label == ANY else label,
        p_min=float(p_min),
        p_max=float(p_max),
        uncertain=float(margin) or None,
        disagreement=bool(st.session_state["wl_disagreement"]),
        status=st.session_state["wl_status"],
        failures=bool(st.session_state["wl_failures"]),
        sort=st.session_state["wl_sort"],
        descending=bool(st.session_state["wl_desc"]),
    )


def _step(delta: int, n_pages: int) -> None:
    st.session_state["wl_page"] = min(max(1, int(st.session_state["wl_page"]) + delta), n_pages)


def table(frame: pd.DataFrame, labels: list[str]) -> dict[str, Any]:
    """The page's rows; returns the dataframe's selection state."""
    config: dict[str, Any] = {
        "study_id": st.column_config.TextColumn("study", pinned=True),
        "patient_pseudonym": st.column_config.TextColumn("patient (pseudonym)"),
        "top_probability": st.column_config.ProgressColumn(
            "top p", format="%.2f", min_value=0.0, max_value=1.0
        ),
    }
    for label in labels:
        config[f"p_{label}"] = st.column_config.NumberColumn(label, format="%.2f")
    return st.dataframe(
        frame,
        hide_index=True,
        column_config=config,
        on_select="rerun",
        selection_mode="single-row",
        key="wl_table",
        width="stretch",
    )


def open_study(study_id: str, params: dict[str, str]) -> None:
    """Go to the study view; the worklist's parameters travel along for back and next."""
    st.switch_page(STUDY_PAGE, query_params={**params, "study": study_id})


def main() -> None:
    """The worklist page."""
    session = current()
    st.session_state.pop("sv_on", None)  # a study opened from here counts its reviews afresh
    query, page, size = initial_view(session.run_id, session.labels)
    seed_widgets(query, page, size)
    st.title("Worklist")
    query = filters(session.labels, session.run_id)
    size = int(st.session_state["wl_size"])
    previous = st.session_state.get("wl_last_query")
    if previous is not None and previous != dataclasses.replace(query, run_id=previous.run_id):
        st.session_state["wl_page"] = 1  # new filters: back to the first page
    st.session_state["wl_last_query"] = query
    page = max(int(st.session_state["wl_page"]) - 1, 0)
    frame, total = worklist(session.store, query, page=page, page_size=size)
    n_pages = max(1, -(-total // size))
    if page >= n_pages:  # the list shrank under a bookmarked page
        page = n_pages - 1
        st.session_state["wl_page"] = n_pages
        frame, total = worklist(session.store, query, page=page, page_size=size)
    params = link_params(query, page, size)
    st.session_state["worklist_params"] = params
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)

    what = ("failed " if query.failures else "") + (
        "study matches" if total == 1 else "studies match"
    )
    st.caption(f"{total} {what} · page {page + 1} of {n_pages} · sorted by {query.sort}")
    if frame.empty:
        failed = 0 if query.failures else session.store.counts(session.run_id)["failed"]
        studies = "study" if failed == 1 else "studies"
        hint = f" This run has {failed} failed {studies}: see “Failures instead”." if failed else ""
        st.info(f"No study matches these filters.{hint}")
        return
    picked = table(frame, session.labels)
    rows = picked.get("selection", {}).get("rows", []) if picked else []
    if rows:
        open_study(str(frame.iloc[rows[0]]["study_id"]), params)

    nav = st.columns([1, 1, 1, 3, 2])
    nav[0].button(
        "◀ Previous", key="wl_prev", on_click=_step, args=(-1, n_pages), disabled=page == 0
    )
    nav[1].number_input("Page", 1, n_pages, key="wl_page", label_visibility="collapsed")
    nav[2].button(
        "Next ▶", key="wl_next", on_click=_step, args=(1, n_pages), disabled=page + 1 >= n_pages
    )
    ids = [str(x) for x in frame["study_id"]]
    chosen = nav[3].selectbox("Study", ids, key="wl_open", label_visibility="collapsed")
    if nav[4].button("Open study", key="wl_open_button", type="primary"):
        open_study(chosen, params)


main()
