"""The server's own work per streamed chunk, without gRPC: a steadier measure than the served lines.

    python -m bench.path [--models DIR] [--model stream_encoder] [--seconds 4] [--tree DIR]

`--sequences` sequences (64) send the streaming line's chunk requests (`chunk_requests`, parsed
once) through the gRPC servicer's per-request stream path (`InferenceServicer._stream_one`: the gate, decoding,
validation, sequence state, the batcher and ONNX Runtime on its thread, the reply's wire bytes),
each a closed loop, on one event loop in this process, pinned to one CPU with one ONNX Runtime
thread; the transport is left out (the call context is a stand-in that answers "no deadline, no
metadata"). Printed: chunks/s and the process's CPU per chunk (ONNX Runtime's share included:
`bench.streaming`'s in-process line gives that alone, ~0.18 ms for `stream_encoder` at batch 64),
and the event loop's thread's own CPU per chunk (everything but the batcher's thread: the
request's path before and after the run).
On this project's shared 2-core machine repeated runs agree within ~3 %, where the served lines
move by 10 % or more, so compare trees with it (`--tree`, alternating) before running the line.
`--profile` adds a cProfile of the event loop's thread (wall clock; compare shares, not times).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _NoTransport:
    """What the servicer reads of a gRPC call context, for a call with no transport: no metadata,
    no deadline, a fixed peer; never cancelled."""

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def add_done_callback(self, callback) -> None:
        pass

    def cancelled(self) -> bool:
        return False


# The streaming line's chunks (bench.streaming uses these): defined here, where nothing of this
# project but its protos is imported, so that `--tree` can run them against another tree's server.
FRAMES = 10  # frames per chunk
CHUNKS_PER_SEQUENCE = 50  # a sequence ends (sequence_end) after this many chunks and starts again


def features_of(model_file: Path) -> int:
    """The feature size of a streaming model's x (batch, time, features)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return int(next(i.shape[2] for i in session.get_inputs() if i.name == "x"))


def chunk_requests(pb, model: str, features: int, slot: int, first_id: int = 1) -> list:
    """A sequence slot's (start, middle, end) ModelInferRequests: x of the slot's own random draw,
    its `FRAMES` as lengths, request id = the slot, sequence_id = `first_id` + the slot."""
    import numpy as np

    x = np.random.default_rng(slot).standard_normal((1, FRAMES, features)).astype(np.float32)
    out = []
    for start, end in ((True, False), (False, False), (False, True)):
        r = pb.ModelInferRequest(model_name=model, id=str(slot))
        r.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        r.inputs.add(name="lengths", datatype="INT64", shape=[1])
        r.raw_input_contents.extend([x.tobytes(), np.array([FRAMES], np.int64).tobytes()])
        r.parameters["sequence_id"].uint64_param = first_id + slot
        r.parameters["sequence_start"].bool_param = start
        r.parameters["sequence_end"].bool_param = end
        out.append(r)
    return out


async def measure(models: Path, model: str, seconds: float, sequences: int, profile: bool) -> dict:
    from server.app import InferenceServer
    from server.config import Settings
    from server.proto import grpc_service_pb2 as pb
    from server.servicer import InferenceServicer

    features = features_of(models / model / "1" / "model.onnx")
    server = InferenceServer(Settings(model_repository=models, port=0, intra_op_threads=1))
    server.repository.load_all()
    servicer = InferenceServicer(server.plane, lambda: True, gate=server._gate([]))
    context = _NoTransport()
    requests = [chunk_requests(pb, model, features, k) for k in range(sequences)]
    done, stop = [0], [False]

    async def sequence(k: int) -> None:
        sent = 0
        while not stop[0]:
            i = sent % CHUNKS_PER_SEQUENCE
            request = requests[k][0 if i == 0 else 2 if i == CHUNKS_PER_SEQUENCE - 1 else 1]
            response, result, hold, _ = await servicer._stream_one(request, context, None)
            if hold is not None:
                hold.release()
            if result is None:
                raise RuntimeError(f"chunk refused: {response}")
            sent += 1
            done[0] += 1

    tasks = [asyncio.ensure_future(sequence(k)) for k in range(sequences)]
    try:
        await asyncio.sleep(min(1.0, seconds))  # warm-up
        cpu0, n0, t0, loop0 = time.process_time(), done[0], time.perf_counter(), time.thread_time()
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        await asyncio.sleep(seconds)
        if profiler is not None:
            profiler.disable()
        cpu1, n1, t1, loop1 = time.process_time(), done[0], time.perf_counter(), time.thread_time()
    finally:
        stop[0] = True
        await asyncio.gather(*tasks, return_exceptions=True)
    chunks = n1 - n0
    figures = {"model": model, "sequences": sequences, "seconds": t1 - t0, "chunks": chunks,
               "chunks_per_s": chunks / (t1 - t0), "cpu_ms_per_chunk": (cpu1 - cpu0) / chunks * 1e3 if chunks else None,
               "cpu_busy": (cpu1 - cpu0) / (t1 - t0),
               "loop_ms_per_chunk": (loop1 - loop0) / chunks * 1e3 if chunks else None}  # fmt: skip
    if profiler is not None:
        import pstats

        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="stream_encoder", help="a stateful model (h0/c0 inputs)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--tree", type=Path, default=None, help="run the server code of this checkout instead")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tree is not None:  # the other tree's server, this file: a fresh interpreter (run as a script)
        import subprocess

        env = {**os.environ, "PYTHONPATH": str(args.tree.resolve())}
        given = list(argv if argv is not None else sys.argv[1:])
        at = next(i for i, a in enumerate(given) if a == "--tree" or a.startswith("--tree="))
        rest = given[:at] + given[at + (1 if "=" in given[at] else 2) :]
        return subprocess.call([sys.executable, str(Path(__file__).resolve()), *rest], env=env)
    if not args.no_pin:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if args.model == "stream_encoder":
        from bench.streaming import ensure_model

        ensure_model(args.models, args.model)
    figures = asyncio.run(measure(args.models.resolve(), args.model, args.seconds, args.sequences, args.profile))
    print(f"stream path without gRPC, {figures['sequences']} sequences of {args.model}: "
          f"{figures['chunks_per_s']:.0f} chunks/s, CPU {figures['cpu_ms_per_chunk']:.3f} ms per chunk "
          f"({100 * figures['cpu_busy']:.0f} % busy; the event loop's thread "
          f"{figures['loop_ms_per_chunk']:.3f} ms)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    sys.stdout.flush()
    os._exit(0)  # the loaded server's threads (sequence sweeper, executor) need no orderly stop here


if __name__ == "__main__":
    sys.exit(main())
