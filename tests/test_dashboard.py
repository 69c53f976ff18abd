"""The review dashboard under Streamlit's AppTest: filters in the URL, server-side pages,
failures, a verdict saved append-only and shown in the history, save-and-next, OIDC and local
identity, and no patient name, id or birth date on any page."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from clinfuse.cli import main
from clinfuse.explain import Explanation
from clinfuse.explain.render import explain_studies
from clinfuse.review import study_view
from clinfuse.store import ExplanationRecord, Store

pytest.importorskip("streamlit")
from streamlit import config as streamlit_config  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402
from streamlit.testing.v1.element_tree import Dataframe  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboard"
APP = DASHBOARD / "app.py"
N_STUDIES = 14  # scored studies in the review store, plus one that fails
EXPLAINED = 3  # of them with explanations (image maps, note words, modality Shapley)
AUTH = {  # an [auth] section as in .streamlit/secrets.toml: OIDC configured
    "redirect_uri": "http://localhost:8501/oauth2callback",
    "cookie_secret": "not-a-secret",
    "client_id": "clinfuse",
    "client_secret": "not-a-secret",
    "server_metadata_url": "https://idp.example/.well-known/openid-configuration",
}


@dataclasses.dataclass(frozen=True)
class ReviewRun:
    """A store holding one inference run with explanations, and what must never be shown."""

    url: str
    run_id: int
    study_ids: tuple[str, ...]  # scored studies
    explained: tuple[str, ...]  # those with an explanation
    failed: str  # the study that failed
    identifiers: tuple[str, ...]  # patient names, ids and birth dates of those studies


def build_review_run(small_export: Path, tiny_model: Path, base: Path) -> ReviewRun:
    """Score the first studies of `small_export` (and one broken file) into an SQLite store
    under `base`, with explanations for the first EXPLAINED of them (explaining is the slow
    part); built once per test session, whichever module asks first."""
    folder = base / "dashboard_run"
    rows = pd.read_csv(small_export, dtype=str, keep_default_na=False).head(N_STUDIES)
    for column in ("image", "note_path"):  # absolute: the manifest is written to `folder`
        rows[column] = [str(small_export.parent / p) if p else "" for p in rows[column]]
    url = Store.default_url(folder / "run")
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        broken = rows.iloc[0].copy()
        broken["study_id"], broken["image"] = "BROKEN", str(folder / "broken.dcm")
        (folder / "broken.dcm").write_text("not a DICOM file")
        manifest = folder / "manifest.csv"
        pd.concat([rows, broken.to_frame().T]).to_csv(manifest, index=False)
        args = ["infer", "--model", str(tiny_model), "--manifest", str(manifest)]
        assert main([*args, "--out", str(folder / "run"), "--workers", "0"]) == 0
        ids = sorted(rows["study_id"])[:EXPLAINED]  # as `infer --explain positive` would
        done = explain_studies(tiny_model, manifest, ids, folder / "run" / "explanations")
        with Store(url) as store:
            run_id = int(store.runs()[-1]["id"])
            records = []
            for study in done:
                npz = next(f for f in study.files if f.suffix == ".npz")
                record = Explanation.load_npz(npz).to_record()
                records.append(ExplanationRecord(study.study_id, record, str(npz)))
            store.write_batch(run_id, [], [], records)
        (folder / "done").touch()
    identifiers: set[str] = set(rows["patient_id"])
    for image in filter(None, rows["image"]):
        ds = pydicom.dcmread(image, stop_before_pixels=True)
        name = ds.PatientName
        identifiers |= {name.family_name, name.given_name, str(ds.PatientID)}
        born = str(ds.PatientBirthDate)
        identifiers |= {born, f"{born[:4]}-{born[4:6]}-{born[6:]}"}
    with Store(url) as store:
        run_id = int(store.runs()[-1]["id"])
    ids = tuple(sorted(rows["study_id"]))
    identifiers = {x for x in identifiers if x}
    return ReviewRun(url, run_id, ids, ids[:EXPLAINED], "BROKEN", tuple(sorted(identifiers)))


@pytest.fixture(scope="session")
def review_run(small_export, tiny_model, tmp_path_factory) -> ReviewRun:
    return build_review_run(small_export, tiny_model, tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def served_here():
    """Streamlit's server.address as `clinfuse dashboard` sets it: this machine only."""
    before = streamlit_config.get_option("server.address")
    streamlit_config.set_option("server.address", "127.0.0.1")
    yield
    streamlit_config.set_option("server.address", before)


def new_app(monkeypatch, run: ReviewRun, reviewer: str | None = "Dr Test", **params) -> AppTest:
    """The dashboard on `run`'s store, a local reviewer already named (unless None)."""
    monkeypatch.setenv("CLINFUSE_STORE", run.url)
    at = AppTest.from_file(str(APP), default_timeout=120)
    if reviewer:
        at.session_state["reviewer_name"] = reviewer
    at.query_params.update({"run": str(run.run_id), **params})
    return at


