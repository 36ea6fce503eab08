"""Per model-version statistics in the shape of Triton's ModelStatistics."""

from __future__ import annotations

import copy
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class VersionStats:
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    inference_count: int = 0  # sequences inferred
    execution_count: int = 0  # ORT runs (one run may serve several requests when batching)
    last_inference_ms: int = 0
    batches: dict[int, _Duration] = field(default_factory=lambda: defaultdict(_Duration))


class Statistics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, int], VersionStats] = defaultdict(VersionStats)

    def record_success(
        self,
        name: str,
        version: int,
        total_ns: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        sequences: int,
    ) -> None:
        with self._lock:
            s = self._stats[(name, version)]
            s.success.add(total_ns)
            s.queue.add(queue_ns)
            s.compute_input.add(input_ns)
            s.compute_infer.add(infer_ns)
            s.compute_output.add(output_ns)
            s.inference_count += sequences
            s.last_inference_ms = int(time.time() * 1000)

    def record_execution(self, name: str, version: int, batch: int, ns: int) -> None:
        with self._lock:
            s = self._stats[(name, version)]
            s.execution_count += 1
            s.batches[batch].add(ns)

    def record_failure(self, name: str, version: int, total_ns: int) -> None:
        with self._lock:
            self._stats[(name, version)].fail.add(total_ns)

    def record_send_failure(self, name: str, version: int, total_ns: int) -> None:
        """A request counted as a success whose response then could not be sent (the client went
        away, its deadline passed, the transport refused the message): it moves from success to
        fail. `total_ns` is the frontend's receipt-to-failure time; the success time it had added
        (shorter: it ended before the send) is taken back, up to that amount. Its compute stays
        counted (inference_count, execution and batch statistics): the model did run."""
        with self._lock:
            s = self._stats[(name, version)]
            if s.success.count > 0:
                s.success.count -= 1
                s.success.ns -= min(s.success.ns, total_ns)
            s.fail.add(total_ns)

    def snapshot(self) -> dict[tuple[str, int], VersionStats]:
        with self._lock:
            return copy.deepcopy(dict(self._stats))
