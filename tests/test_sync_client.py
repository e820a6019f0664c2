"""`sg.Client.connect_sync` (a blocking client for scripts) and the one-call
`complete` of sessions, local and remote."""

from __future__ import annotations

import pytest

import streamgemma as sg
from streamgemma.serve.engine import Engine
from streamgemma.serve.server import Server, serve_in_thread


@pytest.fixture(scope="module")
def model():
    return sg.load("demo")


def test_complete_is_feed_then_generate(model):
    text = model.session().complete("The Python", max_tokens=6, temperature=0)
    s = model.session()
    s.feed("The Python")
    assert text == "".join(t.text for t in s.generate(max_tokens=6, temperature=0))


def test_the_sync_client_opens_appends_generates_and_completes(model):
    with serve_in_thread(Server(Engine(model, max_active=2), port=0, token="t")) as url:
        with sg.Client.connect_sync(url, token="t") as client:
            session = client.open(seed=4)
            assert session.complete("The Python", max_tokens=6, temperature=0) == \
                model.session().complete("The Python", max_tokens=6, temperature=0)
            assert session.position == len(model.tokenizer.encode("The Python", add_bos=True)) + 6
            session.append(" and")
            seen = []
            for token in session.generate(max_tokens=50, stop_token_ids=[]):
                seen.append(token)
                if len(seen) == 3:
                    break  # leaving early cancels the generation on the server
            before = session.position  # counts the tokens generated before the cancel landed
            session.complete(" more", max_tokens=2, stop_token_ids=[])  # the session is usable again
            assert session.position == before + len(model.tokenizer.encode(" more")) + 2
            assert session.snapshot() == session.position
            session.close()
        with pytest.raises(sg.ServerError, match="unauthorized"):
            sg.Client.connect_sync(url, token="wrong")


def test_the_sync_client_resumes_with_what_was_missed_and_sends_input_mid_generation(model):
    with serve_in_thread(Server(Engine(model, max_active=2), port=0)) as url:
        with sg.Client.connect_sync(url) as client:
            session = client.open(seed=4)
            session.append("The Python")
            seen = []
            for token in session.generate(max_tokens=12, stop_token_ids=[]):
                seen.append(token.id)
                if len(seen) == 2:
                    session.send_append(" and")
            assert session.last_done["reason"] == "length" and session.last_done["position"] == session.position
            position = session.position
        with sg.Client.connect_sync(url) as client:
            again = client.open(session, since=position - 4)  # a SyncSession of the closed connection
            assert again.id == session.id and again.position == position
            assert again.missed["ids"] == seen[-4:]


def test_a_script_that_never_closes_its_sync_client_still_exits(model):
    """The client's event loop runs in a daemon thread: the interpreter does not wait for it."""
    import subprocess
    import sys

    from conftest import subprocess_env

    script = ("import sys, streamgemma as sg\n"
              "c = sg.Client.connect_sync(sys.argv[1])\n"
              "print(c.open(seed=0).complete('The Python', max_tokens=3), flush=True)\n")
    with serve_in_thread(Server(Engine(model, max_active=2), port=0)) as url:
        done = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=60,
                              env=subprocess_env())
    assert done.returncode == 0, done.stderr


def test_ctrl_c_inside_a_sync_generate_loop_cancels_the_generation(model):
    """KeyboardInterrupt while the loop waits for a token: the read went on in the client's loop
    thread, closing the iterator failed silently, and the server generated on to max_tokens (the
    next generate failed with "generating"). As in a notebook, the last traceback is kept."""
    import os
    import signal
    import sys
    import threading
    import time

    engine = Engine(model, max_active=2)
    with serve_in_thread(Server(engine, port=0)) as url:
        with sg.Client.connect_sync(url) as client:
            session = client.open(seed=4)
            session.append("The Python")
            threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            try:
                for _ in session.generate(max_tokens=4000, stop_token_ids=[]):
                    pass
            except KeyboardInterrupt:
                sys.last_traceback = sys.exc_info()[2]
            deadline = time.monotonic() + 10
            while engine.sessions[session.id].generation is not None:
                assert time.monotonic() < deadline, "the server is still generating"
                time.sleep(0.01)
            assert len(session.complete(" more", max_tokens=2, stop_token_ids=[])) >= 0  # usable again
            del sys.last_traceback


@pytest.mark.parametrize("where", ["handing the reader to the loop", "waiting for the third token"])
def test_ctrl_c_anywhere_in_the_loop_cancels_the_generation(model, where, monkeypatch):
    """Ctrl-C landing while the iterator handed a read to the loop's thread (not while it waited on
    one): the read ran on, closing the iterator failed ("already running", silenced), and the server
    generated on to max_tokens. Raised here from the hand-over itself, and from a wait."""
    import time

    from streamgemma.client.portal import Feed

    engine = Engine(model, max_active=2)
    with serve_in_thread(Server(engine, port=0)) as url:
        with sg.Client.connect_sync(url) as client:
            session = client.open(seed=4)
            session.append("The Python")
            portal = session._portal
            real_start, real_get, got = portal.start_task_soon, Feed.get, [0]

            def start_task_soon(fn, *args):
                real_start(fn, *args)
                raise KeyboardInterrupt

            def get(feed):
                got[0] += 1
                if got[0] == 3:
                    raise KeyboardInterrupt
                return real_get(feed)

            if where == "handing the reader to the loop":
                monkeypatch.setattr(portal, "start_task_soon", start_task_soon)
            else:
                monkeypatch.setattr(Feed, "get", get)
            with pytest.raises(KeyboardInterrupt):
                for _ in session.generate(max_tokens=4000, stop_token_ids=[]):
                    pass
            monkeypatch.undo()
            deadline = time.monotonic() + 10
            while engine.sessions[session.id].generation is not None:
                assert time.monotonic() < deadline, "the server is still generating"
                time.sleep(0.01)
            assert session.complete(" more", max_tokens=2, stop_token_ids=[]) is not None  # usable again


def test_one_stop_string_is_taken_as_session_generate_takes_it(model):
    """Session.generate(stop="x") works; the client sent the string as is and the server refused it
    ("stop" must be a list; review)."""
    with serve_in_thread(Server(Engine(model, max_active=2), port=0)) as url:
        with sg.Client.connect_sync(url) as client:
            session = client.open(seed=4)
            text = session.complete("The Python", max_tokens=40, temperature=0, stop=" ")
    local = model.session(seed=4).complete("The Python", max_tokens=40, temperature=0, stop=" ")
    assert text == local and " " not in text


def test_reopening_a_session_this_client_holds_gives_the_same_session(model):
    """A second ClientSession replaced the first in the client's books: the first one's position went
    stale (and was then sent as `since` on a reconnect; review)."""
    with serve_in_thread(Server(Engine(model, max_active=2), port=0)) as url:
        with sg.Client.connect_sync(url) as client:
            first = client.open(seed=4)
            first.append("The Python")
            again = client.open(first.id)
            assert again.session is first.session
            first.complete(" more", max_tokens=3, temperature=0, stop_token_ids=[])
            assert again.position == first.position == first.last_done["position"]