def page_text(at: AppTest) -> str:
    """Everything the page shows as text: every element's content, every table's cells."""
    parts = []
    for node in at:
        if isinstance(node, Dataframe):
            parts.append(node.value.to_csv())
        else:
            parts.append(str(getattr(node, "proto", "")))
    return "\n".join(parts)


def table(at: AppTest) -> pd.DataFrame:
    """The worklist's table (the first dataframe of the main area)."""
    return at.main.dataframe[0].value


def open_study(at: AppTest, study_id: str) -> AppTest:
    """From the worklist, open a study with its Open button."""
    at.selectbox(key="wl_open").select(study_id)
    at.button(key="wl_open_button").click()
    return at.run()


def verdict_form(at: AppTest, study_id: str) -> str:
    """The key of the study's verdict form as drawn now (each save draws a new one)."""
    keys = [r.key for r in at.radio if r.key and r.key.startswith(f"verdict-{study_id}-")]
    assert len(keys) == 1, keys
    return keys[0].removesuffix("-verdict")


def predictions(run: ReviewRun) -> pd.DataFrame:
    with Store(run.url) as store:
        return pd.concat(list(store.iter_predictions(run.run_id))).set_index("study_id")


def test_local_mode_asks_for_a_reviewer_name_before_showing_anything(review_run, monkeypatch):
    at = new_app(monkeypatch, review_run, reviewer=None).run()
    assert not at.exception
    assert not at.dataframe and not any(s in page_text(at) for s in review_run.study_ids)
    at.text_input[0].input("  ")  # a form: values count when it is submitted
    at.button[0].click().run()
    assert at.error and "name" in at.error[0].value
    at.text_input[0].input("Dr Test")
    at.button[0].click().run()
    assert at.title[0].value == "Worklist"
    assert "Dr Test" in page_text(at)


def test_without_login_a_server_listening_beyond_this_machine_shows_nothing(
    review_run, monkeypatch
):
    """`streamlit run` by hand listens on every address: with no OIDC login configured,
    anyone who reached it could review, so the app refuses (`clinfuse dashboard` binds to
    127.0.0.1)."""
    streamlit_config.set_option("server.address", None)
    at = new_app(monkeypatch, review_run).run()
    assert "listens on every network address" in at.error[0].value
    assert not at.main.dataframe and review_run.study_ids[0] not in page_text(at)


def test_oidc_visitor_not_logged_in_sees_only_the_login_button(review_run, monkeypatch):
    at = new_app(monkeypatch, review_run, reviewer="typed name is ignored with OIDC")
    at.secrets["auth"] = AUTH
    at.user = {"is_logged_in": False}
    at.query_params["study"] = review_run.study_ids[0]
    at.run()
    assert not at.exception
    assert [b.label for b in at.button] == ["Log in"]
    assert not at.dataframe and not at.text_input
    text = page_text(at)
    assert not any(s in text for s in (*review_run.study_ids, "PSN-", "Worklist"))


def test_oidc_user_is_the_reviewer_of_a_saved_verdict(review_run, monkeypatch):
    at = new_app(monkeypatch, review_run, reviewer=None)
    at.secrets["auth"] = AUTH
    at.user = {"is_logged_in": True, "email": "dr.a@hospital.example", "name": "A. Doctor"}
    at.run()
    assert at.title[0].value == "Worklist" and "Log out" in [b.label for b in at.button]
    study = str(table(at).study_id.iloc[-1])
    form = verdict_form(open_study(at, study), study)
    at.radio(key=f"{form}-verdict").set_value("agree")
    at.text_input(key=f"{form}-comment").input("oidc check")
    at.button(key=f"{form}-save").click().run()
    with Store(review_run.url) as store:
        saved = [r for r in store.reviews(review_run.run_id, study) if r["comment"] == "oidc check"]
    assert [r["reviewer"] for r in saved] == ["dr.a@hospital.example"]


