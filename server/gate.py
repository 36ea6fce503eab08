"""The one gate every inference call passes, whatever its transport (gRPC unary and stream, REST,
the Ray Serve deployment): the transports only convert their wire format; what a call may do is
decided here, in this order:

1. admission: drain refusal and the calls-in-progress limit (`handlers.Admission`);
2. structure caps, O(1) and before any per-element work: inputs, outputs and parameters at most
   what the model could take, a bounded request id (`check_structure`);
3. identity: the bearer token that matched (else the connection), one per call (`client`);
4. every deadline source: the transport's (gRPC deadline, REST Inference-Timeout-Ms) and Triton's
   `timeout` request parameter in microseconds (`deadline`);
5. the memory budget hold (`hold`);
6. the inline decision: whether a small call may run on the event loop (`inline`); the data plane
   adds that only a model version bounded by its input sizes ever does;
7. cancellation: a run by itself is stopped when its caller goes away (`DataPlane.infer_async`).
"""

from __future__ import annotations

import threading
import time

from contract.onnxfile import varint
from server.errors import InvalidArgument, Unauthenticated, clip
from server.handlers import Admission
from server.memory import Hold, MemoryBudget, call_cost, client_key
from server.runtime import Runtime
from server.shm import ShmCall, owner_of

MAX_PARAMETERS = 64  # request (or tensor) parameters at most; Triton's own are a handful
MAX_ID_CHARS = 1024  # a request id is echoed in the reply: bounded
INLINE_IDLE_S = 2e-4  # see Gate.inline
INLINE_GAP_S = 1e-3  # ... where the loop's own CPU time cannot be read (another thread ended the last call)
INLINE_QUIET_S = 0.5
TIMEOUT_PARAMETER = "timeout"  # Triton's request parameter: microseconds the client will wait


def check_structure(rt: Runtime, inputs: int, outputs: int, parameters: int, id_chars: int) -> None:
    """O(1) caps on a request's structure, from counts a transport has without decoding anything
    (len() of protobuf repeated fields or of JSON lists): a model takes each input and output at
    most once, so more than it has is refused before any of them is looked at."""
    sig = rt.signature
    if inputs > len(sig.all_inputs):
        raise InvalidArgument(
            f"the request has {inputs:,} inputs; model '{rt.name}' takes at most {len(sig.all_inputs)} "
            f"({', '.join(t.name for t in sig.all_inputs)})"
        )
    if outputs > len(sig.all_outputs):
        raise InvalidArgument(
            f"the request asks for {outputs:,} outputs; model '{rt.name}' has {len(sig.all_outputs)} "
            f"({', '.join(t.name for t in sig.all_outputs)})"
        )
    if parameters > MAX_PARAMETERS:
        raise InvalidArgument(f"the request has {parameters:,} parameters; at most {MAX_PARAMETERS} are accepted")
    if id_chars > MAX_ID_CHARS:
        raise InvalidArgument(f"the request id has {id_chars:,} characters; at most {MAX_ID_CHARS} are accepted")


def check_tensor_parameters(where: str, parameters, shm=None) -> None:
    """A tensor's own parameters: bounded in number, and nothing this server would ignore (the
    shared-memory ones only with `shm`, the server's enabled registry)."""
    if len(parameters) > MAX_PARAMETERS:
        raise InvalidArgument(f"{where}: {len(parameters):,} parameters; at most {MAX_PARAMETERS} are accepted")
    if shm is None or shm.disabled:
        refuse_shared_memory(where, parameters, shm.disabled if shm is not None else None)


SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def refuse_shared_memory(where: str, parameters, why: str | None = None) -> None:
    """Triton's shared-memory parameters (`shared_memory_region`, ...) on a tensor where system
    shared memory is off (`why`: the registry's reason) or not served (a gate without a registry):
    refused by name, because answering without it would silently ignore where the client asked
    for its data to go."""
    for key in SHARED_MEMORY_PARAMETERS:
        if key in parameters:
            raise InvalidArgument(
                f"{where}: parameter '{key}': {why or 'shared memory is not served here'}; send the tensor's "
                "data in the request (and read outputs from the response)"
            )


def deadline(transport: float | None, parameters: dict) -> float | None:
    """The call's deadline (time.monotonic()): the earliest of the transport's and Triton's
    `timeout` request parameter (microseconds; tritonclient sends it on both protocols)."""
    timeout_us = parameters.get(TIMEOUT_PARAMETER)
    if timeout_us is None:
        return transport
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 0:
        raise InvalidArgument(
            f"parameter '{TIMEOUT_PARAMETER}' must be an integer number of microseconds >= 0, got {clip(timeout_us)}"
        )
    if timeout_us == 0:  # Triton: 0 = no timeout
        return transport
    at = time.monotonic() + timeout_us / 1e6
    return at if transport is None else min(transport, at)


def client(peer: str, authorizations: list[str], tokens_on: bool) -> str:
    """Who a call is from, for per-client shares and sequence ownership: the bearer token that
    matched (one per call: more than one `authorization` value is refused, so access and shares
    always read the same one), else the connection."""
    if len(authorizations) > 1:
        raise Unauthenticated(f"{len(authorizations)} 'authorization' values; send exactly one")
    return client_key(peer, authorizations[0] if authorizations else None, tokens_on)


