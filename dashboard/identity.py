"""Who is reviewing: the OIDC user when `[auth]` is configured, else a name typed once.

With OIDC (`st.login`, an `[auth]` section in `.streamlit/secrets.toml`) the reviewer is the
logged-in user and a visitor who is not logged in sees only the login button. Without it the
dashboard is local and single-user (`clinfuse dashboard` binds to 127.0.0.1): it asks for a
reviewer name and keeps it for the session.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import streamlit as st

from clinfuse.store import named

REVIEWER_KEY = "reviewer_name"  # session state: the local reviewer's name


def auth_section() -> Mapping[str, Any] | None:
    """The `[auth]` secrets section, or None when OIDC is not configured (or no secrets)."""
    try:
        auth = st.secrets.get("auth")
    except Exception:  # no secrets.toml at all, or an unreadable one: not configured
        return None
    return auth if isinstance(auth, Mapping) and auth else None


def oidc_reviewer(user: Mapping[str, Any]) -> str | None:
    """The reviewer an `st.user` mapping names: email, else name, else subject; None when
    nobody is logged in."""
    if not user.get("is_logged_in"):
        return None
    for claim in ("email", "preferred_username", "name", "sub"):
        value = str(user.get(claim) or "").strip()
        if value:
            return value
    return None


def current_reviewer() -> str | None:
    """The reviewer of this session, or None when nobody is identified yet."""
    if auth_section() is not None:
        return oidc_reviewer(st.user)
    name = str(st.session_state.get(REVIEWER_KEY) or "").strip()
    return name or None


def providers(auth: Mapping[str, Any]) -> list[str | None]:
    """The providers to offer: None for a single unnamed one, else the named sub-sections."""
    sections = [key for key, value in auth.items() if isinstance(value, Mapping)]
    return [None] if "client_id" in auth or not sections else sections


def sign_in_page() -> None:
    """The only page shown to someone not yet identified: a login button, or a name form."""
    st.title("clinfuse review")
    auth = auth_section()
    if auth is not None:
        st.write("Log in to review studies.")
        for provider in providers(auth):
            label = "Log in" if provider is None else f"Log in with {provider}"
            if st.button(label, key=f"login-{provider}", type="primary"):
                if provider is None:
                    st.login()
                else:
                    st.login(provider)
        return
    st.write(
        "Local single-user mode: no login is configured, so the dashboard only listens on this "
        "machine. Your name is recorded with every verdict you save."
    )
    with st.form("reviewer"):
        name = st.text_input("Reviewer name", placeholder="e.g. Dr A. Example")
        if st.form_submit_button("Start reviewing", type="primary"):
            if named(name):
                st.session_state[REVIEWER_KEY] = name.strip()
                st.rerun()
            st.error("Enter a name (a letter or digit in it): every verdict records who made it.")


def sign_out() -> None:
    """Log out (OIDC) or forget the local reviewer's name."""
    if auth_section() is not None:
        st.logout()
    else:
        st.session_state.pop(REVIEWER_KEY, None)
