"""The public API at its edges: configs that gave NaN logits or bare tracebacks, load arguments checked after a
download, pool bounds of the wrong type, chat turns fed unchecked, the chat console's blocks and stats (each
found by a review)."""

from __future__ import annotations

import io
import json
import math

import pytest
from textfixtures import text_model

import streamgemma as sg
from streamgemma.console import Stats, read_turn
from streamgemma.model import pool as pool_module


@pytest.mark.parametrize("field,value", [("logits_soft_cap", math.nan), ("logits_soft_cap", -1.0),
                                         ("rms_norm_eps", -1.0), ("rms_norm_eps", 0.0), ("rope_base", 0.0),
                                         ("rope_base", math.inf), ("rope_base", "x"),
                                         ("embeddings_scale_by_sqrt_dim", "no"),
                                         pytest.param("rope_base", 10 ** 400, id="rope_base-huge-int"),
                                         pytest.param("rms_norm_eps", -10 ** 400, id="rms_norm_eps-huge-int")])
def test_config_fields_that_gave_nan_logits_or_deep_errors_are_refused(field, value):
    with pytest.raises(sg.ConfigError, match=field):
        sg.GriffinConfig.preset("tiny", **{field: value})


def test_from_dict_names_missing_fields_and_bad_types_apart():
    fields = sg.GriffinConfig.preset("tiny").to_dict()
    with pytest.raises(sg.ConfigError, match=r"missing fields \['width'\]"):
        sg.GriffinConfig.from_dict({k: v for k, v in fields.items() if k != "width"})
    with pytest.raises(sg.ConfigError, match="logits_soft_cap") as e:
        sg.GriffinConfig.from_dict({**fields, "logits_soft_cap": "30"})
    assert "incomplete" not in str(e.value)


@pytest.mark.parametrize("change", [{"num_attention_heads": 0, "head_dim": 16}, {"rope_theta": 0.0},
                                    {"streamgemma_embeddings_scale_by_sqrt_dim": "false"}])
def test_a_bad_hf_config_is_a_checkpoint_error(tmp_path, change):
    sg.Model.random(sg.GriffinConfig.preset("tiny"), device="cpu").save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(sg.CheckpointError):  # (a bare ZeroDivisionError; NaN logits; "false" read as True)
        sg.load(tmp_path, progress=False)


@pytest.mark.parametrize("kwargs,error", [(dict(device="cdua"), sg.DeviceError), (dict(dtype="bf16"), sg.DeviceError),
                                          (dict(max_sessions=0), ValueError), (dict(max_state_bytes="1"), TypeError),
                                          (dict(config={"width": 8}), TypeError)])
def test_load_checks_its_arguments_before_a_hub_download(monkeypatch, kwargs, error):
    from streamgemma.model import hub

    def download(source):
        raise AssertionError("downloaded before the arguments were checked")

    monkeypatch.setattr(hub, "download", download)
    with pytest.raises(error):
        sg.load("someone/some-model", **kwargs)


@pytest.mark.parametrize("kwargs,error", [(dict(max_sessions=2.5), TypeError), (dict(max_sessions="4"), TypeError),
                                          (dict(max_state_bytes=1), ValueError), (dict(prefill_chunk=-1), ValueError),
                                          (dict(seed=None), TypeError), (dict(seed=1 << 64), ValueError)])
def test_model_arguments_are_checked_up_front(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        sg.Model.random(sg.GriffinConfig.preset("tiny"), device="cpu", **kwargs)
    with pytest.raises(TypeError, match="GriffinConfig"):
        sg.Model.random("tiny")


def test_a_container_with_no_memory_left_is_not_taken_for_one_without_a_limit(monkeypatch):
    monkeypatch.setattr(pool_module, "_cgroup_headroom", lambda: 0)
    assert pool_module.available_memory(sg.Model.random(sg.GriffinConfig.preset("tiny"), device="cpu").device) == 0


def test_a_file_named_demo_does_not_hide_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("print('a script')\n")
    assert sg.load("demo").tokenizer is not None


@pytest.mark.parametrize("messages", [{"role": "user", "content": "hi"},
                                      (m for m in [{"role": "user", "content": "hi"}]),
                                      [("user", "hi"), ("model", "yo")], [("system", "be brief")],
                                      [("assistant", "x"), ("user", "y")], [("user", 5)], [("user", "hi", "x")]])
def test_from_messages_checks_what_it_feeds(messages):
    session = text_model().session()
    with pytest.raises(ValueError):
        sg.Chat.from_messages(session, messages)
    assert session.position == 0


def test_a_block_opened_by_quotes_alone_ends_only_at_quotes_alone():
    pasted = 'def f():\n    """Return one."""\n    return 1\n'
    assert read_turn(io.StringIO(f'"""\n{pasted}"""\nnext\n'), None) == pasted.rstrip("\n")
    assert read_turn(io.StringIO('"""first\nsecond"""\n'), None) == "first\nsecond"
    docstring = 'def f(x):\n    """Add one.\n\n    Longer text.\n    """\n    return x + 1\n'  # (PEP 257)
    assert read_turn(io.StringIO(f'"""\n{docstring}"""\n'), None) == docstring.rstrip("\n")


def test_stats_of_a_reply_without_tokens_report_no_negative_time():
    stats = Stats(position=0)
    stats.prompt_read(12)
    list(stats.count([]))
    assert "-" not in stats.summary().split("generated:")[1]


def test_user_turns_given_as_tuples_are_trimmed_as_dicts_are():
    tok = text_model().tokenizer
    from streamgemma.session.chat_template import chat_prompt_ids

    assert chat_prompt_ids(tok, [("user", "  hi  ")]) == chat_prompt_ids(tok, [{"role": "user", "content": "  hi  "}])
