"""The tick plan is plain data: planned from the engine's books without a model,
a device or an event loop."""

import pytest

from streamgemma.serve.record import ActiveGeneration, PendingInput, SessionRecord
from streamgemma.serve.scheduler import Scheduler

LIVE = object()  # stands for a live Session: the scheduler only asks whether there is one


def session(name, live=True, queued=0, generating=False, cancelled=False):
    es = SessionRecord(name, LIVE if live else None, position=7)
    if queued:
        es.inputs.append(PendingInput(list(range(queued))))
        es.queued_tokens = queued
    if generating:
        es.generation = ActiveGeneration(generation=None, queue=None)
        es.generation.cancelled = cancelled
    return es


def test_short_input_rides_along_while_others_generate():
    gen = session("g", generating=True)
    short, long = session("s", queued=3), session("l", queued=500)
    plan = Scheduler(step_input_tokens=16, idle_step_input_tokens=1).plan_input([gen], [short, long])
    assert plan.riders == [short] and plan.prefill is long and plan.restore is None and plan.cancelled == []


def test_idle_engine_uses_the_idle_bound():
    three = session("a", queued=3)
    plan = Scheduler(step_input_tokens=16, idle_step_input_tokens=1).plan_input([], [three])
    assert plan.riders == [] and plan.prefill is three
    plan = Scheduler(step_input_tokens=16, idle_step_input_tokens=4).plan_input([], [three])
    assert plan.riders == [three] and plan.prefill is None


def test_a_suspended_session_with_short_input_is_restored_to_ride_along():
    gen = session("g", generating=True)
    away = session("x", live=False, queued=2)
    plan = Scheduler().plan_input([gen], [away])
    assert plan.restore is away and plan.prefill is None and plan.riders == []


def test_the_first_waiting_session_that_cannot_ride_takes_the_prefill_turn():
    a, b = session("a", queued=100), session("b", queued=100)
    assert Scheduler().plan_input([], [a, b]).prefill is a
    assert Scheduler().plan_input([], [b, a]).prefill is b


def test_cancelled_generations_end_and_do_not_count_as_decoding():
    gone = session("c", generating=True, cancelled=True)
    three = session("a", queued=3)
    plan = Scheduler(step_input_tokens=16, idle_step_input_tokens=1).plan_input([gone], [three])
    assert plan.cancelled == [gone] and plan.prefill is three  # nobody decodes: the idle bound applies


def test_closed_sessions_never_ride():
    es = session("a", queued=1)
    es.closed = True
    assert Scheduler().plan_input([session("g", generating=True)], [es]).riders == []


def test_the_decode_batch_is_every_generating_live_session_without_queued_input():
    ready, fed, away = session("r", generating=True), session("f", generating=True, queued=2), \
        session("w", generating=True, live=False)
    rider, drained = session("i", queued=1), session("d")
    plan = Scheduler.plan_decode([ready, fed, away], [rider, drained])
    assert plan.batch == [ready] and plan.riders == [rider] and plan
    assert not Scheduler.plan_decode([fed], [drained])


def test_negative_bounds_are_refused():
    with pytest.raises(ValueError, match="step_input_tokens"):
        Scheduler(step_input_tokens=-1)
