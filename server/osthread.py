"""Kernel names for the server's own threads.

Python (before 3.14) leaves every thread's kernel name as the process's ("python"), so `top -H`,
`ps -L`, `perf` and /proc/PID/task/TID/comm cannot tell the event loop from a model's run thread.
The server's threads name themselves on start with `name_os_thread`:

- ``loop``: the event loop (both frontends' request paths; small runs made inline when nothing
  else is in progress, see `DataPlane.infer_async`);
- ``run:<model>``: a model's batcher threads (its ONNX Runtime runs, the merge and split);
- ``ort:<model>``: ONNX Runtime's own intra-op threads of that model's sessions (with more than
  one intra-op thread; they run parts of the runs the ``run:`` threads start);
- ``infer``: the executor threads (large requests' decoding and validation, runs of versions that
  never run on the loop);
- ``aio-exec``: the event loop's default executor (blocking work the loop hands off);
- ``grpc-poll``: gRPC's completion-queue poller, a Python thread gRPC starts from the loop;
- ``watchdog``, ``arena-shrink``, ``seq-sweep``, ``repo-poll``: the background threads.

gRPC's native threads keep the names gRPC gives them (``event_engine``, ``grpc_global_tim``).
Linux gives a new thread its creator's name, so the loop renames the threads that inherited its
own (`rename_inherited`) and a session is created under its ``ort:`` name (`named`). Linux keeps
the first 15 bytes of a name. `bench.streaming` and `bench.shm` read these to split the server's
CPU into runs and the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_PR_SET_NAME, _PR_GET_NAME = 15, 16  # prctl(2)
_LIMIT = 15  # bytes of a kernel thread name, without its terminating NUL

_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no libc symbol to call: names stay as they are
        _prctl = None


def name_os_thread(name: str) -> None:
    """Set the calling thread's kernel name to `name` (its first 15 bytes); a no-op where the
    platform has no such name."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode("utf-8", "replace")[:_LIMIT]), 0, 0, 0)


def os_thread_name() -> str | None:
    """The calling thread's kernel name; None where the platform has no such name."""
    if _prctl is None:
        return None
    buffer = ctypes.create_string_buffer(_LIMIT + 1)
    if _prctl(_PR_GET_NAME, buffer, 0, 0, 0) != 0:
        return None
    return buffer.value.decode("utf-8", "replace")


def thread_pool(name: str, max_workers: int | None = None, prefix: str | None = None) -> ThreadPoolExecutor:
    """A ThreadPoolExecutor whose threads carry the kernel name `name` (and the Python name
    `prefix`_N, `name`_N by default)."""
    return ThreadPoolExecutor(
        max_workers, thread_name_prefix=prefix or name, initializer=name_os_thread, initargs=(name,)
    )


@contextlib.contextmanager
def named(name: str) -> Iterator[None]:
    """The calling thread carries `name` meanwhile (the threads it starts inherit it), then its own
    name again."""
    before = os_thread_name()
    name_os_thread(name)
    try:
        yield
    finally:
        if before is not None:
            name_os_thread(before)


def rename_inherited(name: str) -> None:
    """Give the other threads of this process that carry `name` (inherited from the calling thread,
    which started them) names of their own: gRPC's poller ``grpc-poll``, another Python thread its
    Python name, a native thread ``python``. Linux only (a thread's name is written through
    /proc/self/task/TID/comm); elsewhere nothing happens."""
    tasks = Path("/proc/self/task")
    if _prctl is None or not tasks.is_dir():
        return
    me = threading.get_native_id()
    python = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    for task in tasks.iterdir():
        try:
            tid = int(task.name)
            if tid == me or (task / "comm").read_text().strip() != name:
                continue
            own = python.get(tid, "python")
            own = "grpc-poll" if "_poll_wrapper" in own else own
            (task / "comm").write_bytes(own.encode("utf-8", "replace")[:_LIMIT])
        except (OSError, ValueError):  # the thread ended meanwhile, or the name cannot be written
            continue
