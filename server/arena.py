"""ONNX Runtime's own CPU allocations: the shared arena with a cap that versions sized by input
values allocate from, and giving arena and heap memory back after large runs.

The memory budget (`server.memory`) counts what calls are estimated to need; this module is what
holds ONNX Runtime itself to a cap where no estimate exists, and what returns the memory a run
grew: arena shrinkage at the end of a run, again once its outputs are dropped (`released_soon`),
and glibc's `malloc_trim`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from contract.onnxfile import varint_bytes
from server.osthread import name_os_thread

log = logging.getLogger(__name__)

MIB = 1 << 20
TRIM_SOON_S = 0.25  # after arena shrinks (`_Shrinker`)


def malloc_trim() -> bool:
    """glibc's malloc_trim(0): return the free heap memory (replies, requests, arrays of calls that
    ended) to the OS; without it glibc keeps it mapped and RSS stays at the peak. False where the C
    library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


# -- ONNX Runtime's own allocations ----------------------------------------------------------------
# The budget above counts what calls are *estimated* to need. A version whose output sizes or run
# time come from input *values* (ConstantOfShape, Range, Tile, a Loop's trip count:
# `runtime.bounded_by_input_size`) has no estimate: an 8-byte request can ask for gigabytes. Such
# versions allocate their CPU memory from one shared ONNX Runtime arena with a maximum, so a run
# that would take more fails cleanly (RESOURCE_EXHAUSTED naming the flag that set the cap) instead
# of growing the process; every such run shrinks the arena afterwards, and again once its outputs
# are dropped (`released_soon`). With --ort-arena-cap every version uses it.
# Registered once per process (ONNX Runtime cannot replace it): later servers in the same process
# share the first one's cap.
@dataclass(frozen=True)
class SharedArena:
    """The shared CPU arena in force: its cap, the flag that set it, and who allocates from it."""

    max_bytes: int
    flag: str  # "--max-request-memory-mb" or "--memory-budget-mb": what a refusal names
    every_session: bool  # --ort-arena-cap: every version; else only those sized by input values

    def describe(self) -> str:
        return f"{self.max_bytes / MIB:,.0f} MiB cap ({self.flag})"


_ARENA: dict[str, SharedArena | None] = {"arena": None}
_ARENA_LOCK = threading.Lock()


def arena_cap(total: int, request_limit: int | None, every_session: bool = False) -> tuple[int, str]:
    """(bytes, flag) the shared arena is capped at. Versions sized by input values only: what one
    call may hold (--max-request-memory-mb), or the budget where that is smaller: the arena holds
    every such run at once, and a cap of the whole budget (60 % of the machine by default) would let
    one 8-byte request take that much. Every version (--ort-arena-cap): the budget, which all calls
    share."""
    if every_session or request_limit is None or total <= request_limit:
        return int(total), "--memory-budget-mb"
    return int(request_limit), "--max-request-memory-mb"


def share_ort_arena(max_bytes: int, flag: str = "--memory-budget-mb", every_session: bool = False) -> SharedArena:
    """Register ONNX Runtime's shared CPU arena capped at `max_bytes` (once per process); returns
    the arena in force. `every_session` sticks once any server of the process asked for it."""
    with _ARENA_LOCK:
        arena = _ARENA["arena"]
        if arena is None:
            import onnxruntime as ort

            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # kSameAsRequested (1): the arena grows by what a run asks for, so a shrink returns all of it
            config = ort.OrtArenaCfg({"max_mem": int(max_bytes), "arena_extend_strategy": 1})
            ort.create_and_register_allocator(info, config)
            arena = SharedArena(int(max_bytes), flag, every_session)
        elif arena.max_bytes != int(max_bytes):
            log.warning(
                "ONNX Runtime's shared arena stays capped at %s (set by the first server of this process)",
                arena.describe(),
            )
        if every_session and not arena.every_session:
            arena = SharedArena(arena.max_bytes, arena.flag, True)
        _ARENA["arena"] = arena
    _shared_shrink()  # its session now, not in the first run that needs it
    return arena


def shared_arena() -> SharedArena | None:
    """The shared arena in force; None while none is registered (every session has its own)."""
    return _ARENA["arena"]


def uses_shared_arena(bounded: bool) -> bool:
    """Whether a version loaded now allocates from the shared arena: one whose memory is sized by
    input values (`bounded` False), or any with --ort-arena-cap; none while no arena is registered."""
    arena = _ARENA["arena"]
    return arena is not None and (arena.every_session or not bounded)


