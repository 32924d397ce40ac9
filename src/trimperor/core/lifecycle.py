"""The vassal lifecycle as a table: (state, event) -> (next state, actions).

Everything a vassal supervisor does is a row of :data:`TABLE`. The supervisor
feeds events in, carries the actions out, and never decides anything else;
``docs/design.md`` shows the same table as a diagram
(:func:`mermaid` generates it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from trimperor.core.errors import InternalError

__all__ = ["TABLE", "Act", "Ev", "InvalidTransition", "State", "Transition", "mermaid", "step"]


class State(enum.Enum):
    WAITING = "waiting"
    """No process; a start is scheduled (first start or backoff)."""
    STARTING = "starting"
    """A ``type = notify`` vassal that has not sent sd_notify's READY=1 yet."""
    RUNNING = "running"
    RELOADING = "reloading"
    """The old process is being stopped so that a new one can start."""
    STOPPING = "stopping"
    ARMED = "armed"
    """On-demand and asleep: no process; the first connection wakes the vassal."""
    SLEEPING = "sleeping"
    """Idle: the process is being stopped, then the sockets are armed again."""
    STOPPED = "stopped"
    """Final: the configuration is gone and the process with it."""


class Ev(enum.Enum):
    TIMER = "timer"
    """The scheduled start time has come."""
    SPAWNED = "spawned"
    SPAWNED_NOTIFY = "spawned_notify"
    """Spawned a ``type = notify`` vassal: it is starting until READY=1."""
    READY = "ready"
    SPAWN_FAILED = "spawn_failed"
    EXITED = "exited"
    """The process exited (on its own, or because we stopped it)."""
    RESTART = "restart"
    """New configuration or explicit reload, to be done by restarting."""
    SIGNAL = "signal"
    """Explicit reload of a vassal with a reload signal and unchanged command."""
    STOP = "stop"
    KILL = "kill"
    """Stop at once with SIGKILL (second SIGINT)."""
    EXILED = "exiled"
    """The process exited asking not to be respawned (uWSGI's exit status 26)."""
    RETIRE = "retire"
    """The vassal asked to be stopped (uWSGI's idle byte 22 without a socket)."""
    REARM = "rearm"
    """The scheduled start time of an on-demand vassal: arm, do not spawn."""
    WAKE = "wake"
    """A connection is waiting on an armed socket."""
    IDLE = "idle"
    """No connection for ``idle`` seconds (or uWSGI's byte 22 with a socket)."""
    SLEPT = "slept"
    """An on-demand vassal exited by itself with status 0: back to sleep."""


class Act(enum.Enum):
    SPAWN = "spawn"
    SCHEDULE = "schedule"
    """Record the exit and schedule the next start with backoff."""
    RESET_BACKOFF = "reset_backoff"
    TERMINATE = "terminate"
    """Stop signal to the process group; SIGKILL after the stop timeout."""
    KILL = "kill"
    SEND_RELOAD = "send_reload"
    ARM = "arm"
    """Wait for a connection on the held sockets."""
    REBIND = "rebind"
    """Bind the sockets of a changed configuration; wake if no longer on demand."""
    FINISH = "finish"


@dataclass(frozen=True, slots=True)
class Transition:
    next: State
    actions: tuple[Act, ...] = ()


class InvalidTransition(InternalError):
    pass


S, E, A, T = State, Ev, Act, Transition

