"""The batcher's ticket: concurrent.futures.Future's behaviour as the server relies on it, and the
hand-off of a run's answers to the event loops awaiting them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from server.ticket import Ticket, deliver_all


def test_states_as_concurrent_futures():
    queued = Ticket()
    assert not queued.done() and queued.cancel() and queued.cancelled() and queued.done()
    assert queued.cancel()  # again: still cancelled
    assert not queued.set_running_or_notify_cancel()  # the batcher skips it
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(0)

    running = Ticket()
    assert running.set_running_or_notify_cancel()
    assert not running.cancel() and not running.cancelled()  # a running request is not cancelled
    with pytest.raises(RuntimeError):
        running.set_running_or_notify_cancel()
    running.set_result(("out", 1))
    assert running.done() and running.result() == ("out", 1) and running.exception() is None
    with pytest.raises(concurrent.futures.InvalidStateError):
        running.set_result("again")

    failed = Ticket()
    failed.set_running_or_notify_cancel()
    failed.set_exception(ValueError("bad"))
    assert isinstance(failed.exception(), ValueError)
    with pytest.raises(ValueError, match="bad"):
        failed.result()


def test_result_blocks_until_set_from_another_thread_and_times_out():
    t = Ticket()
    with pytest.raises(concurrent.futures.TimeoutError):
        t.result(0.05)
    threading.Timer(0.05, t.set_result, args=("late",)).start()
    t0 = time.monotonic()
    assert t.result(5) == "late"
    assert time.monotonic() - t0 < 2


def test_done_callbacks_run_once_even_when_added_after():
    seen = []
    t = Ticket()
    t.add_done_callback(lambda f: seen.append(("before", f.result())))
    t.add_done_callback(lambda f: 1 / 0)  # a failing callback is logged; the others still run
    t.add_done_callback(lambda f: seen.append(("before2", f.result())))
    t.set_result(7)
    t.add_done_callback(lambda f: seen.append(("after", f.result())))
    assert seen == [("before", 7), ("before2", 7), ("after", 7)]


def test_a_runs_answers_reach_the_loop_in_one_hand_off():
    """Tickets finished with a delivery list are handed to their loop by one call_soon_threadsafe;
    each waiter gets its own ticket's outcome; a waiter cancelled meanwhile cancels a queued ticket
    and is left alone when its (running) ticket finishes."""
    loop = asyncio.new_event_loop()
    calls = []
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        calls.append(args[0].__name__)
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting
    try:
        tickets = [Ticket() for _ in range(5)]
        waiters = [t.wait_on(loop) for t in tickets]
        for t in tickets:
            t.set_running_or_notify_cancel()
        waiters[4].cancel()  # the caller left while its request ran

        def finish() -> None:
            deliveries: list = []
            for i, t in enumerate(tickets):
                t.set_result(i, deliveries)
            assert len(deliveries) == 5 and not calls  # collected, nothing scheduled yet
            deliver_all(deliveries)

        async def main():
            await asyncio.get_running_loop().run_in_executor(None, finish)
            return await asyncio.gather(*waiters[:4])

        assert loop.run_until_complete(main()) == [0, 1, 2, 3]
        assert calls.count("_settle_all") == 1  # (the executor hop adds its own, "_set_state")
        assert waiters[4].cancelled()

        queued = Ticket()
        waiter = queued.wait_on(loop)
        waiter.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        assert queued.cancelled()  # not run: its caller is gone

        done = Ticket()
        done.set_result("now")
        assert done.wait_on(loop).result() == "now"  # already finished: delivered at once
    finally:
        loop.close()