def test_worklist_filters_live_in_the_url_and_run_in_the_database(review_run, monkeypatch):
    from clinfuse.review import WorklistQuery

    p_copd = predictions(review_run)["p_copd"].dropna()
    cut = float(np.round(p_copd.median(), 4))
    query = WorklistQuery(run_id=review_run.run_id, label="copd", p_min=cut, sort="p_copd")
    at = new_app(
        monkeypatch, review_run, **dataclasses.replace(query, descending=False).to_params()
    )
    at.run()
    assert not at.exception
    assert at.selectbox(key="wl_label").value == "copd"
    shown = table(at)
    assert set(shown.study_id) == set(p_copd[p_copd >= cut].index)
    assert list(shown.p_copd) == sorted(shown.p_copd)  # ascending, as the link asked
    at.selectbox(key="wl_status").select("reviewed").run()  # a new filter goes into the URL
    assert (
        WorklistQuery.from_params(
            {k: v for k, v in at.query_params.items() if k not in ("run", "page", "size")}
        ).status
        == "reviewed"
    )
    assert at.query_params["page"] == "1" and at.query_params["label"] == "copd"
    wide = WorklistQuery(run_id=review_run.run_id, label="copd", uncertain=0.9)
    at = new_app(monkeypatch, review_run, **wide.to_params()).run()  # a margin above 0.5 stays
    assert not at.exception and at.number_input(key="wl_uncertain").value == 0.9
    assert WorklistQuery.from_params(dict(at.query_params)).uncertain == 0.9
    at = new_app(monkeypatch, review_run, **{**wide.to_params(), "uncertain": "1.5"}).run()
    assert at.number_input(key="wl_uncertain").value == 1.0  # every study, as 1.5 would be


def test_worklist_pages_are_cut_on_the_server(review_run, monkeypatch):
    at = new_app(monkeypatch, review_run, size="10").run()
    first = list(table(at).study_id)
    assert len(first) == 10 and "page 1 of 2" in page_text(at)
    at.button(key="wl_next").click().run()
    second = list(table(at).study_id)
    assert at.query_params["page"] == "2" and len(second) == N_STUDIES - 10
    assert sorted(first + second) == list(review_run.study_ids)
    for odd in ({"page": "9" * 23}, {"page": "²", "size": "²"}):  # a mangled link: page one
        at = new_app(monkeypatch, review_run, **odd).run()
        assert not at.exception and len(table(at)) == min(N_STUDIES, 50), odd


def test_the_sort_survives_showing_failures_and_an_unknown_one_is_named(review_run, monkeypatch):
    at = new_app(monkeypatch, review_run).run()
    assert at.selectbox(key="wl_sort").value == "top_probability"
    at.toggle(key="wl_failures").set_value(True).run()
    at.toggle(key="wl_failures").set_value(False).run()
    assert at.selectbox(key="wl_sort").value == "top_probability" and not at.exception
    at.selectbox(key="wl_sort").select("reviews").run()  # a column of both lists: kept
    at.toggle(key="wl_failures").set_value(True).run()
    assert at.selectbox(key="wl_sort").value == "reviews"
    at = new_app(monkeypatch, review_run, sort="p_gout").run()  # a link made for another model
    assert "This list has no column 'p\\_gout' to sort by." in [w.value for w in at.warning]
    assert at.selectbox(key="wl_sort").value == "top_probability" and not at.exception


def test_failures_are_listed_with_their_reason(review_run, monkeypatch):
    at = new_app(monkeypatch, review_run).run()
    at.toggle(key="wl_failures").set_value(True).run()
    failed = table(at)
    assert list(failed.study_id) == [review_run.failed]
    assert "image:" in failed.to_csv() and at.query_params.get("failures")
    at = new_app(monkeypatch, review_run, p_max="0.0").run()  # no study's top score is 0
    assert "No study matches these filters. This run has 1 failed study: see" in page_text(at)
    at = new_app(monkeypatch, review_run)
    at.query_params["run"] = "99"  # a stale link
    at.run()
    assert (
        at.warning[0].value
        == f"This store has no run '99'; showing run {review_run.run_id} instead."
    )
    assert at.query_params["run"] == str(review_run.run_id) and not at.exception
    at = new_app(monkeypatch, review_run, label="gout").run()  # another model's link
    assert at.warning[0].value == "This run has no label 'gout': its filter is left out."
    assert len(table(at)) > 0 and not at.exception


def test_a_failed_study_can_be_given_its_labels_but_not_agreed_with(review_run, monkeypatch):
    at = new_app(monkeypatch, review_run).run()
    at.toggle(key="wl_failures").set_value(True).run()
    open_study(at, review_run.failed)
    assert "could not be scored" in page_text(at) and not at.exception
    form = verdict_form(at, review_run.failed)
    verdict = at.radio(key=f"{form}-verdict")
    assert verdict.options == ["Correct the labels"]  # no model call to agree with
    labels = [b.label for b in at.selectbox if b.key and b.key.startswith(f"{form}-")]
    assert labels and all(at.selectbox(key=f"{form}-{x}").value == "unknown" for x in labels)
    verdict.set_value("corrected")
    at.selectbox(key=f"{form}-{labels[0]}").set_value("positive")
    at.button(key=f"{form}-save").click().run()
    with Store(review_run.url) as store:
        events = store.reviews(review_run.run_id, review_run.failed)
    assert events[-1]["verdict"] == "corrected"
    assert events[-1]["labels_after"][labels[0]] == 1
    assert all(events[-1]["labels_after"][x] is None for x in labels[1:])


