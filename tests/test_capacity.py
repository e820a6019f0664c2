"""The state pool's memory budget: opening sessions past it raises
`sg.CapacityError`, never the kernel's OOM killer."""

from __future__ import annotations

import pytest
import torch

import streamgemma as sg
from streamgemma.model.pool import available_memory
from streamgemma.session import model as model_module


def test_ten_thousand_demo_sessions_end_in_a_capacity_error_not_the_oom_killer():
    budget = 64 * 2**20
    model = sg.load("demo", device="cpu", max_state_bytes=budget)
    fits = budget // model.pool.slot_bytes()
    sessions = []
    with pytest.raises(sg.CapacityError) as full:
        for _ in range(10_000):
            sessions.append(model.session())
    assert len(sessions) == fits and isinstance(full.value, sg.StreamgemmaError)
    message = str(full.value)
    assert f"{fits} sessions are open" in message and "max_state_bytes" in message and "64 MiB" in message
    # Closing one makes room for one; the sessions kept their state through the failed growth.
    sessions[0].feed([2, 5, 7])
    sessions.pop().close()
    sessions.append(model.session())
    assert sessions[0].position == 3


def test_max_sessions_bounds_the_pool_too(tiny_config):
    model = sg.Model.random(tiny_config, max_sessions=3)
    sessions = [model.session() for _ in range(3)]
    with pytest.raises(sg.CapacityError, match="max_sessions=3 allows no more"):
        model.session()
    with pytest.raises(sg.CapacityError):
        sessions[0].fork()
    with pytest.raises(ValueError, match=r"max_sessions must be in \[1, inf\]"):
        sg.Model.random(tiny_config, max_sessions=0)


def test_the_default_budget_is_half_the_free_memory(tiny_config, monkeypatch):
    free = available_memory(torch.device("cpu"))
    assert free is not None and free > 0  # Linux: MemAvailable (bounded by the cgroup's limit)
    model = sg.Model.random(tiny_config)
    assert 0 < model.pool.max_bytes <= free // 2 * 1.1
    # A machine with little memory free: the budget follows it.
    monkeypatch.setattr(model_module, "available_memory", lambda device: 8 * model.pool.slot_bytes())
    small = sg.Model.random(tiny_config)
    assert small.pool.max_slots() == 4
    kept = [small.session() for _ in range(4)]
    with pytest.raises(sg.CapacityError):
        small.session()
    assert len(kept) == 4
