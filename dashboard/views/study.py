"""Study view: the image and note with their evidence, the scores, and the verdict form.

The study comes from the URL (`study`, next to the worklist's parameters), so a link opens
it for a colleague and "Save and next" can walk the worklist in its order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st
from panels import (
    explanation_of,
    failure_message,
    history_panel,
    image_panel,
    label_picker,
    modality_panel,
    note_panel,
    scores_panel,
)
from session import (
    ReviewSession,
    as_written,
    current,
    page_from_params,
    query_from_params,
)

from clinfuse.model.checkpoint import NOTICE
from clinfuse.review import (
    WorklistQuery,
    current_labels,
    ordered_ids,
    save_review,
    study_view,
)
from clinfuse.store import StoreError

WORKLIST_PAGE = Path(__file__).resolve().parent / "worklist.py"
VERDICTS = {
    "agree": "Agree with the model",
    "disagree": "Disagree",
    "corrected": "Correct the labels",
}
CALLS = {"positive": 1, "negative": 0, "unknown": None}


def worklist_order(session: ReviewSession, params: dict[str, Any], study_id: str) -> list[str]:
    """The study ids of the worklist the link describes, in its order; the whole run's when
    the link's filter does not fit this run (a label or sort column of another model's link)
    or no longer holds `study_id` (reviewed meanwhile, on a "not reviewed yet" link)."""
    query, _ = query_from_params(session.run_id, params)
    try:
        order = ordered_ids(session.store, query)
    except ValueError:
        order = []
    if study_id in order:
        return order
    return ordered_ids(session.store, WorklistQuery(run_id=session.run_id))


def study_after(order: list[str], study_id: str) -> str | None:
    """The study after `study_id` in `order`; None after the last (or when it is not there)."""
    at = order.index(study_id) if study_id in order else len(order)
    return order[at + 1] if at + 1 < len(order) else None


def verdict_form(
    view: Any, session: ReviewSession, labels: list[str]
) -> tuple[str, dict, str] | None:
    """The verdict form over the run's `labels`; (verdict, labels_after, comment) when
    submitted with a valid verdict, with "next" in session state when "Save and next" was
    pressed. No verdict is chosen in advance: Enter in the comment box must never record
    agreement by default. A study the model failed on has no call to agree or disagree with:
    its reviewer can only give the labels ("Correct the labels"), starting from unknown.

    Each save gives the next form a new key (`sv_form`): a browser sends a form's last values
    back with its next submit, so reusing the key would record the same verdict again on a
    second click. A submit is refused, with nothing saved, when someone else reviewed the study
    after the page was drawn: the reviewer reads their review before theirs replaces it, and
    the form's labels are set to that latest review's (the verdict and comment are kept), so
    a save after it never reverts the colleague's correction."""
    called = {x["label"]: int(bool(x["decision"])) for x in view.labels}
    before = {label: called.get(label) for label in labels}  # None: the model gave no call
    # the labels as they stand: a revision starts from the latest review's, not the model's
    latest = current_labels(view.history, before)
    current = {label: latest.get(label) for label in labels}
    verdicts = ["corrected"] if view.failure else list(VERDICTS)
    key = f"verdict-{view.study_id}-{st.session_state.setdefault('sv_form', 0)}"
    if st.session_state.pop("sv_reset_labels", None) == key:  # before the widgets are drawn
        names = {value: name for name, value in CALLS.items()}
        for label, value in current.items():
            st.session_state[f"{key}-{label}"] = names[value]
    # how many reviews the page showed when this form was first drawn: kept over reruns (a
    # refused save, a click on the overlay) until the reviewer is told of newer ones
    seen_key = f"sv_seen-{key}"
    if st.session_state.get("sv_on") != view.study_id:  # opened now (from another study)
        st.session_state[seen_key] = len(view.history)
        st.session_state["sv_on"] = view.study_id
    seen = st.session_state.setdefault(seen_key, len(view.history))
    # Not cleared on submit: a refused submit keeps what the reviewer chose and typed.
    with st.form(key, enter_to_submit=True):
        verdict = st.radio(
            "Verdict",
            verdicts,
            format_func=VERDICTS.__getitem__,
            index=None,
            horizontal=True,
            key=f"{key}-verdict",
        )
        st.caption(
            "Your labels (used when you disagree or correct"
            + ("; they start from the latest review's):" if view.history else "):")
        )
        columns = st.columns(min(len(current), 6) or 1)
        edited: dict[str, int | None] = {}
        for i, (label, call) in enumerate(current.items()):
            widget = f"{key}-{label}"  # set above after a colleague's review: no index then
            start = {} if widget in st.session_state else {"index": {1: 0, 0: 1, None: 2}[call]}
            choice = columns[i % len(columns)].selectbox(
                as_written(label), list(CALLS), key=widget, **start
            )
            edited[label] = CALLS[choice]
        comment = st.text_input(
            "Comment", key=f"{key}-comment", placeholder="Enter saves and opens the next study"
        )
        buttons = st.columns(2)
        save_next = buttons[0].form_submit_button(
            "Save and next", type="primary", key=f"{key}-save-next"
        )
        save = buttons[1].form_submit_button("Save", key=f"{key}-save")
    if not (save_next or save):
        return None
    if verdict is None:
        st.error("Choose a verdict first: nothing was saved.")
        return None
    if len(view.history) > seen:
        st.session_state[seen_key] = len(view.history)  # told now: the next submit saves
        st.session_state["sv_reset_labels"] = key
        st.session_state["sv_flash_warning"] = (
            f"{len(view.history) - seen} review(s) of this study were saved while you had it "
            "open (see the review history): nothing was saved. The labels below now show the "
            "latest review's: make your changes again, then save."
        )
        st.rerun()
    st.session_state["sv_go_next"] = bool(save_next)
    if verdict == "agree" and edited == current:  # untouched: the model's calls, whatever the
        edited = {}  # latest review said; edited ones are checked against the model's
    return verdict, edited, comment.strip()  # save_review refuses labels against the verdict


