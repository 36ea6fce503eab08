"""Transport experiment: what the Python gRPC layer costs per call, and whether grpc.aio would cut it.

    python -m bench.transport --models models [--seconds 5] [--out docs/transport.json]

Each server runs alone, pinned to CPU 0 with one ONNX Runtime thread and batching off, so every
call is one ORT run of its own; the load comes from CPU 1 (bench.loadgen, closed loop):

- ``product``: the real server (``python -m server --no-batching``): admission, statistics,
  metrics, health, reflection, ``grpc.aio`` with ONNX Runtime on executor threads.
- ``sync``: a minimal sync ``grpc.server`` (thread pool) calling the same DataPlane (no admission
  or health): the transport the product server used before it moved to asyncio.
- ``aio``: a minimal ``grpc.aio`` server calling the DataPlane inline on the event loop (one call
  at a time: on one pinned core that loses nothing to a thread hop).
- ``aio-thread``: ``grpc.aio`` with ``await asyncio.to_thread(plane.infer, ...)``.
- ``noop``: ``aio`` without the model: each call decodes its request and answers zeros of the
  outputs' real shapes, encoded the same way (the first call of each model, input shapes and
  outputs asked for runs the model once to learn them; the request's id is echoed). Its c=16
  rate is what the transport alone costs per call on one core.

- ``rest-binary`` / ``rest-json``: the product server's HTTP/REST port (``--http-port``), the
  tensors in Triton's binary extension or as JSON lists; one keep-alive connection per client.

Per server: ServerLive (REST: GET /v2/health/live) at concurrency 1 (calls/s: the bare
transport), ModelInfer of one T=50 sequence of the encoder at concurrency 1 (p50 ms) and 16
(sequences/s). An experiment to inform a
frontend choice, not part of `make bench`; the ratios within one run are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("product", "sync", "aio", "aio-thread", "noop", "rest-binary", "rest-json")
REST_MODES = ("rest-binary", "rest-json")


SERVER_ARGS = ["--device", "cpu", "--no-batching", "--intra-op-threads", "1", "--inter-op-threads", "1"]


def _plane(models: Path):
    """The product server's data plane, built by the same factory from the same flags."""
    from server.config import load_settings
    from server.factory import build_plane

    plane = build_plane(load_settings(["--model-repository", str(models), *SERVER_ARGS], {}))
    plane.repository.load_all()
    return plane


def _serve(mode: str, models: Path) -> None:
    """Run one minimal server (sync | aio | aio-thread); print its port; serve until killed."""
    import grpc

    from server.grpc_codec import to_infer_request, to_infer_response
    from server.handlers import error_status
    from server.proto import grpc_service_pb2 as pb
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    plane = _plane(models)

    def infer(request):
        return to_infer_response(plane.infer(to_infer_request(request, plane, None)), request)

    if mode == "noop":
        import dataclasses

        import numpy as np

        learned = {}  # (model, version, input shapes, outputs asked for) -> (a real answer, output shapes/dtypes)

        def infer(request):  # noqa: F811 - the model replaced by zeros of its outputs' shapes
            decoded = to_infer_request(request, plane, None)
            key = (
                decoded.model_name,
                decoded.model_version,
                tuple((name, a.shape) for name, a in decoded.inputs.items()),
                tuple(decoded.outputs),
            )
            if key not in learned:
                real = plane.infer(decoded)
                learned[key] = (real, {n: (a.shape, a.dtype) for n, a in real.outputs.items()})
            real, spec = learned[key]
            zeros = {n: np.zeros(shape, dtype) for n, (shape, dtype) in spec.items()}
            return to_infer_response(dataclasses.replace(real, id=decoded.id, outputs=zeros), request)

    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]

    if mode == "sync":

        class Sync(pb_grpc.GRPCInferenceServiceServicer):
            def ServerLive(self, request, context):  # noqa: N802
                return pb.ServerLiveResponse(live=True)

            def ModelInfer(self, request, context):  # noqa: N802
                try:
                    return infer(request)
                except Exception as exc:  # noqa: BLE001
                    code, _, message = error_status(exc)
                    context.abort(code, message)

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Sync(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(f"listening on 127.0.0.1:{port}", flush=True)
        server.wait_for_termination()
        return

    threaded = mode == "aio-thread"

    class Aio(pb_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):  # noqa: N802
            return pb.ServerLiveResponse(live=True)

        async def ModelInfer(self, request, context):  # noqa: N802
            try:
                if threaded:
                    return await asyncio.to_thread(infer, request)
                return infer(request)
            except Exception as exc:  # noqa: BLE001
                code, _, message = error_status(exc)
            await context.abort(code, message)

    async def main() -> None:
        server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Aio(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def _start(mode: str, models: Path, http_port: int = -1):
    from scale.replicas import start_process, start_replica

    if mode == "product" or mode in REST_MODES:
        return start_replica(models, [*SERVER_ARGS, "--http-port", str(http_port)], {0})
    return start_process(["-m", "bench.transport", "--serve", mode, "--models", str(models)], {0})


def _live_rate(target: str, seconds: float) -> float:
    import grpc

    from server.proto import grpc_service_pb2 as pb
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ServerLiveRequest()
        for _ in range(200):
            stub.ServerLive(request, timeout=10)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            stub.ServerLive(request, timeout=10)
            n += 1
        return n / (time.perf_counter() - t0)


def _rest_worker(port, model, features, threads, warmup_s, duration_s, seed, binary, queue) -> None:
    import http.client

    from bench.loadgen import closed_loop, make_requests

    os.sched_setaffinity(0, {1})
    requests = make_requests("single50", features, 64, seed)
    bodies = {}
    for r in requests:
        inputs = [("x", r.x, "FP32"), ("lengths", r.lengths, "INT64")]
        if binary:
            head = {
                "inputs": [{"name": n, "shape": list(a.shape), "datatype": d,
                            "parameters": {"binary_data_size": a.nbytes}} for n, a, d in inputs],
                "parameters": {"binary_data_output": True},
            }  # fmt: skip
            text = json.dumps(head).encode()
            bodies[id(r)] = (
                text + r.x.tobytes() + r.lengths.tobytes(),
                {"Inference-Header-Content-Length": str(len(text))},
            )
        else:
            head = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": d, "data": a.reshape(-1).tolist()}
                               for n, a, d in inputs]}  # fmt: skip
            bodies[id(r)] = (json.dumps(head).encode(), {})
    local = threading.local()

    def call(r) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body, headers = bodies[id(r)]
        conn.request("POST", f"/v2/models/{model}/infer", body, headers)
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            raise RuntimeError(payload[:200])
        if not binary:
            json.loads(payload)  # a JSON client parses what it gets

    queue.put(closed_loop(call, requests, threads, warmup_s, duration_s, offset=seed))