def test_verdict_is_saved_append_only_shown_in_history_and_save_and_next_moves_on(
    review_run, monkeypatch
):
    at = new_app(monkeypatch, review_run).run()
    order = [str(x) for x in table(at).study_id]
    study = next(s for s in order[:-1] if s in review_run.explained)
    following = order[order.index(study) + 1]
    open_study(at, study)
    text = page_text(at)
    assert at.title[0].value == f"Study {study}" and "Decision support, not a diagnosis" in text
    with Store(review_run.url) as store:
        version = store.run(review_run.run_id)["model_version"]
    assert version in text and predictions(review_run).at[study, "patient_pseudonym"] in text
    assert at.get("image") and "<mark" in at.get("html")[0].value  # image; note's evidence

    form = verdict_form(at, study)
    before = predictions(review_run).loc[study]
    flipped = "negative" if before["decision_copd"] else "positive"
    at.radio(key=f"{form}-verdict").set_value("corrected")
    at.selectbox(key=f"{form}-copd").select(flipped)
    at.text_input(key=f"{form}-comment").input("copd: see the history in the note")
    at.button(key=f"{form}-save").click().run()
    with Store(review_run.url) as store:
        events = store.reviews(review_run.run_id, study)
    event = events[-1]
    assert (event["verdict"], event["reviewer"]) == ("corrected", "Dr Test")
    assert event["labels_after"]["copd"] == (flipped == "positive")
    assert event["labels_before"]["copd"] == bool(before["decision_copd"])
    history = at.main.dataframe[-1].value
    assert "copd: see the history in the note" in set(history["comment"])

    assert verdict_form(at, study) != form  # a fresh form: nothing of the saved one is sent
    form = verdict_form(at, study)
    assert at.radio(key=f"{form}-verdict").value is None
    # a revision starts from the labels as they stand: the correction, not the model's call
    assert at.selectbox(key=f"{form}-copd").value == flipped
    assert any("they start from the latest review" in c.value for c in at.caption)
    at.text_input(key=f"{form}-comment").input("second look: fine")
    at.button(key=f"{form}-save").click().run()  # no verdict chosen: nothing is saved
    assert "Choose a verdict first" in page_text(at)
    assert at.text_input(key=f"{form}-comment").value == "second look: fine"  # kept
    with Store(review_run.url) as store:
        assert store.reviews(review_run.run_id, study) == events
    at.radio(key=f"{form}-verdict").set_value("agree")
    at.button(key=f"{form}-save-next").click().run()  # agree, then next
    assert at.query_params["study"] == following and at.title[0].value == f"Study {following}"
    with Store(review_run.url) as store:
        events = store.reviews(review_run.run_id, study)
    assert len(events) == 2 and events[0] == event  # appended; the first is untouched
    assert events[-1]["verdict"] == "agree"
    assert events[-1]["labels_after"] == events[-1]["labels_before"]


