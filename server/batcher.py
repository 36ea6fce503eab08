"""Dynamic batching of ragged sequences: merge concurrent requests into one ONNX Runtime run.

Exporting with `sequence_lens` makes padding harmless, so requests of different lengths can share
one run exactly: pad to the longest sequence in the batch, pass the true lengths, split the
outputs back per request and trim `y` to each request's own time size.

Policy (per model version):
- a batch starts with the oldest queued request (no starvation), then takes the queued
  requests whose time size is closest to it, until `max_batch` sequences; so padding stays small;
- it waits at most `max_queue_delay_us` after the oldest request arrived for more to come; with
  the default 0, a request that finds the model idle runs at once in its own thread (no hand-off),
  and requests that arrive while a run is in progress are merged into the next run;
- eager (no delay asked for) but busy: when a run ends with requests already waiting, or a
  merged run ended less than `COALESCE_RECENT_S` ago, the next run waits for company while
  requests keep arriving (each within `COALESCE_GAP_S` of the last, `COALESCE_MAX_S` at most):
  where the threads that accept requests share cores with the run, they could not queue much
  while it ran, and runs of one row each cost nearly as much as a run of many (a lone request,
  finding the model idle and no merged run lately, never waits). The "lately": under a closed
  loop of many clients, the first request after a merged run arrives once the loop has sent
  that run's replies, with the queue empty; run at once, it ran alone, and so did the next ones
  while each run left the loop time for just one more (measured: 70 % of runs had one request);
- a request larger than `max_batch` runs alone (never refused for its size);
- `preferred_batch_size` (Triton's): the wait also ends when the queued rows make one of these
  sizes, and a run takes the largest preferred size the queue can fill (else up to max_batch);
  `ready_rows` (Triton's direct `minimum_slot_utilization` x max_batch_size): the wait also ends
  once that many rows are queued;
- the queue is bounded: when `max_queue` requests wait, a new one gets RESOURCE_EXHAUSTED;
- a request whose client deadline passed while queued is not run (DEADLINE_EXCEEDED), nor one whose
  caller cancelled its future while queued (an asyncio frontend whose client went away);
- a run is stopped (ONNX Runtime's terminate flag, `runtime.RunControl`) once every request in it
  has left (`Ticket.leave`: their callers are gone), and at the latest of their deadlines (none
  if one of them has none).
`instances` worker threads run batches concurrently (Triton's instance count). Callers on an event
loop submit with `inline=False`: the request is handed to those threads and the caller awaits the
future (the gRPC frontend passes `inline=True` only for a small request that is the only call in
progress: see `DataPlane.infer_async`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from server.osthread import name_os_thread
from server.runtime import RunControl
from server.signature import Signature
from server.ticket import Ticket, deliver_all

log = logging.getLogger(__name__)
COALESCE_GAP_S = 2e-3  # see the module doc: an eager, busy batcher waits for the next request this long
COALESCE_MAX_S = 8e-3  # and for company this long at most
COALESCE_RECENT_S = 0.05  # and is busy this long after a merged run ended


@dataclass(frozen=True)
class BatchPolicy:
    enabled: bool = True
    max_batch: int = 64  # sequences per merged run
    max_queue_delay_us: int = 0  # how long the oldest request may wait for company (0: eager)
    max_queue: int = 1024  # queued requests before RESOURCE_EXHAUSTED
    instances: int = 1  # concurrent runs per model version
    max_cells: int = 64 * 1024 * 1024  # elements of a merged x (B x T x F) at most
    preferred_batch_size: tuple[int, ...] = ()  # row counts a run aims for (Triton's); (): max_batch
    ready_rows: int = 0  # the wait for company ends once this many rows queue (0: max_batch decides)

    def __post_init__(self) -> None:
        preferred = self.preferred_batch_size
        if not isinstance(preferred, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= self.max_batch for v in preferred
        ):
            raise ValueError(
                f"batching 'preferred_batch_size' must be a list of integers in 1..max_batch, got {preferred!r}"
            )
        object.__setattr__(self, "preferred_batch_size", tuple(sorted(set(preferred))))
        if isinstance(self.ready_rows, bool) or not isinstance(self.ready_rows, int) or self.ready_rows < 0:
            raise ValueError(f"batching 'ready_rows' must be an integer >= 0, got {self.ready_rows!r}")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"batching 'enabled' must be true or false, got {self.enabled!r}")
        for name in ("max_batch", "max_queue", "instances", "max_cells"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"batching '{name}' must be an integer >= 1, got {value!r}")
        if (
            isinstance(self.max_queue_delay_us, bool)
            or not isinstance(self.max_queue_delay_us, int)
            or (self.max_queue_delay_us < 0)
        ):
            raise ValueError(f"batching 'max_queue_delay_us' must be an integer >= 0, got {self.max_queue_delay_us!r}")


def policy_from_config(default: BatchPolicy, name: str, config: dict) -> BatchPolicy:
    """The server's defaults overridden by a model's config ({"batching": {...}} from config.json,
    or what config.pbtxt maps onto it); checked when the model loads (a bad config fails the
    load, not every request)."""
    override = config.get("batching", {})
    if not isinstance(override, dict):
        raise InvalidArgument(f"model '{name}' config.json: 'batching' must be an object")
    fields = {f.name for f in dataclasses.fields(BatchPolicy)}
    unknown = sorted(set(override) - fields)
    if unknown:
        raise InvalidArgument(f"model '{name}' config.json: unknown batching option(s) {unknown}")
    try:
        return dataclasses.replace(default, **override)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"model '{name}' config.json: {exc}") from None


MAX_STRETCH = 4  # a request is merged only with requests at most 4x longer or shorter


@dataclass
class Work:
    """What one request hands the batcher: complete feeds for its rows and what merging needs."""

    feeds: dict[str, np.ndarray]  # every input the session takes (defaults filled in)
    outputs: list[str]  # outputs to compute
    rows: int  # sequences (size of the batch axis; 1 for a model without one)
    steps: int | None = None  # the ragged input's time size (None: the model has no ragged input)
    key: tuple | None = None  # requests merge only with equal keys (None: computed when first needed)
    cells: int = 0  # elements one row contributes per time step (ragged) or in all (equal)
    signature: Signature | None = None  # what the key is computed from

    def merge_key(self) -> tuple:
        """Dtypes and every dim that is not the batch (nor the ragged input's time axis), per feed:
        computed only when the batcher has another request to compare with."""
        if self.key is None:
            skips = self.signature.merge_skips
            key = []
            for name, array in sorted(self.feeds.items()):
                shape = list(array.shape)  # the axes left out count as -1
                for axis in skips[name]:
                    if axis is not None and axis < len(shape):
                        shape[axis] = -1
                key.append((name, array.dtype, *shape))
            self.key = tuple(key)
        return self.key


class _Run:
    """One ONNX Runtime run of merged requests and what stops it (`RunControl`)."""

    __slots__ = ("tickets", "control")

    def __init__(self, tickets: list[Ticket], deadlines: list[float | None]) -> None:
        self.tickets = tickets
        # it runs as long as any of its requests may still want it
        self.control = RunControl(None if any(d is None for d in deadlines) else max(deadlines))
        for t in tickets:
            t.run = self
        self.check()

    def check(self) -> None:
        if all(t.left for t in self.tickets):
            self.control.stop("cancelled")


@dataclass
class _Item:
    work: Work
    deadline: float | None  # time.monotonic() deadline, None = none
    enqueued: float = field(default_factory=time.monotonic)
    future: Ticket = field(default_factory=Ticket)

    @property
    def rows(self) -> int:
        return self.work.rows

    @property
    def steps(self) -> int:
        return self.work.steps or 1


@dataclass
class BatchInfo:
    """What one merged run looked like; the server's metrics and statistics consume it."""

    requests: int
    sequences: int
    padded_steps: int  # T of the merged batch (1 without a ragged input)
    padding_fraction: float  # padded (invalid) cells / all cells in the batch
    infer_ns: int


def _merge(works: list[Work], signature: Signature) -> tuple[dict[str, np.ndarray], int]:
    """One feed dict for all rows: the ragged input padded to the longest along its time axis,
    lengths and everything else concatenated along each tensor's batch axis."""
    steps = max(w.steps or 1 for w in works)
    total = sum(w.rows for w in works)
    feeds = {}
    for name in works[0].feeds:
        spec = signature.input(name)
        axis = spec.batch_axis
        if name == signature.ragged:
            first = works[0].feeds[name]
            shape = list(first.shape)
            shape[axis], shape[spec.time_axis] = total, steps
            merged = np.zeros(shape, first.dtype)  # padding: zeros, never read (sequence_lens)
            row, index = 0, [slice(None)] * len(shape)
            for w in works:
                index[axis] = slice(row, row + w.rows)
                index[spec.time_axis] = slice(0, w.steps)
                merged[tuple(index)] = w.feeds[name]
                row += w.rows
            feeds[name] = merged
        else:
            feeds[name] = np.concatenate([w.feeds[name] for w in works], axis=axis)
    return feeds, steps


def merge_and_run(
    items: list[_Item], run: Callable[[dict, list[str]], dict[str, np.ndarray]], signature: Signature
) -> tuple[list[dict[str, np.ndarray]], BatchInfo]:
    """Merge (see `_merge`), run once with the union of requested outputs, split each output
    along its batch axis and cut its time axis (if any) back to each request's T."""
    works = [i.work for i in items]
    if len(works) == 1:  # a request alone runs as it came: no padded copy
        feeds, steps = works[0].feeds, works[0].steps or 1
    else:
        feeds, steps = _merge(works, signature)
    wanted = sorted({o for w in works for o in w.outputs})
    t0 = time.perf_counter_ns()
    out = run(feeds, wanted)
    infer_ns = time.perf_counter_ns() - t0
    total = sum(w.rows for w in works)
    bad = [n for n in wanted if len(works) > 1 and out[n].shape[signature.output(n).batch_axis] != total]
    if bad:  # the model did not batch along the declared axis: never split such a result across requests
        log.error(
            "merged run of %d requests: output %s has shape %s, not %d rows along axis %d; each request runs alone",
            len(works),
            bad[0],
            list(out[bad[0]].shape),
            total,
            signature.output(bad[0]).batch_axis,
        )
        signature.merge = False
        alone = [merge_and_run([i], run, signature) for i in items]
        return [r[0][0] for r in alone], BatchInfo(len(works), total, steps, 0.0, sum(r[1].infer_ns for r in alone))
    if len(works) == 1:
        results = [{name: out[name] for name in works[0].outputs}]
    else:
        # per output: the merged value, its batch and time axes, and an index reused for each request
        cuts = {}
        for name in wanted:
            spec = signature.output(name)
            cuts[name] = (out[name], spec.batch_axis, spec.time_axis, [slice(None)] * out[name].ndim)
        results = []
        row = 0
        for w in works:
            rows, own = slice(row, row + w.rows), w.steps
            mine = {}
            for name in w.outputs:
                value, axis, time_axis, index = cuts[name]
                index[axis] = rows
                if time_axis is not None:  # back to this request's own T
                    index[time_axis] = slice(None) if own is None else slice(0, own)
                mine[name] = value[tuple(index)]
            results.append(mine)
            row += w.rows
    padding = 0.0
    if signature.lengths is not None:
        valid = sum(sum(w.feeds[signature.lengths].tolist()) for w in works)  # (few rows: no numpy reductions)
        padding = 1.0 - valid / float(total * steps)
    return results, BatchInfo(len(works), total, steps, padding, infer_ns)


def run_alone(work: Work, run: Callable, signature: Signature) -> tuple[dict[str, np.ndarray], BatchInfo]:
    """One request run by itself (no batcher): its outputs and what the run looked like."""
    results, info = merge_and_run([_Item(work, None)], run, signature)
    return results[0], info


class Batcher:
    """One queue and `instances` worker threads for one model version."""

    def __init__(
        self,
        name: str,
        run: Callable,
        policy: BatchPolicy,
        on_batch: Callable[[BatchInfo], None] = lambda info: None,
        executor: Executor | None = None,
        signature: Signature | None = None,
        stoppable: bool = False,
    ) -> None:
        """`executor`: where a request submitted with inline=False runs once this batcher is closed
        (a retired version's late request); None: in the caller's thread. `stoppable`: `run`
        takes a `control` (`runtime.RunControl`, as `ModelRuntime.run` does): a run whose
        requests all left, or whose deadlines all passed, is stopped."""
        self.name = name
        self.run = run
        self.stoppable = stoppable
        self.policy = policy
        self.on_batch = on_batch
        self.executor = executor
        self.signature = signature  # how requests merge and outputs split (see merge_and_run)
        self._queue: list[_Item] = []
        self._cond = threading.Condition()
        self._closed = False
        self._slots = threading.Semaphore(policy.instances)  # runs in progress, inline or by a worker
        self._busy = False  # the last worker run ended with requests waiting (see COALESCE_GAP_S)
        self._last_merged = float("-inf")  # time.monotonic() when the last merged worker run ended
        self._rows = 0  # rows queued (the sum of the queue's `rows`)
        self._threads = [
            threading.Thread(target=self._worker, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(policy.instances)
        ]
        for t in self._threads:
            t.start()

    def submit(self, work: Work, deadline: float | None = None, inline: bool = True) -> Ticket:
        """Queue a request; its future gives (outputs, queue_ns, BatchInfo). `inline`: an idle eager
        batcher may run it in the calling thread (False from an event loop: never)."""
        item = _Item(work, deadline)
        with self._cond:
            closed = self._closed
            if len(self._queue) >= self.policy.max_queue:
                raise ResourceExhausted(
                    f"model '{self.name}': queue full ({self.policy.max_queue} requests waiting); retry later"
                )
            # Idle and eager (no delay asked for): run in the caller's thread, no hand-off, no wait.
            here = inline and not closed and not self._queue and self.policy.max_queue_delay_us == 0
            here = here and self._slots.acquire(blocking=False)
            if not here and not closed:
                self._queue.append(item)
                self._rows += item.rows
                # a worker waits for the first request (`_wait_for_work`) or for a full batch; one
                # waiting for company re-reads the queue when its wait times out (`_take`): a wake-up
                # per request would cost a thread switch each
                if len(self._queue) == 1 or self._full(self._rows):
                    self._cond.notify()
        if closed:
            # This version was replaced or unloaded after the request found it: the session
            # still works, so the request runs alone rather than failing.
            if self.executor is not None and not inline:
                self.executor.submit(self._run_safely, [item])
            else:
                self._run_safely([item])
        elif here:
            try:
                self._run_safely([item])
            finally:
                self._slots.release()
        return item.future

    def queued(self) -> int:
        """Requests queued now, read without the lock (for a gauge)."""
        return len(self._queue)

    def close(self) -> None:
        """Stop taking requests; the queued ones still run (drain), then the workers exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return False
                self._cond.wait()
            return True

    def _full(self, queued: int) -> bool:
        """Whether `queued` rows end a wait for company (max_batch, a preferred size, ready_rows)."""
        policy = self.policy
        preferred = policy.preferred_batch_size
        full = queued >= policy.max_batch or queued in preferred or bool(preferred) and queued >= preferred[-1]
        return full or 0 < policy.ready_rows <= queued

    def _take(self) -> list[_Item]:
        """Called holding a run slot; [] if other workers emptied the queue meanwhile."""
        policy = self.policy
        with self._cond:
            now = time.monotonic()
            # busy: the last run ended with requests waiting, or a merged run ended lately
            busy = self._busy or now - self._last_merged < COALESCE_RECENT_S
            coalesce_until = now + COALESCE_MAX_S if busy and not policy.max_queue_delay_us else 0.0
            while True:
                if not self._queue:
                    return []
                # Another worker may take the oldest while this one waits: re-read it each time.
                oldest = self._queue[0]
                queued = self._rows
                now = time.monotonic()
                remaining = oldest.enqueued + policy.max_queue_delay_us / 1e6 - now
                if coalesce_until:  # eager but busy: wait while requests keep arriving
                    remaining = min(coalesce_until - now, self._queue[-1].enqueued + COALESCE_GAP_S - now)
                if self._full(queued) or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._queue.pop(0)
            batch = [oldest]
            rows, longest = oldest.rows, oldest.steps
            # Triton's preferred sizes: the largest one the queue can fill, else all that fits
            cap = max((p for p in policy.preferred_batch_size if p <= queued), default=policy.max_batch)
            # closest time sizes first: small padding waste. Only requests within a factor
            # MAX_STRETCH of the oldest's time size join it (so padding never multiplies a request's
            # cost beyond that, and short requests never wait on a very long run), and the merged
            # x stays within max_cells (no request-driven memory blow-up).
            for item in sorted(self._queue, key=lambda i: (abs(i.steps - oldest.steps), i.enqueued)):
                if rows + item.rows > cap or item.work.merge_key() != oldest.work.merge_key():
                    continue
                if max(item.steps, oldest.steps) > MAX_STRETCH * min(item.steps, oldest.steps):
                    continue
                new_longest = max(longest, item.steps)
                if (rows + item.rows) * new_longest * max(item.work.cells, oldest.work.cells) > policy.max_cells:
                    continue
                batch.append(item)
                rows, longest = rows + item.rows, new_longest
            if len(batch) > 1:
                taken = {id(i) for i in batch}
                self._queue = [i for i in self._queue if id(i) not in taken]
            self._rows -= rows
            return batch

    def _worker(self) -> None:
        name_os_thread(f"run:{self.name}")
        while self._wait_for_work():
            try:
                with self._slots:  # the batch is formed once a slot is free: it takes all that queued
                    batch = self._take()
                    if batch:
                        self._run_safely(batch)
                        with self._cond:
                            self._busy = bool(self._queue)
                            if len(batch) > 1:
                                self._last_merged = time.monotonic()
            except Exception:  # noqa: BLE001 - never let a worker die while requests wait
                log.exception("batcher %s: worker error", self.name)

    def _run_safely(self, batch: list[_Item]) -> None:
        try:
            self._run_batch(batch)
        except Exception as exc:  # noqa: BLE001 - a worker must never die with requests waiting
            log.exception("batcher %s: unexpected failure", self.name)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)

    def _run_batch(self, batch: list[_Item]) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled while queued: its caller is gone
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(
                    DeadlineExceeded(f"model '{self.name}': deadline passed while queued; not run")
                )
            else:
                live.append(item)
        if live:
            self._run_live(live)

    def _run_live(self, live: list[_Item]) -> None:
        run, control = self.run, None
        if self.stoppable:
            control = _Run([i.future for i in live], [i.deadline for i in live]).control
            run = functools.partial(run, control=control)
        try:
            results, info = merge_and_run(live, run, self.signature)
        except Exception as exc:  # noqa: BLE001 - reported to the request(s) it belongs to
            stopped = control is not None and control.reason is not None  # every caller left, or too late
            if len(live) > 1 and not stopped:  # one request's values may have failed the run: each alone
                for item in live:
                    self._run_live([item])
                return
            for item in live:
                item.future.set_exception(exc)
            return
        start = time.monotonic()
        deliveries: list = []
        for item, result in zip(live, results):
            item.future.set_result((result, int((start - item.enqueued) * 1e9) - info.infer_ns, info), deliveries)
        deliver_all(deliveries)
        try:
            self.on_batch(info)
        except Exception:  # noqa: BLE001
            log.exception("batch callback failed")
