"""The official `openai` package, pointed at a real server with base_url:
models.list, completions and chat.completions, streaming and not, usage
with cached_tokens, logprobs, and our errors as its exception types."""

from __future__ import annotations

import openai
import pytest
from httpfixtures import MODEL, TOKEN, http_server

import streamgemma as sg

MESSAGES = [{"role": "user", "content": "What is a tuple?"}]


@pytest.fixture(scope="module")
def server():
    with http_server(sg.load("demo"), limits=sg.Limits(max_tokens=256)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    # max_retries=0: a 429 or 503 must surface, not be retried
    with openai.OpenAI(base_url=server.http.url, api_key=TOKEN, max_retries=0, timeout=60) as c:
        yield c


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completions_whole_and_streamed(client):
    whole = client.completions.create(model=MODEL, prompt="The Python", max_tokens=8, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8
    chunks = list(client.completions.create(model=MODEL, prompt="The Python", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_whole_and_streamed_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10, seed=3)
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_the_next_turn_reports_cached_tokens(client):
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    history = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "And a set?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens


def test_logprobs_parse_as_the_package_expects(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy: the likeliest


def test_our_errors_are_the_packages_exception_types(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=-2)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=257)
    with openai.OpenAI(base_url=server.http.url, api_key="wrong", max_retries=0) as other:
        with pytest.raises(openai.AuthenticationError):
            other.models.list()


def test_fields_that_change_nothing_here_are_accepted(client):
    """OpenAI's newer fields (the SDK sends them when a tool sets them) were 400 unknown_field (review)."""
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, seed=3)
    extra = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, seed=3,
                                           safety_identifier="u1", prompt_cache_key="k", verbosity="low",
                                           extra_body={"prompt_cache_retention": "in_memory"})
    assert extra.choices[0].message.content == plain.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, seed=3, stream=True,
                                            stream_options={"include_usage": True, "include_obfuscation": False})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == plain.choices[0].message.content
