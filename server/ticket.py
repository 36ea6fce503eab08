"""A request's future in the batcher (`Ticket`) and the delivery of finished tickets to the event
loops that await them (`Ticket.wait_on`, `deliver_all`): `concurrent.futures.Future`'s interface
as the server uses it, at a fraction of its cost per request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_PENDING, _RUNNING, _CANCELLED, _FINISHED = range(4)
_TICKETS = threading.Lock()  # guards every ticket's state change (each held for a few instructions)


class Ticket:
    """A request's future in the batcher; gives (outputs, queue_ns, BatchInfo). `leave()`: its
    caller is gone.

    `concurrent.futures.Future`'s interface as the server uses it (done, cancel, cancelled,
    set_running_or_notify_cancel, set_result, set_exception, add_done_callback, result and
    exception with a timeout), without its per-future Condition (a Python lock object and
    more, built for every request: ~7 % of the event loop's time under a stream of chunks). One
    module lock guards the state; a blocking `result()` makes its own Event only then."""

    __slots__ = ("left", "run", "_state", "_value", "_error", "_callbacks", "_event", "_waiter")

    def __init__(self) -> None:
        self.left = False
        self.run = None  # the batcher's run it is part of, once it runs (has `check()`)
        self._state = _PENDING
        self._value = None
        self._error: BaseException | None = None
        self._callbacks: list | None = None
        self._event: threading.Event | None = None
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None  # see `wait_on`

    def done(self) -> bool:
        return self._state >= _CANCELLED

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def cancel(self) -> bool:
        """Cancel a still-queued request (False once it runs or ran)."""
        with _TICKETS:
            if self._state == _CANCELLED:
                return True
            if self._state != _PENDING:
                return False
            self._state = _CANCELLED
        self._settled()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        """False: cancelled while queued (not to be run); else it is running now."""
        with _TICKETS:
            if self._state == _CANCELLED:
                return False
            if self._state != _PENDING:
                raise RuntimeError(f"ticket in state {self._state} cannot start running")
            self._state = _RUNNING
            return True

    def set_result(self, value, deliveries: list | None = None) -> None:
        """`deliveries`: a list that collects this ticket's event-loop delivery (`deliver_all`
        then hands a whole run's to each loop at once) instead of scheduling it now."""
        self._finish(value, None, deliveries)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value, error: BaseException | None, deliveries: list | None = None) -> None:
        with _TICKETS:
            if self._state >= _CANCELLED:
                state = "cancelled" if self._state == _CANCELLED else "done"
                raise concurrent.futures.InvalidStateError(f"ticket already {state}")
            self._value, self._error, self._state = value, error, _FINISHED
        self._settled(deliveries)

    def _settled(self, deliveries: list | None = None) -> None:
        """Wake a blocked `result()`, deliver to a loop's waiter, run the done-callbacks (outside
        the lock)."""
        with _TICKETS:
            callbacks, self._callbacks = self._callbacks, None
            event, waiter, self._waiter = self._event, self._waiter, None
        if event is not None:
            event.set()
        if waiter is not None:
            if deliveries is not None:
                deliveries.append((*waiter, self))
            else:
                deliver_all([(*waiter, self)])
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - as concurrent.futures: a callback's failure is logged
                log.exception("ticket callback %r failed", fn)

    def add_done_callback(self, fn: Callable[[Ticket], None]) -> None:
        with _TICKETS:
            if self._state < _CANCELLED:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)

    def _wait(self, timeout: float | None) -> None:
        if self._state < _CANCELLED:
            with _TICKETS:
                if self._state < _CANCELLED and self._event is None:
                    self._event = threading.Event()
                event = self._event
            if event is not None and not event.wait(timeout) and self._state < _CANCELLED:
                raise concurrent.futures.TimeoutError()
        if self._state == _CANCELLED:
            raise concurrent.futures.CancelledError()

    def result(self, timeout: float | None = None):
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._error

    def wait_on(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """An asyncio future on `loop` with this ticket's outcome: `asyncio.wrap_future` without
        its generality (cancelling the waiter cancels a still-queued ticket)."""
        waiter = loop.create_future()
        waiter.add_done_callback(self._waiter_done)
        with _TICKETS:
            if self._state < _CANCELLED:
                self._waiter = (loop, waiter)  # delivered by `_settled`
                return waiter
        _settle(waiter, self)  # done already: on this loop now
        return waiter

    def _waiter_done(self, waiter: asyncio.Future) -> None:
        if waiter.cancelled():
            self.cancel()

    def leave(self) -> None:
        """The caller is gone: a queued request is not run; a running one's run is stopped once
        every request in it has left (any thread, idempotent)."""
        if self.cancel():
            return
        self.left = True  # before `run` is read: `_Run.check` after `run` is set sees it
        run = self.run
        if run is not None:
            run.check()


def deliver_all(deliveries: list[tuple[asyncio.AbstractEventLoop, asyncio.Future, Ticket]]) -> None:
    """Finished tickets' outcomes to their loop waiters: one hand-off per loop (a call_soon_threadsafe
    and a wake-up of that loop) for all of them, not one per ticket."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for loop, waiter, ticket in deliveries:
        by_loop.setdefault(loop, []).append((waiter, ticket))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_all, pairs)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _settle_all(pairs: list[tuple[asyncio.Future, Ticket]]) -> None:
    for waiter, ticket in pairs:
        _settle(waiter, ticket)


def _settle(waiter: asyncio.Future, ticket: Ticket) -> None:
    """On the loop: the waiter gets the ticket's outcome (unless it was cancelled meanwhile)."""
    if waiter.done():
        return
    if ticket.cancelled():
        waiter.cancel()
        return
    exc = ticket.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(ticket.result())