TABLE: dict[tuple[State, Ev], Transition] = {
    (S.WAITING, E.TIMER): T(S.RUNNING, (A.SPAWN,)),
    (S.WAITING, E.RESTART): T(S.RUNNING, (A.RESET_BACKOFF, A.SPAWN)),
    (S.WAITING, E.SIGNAL): T(S.RUNNING, (A.RESET_BACKOFF, A.SPAWN)),
    (S.WAITING, E.STOP): T(S.STOPPED, (A.FINISH,)),
    (S.WAITING, E.KILL): T(S.STOPPED, (A.FINISH,)),
    (S.RUNNING, E.SPAWNED): T(S.RUNNING),
    (S.RUNNING, E.SPAWN_FAILED): T(S.WAITING, (A.SCHEDULE,)),
    (S.RUNNING, E.EXITED): T(S.WAITING, (A.SCHEDULE,)),
    (S.RUNNING, E.RESTART): T(S.RELOADING, (A.RESET_BACKOFF, A.TERMINATE)),
    (S.RUNNING, E.SIGNAL): T(S.RUNNING, (A.RESET_BACKOFF, A.SEND_RELOAD)),
    (S.RUNNING, E.STOP): T(S.STOPPING, (A.TERMINATE,)),
    (S.RUNNING, E.KILL): T(S.STOPPING, (A.KILL,)),
    (S.RUNNING, E.EXILED): T(S.STOPPED, (A.FINISH,)),
    (S.RUNNING, E.RETIRE): T(S.STOPPING, (A.TERMINATE,)),
    (S.RELOADING, E.RETIRE): T(S.RELOADING),
    (S.STOPPING, E.RETIRE): T(S.STOPPING),
    (S.RELOADING, E.EXITED): T(S.RUNNING, (A.SPAWN,)),
    (S.RELOADING, E.RESTART): T(S.RELOADING),
    (S.RELOADING, E.SIGNAL): T(S.RELOADING),
    (S.RELOADING, E.STOP): T(S.STOPPING),
    (S.RELOADING, E.KILL): T(S.STOPPING, (A.KILL,)),
    (S.STOPPING, E.EXITED): T(S.STOPPED, (A.FINISH,)),
    (S.STOPPING, E.RESTART): T(S.STOPPING),
    (S.STOPPING, E.SIGNAL): T(S.STOPPING),
    (S.STOPPING, E.STOP): T(S.STOPPING),
    (S.STOPPING, E.KILL): T(S.STOPPING, (A.KILL,)),
    # on demand
    (S.WAITING, E.REARM): T(S.ARMED, (A.ARM,)),
    (S.WAITING, E.SPAWN_FAILED): T(S.WAITING, (A.SCHEDULE,)),
    (S.ARMED, E.WAKE): T(S.RUNNING, (A.SPAWN,)),
    (S.ARMED, E.SPAWN_FAILED): T(S.WAITING, (A.SCHEDULE,)),
    (S.ARMED, E.RESTART): T(S.ARMED, (A.RESET_BACKOFF, A.REBIND)),
    (S.ARMED, E.SIGNAL): T(S.ARMED),
    (S.ARMED, E.IDLE): T(S.ARMED),
    (S.ARMED, E.STOP): T(S.STOPPED, (A.FINISH,)),
    (S.ARMED, E.KILL): T(S.STOPPED, (A.FINISH,)),
    (S.RUNNING, E.IDLE): T(S.SLEEPING, (A.TERMINATE,)),
    (S.RUNNING, E.SLEPT): T(S.ARMED, (A.ARM,)),
    (S.SLEEPING, E.EXITED): T(S.ARMED, (A.ARM,)),
    (S.SLEEPING, E.RESTART): T(S.SLEEPING),
    (S.SLEEPING, E.SIGNAL): T(S.SLEEPING),
    (S.SLEEPING, E.IDLE): T(S.SLEEPING),
    (S.SLEEPING, E.RETIRE): T(S.SLEEPING),
    (S.SLEEPING, E.STOP): T(S.STOPPING),
    (S.SLEEPING, E.KILL): T(S.STOPPING, (A.KILL,)),
    (S.RELOADING, E.IDLE): T(S.RELOADING),
    (S.STOPPING, E.IDLE): T(S.STOPPING),
    # sd_notify readiness
    (S.RUNNING, E.SPAWNED_NOTIFY): T(S.STARTING),
    (S.STARTING, E.READY): T(S.RUNNING),
    (S.RUNNING, E.READY): T(S.RUNNING),
}

# Until READY=1, a starting vassal is handled exactly like a running one.
for (_state, _event), _tr in list(TABLE.items()):
    if _state is S.RUNNING and _event not in (E.SPAWNED, E.SPAWNED_NOTIFY, E.READY):
        _next = S.STARTING if _tr.next is S.RUNNING else _tr.next
        TABLE[S.STARTING, _event] = T(_next, _tr.actions)
for _state in (S.RELOADING, S.STOPPING, S.SLEEPING):
    TABLE[_state, E.READY] = T(_state)


def step(state: State, event: Ev) -> Transition:
    try:
        return TABLE[state, event]
    except KeyError:
        raise InvalidTransition(f"no transition from {state.value} on {event.value}") from None


def mermaid() -> str:
    """The table as a Mermaid state diagram (for the design page)."""
    lines = ["stateDiagram-v2", "    [*] --> waiting"]
    for (state, event), tr in TABLE.items():
        if tr.next is state and not tr.actions:
            continue  # ignored events clutter the picture
        label = event.value
        if tr.actions:
            label += " / " + ", ".join(a.value for a in tr.actions)
        lines.append(f"    {state.value} --> {tr.next.value}: {label}")
    lines.append("    stopped --> [*]")
    return "\n".join(lines)
