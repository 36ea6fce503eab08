"""`Gate.inline`: whether a lone call runs on the event loop. It tells a call that was queued
while the loop ran the previous one (the loop busy all the while since that call ended) from a
lone client's next call (the loop idle while the client read its reply), by the loop thread's
own CPU time, not by the wall time between the calls (the same ~1 ms for both, measured)."""

from __future__ import annotations

import threading
import time

from server.gate import INLINE_GAP_S, INLINE_IDLE_S, Gate
from server.handlers import Admission


def _busy(cpu_s: float) -> None:
    """Keep this thread on the CPU for `cpu_s` of its own CPU time (the loop's work after a call)."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def _decision(gate: Gate) -> bool:
    with gate.call():
        return gate.inline()


def test_a_call_taken_up_while_the_loop_stayed_busy_goes_to_a_thread():
    """After a call ends, 1.5 ms of loop work (more than the old 1 ms wall-time gap), no idle: the
    next call could have been waiting behind it, so it does not run on the loop. A trial counts
    only if this thread was not preempted meanwhile (a shared machine): one clean trial is enough."""
    gate = Gate(None, Admission())
    decisions = []
    for _ in range(20):
        with gate.call():
            pass
        _busy(3 * INLINE_GAP_S / 2)
        decisions.append(_decision(gate))
    assert not all(decisions), "every call ran inline although the loop never idled since the last one ended"


def test_a_lone_clients_next_call_runs_on_the_loop():
    """The loop idle for a while since the last call ended (a lone client reading its reply,
    well under the old 1 ms gap): the call runs inline."""
    gate = Gate(None, Admission())
    with gate.call():
        pass
    time.sleep(3 * INLINE_IDLE_S)
    assert _decision(gate)


def test_calls_in_progress_together_keep_the_loop_free():
    gate = Gate(None, Admission())
    with gate.call():
        with gate.call():
            assert not gate.inline()  # two at once
    time.sleep(3 * INLINE_IDLE_S)
    assert not _decision(gate)  # the next half second is marked busy


def test_a_call_ended_on_another_thread_falls_back_to_the_wall_time_gap():
    """The loop thread's CPU time says nothing about a call another thread ended: then only the
    wall time since it ended counts."""
    gate = Gate(None, Admission())

    def one_call() -> None:
        with gate.call():
            pass

    def after_other_thread(wait_s: float) -> bool:
        worker = threading.Thread(target=one_call)
        worker.start()
        worker.join()
        time.sleep(wait_s)
        return _decision(gate)

    # idle (a sleep) but within INLINE_GAP_S of its end: not inline (a trial may overrun the gap
    # on a shared machine: one in time is enough)
    assert not all(after_other_thread(3 * INLINE_IDLE_S) for _ in range(10))
    assert after_other_thread(2 * INLINE_GAP_S)