def test_save_and_next_opens_the_study_after_this_one_as_the_worklist_was_before_the_save(
    review_run, monkeypatch
):
    """On a "not reviewed yet" worklist the saved study leaves the list: "Save and next" still
    opens the study after it, on the page it is on now; a link whose filter no longer holds the
    study (reviewed meanwhile) walks the whole run's worklist."""
    from clinfuse.review import WorklistQuery, ordered_ids

    unreviewed = WorklistQuery(run_id=review_run.run_id, status="unreviewed")
    with Store(review_run.url) as store:
        before = ordered_ids(store, unreviewed)
        whole = ordered_ids(store, WorklistQuery(run_id=review_run.run_id))
    study = [s for s in before[:-1] if whole.index(s) < len(whole) - 1][-1]
    link = {"status": "unreviewed", "size": "10", "page": str(before.index(study) // 10 + 1)}
    at = open_study(new_app(monkeypatch, review_run, **link).run(), study)
    form = verdict_form(at, study)
    at.radio(key=f"{form}-verdict").set_value("agree")
    at.button(key=f"{form}-save-next").click().run()
    following = before[before.index(study) + 1]
    with Store(review_run.url) as store:
        after = ordered_ids(store, unreviewed)
    assert study not in after and at.query_params["study"] == following
    assert at.query_params["page"] == str(after.index(following) // 10 + 1)
    assert "last study" not in page_text(at)

    at.query_params.update({**link, "study": study})  # the same link, again: now stale
    form = verdict_form(at.run(), study)
    at.radio(key=f"{form}-verdict").set_value("agree")
    at.button(key=f"{form}-save-next").click().run()
    assert at.query_params["study"] == whole[whole.index(study) + 1]


@pytest.mark.parametrize("first", ["save", "refused save and a click"])
def test_a_verdict_is_not_saved_over_a_review_the_page_did_not_show(review_run, monkeypatch, first):
    """A colleague reviews the study while it is open: the first submit shows that review and
    saves nothing, also after a refused submit (no verdict) and a click elsewhere on the page
    reran it; the second (the reviewer has seen it) saves."""
    from clinfuse.review import save_review

    at = new_app(monkeypatch, review_run).run()
    study = str(table(at).study_id.iloc[1 if first == "save" else 2])
    form = verdict_form(open_study(at, study), study)
    with Store(review_run.url) as store:
        save_review(store, review_run.run_id, study, "Dr Colleague", "agree", {}, "seen first")
        before = len(store.reviews(review_run.run_id, study))
    if first != "save":
        at.button(key=f"{form}-save").click().run()  # no verdict chosen: refused
        assert "Choose a verdict first" in page_text(at)
        if at.toggle(key="sv_overlay").value is not None:
            at.toggle(key="sv_overlay").set_value(False).run()  # a click outside the form
    at.radio(key=f"{form}-verdict").set_value("agree")
    at.button(key=f"{form}-save").click().run()
    assert "saved while you had it open" in page_text(at) and "seen first" in page_text(at)
    assert "The labels below now show the latest review" in page_text(at)
    with Store(review_run.url) as store:
        assert len(store.reviews(review_run.run_id, study)) == before
    assert at.radio(key=f"{form}-verdict").value == "agree"  # kept for the second submit
    at.button(key=f"{form}-save").click().run()
    with Store(review_run.url) as store:
        events = store.reviews(review_run.run_id, study)
    assert len(events) == before + 1 and events[-1]["reviewer"] == "Dr Test"


def test_a_save_after_a_colleagues_correction_keeps_it(review_run, monkeypatch):
    """The form showed the labels as they were when it was drawn: after the warning of a
    colleague's review, a second save sent them back and reverted the colleague's correction."""
    from clinfuse.review import save_review

    at = new_app(monkeypatch, review_run).run()
    study = str(table(at).study_id.iloc[3])
    form = verdict_form(open_study(at, study), study)
    labels = [b.key.removeprefix(f"{form}-") for b in at.selectbox if b.key.startswith(form)]
    theirs, mine = labels[0], labels[1]
    with Store(review_run.url) as store:
        called = store.reviews(review_run.run_id, study) or None
        decision = predictions(review_run).loc[study]
        flipped = 1 - int(bool(decision[f"decision_{theirs}"]))
        save_review(store, review_run.run_id, study, "Dr Colleague", "corrected", {theirs: flipped})
    assert called is None
    at.radio(key=f"{form}-verdict").set_value("corrected")
    at.selectbox(key=f"{form}-{mine}").select("unknown")
    at.button(key=f"{form}-save").click().run()  # refused: the colleague's review is shown
    assert at.selectbox(key=f"{form}-{theirs}").value == ("positive" if flipped else "negative")
    at.selectbox(key=f"{form}-{mine}").select("unknown")  # the reviewer's change, made again
    at.button(key=f"{form}-save").click().run()
    with Store(review_run.url) as store:
        latest = store.reviews(review_run.run_id, study)[-1]
    assert latest["reviewer"] == "Dr Test"
    assert latest["labels_after"][theirs] == flipped and latest["labels_after"][mine] is None


def test_each_study_opens_on_its_own_explained_label_and_history_says_unknown(
    review_run, monkeypatch
):
    first, second = review_run.explained[:2]
    at = new_app(monkeypatch, review_run).run()
    open_study(at, first)
    with Store(review_run.url) as store:
        views = [study_view(store, review_run.run_id, s) for s in (first, second)]
    picker = at.selectbox(key=f"sv_label-{first}")
    other = next(x["label"] for x in views[0].labels if x["label"] != picker.value)
    picker.set_value(other).run()
    at.query_params["study"] = second
    at.run()
    assert at.selectbox(key=f"sv_label-{second}").value == views[1].explanation["labels"][0]

    def page(dashboard: str) -> None:
        import sys

        sys.path.insert(0, dashboard)
        import streamlit as st
        from panels import failure_message, history_panel

        history_panel(
            [
                {
                    "created_at": "2026-01-02 03:04:05",
                    "reviewer": "Dr A",
                    "verdict": "corrected",
                    "labels_before": {"copd": 0, "mass": 1},
                    "labels_after": {"copd": None, "mass": 0},
                },
                {  # a later review that undoes Dr A's mass correction shows it
                    "created_at": "2026-01-02 04:05:06",
                    "reviewer": "Dr B",
                    "verdict": "corrected",
                    "labels_before": {"copd": 0, "mass": 1},
                    "labels_after": {"copd": None, "mass": 1},
                },
            ]
        )
        st.error(failure_message(("image:truncated", "image:truncated: manifest row 3's image")))

    shown = AppTest.from_function(page, args=(str(DASHBOARD),)).run()
    history = shown.dataframe[0].value
    assert history["label changes"].iloc[0] == "copd: negative → unknown, mass: positive → negative"
    assert history["since the review before"].tolist() == ["—", "mass: negative → positive"]
    assert shown.error[0].value.count("image:truncated") == 1


def test_a_verdict_survives_a_link_from_another_model_and_disagree_must_change_a_label(
    review_run, monkeypatch
):
    at = new_app(monkeypatch, review_run).run()
    study = str(table(at).study_id.iloc[0])
    open_study(at, study)
    # now the study's link as made for another model: its label and sort are not this run's
    at.query_params.update({"label": "gout", "sort": "p_gout"})
    assert at.run().title[0].value == f"Study {study}" and not at.exception
    form = verdict_form(at, study)
    at.radio(key=f"{form}-verdict").set_value("disagree")
    at.button(key=f"{form}-save").click().run()  # every label still as the model called it
    assert [e.value for e in at.error] == [
        "Not saved: verdict 'disagree' with every label as the model called it: change the "
        "labels you disagree with, or set them to unknown"
    ]
    with Store(review_run.url) as store:
        before = len(store.reviews(review_run.run_id, study))
    at.selectbox(key=f"{form}-copd").select("unknown")
    at.button(key=f"{form}-save-next").click().run()
    assert not at.exception
    with Store(review_run.url) as store:
        events = store.reviews(review_run.run_id, study)
    assert len(events) == before + 1 and events[-1]["verdict"] == "disagree"
    assert events[-1]["labels_after"]["copd"] is None
    assert at.query_params["study"] != study  # moved on, in the whole run's worklist


def test_no_patient_name_id_or_birth_date_on_any_page(review_run, monkeypatch):
    at = new_app(monkeypatch, review_run).run()
    pages = [page_text(at)]
    at.toggle(key="wl_failures").set_value(True).run()
    pages.append(page_text(at))
    at.switch_page("views/monitoring.py").run()
    pages.append(page_text(at))
    at.switch_page("views/study.py")
    for study in (*review_run.study_ids, review_run.failed):
        at.query_params.update({"run": str(review_run.run_id), "study": study})
        pages.append(page_text(at.run()))
        assert not at.exception
    assert all("PSN-" in text for text in pages[:1] + pages[3:])  # pseudonyms are shown ...
    for text in pages:  # ... and nothing that identifies a patient
        found = [x for x in review_run.identifiers if x in text]
        assert not found, found


def test_monitoring_compares_the_run_with_validation(review_run, monkeypatch):
    at = new_app(monkeypatch, review_run).run()
    at.switch_page("views/monitoring.py").run()
    assert not at.exception and at.title[0].value == "Monitoring"
    with Store(review_run.url) as store:
        labels = store.run(review_run.run_id)["labels"]
    summary = at.main.dataframe[0].value
    assert list(summary["label"]) == labels
    assert summary.filter(like="positive rate").notna().all().all()


def test_reviewer_identity_from_oidc_claims():
    sys.path.insert(0, str(DASHBOARD))
    try:
        from identity import oidc_reviewer, providers
    finally:
        sys.path.remove(str(DASHBOARD))
    assert oidc_reviewer({"is_logged_in": False, "email": "a@b"}) is None
    assert oidc_reviewer({"is_logged_in": True, "email": "", "name": "A"}) == "A"
    assert oidc_reviewer({"is_logged_in": True, "sub": "42"}) == "42"
    assert providers(AUTH) == [None]
    assert providers({"cookie_secret": "x", "google": {}, "okta": {}}) == ["google", "okta"]


def test_no_overlay_on_an_image_replaced_after_scoring(review_run, monkeypatch):
    """A map is drawn only on the pixel grid it was made on, never stretched onto a new file."""
    study = review_run.explained[0]
    with Store(review_run.url) as store:
        manifest = pd.read_csv(store.run(review_run.run_id)["manifest"], dtype=str)
    path = Path(manifest.set_index("study_id").at[study, "image"])
    original = path.read_bytes()
    try:
        ds = pydicom.dcmread(path)
        ds.set_pixel_data(np.zeros((ds.Rows + 8, ds.Columns), np.uint16), "MONOCHROME2", 16)
        ds.save_as(path)
        at = open_study(new_app(monkeypatch, review_run).run(), study)
        assert not at.exception and at.get("image")  # the image itself is still shown
        assert "No overlay: the image file has changed since it was scored" in page_text(at)
    finally:
        path.write_bytes(original)
    at = open_study(new_app(monkeypatch, review_run).run(), study)
    assert "No overlay" not in page_text(at)


def test_an_explanation_file_of_another_study_or_damaged_is_never_shown(review_run, monkeypatch):
    """A later run into the same folder rewrites explanations/<id>.npz: another patient's note
    and maps must not appear on this study's page; a damaged file is not a crash."""
    first, second = review_run.explained[:2]
    with Store(review_run.url) as store:
        paths = {
            s: Path(study_view(store, review_run.run_id, s).explanation_path)
            for s in (first, second)
        }
    original = paths[first].read_bytes()
    other_note = Explanation.load_npz(paths[second]).note
    try:
        paths[first].write_bytes(paths[second].read_bytes())  # another study's file in its place
        at = open_study(new_app(monkeypatch, review_run).run(), first)
        text = page_text(at)
        assert not at.exception and "written by another run or for other scores" in text
        assert other_note[:40] not in text
        paths[first].write_bytes(original[: len(original) // 2])  # cut short
        at = open_study(new_app(monkeypatch, review_run).run(), first)
        assert not at.exception and "explanation file cannot be read" in page_text(at)
    finally:
        paths[first].write_bytes(original)
    at = open_study(new_app(monkeypatch, review_run).run(), first)
    assert "explanation file" not in page_text(at)


def test_an_explanation_is_matched_with_its_own_summary_in_the_store(review_run):
    """The file is the run's when the store's record summarises it: the scores a GPU run stored
    (under autocast) may differ from the explanation's float32 ones, its own record does not."""
    sys.path.insert(0, str(DASHBOARD))
    try:
        from panels import summarised_by
    finally:
        sys.path.remove(str(DASHBOARD))
    with Store(review_run.url) as store:
        first, second = (study_view(store, review_run.run_id, s) for s in review_run.explained[:2])
    expl = Explanation.load_npz(first.explanation_path)
    assert summarised_by(expl, first.explanation)
    assert not summarised_by(expl, second.explanation)  # another study's
    shifted = dataclasses.replace(expl, probabilities=expl.probabilities + 0.01)
    assert not summarised_by(shifted, first.explanation)  # other scores: another run's
    assert not summarised_by(expl, {**first.explanation, "probabilities": [0.5]})  # no crash


def test_a_study_id_in_a_title_or_message_reads_as_written():
    """Not maths, bold, a link or HTML: Streamlit renders titles and messages as Markdown."""
    import html

    sys.path.insert(0, str(DASHBOARD))
    try:
        from session import as_written
    finally:
        sys.path.remove(str(DASHBOARD))
    markdown = pytest.importorskip("markdown_it").MarkdownIt()
    for study_id in (
        "S$1$ **b** [l](http://e.x) a&amp;b",
        "1.2.840_x-1",
        "<b>x</b> # h",
        "[Session expired: sign in](https://evil.example/login) ![t](https://evil.example/b.png)",
        "see https://evil.example/login",
    ):
        shown = markdown.renderInline(as_written(study_id)).replace("\u200b", "")
        assert shown == html.escape(study_id, quote=False)
    # an address is broken (a zero-width space) where GitHub-flavoured Markdown (Streamlit's)
    # would make it a link, backslashes or not
    for address in ("https://evil.example/login", "www.evil.example", "admin@evil.example"):
        assert "\u200b" in as_written(address)


def test_window_presets_slices_and_overlay():
    sys.path.insert(0, str(DASHBOARD))
    try:
        from imaging import (
            grey_slice,
            map_slice,
            n_slices,
            opening_slice,
            overlay_rgb,
            window_presets,
        )
    finally:
        sys.path.remove(str(DASHBOARD))
    from clinfuse.data.dicom import DicomImage
    from clinfuse.explain.explanation import overlay_scale
    from clinfuse.explain.render import peak_slice

    volume = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4) * 10
    image = DicomImage(volume, (1.0, 1.0, 1.0), (100.0, 50.0), {"modality": "CT"})
    presets = window_presets(image)
    assert next(iter(presets.items())) == ("file", (100.0, 50.0)) and "lung" in presets
    assert presets["auto (0.5-99.5%)"] == pytest.approx((155.0, 306.9), abs=0.01)  # its pixels'

    assert n_slices(image) == 2
    grey = grey_slice(image, 100.0, 50.0, z=1)  # values 160..310: all above the window
    assert grey.shape == (4, 4) and np.all(grey == 1.0)
    attribution = np.zeros((2, 2, 2), np.float32)
    attribution[1, 0, 0] = 1.0  # slice 1, top-left quarter
    values = map_slice(attribution, (4, 4), z=1, depth=2)
    plain = overlay_rgb(grey * 0.5, None, 0.5)
    shown = overlay_rgb(grey * 0.5, values, 1.0)
    assert np.array_equal(overlay_rgb(grey * 0.5, values, 0.0), plain)
    corner, other = slice(0, len(shown) // 2), slice(len(shown) // 2, None)
    assert not np.array_equal(shown[corner, corner], plain[corner, corner])
    assert np.array_equal(shown[other, other], plain[other, other])
    # a volume's slices share its scale: a slice holding a millionth of the peak stays grey
    attribution[0, 0, 0] = 1e-6
    assert peak_slice(attribution) == 1  # where the page (and the PNG) opens the volume
    for map_depth, depth in ((2, 2), (32, 100), (3, 4), (5, 5)):  # the store's map is coarser
        for peak in range(map_depth):
            z = opening_slice(peak, map_depth, depth)
            assert min(z * map_depth // depth, map_depth - 1) == peak  # map_slice's own rule
    faint = map_slice(attribution, (4, 4), z=0, depth=2)
    top = overlay_scale(attribution)
    assert np.abs(overlay_rgb(grey * 0.5, faint, 1.0, top).astype(int) - plain).max() <= 1
    assert not np.array_equal(overlay_rgb(grey * 0.5, faint, 1.0), plain)  # alone: full
    focal = np.zeros((40, 64, 64), np.float32)  # a finding in 2 slices of 40: drawn still
    focal[20:22, 30:38, 30:38] = 1.0
    assert overlay_scale(focal) == pytest.approx(1.0)
    # evidence on under 0.5 % of the pixels (a small lesion) is drawn at full strength
    small = np.zeros((200, 120), np.float32)
    small[50:55, 60:67] = 0.3  # 35 pixels: the 99.5th percentile is 0
    assert overlay_scale(small) == pytest.approx(0.3)
    assert not np.array_equal(
        overlay_rgb(np.zeros((200, 120)), small, 1.0), overlay_rgb(np.zeros((200, 120)), None, 1.0)
    )
    assert overlay_scale(-small) == 0.0  # nothing raises the score: nothing to draw


def test_a_note_longer_than_the_model_read_says_where_it_stopped():
    def page(note: str, record: dict, dashboard: str) -> None:
        import sys

        sys.path.insert(0, dashboard)
        from panels import note_panel

        note_panel(note, None, record, "copd")

    note = "Chronic cough, COPD. " + "Follow-up history. " * 200
    record = {"note_read": 20, "top_words": {"copd": [[15, 19, 0.8]]}}
    at = AppTest.from_function(page, args=(note, record, str(DASHBOARD))).run()
    assert "read the first 20 of 3,821 characters" in at.warning[0].value
    assert "<mark" in at.get("html")[0].value  # the part read, its evidence marked
    assert at.expander[0].label == "The rest of the note (3,801 characters, not read)"
    assert at.expander[0].text[0].value == note[20:].strip()  # st.text strips the ends


def test_a_note_changed_since_it_was_scored_is_shown_as_the_model_read_it():
    def page(note: str, dashboard: str) -> None:
        import sys

        import numpy as np

        sys.path.insert(0, dashboard)
        from panels import note_panel

        from clinfuse.explain.explanation import Explanation

        read = "Known COPD. Chest clear."
        expl = Explanation(
            study_id="S1",
            labels=("copd",),
            probabilities=np.array([0.9], dtype=np.float32),
            image=None,
            gradcam=None,
            note=read,
            spans=np.array([[0, 5], [6, 10], [12, 17], [18, 23]], dtype=np.int32),
            words=np.array([[0.0, 0.9, 0.0, 0.0]], dtype=np.float32),
            modality=np.zeros((1, 3), dtype=np.float32),
            attention=None,
            delta=np.full((1, 2), np.nan, dtype=np.float32),
            note_read=len(read),
        )
        note_panel(note, expl, None, "copd")

    edited = "Addendum: seen again today. Known COPD. Chest clear."  # spans would miss by 28
    at = AppTest.from_function(page, args=(edited, str(DASHBOARD))).run()
    assert "changed since it was scored" in at.warning[0].value
    html = at.get("html")[0].value
    assert "Addendum" not in html and ">COPD</mark>" in html.replace("\n", "")


def test_a_stored_summary_never_highlights_a_note_changed_since_it_was_scored():
    def page(note: str, dashboard: str) -> None:
        import sys

        sys.path.insert(0, dashboard)
        from panels import note_panel

        from clinfuse.explain.explanation import note_fingerprint

        read = "Known COPD. Chest clear."
        record = {
            "labels": ["copd"],
            "top_words": {"copd": [[6, 10, 0.9]]},
            "note_read": len(read),
            "note_fingerprint": note_fingerprint(read),
        }
        note_panel(note, None, record, "copd")  # no explanation file: the summary's words

    same = AppTest.from_function(page, args=("Known COPD. Chest clear.", str(DASHBOARD))).run()
    assert ">COPD</mark>" in same.get("html")[0].value.replace("\n", "")
    edited = "Addendum: seen again today. Known COPD. Chest clear."
    at = AppTest.from_function(page, args=(edited, str(DASHBOARD))).run()
    assert "changed since it was scored" in at.warning[0].value
    assert not at.get("html") and "token limit" not in "".join(w.value for w in at.warning)
