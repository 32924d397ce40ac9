from __future__ import annotations

import pytest

from trimperor.core.lifecycle import TABLE, Act, Ev, InvalidTransition, State, mermaid, step


def test_every_state_but_stopped_handles_stop_and_kill() -> None:
    for state in State:
        if state is State.STOPPED:
            continue
        assert step(state, Ev.STOP).next in {State.STOPPING, State.STOPPED}
        assert step(state, Ev.KILL).next in {State.STOPPING, State.STOPPED}


def test_stopped_is_final() -> None:
    assert not [key for key in TABLE if key[0] is State.STOPPED]
    with pytest.raises(InvalidTransition):
        step(State.STOPPED, Ev.TIMER)


def test_every_state_is_reachable_from_waiting() -> None:
    seen, todo = {State.WAITING}, [State.WAITING]
    while todo:
        here = todo.pop()
        for (state, _), tr in TABLE.items():
            if state is here and tr.next not in seen:
                seen.add(tr.next)
                todo.append(tr.next)
    assert seen == set(State)


def test_process_events_only_where_a_process_can_exist() -> None:
    for (state, event), _ in TABLE.items():
        if event is Ev.EXITED:
            assert state in {
                State.STARTING,
                State.RUNNING,
                State.RELOADING,
                State.STOPPING,
                State.SLEEPING,
            }


def test_reload_bypasses_backoff() -> None:
    tr = step(State.WAITING, Ev.RESTART)
    assert tr.actions == (Act.RESET_BACKOFF, Act.SPAWN)
    assert step(State.RUNNING, Ev.RESTART).actions[0] is Act.RESET_BACKOFF


def test_crash_schedules_and_stop_does_not_respawn() -> None:
    assert step(State.RUNNING, Ev.EXITED) == step(State.RUNNING, Ev.SPAWN_FAILED)
    assert step(State.RUNNING, Ev.EXITED).actions == (Act.SCHEDULE,)
    assert step(State.STOPPING, Ev.EXITED).next is State.STOPPED
    assert step(State.STOPPING, Ev.RESTART).actions == ()


def test_mermaid_lists_every_non_trivial_row() -> None:
    diagram = mermaid()
    assert diagram.startswith("stateDiagram-v2")
    assert "running --> reloading: restart / reset_backoff, terminate" in diagram
    assert "stopping --> stopped: exited / finish" in diagram


def test_starting_behaves_like_running_until_ready() -> None:
    assert step(State.RUNNING, Ev.SPAWNED_NOTIFY).next is State.STARTING
    assert step(State.STARTING, Ev.READY).next is State.RUNNING
    for (state, event), tr in TABLE.items():
        if state is State.RUNNING and event not in (Ev.SPAWNED, Ev.SPAWNED_NOTIFY, Ev.READY):
            starting = step(State.STARTING, event)
            assert starting.actions == tr.actions
            assert starting.next is (State.STARTING if tr.next is State.RUNNING else tr.next)
