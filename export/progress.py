"""One line per step, with its time, and a heartbeat while a step runs: an export never stays
silent for more than HEARTBEAT_S seconds (ONNX Runtime's load of an unrolled graph can take minutes)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

HEARTBEAT_S = 8.0


@contextlib.contextmanager
def step(label: str, stream=None) -> Iterator[None]:
    """Print `label ...`, then `label: done in N s` (or `failed`), and `... still label (N s)`
    every HEARTBEAT_S seconds in between."""
    out = stream or sys.stdout
    start = time.perf_counter()
    print(f"{label} ...", file=out, flush=True)
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            print(f"  ... still {label} ({time.perf_counter() - start:.0f} s)", file=out, flush=True)

    thread = threading.Thread(target=beat, name="export-heartbeat", daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        thread.join()
        print(f"{label}: {'done' if ok else 'failed'} in {time.perf_counter() - start:.1f} s", file=out, flush=True)