def main() -> None:
    """The study page."""
    session = current()
    params = st.query_params.to_dict()
    study_id = params.pop("study", None)
    back = params if len(params) > 1 else st.session_state.get("worklist_params", params)
    st.page_link(WORKLIST_PAGE, label="Back to the worklist", icon="⬅️", query_params=back)
    if not study_id:
        st.info("Open a study from the worklist.")
        return
    try:
        view = study_view(session.store, session.run_id, study_id)
    except StoreError as exc:
        st.error(as_written(str(exc)))  # it quotes the study id of the URL
        return
    if flash := st.session_state.pop("sv_flash", None):
        st.success(flash)
    if told := st.session_state.pop("sv_flash_warning", None):
        st.warning(told)
    st.title(f"Study {as_written(view.study_id)}")
    st.warning(NOTICE, icon="⚕️")
    st.caption(
        f"Patient {view.patient_pseudonym or '(no id)'} · {view.modalities or 'no input'} · "
        f"model {view.model_version} · run #{session.run_id}"
    )
    failure = failure_message(view.failure)
    if view.source_error and view.source_error not in (failure or ""):
        st.warning(f"Inputs not shown: {view.source_error}")
    if failure is not None:  # no input shown: an image that could not be read left the names
        st.error(failure)  # its header gives unmasked in the note
        st.caption(
            "The model gave no answer for this study: you can still give its labels, from its "
            "images and note in your hospital's systems."
        )
    else:
        study_panels(view)
    st.subheader("Your verdict")
    submitted = verdict_form(view, session, session.labels)
    if submitted is not None:
        save_verdict(session, params, view, *submitted)
    st.subheader("Review history")
    history_panel(view.history)


def study_panels(view: Any) -> None:
    """A scored study: its scores, the image and note with their evidence, the Shapley split."""
    record = view.explanation
    expl = explanation_of(view.explanation_path, record)
    labels = [x["label"] for x in view.labels]
    explained = list(expl.labels if expl is not None else (record or {}).get("labels", []))
    top = max(view.labels, key=lambda x: float(x["probability"]))["label"]
    left, right = st.columns([1, 1], gap="large")
    with right:
        st.subheader("Scores")
        scores_panel(view.labels)
        st.subheader("Image and note contribution")
        modality_panel(record)
    with left:
        label = label_picker(labels, explained, explained[0] if explained else top, view.study_id)
        if view.image_path is None and view.source_error:  # not "no image": not found now
            st.info("The image is not shown: its run's manifest cannot be read (above).")
        else:
            image_panel(view.image_path, expl, record, label)
    st.subheader("Note")
    note_panel(view.note or (expl.note if expl else None), expl, record, label)


def save_verdict(
    session: ReviewSession,
    params: dict[str, Any],
    view: Any,
    verdict: str,
    labels_after: dict,
    comment: str,
) -> None:
    """Record a submitted verdict, then open this page again (or the next study's)."""
    # the next study is found before the save: a verdict can take this one off a filtered
    # worklist ("not reviewed yet") or move it in a sorted one ("reviews", "last_*")
    go_next = st.session_state.pop("sv_go_next", False)
    following = None
    if go_next:
        following = study_after(worklist_order(session, params, view.study_id), view.study_id)
    try:
        review_id = save_review(
            session.store,
            session.run_id,
            view.study_id,
            session.reviewer,
            verdict,
            labels_after,
            comment,
        )
    except (ValueError, StoreError) as exc:
        st.error(f"Not saved: {as_written(str(exc))}")
        st.stop()
    st.session_state["sv_form"] += 1  # a fresh form
    saved = f"Saved review #{review_id} of {as_written(view.study_id)}: "
    saved += f"{VERDICTS[verdict].lower()}."
    if go_next and following is None:
        st.session_state["sv_flash"] = f"{saved} It was the last study of the worklist."
    else:
        st.session_state["sv_flash"] = saved
    if following is not None:  # its page in the worklist as the save left it
        order = worklist_order(session, params, following)
        size = page_from_params(params)[1]
        st.query_params["study"] = following
        st.query_params["page"] = str(order.index(following) // size + 1)
    st.rerun()


main()
