"""Kernel names for the server's own threads.

Python (before 3.14) leaves every thread's kernel name as the process's ("python"), so `top -H`,
`ps -L`, `perf` and /proc/PID/task/TID/comm cannot tell the event loop from a model's run thread.
The server's threads name themselves on start with `name_os_thread`:

- ``loop``: the event loop (both frontends' request paths; small runs made inline when nothing
  else is in progress, see `DataPlane.infer_async`);
- ``run:<model>``: a model's batcher threads (its ONNX Runtime runs, the merge and split);
- ``infer``: the executor threads (large requests' decoding and validation, runs of versions that
  never run on the loop);
- ``watchdog``, ``arena-shrink``, ``seq-sweep``, ``repo-poll``: the background threads.

gRPC's own threads keep the names gRPC gives them. Linux keeps the first 15 bytes of a name.
`bench.streaming` and `bench.shm` read these to split the server's CPU into runs and the rest.
"""

from __future__ import annotations

import ctypes
import sys

_PR_SET_NAME = 15  # prctl(2)
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