class Gate:
    """What every frontend calls around an inference call (see the module docstring)."""

    def __init__(self, plane, admission: Admission | None = None, budget: MemoryBudget | None = None,
                 tokens_on: bool = False, shm=None) -> None:  # fmt: skip
        """`shm`: the server's system shared-memory registry (`server.shm.SharedMemoryRegistry`),
        shared by both frontends; None: shared-memory parameters are refused."""
        self.plane = plane
        self.shm = shm
        self.admission = admission or Admission()
        self.budget = budget  # None: calls hold no memory budget (tests, minimal servers)
        self.tokens_on = tokens_on
        self._last_end = 0.0  # time.monotonic() when the last inference call ended
        self._end_cpu = 0.0  # time.thread_time() of the thread that ended it, then
        self._end_thread = 0  # ... that thread's ident
        self._busy_until = 0.0  # no inference on the loop before this time.monotonic()

    @property
    def shm_enabled(self) -> bool:
        """Whether clients may use system shared memory (a registry that is not disabled)."""
        return self.shm is not None and not self.shm.disabled

    def shm_call(self, authorization: str | None):
        """The shared-memory side of one call (`server.shm.ShmCall`): regions of the caller's token
        when tokens are on; None when shared memory is off."""
        if not self.shm_enabled:
            return None
        return ShmCall(self.shm, owner_of(authorization, self.tokens_on))

    def call(self) -> _GateCall:
        """One inference call in progress (admission: refused while draining or over the limit), as
        a context manager."""
        return _GateCall(self)

    def _ended(self) -> None:
        """A call ended. When it was the last in progress, when and how busy the loop thread was
        is kept for `inline` (the only case it reads: a lone next call)."""
        admission = self.admission
        admission.leave()
        if admission.in_flight == 0:
            self._last_end = time.monotonic()
            self._end_cpu, self._end_thread = time.thread_time(), threading.get_ident()

    def model(self, name: str, version: str):
        """The loaded model version a call names (NOT_FOUND / UNAVAILABLE otherwise)."""
        return self.plane.repository.get(name, version)

    async def hold(self, rt, infer, request_bytes: int | None = None, response_factor: int = 1) -> Hold | None:
        """Reserve the call's memory (request, working memory, response) in the budget, waiting
        within its deadline; None without a budget."""
        if self.budget is None:
            return None
        cost = call_cost(rt, infer.inputs, infer.outputs, request_bytes, response_factor)
        return await self.budget.hold(cost, infer.client, infer.deadline)

    def inline(self) -> bool:
        """Whether a call may run on the event loop: it is the only call in progress, and the loop
        was idle for a while since the previous one ended. A call that was waiting while the loop
        ran the last one is taken up right after it, the loop busy all the while (its reply, this
        call's arrival and decoding), so it goes to a thread and the loop is free to take the calls
        behind it, which are batched. A lone client's next call arrives only after it read the
        reply: the loop waited for it. Measured on one core (a Python client; the loop's idle time
        = wall time minus the loop thread's CPU time since the last call ended): a call queued
        behind an inline run 0.02-0.27 ms (p1-p95), a lone client's next call 0.23-0.71 ms; the
        wall time alone (0.6-1.3 ms for both) cannot tell them apart. Calls seen together mark the
        next half second busy: no run on the loop then. The data plane adds its own conditions (a
        small request, a model bounded by its input sizes)."""
        now = time.monotonic()
        in_flight = self.admission.in_flight
        if in_flight > 1:
            self._busy_until = now + INLINE_QUIET_S
        if in_flight != 1 or now <= self._busy_until:
            return False
        gap = now - self._last_end
        if threading.get_ident() != self._end_thread:  # another thread ended the last call: wall time only
            return gap > INLINE_GAP_S
        return gap - (time.thread_time() - self._end_cpu) > INLINE_IDLE_S


class _GateCall:
    """`Gate.call()`: a plain context manager (a generator-based one costs several times more per
    call)."""

    __slots__ = ("gate",)

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def __enter__(self) -> None:
        self.gate.admission.enter()

    def __exit__(self, *exc) -> None:
        self.gate._ended()


# -- before a large gRPC message is parsed ----------------------------------------------------------
# Parsing a message of millions of empty entries costs seconds of CPU with the interpreter lock held
# (2,000,000 parameters: 1.3 s measured), whichever thread does it. So a large ModelInferRequest's
# top-level fields are counted from the wire format first, stopping at the first cap exceeded:
# at most ~MAX_WIRE_TENSORS * 3 + MAX_PARAMETERS fields are ever looked at, each in O(1) (tensor
# bytes are skipped by their length).
MAX_WIRE_TENSORS = 1024  # inputs, requested outputs, raw_input_contents: each at most (any model)
_INFER_FIELDS = {4: ("parameters", MAX_PARAMETERS), 5: ("inputs", MAX_WIRE_TENSORS),
                 6: ("outputs", MAX_WIRE_TENSORS), 7: ("raw_input_contents", MAX_WIRE_TENSORS)}  # fmt: skip


def infer_request_counts_refusal(data: bytes) -> str | None:
    """Why a serialized ModelInferRequest carries too many parameters, inputs, outputs or raw
    contents to be parsed (a message naming the field and the cap), or None. Malformed bytes are
    left to the parser to describe."""
    counts = dict.fromkeys(_INFER_FIELDS, 0)
    pos, end = 0, len(data)
    try:
        while pos < end:
            key, pos = varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = varint(data, pos)
                pos += size
            else:
                return None
            if number in counts:
                counts[number] += 1
                name, cap = _INFER_FIELDS[number]
                if counts[number] > cap:
                    return f"the request carries more than {cap} {name}: at most {cap} are accepted"
    except (IndexError, ValueError):  # truncated, or a varint over 64 bits: the parser says what is wrong
        return None
    return None
