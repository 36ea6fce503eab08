"""A reusable closed-loop load generator for Open Inference Protocol v2 gRPC servers.

`concurrency` clients each send one request, wait for the reply, send the next. Clients are
threads spread over several processes (Python's GIL would otherwise make the client the
bottleneck). Requests are built and serialized before the clock starts. Latencies of the
warm-up period are discarded. Needs grpcio, protobuf and numpy only.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

PAYLOADS = {  # lengths (time steps) drawn uniformly in [lo, hi]; 1..4 sequences per request
    "short": (5, 25),
    "long": (100, 200),
    "mixed": (5, 200),
    "single50": (50, 50),  # the targets' payload: one sequence of T = 50 per request
}
SINGLE = {"single50"}


@dataclass(frozen=True)
class Request:
    x: np.ndarray  # (b, T, F) float32, padded
    lengths: np.ndarray  # (b,) int64

    @property
    def sequences(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def steps(self) -> int:
        return int(self.lengths.sum())


def make_requests(payload: str, features: int, count: int, seed: int, max_seqs: int = 4) -> list[Request]:
    lo, hi = PAYLOADS[payload]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        b = 1 if payload in SINGLE else int(rng.integers(1, max_seqs + 1))
        lengths = rng.integers(lo, hi + 1, size=b).astype(np.int64)
        x = rng.standard_normal((b, int(lengths.max()), features)).astype(np.float32)
        for i, n in enumerate(lengths):
            x[i, n:] = 0.0
        out.append(Request(x, lengths))
    return out


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    sequences: int = 0
    steps: int = 0  # valid time steps processed (for FLOP counts)
    errors: int = 0
    window_s: float = 0.0

    def merge(self, other: LoadResult) -> None:
        self.latencies_s += other.latencies_s
        self.sequences += other.sequences
        self.steps += other.steps
        self.errors += other.errors
        self.window_s = max(self.window_s, other.window_s)

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3 if lat else float("nan")

        return {
            "requests": len(lat),
            "errors": self.errors,
            "sequences": self.sequences,
            "seq_per_s": self.sequences / self.window_s if self.window_s else 0.0,
            "steps_per_s": self.steps / self.window_s if self.window_s else 0.0,
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
            "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
        }


def closed_loop(
    call: Callable[[Request], None],
    requests: list[Request],
    threads: int,
    warmup_s: float,
    duration_s: float,
    offset: int = 0,
) -> LoadResult:
    """`threads` loops calling `call` back to back; only calls that start after warm-up count."""
    result = LoadResult()
    lock = threading.Lock()
    t_start = time.perf_counter()
    t_measure = t_start + warmup_s
    t_end = t_measure + duration_s

    def loop(k: int) -> None:
        local = LoadResult()
        i = offset + k * 7919
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            req = requests[i % len(requests)]
            i += 1
            try:
                call(req)
            except Exception:  # noqa: BLE001 - counted, the load goes on
                local.errors += 1
                continue
            done = time.perf_counter()
            if now >= t_measure and done <= t_end:
                local.latencies_s.append(done - now)
                local.sequences += req.sequences
                local.steps += req.steps
        with lock:
            result.merge(local)

    pool = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    result.window_s = duration_s
    return result


def _grpc_worker(
    target: str,
    model: str,
    payload: str,
    features: int,
    threads: int,
    warmup_s: float,
    duration_s: float,
    seed: int,
    cpus: set[int] | None,
    method: str,
    queue,
) -> None:
    import os

    import grpc

    if cpus:
        os.sched_setaffinity(0, cpus)  # keep the load generator off the server's core

    from server.codec import encode_input
    from server.proto import grpc_service_pb2 as pb
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    requests = make_requests(payload, features, 256, seed)
    wire = {}
    for r in requests:
        req = pb.ModelInferRequest(model_name=model)
        encode_input(req, "x", r.x)
        encode_input(req, "lengths", r.lengths)
        wire[id(r)] = req
    size = 256 * 1024 * 1024
    channels = [
        grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
        )
        for _ in range(max(1, threads // 8))
    ]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    counter = iter(range(10**12))

    live = pb.ServerLiveRequest()

    def call(r: Request) -> None:
        stub = stubs[next(counter) % len(stubs)]
        if method == "ServerLive":  # the bare transport: an empty request and reply
            stub.ServerLive(live, timeout=60)
        else:
            stub.ModelInfer(wire[id(r)], timeout=60)

    queue.put(closed_loop(call, requests, threads, warmup_s, duration_s, offset=seed))


def run_in_processes(worker, args_for, concurrency: int, processes: int, timeout_s: float) -> LoadResult:
    """Start `processes` spawned processes running `worker(*args_for(p, threads), queue)`, the
    `concurrency` client threads split among them; merge the LoadResults they put on the queue."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    nproc = max(1, min(processes, concurrency))
    procs = []
    for p in range(nproc):
        threads = concurrency // nproc + (1 if p < concurrency % nproc else 0)
        procs.append(ctx.Process(target=worker, args=(*args_for(p, threads), queue)))
    for proc in procs:
        proc.start()
    total = LoadResult()
    for _ in procs:
        total.merge(queue.get(timeout=timeout_s))
    for proc in procs:
        proc.join()
    return total


def run_grpc_load(
    target: str,
    model: str,
    payload: str,
    features: int,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    processes: int = 2,
    seed: int = 0,
    cpus: set[int] | None = None,
    method: str = "ModelInfer",
) -> LoadResult:
    """Closed-loop load from `processes` client processes (threads split among them). `method`:
    ModelInfer (the payload's requests) or ServerLive (the transport alone; counts a call as one
    sequence of no steps)."""
    total = run_in_processes(
        _grpc_worker,
        lambda p, threads: (
            target,
            model,
            payload,
            features,
            threads,
            warmup_s + 1.0,
            duration_s,
            seed + p,
            cpus,
            method,
        ),  # fmt: skip
        concurrency,
        processes,
        warmup_s + duration_s + 300,
    )
    total.window_s = duration_s
    return total
