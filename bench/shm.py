"""`python -m bench.shm`: the encoder served with its inputs and outputs in system shared memory
(Triton's extension), against the same calls with the tensors in the message, the bare RPC and
the in-process best, in one run.

Lines (payload single50: one sequence of T = 50 per request; batching on):
  live    ServerLive at c=1 and at the highest concurrency: the bare RPC
  plain   ModelInfer, tensors in the message, c=1 and c=64
  shm     ModelInfer, each client thread with its own input and output regions: it writes the
          input into its region, the request carries only the regions' names, offsets and sizes,
          the server writes the outputs into the output region (the reply holds none), c=1 and c=64
  best    ONNX Runtime in-process at batch 16 and 64 on the server's CPU (the better one)
Then the acceptance figures: shm c=64 / best (goal >= 0.85), shm c=1 p50 - in-process batch-1
run - live p50 (goal <= 0.5 ms), and the shm outputs equal the plain call's (1e-5); and, beside
them, the ceiling the shm c=64 line has with this frontend: the in-process best over what the
server's run threads spent per sequence in that line plus the bare RPC's CPU per call at the same
concurrency, i.e. the ratio a server whose request path cost nothing beyond gRPC's own would reach;
and for c=1, the server's own batch-1 run time (ModelStatistics' compute_infer per run over the
window) against the in-process one: the part of the c=1 figure that is the run itself.

Each served line also states the server's own CPU (utime + stime of its process, all threads, from
/proc/<pid>/stat) over a window inside its load: `server_cpu_ms` per request (per sequence for
plain and shm, counted by the server's ModelStatistics over the same window; per call for live,
from the clients' rate), and `server_busy`, the share of one CPU it used. Compared with the
in-process run's time per sequence, it shows what the served path adds, whatever the clients do.
That CPU is also split by the server's thread names (`server.osthread`, `bench.streaming.cpu_split`):
`run_cpu_ms` (its batcher threads: ONNX Runtime, merge and split), `loop_cpu_ms` (the event loop:
the request path, gRPC's Python callbacks, and runs made inline when nothing else is in progress,
as at c=1), `other_cpu_ms` (gRPC's own threads and the rest).

Pinned as `python -m bench` is (server and in-process lines on CPU 0, clients on the other CPUs).
Clients and server must share /dev/shm (same machine, same IPC namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.loadgen import PAYLOADS, LoadResult, closed_loop, make_requests, run_grpc_load, run_in_processes
from bench.streaming import _proc_cpu_s, _statistics, _thread_cpu_s, cpu_split
from server.dtypes import numpy_dtype

ROOT = Path(__file__).resolve().parents[1]
SERVER_CPU = 0
OUTPUT_SLACK = 4096  # bytes of each output region beyond what the outputs take
TOL = 1e-5  # float32 through the same ORT session: the plain and the shm call agree to this


def _infer_request(pb, model: str, x: np.ndarray, lengths: np.ndarray):
    from server.codec import encode_input

    req = pb.ModelInferRequest(model_name=model)
    encode_input(req, "x", x)
    encode_input(req, "lengths", lengths)
    return req


def _set_shm(params, region: str, offset: int, byte_size: int) -> None:
    params["shared_memory_region"].string_param = region
    params["shared_memory_offset"].int64_param = offset
    params["shared_memory_byte_size"].int64_param = byte_size


class ShmClient:
    """One client thread's regions: an input object (x then lengths) and an output object (each
    output at its own offset), registered with the server under names of its own."""

    def __init__(self, stub, pb, model: str, tag: str, x_shape, out_sizes: dict[str, int]) -> None:
        from multiprocessing import shared_memory

        self.stub, self.pb, self.model = stub, pb, model
        self.x_bytes = int(np.prod(x_shape)) * 4
        self.len_bytes = int(x_shape[0]) * 8
        self.offsets, pos = {}, 0
        for name, size in out_sizes.items():
            self.offsets[name] = (pos, size + OUTPUT_SLACK)
            pos += size + OUTPUT_SLACK
        self.inp = shared_memory.SharedMemory(create=True, size=self.x_bytes + self.len_bytes)
        self.out = shared_memory.SharedMemory(create=True, size=pos)
        self.names = (f"{tag}-in", f"{tag}-out")
        for name, obj in zip(self.names, (self.inp, self.out), strict=True):
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name=name, key="/" + obj.name, offset=0, byte_size=obj.size),
                timeout=30,
            )
        req = pb.ModelInferRequest(model_name=model)
        for name, shape, datatype, offset, size in (
            ("x", x_shape, "FP32", 0, self.x_bytes),
            ("lengths", x_shape[:1], "INT64", self.x_bytes, self.len_bytes),
        ):
            tensor = req.inputs.add(name=name, datatype=datatype, shape=list(shape))
            _set_shm(tensor.parameters, self.names[0], offset, size)
        for name, (offset, size) in self.offsets.items():
            _set_shm(req.outputs.add(name=name).parameters, self.names[1], offset, size)
        self.request = req
        self.x_view = np.ndarray(tuple(x_shape), np.float32, buffer=self.inp.buf)
        self.len_view = np.ndarray((int(x_shape[0]),), np.int64, buffer=self.inp.buf, offset=self.x_bytes)

    def call(self, x: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """Write the input into the region, infer, and view the outputs where the server wrote them."""
        self.x_view[...] = x
        self.len_view[...] = lengths
        reply = self.stub.ModelInfer(self.request, timeout=60)
        if any(len(raw) for raw in reply.raw_output_contents):
            raise RuntimeError("the reply carries output bytes: the outputs did not go to shared memory")
        out = {}
        for tensor in reply.outputs:
            offset, _ = self.offsets[tensor.name]
            dtype = numpy_dtype(tensor.datatype)
            out[tensor.name] = np.ndarray(tuple(tensor.shape), dtype, buffer=self.out.buf, offset=offset)
        return out

    def close(self) -> None:
        for name in self.names:
            try:
                self.stub.SystemSharedMemoryUnregister(
                    self.pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=30
                )
            except Exception:  # noqa: BLE001 - the server may be gone; the objects go anyway
                pass
        for obj in (self.inp, self.out):
            obj.close()
            obj.unlink()


def _plain_outputs(stub, pb, model: str, x, lengths) -> dict[str, np.ndarray]:
    reply = stub.ModelInfer(_infer_request(pb, model, x, lengths), timeout=60)
    return {
        t.name: np.frombuffer(raw, np.float32).reshape(tuple(t.shape))
        for t, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)
    }


def _shm_worker(target, model, payload, features, threads, warmup_s, duration_s, seed, cpus, queue) -> None:
    import grpc

    if cpus:
        os.sched_setaffinity(0, cpus)
    from server.proto import grpc_service_pb2 as pb
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    requests = make_requests(payload, features, 256, seed)
    channels = [grpc.insecure_channel(target) for _ in range(max(1, threads // 8))]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    first = requests[0]
    out_sizes = {k: v.nbytes for k, v in _plain_outputs(stubs[0], pb, model, first.x, first.lengths).items()}
    clients = [
        ShmClient(stubs[k % len(stubs)], pb, model, f"bench-{os.getpid()}-{k}", first.x.shape, out_sizes)
        for k in range(threads)
    ]
    slot = {}
    try:
        import threading

        lock, counter = threading.Lock(), iter(range(threads))

        def call(r) -> None:
            me = threading.get_ident()
            if me not in slot:
                with lock:
                    slot[me] = clients[next(counter)]
            slot[me].call(r.x, r.lengths)

        queue.put(closed_loop(call, requests, threads, warmup_s, duration_s, offset=seed))
    finally:
        for c in clients:
            c.close()
        for ch in channels:
            ch.close()


def run_shm_load(target, model, payload, features, concurrency, warmup_s, duration_s, processes=2, cpus=None):
    total = run_in_processes(
        _shm_worker,
        lambda p, threads: (target, model, payload, features, threads, warmup_s + 1.0, duration_s, p, cpus),
        concurrency,
        processes,
        warmup_s + duration_s + 300,
    )
    total.window_s = duration_s
    return total


def _inferences(target: str, model: str) -> int:
    """Sequences the server has inferred for `model` so far (ModelStatistics)."""
    return _statistics(target, model)[0]


def with_server_cpu(pid: int, target: str, model: str, load, warmup_s: float, duration_s: float,
                    count: bool = True) -> tuple[LoadResult, dict]:  # fmt: skip
    """`load()` (a closed-loop run) in a thread while the server's CPU is read over a window inside
    it: from `warmup_s` + 1 s after its first request (the clients' own warm-up) for half of
    `duration_s`. {"server_cpu_ms": ms of server CPU per sequence (ModelStatistics over the same
    window; per call from the clients' rate when not `count`: ServerLive), "server_busy": share
    of one CPU}; the ms is None when the window saw no request."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", load()), daemon=True)
    before = _inferences(target, model) if count else 0
    started = time.monotonic()
    thread.start()
    if count:  # the clients' first request: they set up (processes, regions) before it
        while thread.is_alive() and _inferences(target, model) == before and time.monotonic() - started < 120:
            time.sleep(0.05)
    else:
        time.sleep(1.5)  # no count to watch: the clients' usual set-up time
    thread.join(timeout=max(0.0, warmup_s + 1.0))
    none = (0, 0, 0)
    cpu0, stats0, t0 = _proc_cpu_s(pid), _statistics(target, model) if count else none, time.monotonic()
    threads0 = _thread_cpu_s(pid)
    thread.join(timeout=duration_s / 2)
    cpu1, stats1, t1 = _proc_cpu_s(pid), _statistics(target, model) if count else none, time.monotonic()
    threads1 = _thread_cpu_s(pid)
    n0, n1, runs = stats0[0], stats1[0], stats1[1] - stats0[1]
    thread.join()
    if "result" not in out:
        raise RuntimeError("the load did not finish")
    result: LoadResult = out["result"]
    seconds = max(t1 - t0, 1e-9)
    served = n1 - n0 if count else result.summary()["seq_per_s"] * seconds
    cpu = cpu1 - cpu0
    figures = {"server_cpu_ms": 1e3 * cpu / served if served > 0 else None, "server_busy": cpu / seconds}
    if runs > 0:  # the server's ONNX Runtime runs over the window: wall time each, sequences each
        figures["run_ms"] = (stats1[2] - stats0[2]) / 1e6 / runs
        figures["mean_batch"] = (n1 - n0) / runs
    for part, part_s in cpu_split(threads0, threads1).items():
        figures[f"{part}_cpu_ms"] = 1e3 * part_s / served if served > 0 else None
    return result, figures


