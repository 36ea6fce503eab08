"""Server-side state for chunked streams (Triton's sequence batcher, implicit state).

A client sends a long sequence in chunks with the OIP request parameters `sequence_id` (uint64,
int64 or string), `sequence_start` and `sequence_end`. Between chunks the server keeps the
sequence's state tensors (by input name: an LSTM's h0/c0, or a config.pbtxt's
`sequence_batching.state` inputs); each chunk starts from them, so chunked equals whole exactly. One chunk of a
sequence may be in flight at a time (a second is refused: chunks must be applied in order).
Sequences idle longer than `idle_s` are freed; a later chunk is told so.

Bounded memory whatever clients send: a string id is at most MAX_ID_BYTES (UTF-8), and the ids of
freed sequences remembered for that message are capped by count and by bytes (the oldest are
forgotten first; a forgotten one is then answered "unknown sequence").

Owned: with bearer tokens on, a sequence belongs to the client (token) that started it; another
client's chunk or end is answered NOT_FOUND as for an unknown id, and never sees or moves its state.

Shared fairly: one client (its bearer token, else its connection: `InferRequest.client`) holds at
most `client_share` of the `max_sequences` slots, so a client that starts sequences and keeps them
alive cannot lock the others out; its next start is refused while the others' still succeed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, clip

MAX_ID_BYTES = 256  # longest string sequence_id (UTF-8 bytes); Triton's ids are uint64 or strings
EVICTED_MAX_COUNT = 10_000  # freed sequence ids remembered (for "freed after N s idle" errors)
EVICTED_MAX_BYTES = 1 << 20  # ... and the bytes of their keys, at most (4,096 ids of 256 bytes)


@dataclass
class SequenceState:
    model: str
    version: int
    state: dict[str, np.ndarray]  # state input name -> this sequence's value (batch axis of size 1)
    last_used: float
    busy: bool = False
    chunks: int = 0
    idle_s: float | None = None  # this model's idle timeout (config.pbtxt); None: the store's
    pending_start: bool = False  # started by the chunk in flight: undone if that chunk fails
    previous: SequenceState | None = None  # what a restart replaced (restored if the chunk fails)
    client: str = ""  # who started it (`InferRequest.client`): counted against that client's share
    nbytes: int = 0  # bytes of `state`, counted in the store's kept-state memory


def parse_sequence(parameters: dict[str, object]) -> tuple[object, bool, bool] | None:
    """(id, start, end) from request parameters as plain values (an integer id from uint64 or
    int64, a string id), or None when the request is not a sequence chunk."""
    if "sequence_id" not in parameters:
        for key in ("sequence_start", "sequence_end"):
            if key in parameters:
                raise InvalidArgument(f"parameter '{key}' needs 'sequence_id'")
        return None
    value = parameters["sequence_id"]
    if isinstance(value, int) and not isinstance(value, bool):
        seq_id: object = value
    elif isinstance(value, str) and value:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_ID_BYTES:
            raise InvalidArgument(
                f"parameter 'sequence_id': a string id is at most {MAX_ID_BYTES} bytes (UTF-8), got {size} bytes"
            )
        seq_id = value
    else:
        raise InvalidArgument("parameter 'sequence_id' must be a uint64, int64 or non-empty string")
    flags = []
    for key in ("sequence_start", "sequence_end"):
        flag = parameters.get(key, False)
        if not isinstance(flag, bool):
            raise InvalidArgument(f"parameter '{key}' must be a bool")
        flags.append(flag)
    return seq_id, flags[0], flags[1]


class SequenceStore:
    def __init__(self, max_sequences: int = 1024, idle_s: float = 60.0, on_change=lambda live, evicted: None,
                 client_share: float = 1.0, max_state_bytes: int | None = None,
                 state_memory: int | None = None) -> None:  # fmt: skip
        """`max_state_bytes`: one sequence's kept state at most (--max-sequence-state-mb; a state
        output that grows past it is refused and the sequence freed); `state_memory`: all kept
        state at most, one client at most `client_share` of it (None: unbounded)."""
        self.max_sequences = max_sequences
        self.client_share = client_share
        self.max_state_bytes = max_state_bytes
        self.state_memory = state_memory
        self.kept_bytes = 0
        self._kept_by_client: dict[str, int] = {}
        self.idle_s = idle_s
        self._lock = threading.Lock()
        # no sequence can be idle past its timeout before this time.monotonic() (`_sweep_locked`
        # looks at every live sequence only from then on); computed with `_due_idle_s` as idle_s
        self._next_due = float("-inf")
        self._due_idle_s = idle_s
        self._live: dict[tuple[str, object], SequenceState] = {}
        self._evicted: OrderedDict[tuple[str, object], int] = OrderedDict()  # key -> its bytes (clear errors)
        self._evicted_bytes = 0
        self._evicted_idle: dict = {}  # key -> a model's own idle timeout, for the message (bounded below)
        self.evictions = 0
        self.on_change = on_change
        self._reported = -1  # the live count `on_change` was last told

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    @property
    def client_limit(self) -> int:
        """Live sequences one named client may hold (at least 1)."""
        return max(1, int(self.max_sequences * self.client_share))

    def _check_share(self, client: str, replacing: SequenceState | None) -> None:
        """RESOURCE_EXHAUSTED when `client` already holds its share (a restart of one of its own
        sequences takes no new slot). Unnamed callers (in-process, Ray) are not counted."""
        if not client or self.client_share >= 1 or (replacing is not None and replacing.client == client):
            return
        mine = sum(1 for state in self._live.values() if state.client == client)
        if mine >= self.client_limit:
            raise ResourceExhausted(
                f"this client holds {mine} live sequences: its share of the {self.max_sequences} slots "
                f"(--sequence-client-share {self.client_share:g} = {self.client_limit}); end sequences with "
                "sequence_end or wait for idle ones to be freed"
            )

    def acquire(self, model: str, version: int, seq_id, start: bool, initial: dict[str, np.ndarray],
                idle_s: float | None = None, client: str = ""):  # fmt: skip
        """Mark the sequence busy and return it; on start its state is `initial` (zeros, the
        config's initial_state, or what the client sent). `idle_s`: the model's own idle timeout
        (config.pbtxt max_sequence_idle_microseconds), None: the store's. `client`: who starts it,
        counted against its share of the slots (`client_share` of `max_sequences`)."""
        key = (model, seq_id)
        now = time.monotonic()
        with self._lock:
            self._sweep_locked(now)
            state = self._live.get(key)
            if state is not None and not self._owned_by(state, client):
                if start:  # its id is taken by another client: nothing of it is shown or replaced
                    raise FailedPrecondition(
                        f"sequence id {clip(seq_id)} of model '{model}' is in use by another client; choose another id"
                    )
                state = None  # another client's sequence: as if it did not exist
            if state is not None and state.busy:
                raise FailedPrecondition(
                    f"sequence {clip(seq_id)} of model '{model}' already has a chunk in flight; send its chunks "
                    "one at a time, in order (or over one ModelStreamInfer stream)"
                )
            if start:
                if state is None and len(self._live) >= self.max_sequences:
                    raise ResourceExhausted(
                        f"{len(self._live)} live sequences: the limit ({self.max_sequences}) is reached; "
                        "end sequences with sequence_end or wait for idle ones to be freed"
                    )
                self._check_share(client, state)
                nbytes = _state_bytes(initial)
                problem = self._state_problem(model, seq_id, nbytes, client, 0)
                if problem is not None:
                    raise ResourceExhausted(problem)
                previous = state
                state = SequenceState(
                    model, version, dict(initial), now, idle_s=idle_s, pending_start=True, previous=previous,
                    client=client,
                )  # fmt: skip
                self._live[key] = state
                self._count(state, nbytes)
                self._forget_evicted(key)
            elif state is None:
                if key in self._evicted and key not in self._live:
                    raise NotFound(
                        f"sequence {clip(seq_id)} of model '{model}' was freed after "
                        f"{self._evicted_idle.get(key, self.idle_s):g} s idle; "
                        "start it again with sequence_start"
                    )
                raise NotFound(
                    f"unknown sequence {clip(seq_id)} for model '{model}' (never started, already ended, or lost in a "
                    "server restart); begin it with sequence_start=true"
                )
            state.busy = True
            state.last_used = now
            self._report(0)
            return state

    def _report(self, evicted: int) -> None:
        """`on_change` (holding the lock), only when the live count moved or sequences were evicted
        (a gauge set per chunk costs a lock of its own)."""
        live = len(self._live)
        if live != self._reported or evicted:
            self._reported = live
            self.on_change(live, evicted)

    @staticmethod
    def _owned_by(state: SequenceState, client: str) -> bool:
        """A sequence belongs to the client that started it when that client is named by its bearer
        token (`memory.client_key`: "token:..."); without tokens a client is its connection, which a
        REST client changes at will, so sequences are then shared by id (as in Triton)."""
        return not state.client.startswith("token:") or state.client == client

    def _state_problem(self, model: str, seq_id, nbytes: int, client: str, replacing: int) -> str | None:
        """Why a sequence may not keep `nbytes` of state (instead of `replacing` bytes), or None."""
        mib = 1 << 20
        if self.max_state_bytes is not None and nbytes > self.max_state_bytes:
            return (
                f"sequence {clip(seq_id)} of model '{model}' would keep {nbytes / mib:,.1f} MiB of state, more than "
                f"one sequence may keep ({self.max_state_bytes / mib:,.0f} MiB, --max-sequence-state-mb)"
            )
        if self.state_memory is None:
            return None
        if self.kept_bytes - replacing + nbytes > self.state_memory:
            return (
                f"live sequences keep {self.kept_bytes / mib:,.0f} MiB of state; {nbytes / mib:,.1f} MiB more would "
                f"exceed the {self.state_memory / mib:,.0f} MiB kept-state budget; end sequences or retry later"
            )
        mine = self._kept_by_client.get(client, 0)
        share = int(self.state_memory * self.client_share)
        if client and self.client_share < 1 and mine - replacing + nbytes > share:
            return (
                f"this client's sequences keep {mine / mib:,.0f} MiB of state; {nbytes / mib:,.1f} MiB more would "
                f"exceed its share ({share / mib:,.0f} MiB, --sequence-client-share); end some of its sequences"
            )
        return None

    def _count(self, state: SequenceState, nbytes: int) -> None:
        delta = nbytes - state.nbytes
        state.nbytes = nbytes
        self.kept_bytes += delta
        left = self._kept_by_client.get(state.client, 0) + delta
        if left > 0:
            self._kept_by_client[state.client] = left
        else:
            self._kept_by_client.pop(state.client, None)

    def _forget(self, key) -> SequenceState | None:
        """Remove a live sequence and its kept bytes."""
        state = self._live.pop(key, None)
        if state is not None:
            self._count(state, 0)
        return state

    def version_of(self, model: str, seq_id, client: str | None = None) -> int | None:
        """The model version a live sequence started on (None if unknown). `client`: who asks; a
        sequence another token holds is unknown to it (None: any caller, for the server itself)."""
        with self._lock:
            state = self._live.get((model, seq_id))
            if state is None or (client is not None and not self._owned_by(state, client)):
                return None
            return state.version

    def drop(self, model: str, seq_id, client: str | None = None) -> None:
        """Free an idle sequence; a `client` must own it (`_owned_by`), else nothing happens."""
        with self._lock:
            state = self._live.get((model, seq_id))
            if state is not None and not state.busy and (client is None or self._owned_by(state, client)):
                self._forget((model, seq_id))
                self._report(0)

    def release(self, model: str, seq_id, new: dict[str, np.ndarray] | None, end: bool,
                client: str | None = None) -> None:  # fmt: skip
        """After a chunk: store the new state (None: the chunk failed, keep the old), free on end.
        `client`: the caller that acquired it (another token's sequence of that id is left alone);
        None: the server itself."""
        key = (model, seq_id)
        with self._lock:
            state = self._live.get(key)
            if state is None or (client is not None and not self._owned_by(state, client)):
                return
            problem = None
            if new is not None and not end:
                problem = self._state_problem(model, seq_id, _state_bytes(new), state.client, state.nbytes)
            replaced = state.previous if state.pending_start else None  # a restart's old sequence (counted)
            if new is None and state.pending_start:  # the start chunk failed: as if it never came
                self._forget(key)
                if replaced is not None:
                    self._live[key] = replaced
                    self._next_due = float("-inf")  # it is idle again: the next sweep looks
            elif (end and new is not None) or problem is not None:
                self._forget(key)  # ended, or its state outgrew what it may keep: freed
                if replaced is not None:
                    self._count(replaced, 0)
            else:
                if replaced is not None:
                    self._count(replaced, 0)
                state.pending_start, state.previous = False, None
                if new is not None:  # copies: do not keep a whole batch's output alive (an array that
                    # owns its memory is no view of one: kept as it is)
                    state.state = {k: v if getattr(v, "base", 0) is None else np.array(v) for k, v in new.items()}
                    state.chunks += 1
                    self._count(state, _state_bytes(state.state))
                state.busy = False
                state.last_used = time.monotonic()
                self._next_due = min(self._next_due, state.last_used + (state.idle_s or self.idle_s))
            self._report(0)
        if problem is not None:
            raise ResourceExhausted(f"{problem}; the sequence is freed: start it again with sequence_start")

    def sweep(self) -> int:
        with self._lock:
            return self._sweep_locked(time.monotonic())

    def evicted_memory(self) -> tuple[int, int]:
        """(ids remembered as freed, bytes of their keys): bounded by EVICTED_MAX_COUNT/BYTES."""
        with self._lock:
            return len(self._evicted), self._evicted_bytes

    def _forget_evicted(self, key) -> None:
        self._evicted_idle.pop(key, None)
        size = self._evicted.pop(key, None)
        if size is not None:
            self._evicted_bytes -= size

    def _sweep_locked(self, now: float) -> int:
        if now <= self._next_due and self.idle_s == self._due_idle_s:
            return 0  # none can be idle yet: not every live sequence looked at on every chunk
        idle, due = [], float("inf")
        for k, s in self._live.items():
            if not s.busy:
                until = s.last_used + (s.idle_s or self.idle_s)
                if now > until:
                    idle.append(k)
                else:
                    due = min(due, until)
        self._next_due, self._due_idle_s = due, self.idle_s
        for key in idle:
            own = self._forget(key).idle_s
            self._forget_evicted(key)
            if own:
                self._evicted_idle[key] = own
            model, seq_id = key
            size = len(model) + (len(seq_id.encode("utf-8", "surrogatepass")) if isinstance(seq_id, str) else 8)
            self._evicted[key] = size
            self._evicted_bytes += size
            while self._evicted and (len(self._evicted) > EVICTED_MAX_COUNT or self._evicted_bytes > EVICTED_MAX_BYTES):
                old, size = self._evicted.popitem(last=False)
                self._evicted_bytes -= size
                self._evicted_idle.pop(old, None)
        if idle:
            self.evictions += len(idle)
            self._report(len(idle))
        return len(idle)


def _state_bytes(state: dict[str, np.ndarray]) -> int:
    return sum(int(getattr(v, "nbytes", 0)) for v in state.values())