def run_rest_load(port, model, features, concurrency, warmup_s, duration_s, binary, processes=2):
    from bench.loadgen import run_in_processes

    total = run_in_processes(
        _rest_worker,
        lambda p, threads: (port, model, features, threads, warmup_s + 1.0, duration_s, p, binary),
        concurrency,
        processes,
        warmup_s + duration_s + 300,
    )
    total.window_s = duration_s
    return total


def _rest_live_rate(port: int, seconds: float) -> float:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            conn.request("GET", "/v2/health/live")
            conn.getresponse().read()
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        conn.close()


def _measure(mode: str, models: Path, model: str, features: int, seconds: float) -> dict:
    from bench.loadgen import run_grpc_load

    os.sched_setaffinity(0, {1})
    from scale.replicas import free_port

    http_port = free_port() if mode in REST_MODES else -1
    replica = _start(mode, models, http_port)
    try:
        target = replica.address
        if mode in REST_MODES:
            binary = mode == "rest-binary"
            row = {"mode": mode, "live_calls_per_s": _rest_live_rate(http_port, seconds)}
            c1 = run_rest_load(http_port, model, features, 1, 1.0, seconds, binary, processes=1)
            c16 = run_rest_load(http_port, model, features, 16, 1.0, seconds, binary, processes=2)
        else:
            row = {"mode": mode, "live_calls_per_s": _live_rate(target, seconds)}
            c1 = run_grpc_load(target, model, "single50", features, 1, 1.0, seconds, processes=1, cpus={1})
            c16 = run_grpc_load(target, model, "single50", features, 16, 1.0, seconds, processes=2, cpus={1})
        s1, s16 = c1.summary(), c16.summary()
        row.update(
            c1_p50_ms=s1["p50_ms"],
            c1_seq_per_s=c1.sequences / c1.window_s,
            c16_seq_per_s=c16.sequences / c16.window_s,
            c16_p50_ms=s16["p50_ms"],
            errors=c1.errors + c16.errors,
        )
        return row
    finally:
        replica.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="encoder", help="a dynamic model of the repository")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--serve", choices=("sync", "aio", "aio-thread", "noop"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.models)
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        print("needs 2 CPUs (server on CPU 0, load on CPU 1)", file=sys.stderr)
        return 2
    import grpc
    import onnxruntime

    session = onnxruntime.InferenceSession(str(args.models / args.model / "1" / "model.onnx"))
    features = int(session.get_inputs()[0].shape[2])
    rows = [_measure(m, args.models, args.model, features, args.seconds) for m in args.modes.split(",")]
    base = rows[0]
    print(f"{'server':<11} {'live/s':>8} {'c=1 p50 ms':>11} {'c=16 seq/s':>11} {'vs ' + base['mode']:>12}")
    for r in rows:
        ratio = r["c16_seq_per_s"] / base["c16_seq_per_s"]
        print(
            f"{r['mode']:<11} {r['live_calls_per_s']:>8.0f} {r['c1_p50_ms']:>11.2f} {r['c16_seq_per_s']:>11.0f} "
            f"{ratio:>11.2f}x  errors {r['errors']}"
        )
    if args.out:
        report = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "versions": {"python": platform.python_version(), "grpcio": grpc.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "model": args.model,
            "seconds": args.seconds,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rows": rows,
        }  # fmt: skip
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
