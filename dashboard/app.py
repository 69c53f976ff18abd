"""clinfuse review dashboard: `clinfuse dashboard --store URL`, or
`streamlit run dashboard/app.py --server.address 127.0.0.1 -- --store URL`.

The entry point identifies the reviewer, opens the store, picks the run and routes to the
pages in `views/` (worklist, study, monitoring). Until the reviewer is identified every page's
address shows the sign-in page, so nothing else can be reached, and a reloaded or bookmarked
link (a study's, say) opens its page once the reviewer is known: its query parameters stay.
All queries live in `clinfuse.review`; the pages only lay out what it returns.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `streamlit run` adds this folder; AppTest and imports may not
    sys.path.insert(0, str(HERE))

import sqlalchemy as sa  # noqa: E402
import streamlit as st  # noqa: E402
from identity import auth_section, current_reviewer, sign_in_page, sign_out  # noqa: E402
from session import SESSION_KEY, ReviewSession, choose_run, open_store, store_url  # noqa: E402

from clinfuse.model.checkpoint import NOTICE  # noqa: E402
from clinfuse.review import LOCAL_HOSTS  # noqa: E402
from clinfuse.store import StoreError  # noqa: E402

st.set_page_config(page_title="clinfuse review", page_icon=":material/fact_check:", layout="wide")
st.session_state.pop(SESSION_KEY, None)  # rebuilt below on every run, only once identified
PAGES = {  # url path (views/<path>.py) -> (title, icon); the first is the default page
    "worklist": ("Worklist", ":material/list:"),
    "study": ("Study", ":material/radiology:"),
    "monitoring": ("Monitoring", ":material/monitoring:"),
}


def main() -> None:
    """Identify, open the store, pick the run, then run the chosen page."""
    address = st.get_option("server.address")
    if auth_section() is None and address not in LOCAL_HOSTS:  # `streamlit run` by hand
        st.error(
            f"No login is configured, so this dashboard serves this machine only, but it "
            f"listens on {address or 'every network address'}: start it with `clinfuse "
            "dashboard`, or add `--server.address 127.0.0.1` after `streamlit run`, or "
            "configure OIDC login ([auth] in .streamlit/secrets.toml)."
        )
        return
    reviewer = current_reviewer()
    if reviewer is None:
        sign_in = [
            st.Page(sign_in_page, title="Sign in", url_path=path, default=i == 0)
            for i, path in enumerate(PAGES)
        ]
        st.navigation(sign_in, position="hidden").run()
        return
    url = store_url(sys.argv[1:])
    if not url:
        st.error(
            "No store given: start the dashboard with `clinfuse dashboard --store URL` "
            "(or set CLINFUSE_STORE to the store's SQLAlchemy URL)."
        )
        return
    try:
        store = open_store(url)
    except StoreError as exc:  # a path that holds no store, a server that cannot be reached
        st.error(str(exc))
        return
    with st.sidebar:
        st.caption(f"Reviewer: **{reviewer}**")
        if st.button("Log out" if auth_section() is not None else "Change reviewer"):
            sign_out()
            st.rerun()
    try:
        run = choose_run(store)
        if run is None:
            st.info("This store has no inference run yet: run `clinfuse infer` into it first.")
            return
        st.sidebar.caption(NOTICE)
        st.session_state[SESSION_KEY] = ReviewSession(store=store, run=run, reviewer=reviewer)
        pages = [
            st.Page(HERE / "views" / f"{path}.py", title=title, icon=icon, url_path=path)
            for path, (title, icon) in PAGES.items()
        ]
        st.navigation(pages).run()
    except sa.exc.DBAPIError as exc:  # a server gone mid-session, a store locked too long
        st.error(
            f"The store's database did not answer ({type(exc.orig).__name__}): if it is a "
            "server, check that it is running; if another program is writing to it, wait a "
            "moment; then reload the page. Nothing was saved since."
        )


main()