def check_equal(target: str, model: str, features: int) -> float:
    """Largest |difference| between the shm call's outputs and the plain call's, over 8 requests."""
    import grpc

    from server.proto import grpc_service_pb2 as pb
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    worst = 0.0
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        reqs = make_requests("single50", features, 8, seed=123)
        sizes = {k: v.nbytes for k, v in _plain_outputs(stub, pb, model, reqs[0].x, reqs[0].lengths).items()}
        client = ShmClient(stub, pb, model, f"bench-check-{os.getpid()}", reqs[0].x.shape, sizes)
        try:
            for r in reqs:
                want = _plain_outputs(stub, pb, model, r.x, r.lengths)
                got = client.call(r.x, r.lengths)
                assert set(got) == set(want), (sorted(got), sorted(want))
                worst = max([worst, *(float(np.abs(got[k] - want[k]).max()) for k in want)])
        finally:
            client.close()
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="encoder")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--server-args", default="", help="extra flags for the server")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bench.__main__ import ServerProcess, batch_throughput
    from export.onnx_export import config_from_metadata, read_metadata

    model_file = args.models / args.model / "1" / "model.onnx"
    features = config_from_metadata(read_metadata(model_file)).input_size
    steps = PAYLOADS["single50"][0]
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    server_cpus = {SERVER_CPU} if pin else None
    client_cpus = set(cpus) - {SERVER_CPU} if pin else None
    levels = [int(c) for c in args.concurrency.split(",")]
    if pin:
        os.sched_setaffinity(0, {SERVER_CPU})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1 if pin else 0
    session = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])

    def ort_run(x, lengths) -> None:
        session.run(None, {"x": x, "lengths": lengths})

    seconds = max(1.0, args.duration / 2)
    run1, run1_ms = batch_throughput(ort_run, features, 1, steps, seconds)
    best_batch, best = max(((b, batch_throughput(ort_run, features, b, steps, seconds)[0]) for b in (16, 64)),
                           key=lambda t: t[1])  # fmt: skip
    print(f"in-process: batch 1 {run1:.0f} seq/s (median run {run1_ms:.3f} ms); best {best:.0f} seq/s at batch "
          f"{best_batch} ({1e3 / best:.3f} ms per sequence)", flush=True)  # fmt: skip
    if pin:
        os.sched_setaffinity(0, set(cpus))

    figures: dict = {"in_process": {"batch1_seq_s": run1, "batch1_ms": run1_ms, "best_seq_s": best,
                                    "best_batch": best_batch}, "lines": {}}  # fmt: skip
    srv = ServerProcess(args.models, ["--batching", *args.server_args.split()], server_cpus)
    try:

        def show(line: str, conc: int, load, count: bool = True) -> dict:
            res, cpu = with_server_cpu(srv.proc.pid, srv.target, args.model, load, args.warmup, args.duration, count)
            s = {**res.summary(), **cpu}
            figures["lines"][f"{line}_c{conc}"] = s
            ms = "n/a" if s["server_cpu_ms"] is None else f"{s['server_cpu_ms']:.3f} ms"
            parts = ", ".join(f"{part} {s[f'{part}_cpu_ms']:.3f}" for part in ("run", "loop", "other")
                              if s.get(f"{part}_cpu_ms") is not None)  # fmt: skip
            print(f"{line:6} c={conc:<3} {s['seq_per_s']:8.1f} seq/s  p50 {s['p50_ms']:7.3f} ms  "
                  f"p99 {s['p99_ms']:7.3f} ms  errors {s['errors']}  server CPU {ms}/req ({parts}; "
                  f"{100 * s['server_busy']:.0f}% busy)", flush=True)  # fmt: skip
            return s

        common = (args.warmup, args.duration, args.client_processes)
        live = show("live", 1, lambda: run_grpc_load(srv.target, args.model, "single50", features, 1, *common,
                                                     cpus=client_cpus, method="ServerLive"), count=False)  # fmt: skip
        top = max(levels)
        live_top = None if top < 64 else show(  # the bare RPC at the ceiling's concurrency (below)
            "live", top, lambda: run_grpc_load(srv.target, args.model, "single50", features, top, *common,
                                               cpus=client_cpus, method="ServerLive"), count=False)  # fmt: skip
        for conc in levels:
            show("plain", conc, lambda conc=conc: run_grpc_load(srv.target, args.model, "single50", features, conc,
                                                                *common, cpus=client_cpus))  # fmt: skip
        try:
            worst = check_equal(srv.target, args.model, features)
        except Exception as exc:  # noqa: BLE001 - a server without the extension: say so, keep the rest
            print(f"shm: n/a ({type(exc).__name__}: {str(exc)[:300]})", flush=True)
            figures["shm_error"] = str(exc)[:300]
            worst = None
        if worst is not None:
            print(f"shm outputs vs plain: max |diff| {worst:.2e} (goal <= {TOL:g})", flush=True)
            figures["max_abs_diff"] = worst
            shm = {conc: show("shm", conc, lambda conc=conc: run_shm_load(srv.target, args.model, "single50", features,
                                                                          conc, *common, cpus=client_cpus))
                   for conc in levels}  # fmt: skip
            targets = []
            if top >= 64:
                ratio = shm[top]["seq_per_s"] / best
                targets.append(("shm c=%d / in-process best" % top, ratio, ">= 0.85", ratio >= 0.85))
                run_ms, rpc_ms = shm[top].get("run_cpu_ms"), live_top["server_cpu_ms"]
                if run_ms and rpc_ms is not None:  # a server that names its run threads (server.osthread)
                    ceiling = 1e3 / best / (run_ms + rpc_ms)
                    figures["ceiling"] = {"run_cpu_ms": run_ms, "rpc_cpu_ms": rpc_ms, "ratio": ceiling}
                    print(f"shm c={top} ceiling with this frontend: {ceiling:.2f} of the in-process best "
                          f"(its run threads {run_ms:.3f} ms per sequence + the bare RPC {rpc_ms:.3f} ms per call "
                          f"at c={top}, against {1e3 / best:.3f} ms in-process)", flush=True)  # fmt: skip
            if 1 in shm:
                over = shm[1]["p50_ms"] - run1_ms - live["p50_ms"]
                targets.append(("shm c=1 p50 - batch-1 run - live p50 (ms)", over, "<= 0.5", over <= 0.5))
                if shm[1].get("run_ms"):  # the same run inside the server, whose request path shares its core
                    slower = shm[1]["run_ms"] - run1_ms
                    figures["c1_run"] = {"served_run_ms": shm[1]["run_ms"], "in_process_ms": run1_ms,
                                         "slower_ms": slower}  # fmt: skip
                    print(f"shm c=1: the server's batch-1 run took {shm[1]['run_ms']:.3f} ms (median in-process "
                          f"{run1_ms:.3f}): {slower:+.3f} ms of the c=1 figure is the run itself",
                          flush=True)  # fmt: skip
            targets.append(("shm outputs vs plain, max |diff|", worst, f"<= {TOL:g}", worst <= TOL))
            figures["targets"] = [{"target": t, "value": v, "goal": g, "ok": ok} for t, v, g, ok in targets]
            for t, v, g, ok in targets:
                print(f"{'ok  ' if ok else 'MISS'} {t}: {v:.3g} (goal {g})", flush=True)
    finally:
        srv.stop()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def run_line(models: Path, model: str, cpus, warmup: float, duration: float, processes: int, json_path: Path,
             pin: bool = True, quick: bool = False) -> dict:  # fmt: skip
    """`make bench`'s shared-memory line (`python -m bench`, line s): this module's run from the
    bench's own process, its CPU affinity set to `cpus` meanwhile (the bench pins itself to the
    server's CPU); the figures, also written to `json_path`."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    argv = ["--models", str(models), "--model", model, "--warmup", str(warmup), "--duration", str(duration),
            "--client-processes", str(processes), "--json", str(json_path)]  # fmt: skip
    if quick:
        argv += ["--concurrency", "1,4"]
    if not pin:
        argv.append("--no-pin")
    try:
        main(argv)
    finally:
        os.sched_setaffinity(0, before)
    return json.loads(Path(json_path).read_text())


if __name__ == "__main__":
    sys.exit(main())
