"""One real browser on the real server: `streamlit run dashboard/app.py -- --store URL` driven
by Debian's Chromium through Playwright: name the reviewer, open the worklist, open a study,
reload it and land on it again, save a verdict with the keyboard, and find it in the store.
Skipped only without Chromium or Playwright (never downloads a browser)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from clinfuse.store import Store

pytest.importorskip("streamlit")
from test_dashboard import APP, DASHBOARD, build_review_run  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 90_000  # generous: the first page imports torch on two shared CPU cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(port: int, server: subprocess.Popen, seconds: float = 120) -> None:
    """Poll Streamlit's health endpoint until the server answers (or fail with its log)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail("streamlit did not start")


@pytest.fixture
def server(small_export, tiny_model, tmp_path_factory, tmp_path):
    """The dashboard served on a free port of 127.0.0.1, on the review store; (url, run)."""
    run = build_review_run(small_export, tiny_model, tmp_path_factory.getbasetemp())
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true"]
    command += ["--server.port", str(port), "--server.address", "127.0.0.1"]
    command += ["--browser.gatherUsageStats", "false", "--", "--store", run.url]
    env = {k: v for k, v in os.environ.items() if k != "CLINFUSE_STORE"}
    log = (tmp_path / "streamlit.log").open("w")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        wait_until_healthy(port, process)
        yield f"http://127.0.0.1:{port}", run
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def settled(page, locator):
    """`locator` once the page has stopped rerunning: one element, the same for a second (a
    rerun keeps the last run's elements on the page until it replaces them)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    for _ in range(2):
        sync_api.expect(locator).to_have_count(1)
        page.wait_for_timeout(1000)
    return locator


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
)
def test_review_a_study_in_a_real_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    base, run = server
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(base)
            page.get_by_label("Reviewer name").fill("Dr Browser")
            page.get_by_role("button", name="Start reviewing").click()
            page.get_by_role("heading", name="Worklist").wait_for()
            page.get_by_text("studies match").wait_for()
            study = run.explained[0]  # one with an overlay and highlighted words
            chooser = page.get_by_role("combobox", name="Study")
            chooser.click()
            chooser.fill(study)
            chooser.press("Enter")
            page.get_by_role("button", name="Open study").click()
            page.get_by_role("heading", name=f"Study {study}").wait_for()
            page.get_by_text("Decision support, not a diagnosis").first.wait_for()
            page.locator("[data-testid='stImage'] img").wait_for()
            page.locator("mark").first.wait_for()  # the note's evidence words
            page.get_by_role("heading", name="Your verdict").wait_for()
            page.wait_for_timeout(1500)  # let the tables and the image paint
            page.screenshot(path=str(tmp_path / "study.png"))
            page.reload()  # a new session: sign in again, and land on the same study
            page.get_by_label("Reviewer name").fill("Dr Browser")
            page.get_by_role("button", name="Start reviewing").click()
            page.get_by_role("heading", name=f"Study {study}").wait_for()
            assert page.get_by_text("Page not found").count() == 0
            comment = page.get_by_label("Comment")
            comment.fill("checked in the browser")
            comment.press("Enter")  # no verdict chosen yet: Enter must not save agreement
            page.get_by_text("Choose a verdict first").wait_for()
            page.get_by_text("Agree with the model").click()
            comment.press("Enter")  # the comment is kept; Enter presses "Save and next"
            page.get_by_text(f"of {study}: agree with the model").wait_for()
            following = parse_qs(urlparse(page.url).query)["study"][0]
            page.get_by_role("heading", name=f"Study {following}").wait_for()
            verdict = settled(page, page.get_by_role("radiogroup", name="Verdict"))
            verdict.get_by_text("Agree with the model", exact=True).click()
            save = settled(page, page.get_by_role("button", name="Save", exact=True))
            save.dblclick()  # one verdict, however many clicks
            page.get_by_text(f"of {following}: agree with the model").wait_for()
            settled(page, save).click()  # a fresh form: no verdict chosen
            page.get_by_text("Choose a verdict first").wait_for()
        finally:
            browser.close()
    with Store(run.url) as store:
        saved = [r for r in store.reviews(run.run_id, study) if r["reviewer"] == "Dr Browser"]
        again = [r for r in store.reviews(run.run_id, following) if r["reviewer"] == "Dr Browser"]
    assert [(r["verdict"], r["comment"]) for r in saved] == [("agree", "checked in the browser")]
    assert [r["verdict"] for r in again] == ["agree"]  # a double click saved it once
    assert (tmp_path / "study.png").stat().st_size > 10_000
    if os.environ.get("CLINFUSE_UPDATE_SCREENSHOT"):  # refresh the README's picture on request
        shutil.copyfile(tmp_path / "study.png", DASHBOARD / "screenshot.png")