def _pb(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint (int) or a length-delimited payload (bytes)."""
    if isinstance(payload, int):
        return varint_bytes(number << 3) + varint_bytes(payload)
    return varint_bytes(number << 3 | 2) + varint_bytes(len(payload)) + payload


def _neg_model() -> bytes:
    """An ONNX model b = Neg(a), a and b float[1] (written here: the server does not need onnx)."""
    tensor = _pb(1, _pb(1, 1) + _pb(2, _pb(1, _pb(1, 1))))  # TypeProto.tensor_type: FLOAT, shape [1]
    graph = (_pb(1, _pb(1, b"a") + _pb(2, b"b") + _pb(4, b"Neg")) + _pb(2, b"shrink")
             + _pb(11, _pb(1, b"a") + _pb(2, tensor)) + _pb(12, _pb(1, b"b") + _pb(2, tensor)))  # fmt: skip
    return _pb(1, 8) + _pb(7, graph) + _pb(8, _pb(1, b"") + _pb(2, 17))  # ir_version 8, opset 17


class _SharedArenaShrink:
    """Shrinks the shared arena now: a run of a one-value model whose input and output are this
    object's buffers (io-binding), so the run itself allocates nothing in the arena that could keep
    a region from being returned."""

    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(_neg_model(), options, providers=["CPUExecutionProvider"])
        self._buffers = np.zeros(1, np.float32), np.zeros(1, np.float32)
        self._binding = self._session.io_binding()
        self._binding.bind_input("a", "cpu", 0, np.float32, [1], self._buffers[0].ctypes.data)
        self._binding.bind_output("b", "cpu", 0, np.float32, [1], self._buffers[1].ctypes.data)
        self._options = shrink_options()

    def __call__(self) -> None:
        self._session.run_with_iobinding(self._binding, self._options)


def shrink_options():
    """RunOptions that shrink ONNX Runtime's CPU arena at the end of the run."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class _Shrinker:
    """Shrinks ONNX Runtime arenas soon after the outputs of a run that shrank one are dropped, on
    one thread. ONNX Runtime shrinks an arena only at the end of a run, when that run's outputs
    (which Python's arrays then use without a copy) still hold their chunks: the regions they lie in
    stay mapped until a later shrinking run finds them free (measured in-process: after a stalled
    reader's 40 s of encoder calls of 16 x 400 steps, RSS 918 MiB 5 s after it went, start 108;
    180 MiB after one more shrinking run). TRIM_SOON_S after a burst of shrinks, `malloc_trim`:
    regions under glibc's mmap threshold (up to 32 MiB) were heap, which glibc keeps mapped when
    freed (measured: +98 MiB after a 4 x 3,000-step encoder run on the shared arena, +0 trimmed)."""

    def __init__(self) -> None:
        # re-entrant: a finalizer may call `request` on this thread while it holds the lock
        self._cond = threading.Condition(threading.RLock())
        self._due: dict[object, object] = {}  # key -> what shrinks it (a callable)
        self._thread: threading.Thread | None = None
        self.shrinks = self.trims = 0

    def request(self, key: object, shrink) -> None:
        """Call `shrink()` soon (once for several requests of one key); any thread, also from a
        finalizer inside a deallocation."""
        with self._cond:
            self._due[key] = shrink
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ort-arena-shrink", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        name_os_thread("arena-shrink")
        trim_at = None  # time.monotonic() of the trim after the last shrinks
        while True:
            with self._cond:
                while not self._due and (trim_at is None or time.monotonic() < trim_at):
                    self._cond.wait(None if trim_at is None else trim_at - time.monotonic())
                due, self._due = self._due, {}
            for shrink in due.values():
                try:
                    shrink()
                    self.shrinks += 1
                except Exception:  # never fatal: the next shrinking run still returns the memory
                    log.exception("shrinking an ONNX Runtime arena failed")
            if trim_at is None and due:
                trim_at = time.monotonic() + TRIM_SOON_S
            elif trim_at is not None and time.monotonic() >= trim_at:
                self.trims += malloc_trim()
                trim_at = None
            del due


SHRINKER = _Shrinker()
_SHARED_SHRINK: dict[str, _SharedArenaShrink | None] = {"shrink": None}


def _shared_shrink() -> _SharedArenaShrink:
    with _ARENA_LOCK:
        if _SHARED_SHRINK["shrink"] is None:
            _SHARED_SHRINK["shrink"] = _SharedArenaShrink()
        return _SHARED_SHRINK["shrink"]


def released_soon(results, key: object, shrink) -> None:
    """After a run that shrank an arena: `shrink()` again (on the shrinker's thread) once each of
    its output arrays, which are ONNX Runtime's memory (no copy), is dropped; at once when the run
    left none (it failed) or some were copied out (strings)."""
    request = functools.partial(SHRINKER.request, key, shrink)
    tracked = 0
    for value in results or ():
        if isinstance(value, np.ndarray) and value.base is not None:
            weakref.finalize(value, request).atexit = False
            tracked += 1
    if not results or tracked < len(results):
        request()


def shared_arena_shrink():
    """What shrinks the shared arena (for `released_soon`); None while none is registered."""
    return _shared_shrink() if _ARENA["arena"] is not None else None
