"""The relay engine waits in trio's place while trio has nothing else to do.

Why. The engine (connmgr/proxy/engine.py) pumps every plain-TCP session over one epoll
set, and used to wait for it as any trio task waits for a descriptor:
``wait_readable(epoll)``. Each wakeup then went through trio's whole scheduler: the
run loop's deadline and instrument checks, ``epoll_wait`` on trio's set, rescheduling the
engine task, and an ``epoll_ctl`` to arm the descriptor again, plus an empty ``poll`` of
the engine's set before going back. With one busy client that is two wakeups per query,
and callgrind put more than half of connmgr's instructions per query in it.

How. When trio has nothing to run (its run queue is empty and no deadline is due), the
engine may block in trio's place: on a third epoll set holding the engine's set and
trio's own. It returns as soon as either is ready:

* the engine's set: sessions to pump, without a trip through the scheduler;
* trio's set: something else (a listener, a timer task's socket, a cross-thread or
  signal wakeup, a child process) needs trio, and the engine goes back to
  ``wait_readable`` (trio's run loop then takes its events as usual);
* the next deadline: the engine goes back to trio, which expires it.

Nothing trio would have done is skipped or delayed: the engine blocks only when trio
would have blocked in ``epoll_wait`` itself, for no longer than trio would have, and wakes
for everything that would have woken trio. Sets nest without a loop (trio's set holds the
engine's; the third holds both and is held by none).

"Trio has nothing to run" needs care: trio runs its runnable tasks in batches, and a
batch is taken off the run queue before its first task runs. The tasks behind the engine
in its own batch are in neither the run queue nor trio's epoll set; an engine that blocked
then would hold them up until the next deadline (a test caught exactly that: new clients
waited seconds to be accepted). So the first time the engine would wait in a task step, it
looks at the batch trio is running (:meth:`IdleWait._batch_done`) and waits only if it is
the batch's last task; until its next step, nothing else can join that batch.

This reads trio's run-loop state (``runq``, ``deadlines``, ``clock``, the I/O manager's
epoll), which is not public API. :class:`IdleWait` checks that it finds them as expected
and otherwise reports why and stays off (the engine then waits as before); so do a
non-system clock (tests' MockClock), guest mode, instruments and
``wait_all_tasks_blocked``. ``CONNMGR_ENGINE_IDLE_WAIT=0`` turns it off.
"""

from __future__ import annotations

import os
import select
import sys

__all__ = ["IdleWait", "open_idle_wait"]

#: the longest one wait lasts before trio gets the thread back anyway
MAX_WAIT = 1.0


class IdleWait:
    """A wait on the engine's epoll set ``engine_fd`` and trio's, for the trio run this is
    created in. Use :func:`open_idle_wait`."""

    def __init__(self, runner, engine_fd: int, trio_fd: int, loop_code) -> None:
        self._runner = runner
        #: the code of trio's run loop, whose local ``batch`` holds the tasks still to run
        self._loop_code = loop_code
        #: whether the engine ran last in its batch (None: not looked yet, this step)
        self._last: bool | None = None
        self._runq = runner.runq
        self._deadlines = runner.deadlines
        self._clock = runner.clock
        self._trio_fd = trio_fd
        self._set = select.epoll()
        self._set.register(engine_fd, select.EPOLLIN)
        self._set.register(trio_fd, select.EPOLLIN)
        self._poll = self._set.poll
        #: waits that ended with the engine's set ready (no trip through trio)
        self.waits = 0

    def wait(self) -> bool:
        """Block while neither set is ready, if trio has nothing to run: True when the
        engine's set is ready and trio's is not, False when trio needs the thread (a task
        to run, a deadline due, its own set ready)."""
        runner = self._runner
        if self._runq or runner.waiting_for_idle:
            return False
        if self._last is None:
            self._last = self._batch_done()
        if not self._last:
            return False
        timeout = self._clock.deadline_to_sleep_time(self._deadlines.next_deadline())
        if not timeout > 0:
            return False
        ready = self._poll(timeout if timeout < MAX_WAIT else MAX_WAIT, 2)
        if not ready:
            return False
        trio_fd = self._trio_fd
        for fd, _events in ready:
            if fd == trio_fd:
                return False
        self.waits += 1
        return True

    def step(self) -> None:
        """The engine got the thread from trio again (a new task step, a new batch)."""
        self._last = None

    def _batch_done(self) -> bool:
        """Whether trio's batch has no task left to run after this one."""
        frame = sys._getframe(1)
        code = self._loop_code
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        if frame is None:
            return False
        batch = frame.f_locals.get("batch")
        return batch is not None and not batch

    def close(self) -> None:
        self._set.close()


def open_idle_wait(engine_fd: int) -> tuple[IdleWait | None, str]:
    """An :class:`IdleWait` for the current trio run, or (None, why not)."""
    if os.environ.get("CONNMGR_ENGINE_IDLE_WAIT", "1") == "0":
        return None, "CONNMGR_ENGINE_IDLE_WAIT=0"
    try:
        from trio._core import _run

        runner = _run.GLOBAL_RUN_CONTEXT.runner
        trio_fd = runner.io_manager._epoll.fileno()
        loop_code = _run.unrolled_run.__code__
        known = (runner.runq is not None and runner.waiting_for_idle is not None
                 and callable(runner.deadlines.next_deadline) and callable(runner.clock.deadline_to_sleep_time)
                 and "batch" in loop_code.co_varnames)  # fmt: skip
    except (ImportError, AttributeError) as e:
        return None, f"trio's run loop is not as this connmgr knows it ({e})"
    if not known:
        return None, "trio's run loop is not as this connmgr knows it"
    if type(runner.clock) is not _run.SystemClock:
        return None, f"trio runs with {type(runner.clock).__name__}, not its system clock"
    if runner.is_guest:
        return None, "trio runs in guest mode"
    if runner.instruments.get("_all"):
        return None, "trio instruments are installed"
    return IdleWait(runner, engine_fd, trio_fd, loop_code), ""
