"""The web page of docs/browser.md in a real headless Chromium (the system's
`chromium` and `chromedriver`, driven by Selenium; nothing is downloaded),
against a real server on 127.0.0.1 serving the bundled demo model.

Skipped only where no browser is installed; where STREAMGEMMA_REQUIRE_BROWSER
is set (CI) a missing browser is a failure. STREAMGEMMA_SCREENSHOT=PATH also
writes the screenshot there (docs/images/browser-page.png comes from it).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import streamgemma as sg
from streamgemma.serve.engine import Engine
from streamgemma.serve.server import Server, serve_in_thread

TOKEN = "browser tést-token"  # a space and a non-ASCII letter: the page encodes UTF-8
TRANSCRIPT = ["Ada: good morning, the ingest service handled the holiday traffic.",
              "Bob: the queue backed up twice, both times during the nightly export.",
              "Ada: then we move the export to the afternoon window."]


def missing(reason: str):
    if os.environ.get("STREAMGEMMA_REQUIRE_BROWSER"):
        pytest.fail(f"STREAMGEMMA_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed (pip install -e '.[dev]')")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        missing("no Chromium and chromedriver on PATH (Debian: apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with both paths given, Selenium fetches nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1500", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server():
    srv = Server(Engine(sg.load("demo", device="cpu"), max_active=4), port=0, token=TOKEN)
    with serve_in_thread(srv):
        yield srv


def wait_for(condition, timeout: float = 20.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def page_state(d) -> dict:
    """The figures and status, read in one round trip."""
    return d.execute_script("""
        const text = (id) => document.getElementById(id).textContent;
        return {state: document.body.dataset.state, tokens: text('fig-tokens'), position: text('fig-position'),
                status: text('status'), error: document.getElementById('error').hidden ? '' : text('error'),
                snapshot: text('fig-snapshot'), stateSize: text('fig-state'), ttft: text('fig-ttft'),
                rate: text('fig-rate')};""")


def fill(d, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = d.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def idle_after(d, what: str, timeout: float = 30.0) -> dict:
    """Wait until the page has no generation or request running."""
    wait_for(lambda: d.execute_script("return !document.getElementById('send').disabled"), timeout, what)
    return page_state(d)


def test_the_page_streams_snapshots_and_resumes_after_a_reload(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    base = f"http://127.0.0.1:{server.port}/"
    d.get(base)
    assert d.title == "streamgemma"

    # A wrong token is refused, visibly.
    fill(d, "token", "not-the-token")
    d.find_element(By.ID, "open-new").click()
    error = wait_for(lambda: page_state(d)["error"], what="the refusal")
    assert "refused" in error and "token" in error
    assert d.find_element(By.ID, "error").is_displayed()

    # The right token opens a session.
    fill(d, "token", TOKEN)
    d.find_element(By.ID, "open-new").click()
    wait_for(lambda: "opened" in page_state(d)["status"], what="the session to open")
    session_id = d.find_element(By.ID, "current-session").get_attribute("value")
    assert len(session_id) == 22 and page_state(d)["error"] == ""
    assert "MiB" in page_state(d)["stateSize"]

    # A prompt, sent from the keyboard: the token count grows while it streams.
    fill(d, "max-tokens", "200")
    fill(d, "seed", "3")
    prompt = d.find_element(By.ID, "prompt")
    prompt.send_keys("What does the logging module do?")
    started = time.monotonic()
    prompt.send_keys(Keys.ENTER)
    seen = []  # (seconds, tokens) while generating
    while time.monotonic() - started < 30:
        now = page_state(d)
        if now["state"] == "generating" and int(now["tokens"]) > 0:
            seen.append((time.monotonic() - started, int(now["tokens"])))
        elif seen and now["state"] != "generating":
            break
        time.sleep(0.03)
    done = idle_after(d, "the first generation")
    final = int(done["tokens"])
    counts = [n for _, n in seen]
    rising = [b for a, b in zip(counts, counts[1:]) if b > a]
    assert len(rising) >= 2 and counts[0] < final, f"no growth seen while streaming: {seen}"
    assert final > 20 and "ms" in done["ttft"] and float(done["rate"]) > 0
    assert d.find_elements(By.CSS_SELECTOR, "#chat-log .message.model .text")[-1].text.strip()

    # Snapshot: stored on the server at the current position.
    d.find_element(By.ID, "snapshot").click()
    snap = wait_for(lambda: "position" in page_state(d)["snapshot"] and page_state(d)["snapshot"], what="the snapshot")
    position = int(page_state(d)["position"])
    assert snap.startswith(f"position {position},") and position > final
    assert session_id in server.engine.store.list()

    # Reload: the token and the session id are still in this tab; resume continues the same session.
    d.refresh()
    wait_for(lambda: d.find_element(By.ID, "session-id").get_attribute("value") == session_id, what="the reload")
    assert d.find_element(By.ID, "token").get_attribute("value") == TOKEN
    assert TOKEN not in d.current_url
    d.find_element(By.ID, "resume").click()
    wait_for(lambda: "resumed" in page_state(d)["status"], what="the resume")
    assert int(page_state(d)["position"]) == position  # where it was before the reload
    assert page_state(d)["snapshot"] == snap
    assert len(d.find_elements(By.CSS_SELECTOR, "#chat-log .message")) == 2  # the conversation so far
    fill(d, "max-tokens", "30")
    d.find_element(By.ID, "prompt").send_keys("And the queue module?")
    d.find_element(By.ID, "send").click()
    wait_for(lambda: page_state(d)["state"] == "generating" or int(page_state(d)["position"]) > position,
             what="the second generation")
    after = idle_after(d, "the second generation")
    assert int(after["position"]) > position + int(after["tokens"]) > position
    assert len(d.find_elements(By.CSS_SELECTOR, "#chat-log .message")) == 4

    # The transcript pane: a file uploaded, its lines streamed one by one, a summary every 2 lines.
    transcript = tmp_path / "meeting.txt"
    transcript.write_text("\n".join(TRANSCRIPT) + "\n\n", encoding="utf-8")
    d.find_element(By.ID, "transcript-file").send_keys(str(transcript))
    wait_for(lambda: TRANSCRIPT[-1] in d.find_element(By.ID, "transcript-text").get_attribute("value"),
             what="the file to load")
    fill(d, "every", "2")
    fill(d, "summary-tokens", "12")
    d.find_element(By.ID, "transcript-start").click()
    wait_for(lambda: "Transcript streamed: 3 lines" in page_state(d)["status"], 30, "the transcript")
    assert len(d.find_elements(By.CSS_SELECTOR, "#summaries .summary")) == 2  # after lines 2 and 3
    assert int(page_state(d)["position"]) > int(after["position"])

    # Nothing came from elsewhere, and the page broke no rule of its Content-Security-Policy.
    resources = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(base) for url in resources), resources
    messages = [entry["message"] for entry in d.get_log("browser")]
    assert not [m for m in messages if "Content Security Policy" in m], messages

    d.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "browser-page.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("STREAMGEMMA_SCREENSHOT"):
        Path(os.environ["STREAMGEMMA_SCREENSHOT"]).write_bytes(shot.read_bytes())

    # Escape cancels a generation; the session id copies; Close ends the session for good.
    fill(d, "max-tokens", "2000")
    d.find_element(By.ID, "prompt").send_keys("Tell me everything.", Keys.ENTER)
    # (The figure still shows the last summary's count until this generation starts.)
    wait_for(lambda: (lambda now: now["state"] == "generating" and int(now["tokens"]) > 3)(page_state(d)),
             what="a long generation")
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    cancelled = idle_after(d, "the cancel")
    assert "(cancelled)" in cancelled["status"] and int(cancelled["tokens"]) < 2000, cancelled
    d.find_element(By.ID, "copy-id").click()
    wait_for(lambda: "copied" in page_state(d)["status"] or page_state(d)["error"], what="the copy")
    assert page_state(d)["status"] == "Session id copied.", page_state(d)
    d.find_element(By.ID, "close").click()
    d.switch_to.alert.accept()  # "Close the session for good?"
    wait_for(lambda: page_state(d)["status"] == "Session closed.", what="the close")
    assert session_id not in server.engine.sessions and session_id not in server.engine.store.list()
    assert d.find_element(By.ID, "send").get_attribute("disabled")


def test_a_refused_reply_closes_its_turn_and_enter_in_the_id_field_resumes(browser, server):
    """A generate the server refused left the model's turn open, so the next message landed inside it; the
    status stayed "Connecting…" after a failed resume, focus was lost, and Enter in the session id field
    opened a new session (the form's submit button) instead of resuming the id."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(f"http://127.0.0.1:{server.port}/")
    fill(d, "token", TOKEN)
    d.find_element(By.ID, "open-new").click()
    wait_for(lambda: "opened" in page_state(d)["status"], what="the session to open")
    session_id = d.find_element(By.ID, "current-session").get_attribute("value")

    fill(d, "temperature", "-1")  # refused by the server
    d.find_element(By.ID, "prompt").send_keys("first")
    d.find_element(By.ID, "send").click()
    refused = wait_for(lambda: page_state(d)["error"], what="the refusal")
    assert "temperature" in refused and page_state(d)["ttft"] == "–"
    assert d.switch_to.active_element.get_attribute("id") == "send"  # (focus was on the body)
    fill(d, "temperature", "0.7")
    fill(d, "max-tokens", "5")
    d.find_element(By.ID, "prompt").send_keys("second", Keys.ENTER)
    idle_after(d, "the reply")

    fill(d, "session-id", "no-such-session")
    d.find_element(By.ID, "session-id").send_keys(Keys.ENTER)
    wait_for(lambda: page_state(d)["error"], what="the failed resume")
    now = page_state(d)
    assert "unknown_session" in now["error"] and now["state"] != "connecting" and "Connecting" not in now["status"]
    assert not d.find_elements(By.CSS_SELECTOR, "#chat-log .message") and now["position"] == "–"

    fill(d, "session-id", session_id)
    d.find_element(By.ID, "session-id").send_keys(Keys.ENTER)  # resumes it (opened a new one before)
    wait_for(lambda: "resumed" in page_state(d)["status"], what="the resume")
    assert d.find_element(By.ID, "current-session").get_attribute("value") == session_id
    d.get("about:blank")  # the page's connection ends: the session is free to read

    with sg.Client.connect_sync(server.url, token=TOKEN) as client:
        def reopened():  # (once the server has seen the page's connection end)
            try:
                return client.open(session_id, since=0)
            except sg.ServerError as e:
                assert e.code == "session_busy"
                return None

        text = wait_for(reopened, what="the session to be free").missed["text"]
    turns = text.split("<start_of_turn>")[1:]
    assert [turn.split("\n", 1)[0] for turn in turns] == ["user", "model", "user", "model"], text
    assert all(turn.rstrip("\n").endswith("<end_of_turn>") for turn in turns[:-1]), text
