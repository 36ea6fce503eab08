"""The server's memory budget: what every accepted inference call may hold, and what it holds.

A call holds its request bytes, the working memory ONNX Runtime will need for it (estimated from
the model and the request's shape: `working_bytes`) and its response bytes, from admission until
its response has been sent (gRPC: the RPC has terminated; REST: the socket took the reply) or the
call is cancelled. A call that does not fit waits, within its deadline, for calls ahead of it to
finish; one that alone exceeds the budget, or its client's share of it, is refused before it runs.

Bounded by client too: one client (its bearer token when tokens are on, else its connection) holds
at most `client_share` of the budget, so a client that never reads its replies stops itself, not
the server (its connection is then cut by the per-connection limits: `server.app`, `server.rest_http`).

Everything here runs on the server's event loop (both frontends do); `release` may be called from
any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contract import metadata
from server.arena import MIB, arena_cap, malloc_trim, share_ort_arena, shrink_options
from server.dtypes import DATATYPES, numpy_dtype
from server.errors import ResourceExhausted
from server.layout import output_dims
from server.signature import structure

if TYPE_CHECKING:  # server.runtime imports this module
    from server.runtime import Runtime

log = logging.getLogger(__name__)

# ONNX Runtime's CPU peak working memory per sequence step (batch x time), per hidden unit of
# every layer and direction, measured with VmHWM around one run of each model family (x of
# 16 x 2000 steps, h_n only, fresh session; bench/ort_memory.py): LSTM 16.1 (encoder, 2x2x256)
# to 18.3 (stream_encoder, 1x2x256) bytes, GRU 13.5 (gru_encoder), Elman RNN ~5 (rnn_stream).
# Rounded up: an estimate must not undercount (the input's own copies: 8 bytes per feature).
CELL_BYTES = {"lstm": 18, "gru": 14, "rnn": 6}
STEP_OVERHEAD = 64  # bytes per step whatever the size (tf_example: 95 B per step measured)
# A model whose file does not describe its recurrent layers: this many bytes of working memory
# per input byte (the measured recurrent models: 5x (tf_example) to 85x (speaker_id, 12 features)).
DEFAULT_INPUT_FACTOR = 64
# runs needing more than this get ONNX Runtime's arena shrunk afterwards (`run_options`)
SHRINK_ABOVE = 64 * MIB
# a REST JSON response is text: "%.9g" floats are ~12 bytes per 4-byte value, plus the Python list
# built on the way: a 16 MiB float32 output peaked at +197 MiB while encoded (12.3x, measured with
# VmHWM around `rest_codec.response_body`), a 3x body left
JSON_RESPONSE_FACTOR = 13


def _recurrent(meta: dict) -> dict | None:
    try:
        config = json.loads(meta.get(metadata.CONFIG) or "null")
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def step_bytes(rt: Runtime) -> int | None:
    """ONNX Runtime working bytes per sequence step of `rt`, from the recurrent
    configuration its file records (`lstm.config`); None when the file records none. Computed once
    per runtime (kept on it)."""
    cached = getattr(rt, "_memory_step_bytes", False)  # the per-runtime cache, not a member
    if cached is not False:
        return cached
    value = _step_bytes(rt)
    try:
        rt._memory_step_bytes = value
    except AttributeError:  # a read-only stand-in: recomputed each time
        pass
    return value


def _step_bytes(rt: Runtime) -> int | None:
    config = _recurrent(rt.export_metadata)
    if config is None:
        return None
    try:
        cell = CELL_BYTES.get(str(config.get("cell", "lstm")), CELL_BYTES["lstm"])
        directions = 2 if config.get("bidirectional") else 1
        units = int(config["hidden_size"]) * int(config.get("num_layers", 1)) * directions
        features = int(config.get("input_size", 0))
    except (KeyError, TypeError, ValueError):
        return None
    return cell * units + 8 * features + STEP_OVERHEAD


def working_bytes(rt: Runtime, input_bytes: int, batch: int | None = None, steps: int | None = None) -> int:
    """Estimated ONNX Runtime working memory of one run of `rt`: per step (batch x time) when the
    model's recurrent layers are known and the request's batch and time are, else
    DEFAULT_INPUT_FACTOR x its input bytes. A static model runs padded to its own length."""
    per_step = step_bytes(rt)
    if per_step is None or not batch or not steps:
        return DEFAULT_INPUT_FACTOR * input_bytes
    steps = max(steps, rt.static_length or 0)
    return per_step * batch * steps


def batch_and_time(rt: Runtime, inputs: dict[str, np.ndarray]) -> tuple[int | None, int | None]:
    """(sequences, time steps) of a request, from its ragged input's batch and time axes as the
    model's signature names them (any input's batch axis when the model has no ragged input);
    None where unknown (a malformed request: validation will say why)."""
    sig = rt.signature
    batch = steps = None
    if sig.ragged is not None and sig.ragged in inputs:
        spec, array = sig.input(sig.ragged), inputs[sig.ragged]
        if spec.batch_axis is not None and spec.batch_axis < array.ndim:
            batch = int(array.shape[spec.batch_axis])
        if spec.time_axis is not None and spec.time_axis < array.ndim:
            steps = int(array.shape[spec.time_axis])
    if batch is None:
        for spec in sig.inputs:
            array = inputs.get(spec.name)
            if array is not None and spec.batch_axis is not None and spec.batch_axis < array.ndim:
                batch = int(array.shape[spec.batch_axis])
                break
    return batch, steps


def output_bytes(rt: Runtime, outputs: list[str], batch: int | None, steps: int | None) -> int:
    """Bytes of the outputs asked for ([] = all), from the layout probed when the version loaded
    (`layout.probe_output_layout`); 0 where it is unknown (strings, an unprobed version)."""
    total = 0
    for name in outputs or list(rt.output_layout):
        dims = output_dims(rt, name, batch or 1, steps or 1)
        if dims is None:
            continue
        spec = rt.signature.output(name)
        dtype = numpy_dtype(spec.datatype) if spec is not None and spec.datatype in DATATYPES else None
        itemsize = dtype.itemsize if dtype is not None and dtype.kind not in "OUS" else 64  # a string: a guess
        total += math.prod(dims) * itemsize
    return total


@dataclass(frozen=True)
class Cost:
    """What one call holds, in bytes, by part (for the refusal message and the tests)."""

    request: int
    working: int
    response: int

    @property
    def total(self) -> int:
        return self.request + self.working + self.response

    def describe(self) -> str:
        return (
            f"about {self.total / MIB:,.0f} MiB (request {self.request / MIB:,.1f} MiB, ONNX Runtime working "
            f"memory {self.working / MIB:,.0f} MiB, response {self.response / MIB:,.1f} MiB)"
        )


def call_cost(rt: Runtime, inputs: dict[str, np.ndarray], outputs: list[str], request_bytes: int | None = None,
              response_factor: int = 1) -> Cost:  # fmt: skip
    """The memory a call on `rt` with these decoded inputs and requested outputs holds: its request
    (`request_bytes`, default the inputs' bytes), ORT's working memory and its response
    (x `response_factor`: a REST JSON reply is text). It depends on the inputs' datatypes and
    shapes only: without `request_bytes` it is computed once per request structure and model
    version (kept with `validate`'s in `Signature.plans`, which bounds them)."""
    key, sig = None, rt.signature
    if request_bytes is None:
        key = ("cost", response_factor, *outputs, None, *structure(inputs))
        cost = sig.plans.get(key)
        if cost is not None:
            return cost
        # remembered only for the model's own names and ranks (this runs before validation): the
        # keys kept are the model's size, not what a request may carry
        if not _known(sig, inputs, outputs):
            key = None
    in_bytes = sum(int(a.nbytes) for a in inputs.values())
    batch, steps = batch_and_time(rt, inputs)
    cost = Cost(
        request=in_bytes if request_bytes is None else max(request_bytes, in_bytes),
        working=working_bytes(rt, in_bytes, batch, steps),
        response=output_bytes(rt, outputs, batch, steps) * response_factor,
    )
    return cost if key is None else sig.remember(key, cost)


def _known(sig, inputs: dict[str, np.ndarray], outputs: list[str]) -> bool:
    for name, array in inputs.items():
        spec = sig.input(name)
        if spec is None or array.ndim != spec.rank:
            return False
    return all(sig.output(name) is not None for name in outputs)


def run_options(working: int, always: bool = False):
    """ONNX Runtime RunOptions for a run of `working` estimated bytes: above SHRINK_ABOVE, or
    `always` (a version whose memory is sized by input values: no estimate holds), the CPU arena
    gives back what the run grew it by (measured: 504 MB held after an encoder run of 16 x 2000
    steps with the arena, 28 MB with shrinkage; docs/behaviour.md, memory budget); None otherwise."""
    if working <= SHRINK_ABOVE and not always:
        return None
    return shrink_options()


def client_key(peer: str, authorization: str | None = None, tokens_on: bool = False) -> str:
    """Who a call is from, for per-client shares: its bearer token (hashed) when tokens are on and
    it sent one, else its connection (`peer`: gRPC's "ipv4:1.2.3.4:5678", REST's "1.2.3.4:5678")."""
    if tokens_on and authorization and authorization[:7].lower() == "bearer ":
        return "token:" + hashlib.sha256(authorization[7:].strip().encode("utf-8", "replace")).hexdigest()[:16]
    return "peer:" + peer


# -- the budget's size ------------------------------------------------------------------------------
DEFAULT_FRACTION = 0.6  # of the machine's (or cgroup's) memory, shared among --workers processes


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # cgroup v1 writes "no limit" as a huge number
            return int(text)
    return None


def _machine_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(workers: int = 1) -> tuple[int, str]:
    """(bytes, why): DEFAULT_FRACTION of the cgroup's memory limit or the machine's memory,
    whichever is smaller, divided among `workers` processes."""
    machine = _machine_memory()
    cgroup = _cgroup_limit()
    limit, source = (machine, "MemTotal")
    if cgroup is not None and cgroup < machine:
        limit, source = cgroup, "cgroup memory limit"
    share = int(limit * DEFAULT_FRACTION / max(1, workers))
    return share, f"{DEFAULT_FRACTION:.0%} of the {source} {limit / MIB:,.0f} MiB / {workers} worker(s)"


# -- giving freed memory back -----------------------------------------------------------------------
TRIM_AFTER = 64 * MIB  # released holds since the last trim that schedule one
TRIM_DELAY_S = 1.0  # ... this long after (one trim for a burst of calls ending)
COLLECT_HOLD = 16 * MIB  # a trim collects garbage first after TRIM_AFTER released by calls this large (or failed)


def _collect_and_trim(collect: bool) -> None:
    """`malloc_trim`, after a garbage collection when `collect`. A call that failed or was cancelled,
    or whose reply was still unsent when its connection ended, leaves its frames in reference cycles
    (an exception's traceback holds the frames that hold it), so its request, its outputs and the
    ONNX Runtime arena regions those outputs lie in stay until the cyclic collector runs, which an
    idle server may not do for long (measured in-process: after a stalled reader's 15 s of 16 x 800
    step calls, whose replies were all computed, RSS stayed at 805 MiB, start 97; 161 MiB once
    collected). What start-up built is frozen out of the collector's walk (`gc.freeze`): a
    collection here took 0.4-1.4 ms."""
    if collect:
        gc.collect()
    malloc_trim()


# -- the budget -------------------------------------------------------------------------------------
def _describe(cost: Cost | int) -> str:
    return cost.describe() if isinstance(cost, Cost) else f"{int(cost) / MIB:,.0f} MiB"


class Hold:
    """Bytes one call holds; `release()` (idempotent, any thread) returns them."""

    __slots__ = ("budget", "nbytes", "client", "_released")

    def __init__(self, budget: MemoryBudget, nbytes: int, client: str) -> None:
        self.budget, self.nbytes, self.client = budget, nbytes, client
        self._released = False

    def release(self, *context) -> None:  # also a grpc done-callback: (context)
        if self._released:
            return
        self._released = True
        # a call that failed or was cancelled: released while its exception unwinds it, or by grpc's
        # done-callback with a cancelled context (`MemoryBudget._trim` then collects garbage)
        unwound = sys.exc_info()[1] is not None or (
            bool(context) and callable(getattr(context[0], "cancelled", None)) and context[0].cancelled()
        )
        self.budget._release_soon(self, unwound)


class MemoryBudget:
    """Bytes held by accepted calls, at most `total`; a client at most `client_share` of it."""

    def __init__(self, total: int, client_share: float = 0.5, wait_s: float = 30.0, metrics=None,
                 request_limit: int | None = None) -> None:  # fmt: skip
        """`request_limit`: bytes one call may hold at most (--max-request-memory-mb; None: no cap)."""
        self.total = int(total)
        self.request_limit = request_limit
        self.client_share = client_share
        self.wait_s = wait_s
        self.held = 0
        self.by_client: dict[str, int] = {}
        self.refused = 0
        self.metrics = metrics
        self._waiters: deque[tuple[int, str, asyncio.Future]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._released = 0  # bytes released since the last malloc_trim
        self._collectable = 0  # ... of them by calls that failed, were cancelled or held COLLECT_HOLD
        self._trim_due = False
        self.collections = 0  # garbage collections before a trim (`_collect_and_trim`)
        if metrics is not None:
            metrics.memory_budget.set(self.total)

    @property
    def client_limit(self) -> int:
        return int(self.total * self.client_share)

    def _fits(self, nbytes: int, client: str) -> bool:
        return self.held + nbytes <= self.total and self.by_client.get(client, 0) + nbytes <= self.client_limit

    def _take(self, nbytes: int, client: str) -> Hold:
        self.held += nbytes
        self.by_client[client] = self.by_client.get(client, 0) + nbytes
        self._gauge()
        return Hold(self, nbytes, client)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.memory_held.set(self.held)

    def _refuse(self, message: str) -> ResourceExhausted:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.memory_refusals.inc()
        return ResourceExhausted(message)

    async def hold(self, cost: Cost | int, client: str, deadline: float | None = None) -> Hold:
        """Reserve `cost` for `client`: at once when it fits, else waiting (FIFO) until the
        deadline (time.monotonic(); none: `wait_s`); RESOURCE_EXHAUSTED naming the budget when it
        never fits, or cannot fit at all."""
        nbytes = cost.total if isinstance(cost, Cost) else int(cost)
        if self._loop is None:
            self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        if self.request_limit is not None and nbytes > self.request_limit and nbytes <= self.client_limit:
            raise self._refuse(
                f"this request needs {_describe(cost)}, more than one call may hold: "
                f"{self.request_limit / MIB:,.0f} MiB (--max-request-memory-mb); send a long sequence in chunks "
                "(sequence_id with sequence_start/sequence_end, or a ModelStreamInfer stream), fewer sequences "
                "per request, or ask only for the outputs you need"
            )
        if nbytes > self.client_limit:
            what = _describe(cost)
            whole = nbytes > self.total
            limit = self.total if whole else self.client_limit
            raise self._refuse(
                f"this request needs {what}, more than the server's "
                f"{'whole memory budget' if whole else 'per-client share'} "
                f"of {limit / MIB:,.0f} MiB (--memory-budget-mb {self.total / MIB:,.0f}"
                f"{'' if whole else f' x --memory-client-share {self.client_share:g}'}); send fewer or shorter "
                "sequences per request, or ask only for the outputs you need"
            )
        if not self._waiters and self._fits(nbytes, client):
            return self._take(nbytes, client)
        future = self._loop.create_future()
        entry = (nbytes, client, future)
        self._waiters.append(entry)
        self._wake()  # the waiters ahead may wait on their own share only
        if future.done():
            return future.result()
        wait = self.wait_s if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(future), wait)
        except asyncio.TimeoutError:
            pass
        except BaseException:  # cancelled: give back what may have been granted meanwhile
            self._drop_waiter(entry)
            raise
        if future.done() and not future.cancelled():
            return future.result()
        self._drop_waiter(entry)
        mine = self.by_client.get(client, 0)
        raise self._refuse(
            f"memory budget full: this request needs {_describe(cost)}; calls in progress hold "
            f"{self.held / MIB:,.0f} of "
            f"{self.total / MIB:,.0f} MiB (--memory-budget-mb), this client {mine / MIB:,.0f} of its "
            f"{self.client_limit / MIB:,.0f} MiB share; waited {wait:.1f} s. Retry later"
        )

    def _drop_waiter(self, entry) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(entry)
        future = entry[2]
        if future.done() and not future.cancelled():
            future.result().release()
        else:
            future.cancel()
        self._wake()

    def _release_soon(self, hold: Hold, unwound: bool = False) -> None:
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._release(hold, unwound)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._release, hold, unwound)

    def _release(self, hold: Hold, unwound: bool = False) -> None:
        self._released += hold.nbytes
        if unwound or hold.nbytes >= COLLECT_HOLD:
            self._collectable += hold.nbytes
        if self._released >= TRIM_AFTER and not self._trim_due and self._loop is not None:
            # freed heap goes back to the OS soon after large calls end (glibc keeps it otherwise)
            self._trim_due = True
            self._loop.call_later(TRIM_DELAY_S, self._trim)
        self.held -= hold.nbytes
        left = self.by_client.get(hold.client, 0) - hold.nbytes
        if left > 0:
            self.by_client[hold.client] = left
        else:
            self.by_client.pop(hold.client, None)
        self._gauge()
        self._wake()

    def _trim(self) -> None:
        collect = self._collectable >= TRIM_AFTER
        self._trim_due, self._released, self._collectable = False, 0, 0
        if self._loop is not None and not self._loop.is_closed():
            self.collections += collect
            self._loop.run_in_executor(None, _collect_and_trim, collect)

    def _wake(self) -> None:
        """Grant waiters in order while they fit; one that does not fit blocks those behind it only
        when it waits on the whole budget (not on its own client's share)."""
        blocked = False
        for entry in list(self._waiters):
            nbytes, client, future = entry
            if future.done():
                self._waiters.remove(entry)
                continue
            if blocked:
                break
            if self._fits(nbytes, client):
                self._waiters.remove(entry)
                future.set_result(self._take(nbytes, client))
            elif self.held + nbytes > self.total:
                blocked = True


def budget_from_settings(settings, metrics=None) -> MemoryBudget:
    """The server's budget: --memory-budget-mb, or (0) `default_budget`; logged."""
    if settings.memory_budget_mb > 0:
        total, why = settings.memory_budget_mb * MIB, "--memory-budget-mb"
    else:
        total, why = default_budget(settings.workers)
    request_limit = settings.max_request_memory_mb * MIB if settings.max_request_memory_mb > 0 else None
    log.info(
        "memory budget %s MiB (%s); one client at most %.0f%% of it, one call at most %s",
        f"{total / MIB:,.0f}",
        why,
        settings.memory_client_share * 100,
        f"{request_limit / MIB:,.0f} MiB (--max-request-memory-mb)" if request_limit else "its client's share",
    )
    every = bool(getattr(settings, "ort_arena_cap", False))
    cap, flag = arena_cap(total, request_limit, every)
    arena = share_ort_arena(cap, flag, every)
    log.info(
        "ONNX Runtime: %s allocate CPU memory from one shared arena, %s",
        "all model versions" if arena.every_session else "model versions sized by input values",
        arena.describe(),
    )
    return MemoryBudget(total, settings.memory_client_share, settings.memory_wait_s, metrics, request_limit)
