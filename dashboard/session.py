"""What every page of one dashboard session shares: the store, the run and the reviewer.

`app.py` builds a `ReviewSession` on each script run after the reviewer is identified, and the
pages read it with `current()`; a page reached any other way stops with nothing shown. The
worklist's filters travel in the URL (`st.query_params`) next to `run`, `page` and `size`, so
a link to the worklist or to a study opens the same view for a colleague.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import streamlit as st

from clinfuse.review import WorklistQuery
from clinfuse.store import Store


def as_written(text: str) -> str:
    """`text` for Streamlit's Markdown (titles, captions, messages, widget labels) shown as it
    is written: a study id, a label name or a link's parameter such as `S$1$ **b**
    [l](http://e.x)` is not maths, bold or a link (a link someone sends a clinician must not
    put a sign-in link of theirs on the page)."""
    # an address is broken by an invisible zero-width space, which GitHub-flavoured Markdown's
    # autolinks (Streamlit's) do not cross: backslashes do not stop them
    broken = re.sub(r"(?i)(://|www\.|@)", lambda m: m[0][0] + "\u200b" + m[0][1:], text)
    return re.sub(r"([\\`*_{}\[\]()#+\-.!$~|<>&])", r"\\\1", broken)


STORE_ENV = "CLINFUSE_STORE"
SESSION_KEY = "review_session"
QUERY_FIELDS = frozenset(f.name for f in dataclasses.fields(WorklistQuery)) - {"run_id"}
PAGE_SIZES = (10, 25, 50, 100, 200)


@dataclass
class ReviewSession:
    """The store, the run under review (a `Store.run` dict) and who is reviewing."""

    store: Store
    run: dict[str, Any]
    reviewer: str

    @property
    def run_id(self) -> int:
        return int(self.run["id"])

    @property
    def labels(self) -> list[str]:
        return list(self.run["labels"])


def store_url(argv: Sequence[str]) -> str | None:
    """The store URL: `--store URL` after `--` on the streamlit command line, else the
    CLINFUSE_STORE environment variable; None when neither is set."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--store")
    known, _ = parser.parse_known_args(list(argv))
    return known.store or os.environ.get(STORE_ENV) or None


@st.cache_resource(show_spinner=False)
def open_store(url: str) -> Store:
    """One `Store` per URL for the whole server (it is thread-safe)."""
    return Store(url, create=False)


def choose_run(store: Store) -> dict[str, Any] | None:
    """The run picked in the sidebar: the URL's `run`, else the latest; None if there is none."""
    runs = list(reversed(store.runs()))  # newest first
    if not runs:
        return None
    ids = [int(r["id"]) for r in runs]
    wanted = st.query_params.get("run")
    if wanted is not None and counting_number(wanted) in ids:
        st.session_state["run_choice"] = int(wanted)
    else:
        if st.session_state.get("run_choice") not in ids:
            st.session_state["run_choice"] = ids[0]
        if wanted is not None:  # a link to a run this store does not hold: say so
            shown = st.session_state["run_choice"]
            asked = as_written(repr(wanted))
            st.warning(f"This store has no run {asked}; showing run {shown} instead.")
    by_id = {int(r["id"]): r for r in runs}
    run_id = st.sidebar.selectbox(
        "Run",
        ids,
        key="run_choice",
        format_func=lambda i: f"#{i} · {by_id[i]['model_version']}",
        help="Runs of this store, newest first: #id · model version",
        on_change=_switch_run,
    )
    st.query_params["run"] = str(run_id)
    return by_id[run_id]


def _switch_run() -> None:
    """Another run: into the URL, and its worklist starts unfiltered on the first page."""
    st.query_params.clear()
    st.query_params["run"] = str(st.session_state["run_choice"])
    st.session_state.pop("worklist_params", None)
    for key in [k for k in st.session_state if str(k).startswith("wl_")]:
        del st.session_state[key]


def current() -> ReviewSession:
    """This run's session; stops the page (showing nothing) if `app.py` did not set one."""
    session = st.session_state.get(SESSION_KEY)
    if not isinstance(session, ReviewSession):
        st.stop()
    return session


def query_from_params(run_id: int, params: Mapping[str, Any]) -> tuple[WorklistQuery, str | None]:
    """The worklist query a URL describes, and an error message when it holds a bad value."""
    mine = {k: str(v) for k, v in params.items() if k in QUERY_FIELDS}
    try:
        query = WorklistQuery.from_params(mine, run_id=run_id)
    except (ValueError, TypeError) as exc:
        return WorklistQuery(run_id=run_id), f"Ignored the link's filters: {exc}"
    return dataclasses.replace(query, run_id=run_id), None


def link_params(query: WorklistQuery, page: int, size: int, **extra: str) -> dict[str, str]:
    """URL parameters for a worklist view: run, the filters, the 1-based page and its size."""
    params = {"run": str(query.run_id), **query.to_params(), "page": str(page + 1)}
    params.pop("run_id", None)
    if size != 50:
        params["size"] = str(size)
    return {**params, **extra}


def page_from_params(params: Mapping[str, Any]) -> tuple[int, int]:
    """(0-based page, page size) from the URL's `page` (1-based) and `size`."""
    page = counting_number(str(params.get("page", "1")))
    size = counting_number(str(params.get("size", "50")))
    return (page - 1 if page else 0), (size if size in PAGE_SIZES else 50)


def counting_number(text: str) -> int | None:
    """A URL parameter's positive whole number of at most 9 ASCII digits, else None (`isdigit`
    takes "²", which `int` refuses; a 20-digit page overflows a database integer)."""
    return int(text) if re.fullmatch(r"[0-9]{1,9}", text) and int(text) > 0 else None
