"""The streaming line: many live sequences sending short chunks to a stateful encoder that the
server keeps the state of (Triton's sequence parameters), the product's core case.

`SEQUENCES` sequences each send `FRAMES`-frame chunks (closed loop: a sequence's next chunk goes
once its previous answer came back; a sequence ends after `CHUNKS_PER_SEQUENCE` chunks and starts
again) over:
  unary     one ModelInfer call per chunk
  streams   one ModelStreamInfer stream per sequence
  one       all sequences multiplexed on one ModelStreamInfer stream (Triton's sequence stream example)
against the same model in-process at batch `SEQUENCES` on the server's core (state fed back in).
Per mode: served frames/s and its ratio to in-process, the server's CPU per chunk (utime + stime
of the server process from /proc/PID/stat over the measured window), the mean merged batch
(ModelStatistics), and real-time capacity: streams of 10 ms frames (100 frames/s each) one core
of the server would carry at that CPU per frame.

    python -m bench.streaming --models DIR [--model stream_encoder] [--duration 4]

Run pinned as `make bench` runs: server on CPU 0, clients on the others. Clients are grpc.aio
coroutines in a separate process; requests are serialized before the clock starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.path import CHUNKS_PER_SEQUENCE, FRAMES, chunk_requests, features_of

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES = 64
FRAME_S = 0.010  # a real-time stream sends one frame every 10 ms
MODES = ("unary", "streams", "one")
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _stat_cpu_s(stat: Path) -> float:
    """utime + stime from a /proc .../stat file, seconds."""
    text = stat.read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def _thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of a process: tid -> (its kernel name, utime + stime in seconds). The server
    names its own (`server.osthread`)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = ((task / "comm").read_text().strip(), _stat_cpu_s(task / "stat"))
        except OSError:  # the thread ended meanwhile
            continue
    return out


RUN_THREADS = ("run:", "ort:")  # a model's batcher threads, and ONNX Runtime's own intra-op threads


def cpu_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """The server's CPU seconds between two `_thread_cpu_s` reads, per thread (one that ended
    meanwhile is missing; one that started counts whole), by part under its later name: "run" (its
    models' run threads `run:*` and ONNX Runtime's `ort:*`: the runs, the merge and split), "loop"
    (the event loop: each request's path, gRPC's Python callbacks, and small runs made inline when
    nothing else is in progress), "other" (gRPC's own threads, the executors, background threads;
    everything of a server that does not name its threads)."""
    parts = {"run": 0.0, "loop": 0.0, "other": 0.0}
    for tid, (name, seconds) in after.items():
        part = "run" if name.startswith(RUN_THREADS) else "loop" if name == "loop" else "other"
        parts[part] += max(0.0, seconds - before.get(tid, (name, 0.0))[1])
    return parts


def _chunks(model: str, features: int, slot: int, mode_seed: int) -> tuple[bytes, bytes, bytes]:
    """A sequence slot's serialized chunk requests (`bench.path.chunk_requests`): (start, middle,
    end); id = the slot; sequence ids distinct per mode."""
    from server.proto import grpc_service_pb2 as pb

    start, middle, end = chunk_requests(pb, model, features, slot, mode_seed * 1000 + 1)
    return start.SerializeToString(), middle.SerializeToString(), end.SerializeToString()


class _Sequence:
    __slots__ = ("requests", "sent")

    def __init__(self, requests) -> None:
        self.requests, self.sent = requests, 0

    def next(self) -> bytes:
        k = self.sent % CHUNKS_PER_SEQUENCE
        self.sent += 1
        return self.requests[0 if k == 0 else 2 if k == CHUNKS_PER_SEQUENCE - 1 else 1]


async def _drive(target: str, mode: str, seqs: list[_Sequence], start_at: float, window: tuple[float, float],
                 stop_at: float) -> dict:  # fmt: skip
    import grpc

    done = {"chunks": 0, "errors": 0, "first_error": "", "latency_s": []}
    lo, hi = window
    latency = done["latency_s"]  # each answered chunk's round trip (sent to answer read), in the window

    def count(ok: bool, what: str = "", sent: float | None = None) -> None:
        now = time.time()
        if lo <= now < hi:
            if ok:
                done["chunks"] += 1
                if sent is not None:
                    latency.append(now - sent)
            else:
                done["errors"] += 1
        if not ok and not done["first_error"]:
            done["first_error"] = what[:300]

    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as ch:
        await ch.channel_ready()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        if mode == "unary":
            call = ch.unary_unary(INFER)  # bytes in, bytes out

            async def one(s: _Sequence) -> None:
                while (sent := time.time()) < stop_at:
                    try:
                        await call(s.next(), timeout=30)
                        count(True, sent=sent)
                    except grpc.RpcError as exc:
                        count(False, str(exc.details()))

            await asyncio.gather(*(one(s) for s in seqs))
        elif mode == "streams":

            async def one(s: _Sequence) -> None:
                stream = ch.stream_stream(STREAM)(timeout=stop_at - time.time() + 30)
                while (sent := time.time()) < stop_at:
                    await stream.write(s.next())
                    reply = await stream.read()
                    count(not reply.startswith(b"\x0a"), reply[:300].decode(errors="replace"), sent)  # field 1: error
                await stream.done_writing()
                while await stream.read() is not grpc.aio.EOF:
                    pass

            await asyncio.gather(*(one(s) for s in seqs))
        else:  # one stream for all: each sequence's next chunk goes once its answer (by id) came back
            from server.proto import grpc_service_pb2 as pb

            stream = ch.stream_stream(STREAM)(timeout=stop_at - time.time() + 30)
            sent = [0.0] * len(seqs)
            for k, s in enumerate(seqs):
                sent[k] = time.time()
                await stream.write(s.next())
            in_flight = len(seqs)
            while in_flight:
                reply = await stream.read()
                if reply is grpc.aio.EOF:
                    break
                in_flight -= 1
                message = pb.ModelStreamInferResponse.FromString(reply)
                try:
                    k = int(message.infer_response.id)
                except ValueError:  # an answer without this client's id: an error before the request was read
                    count(False, message.error_message or f"answer without an id: {reply[:100]!r}")
                    continue
                count(not message.error_message, message.error_message, sent[k])
                sent[k] = time.time()
                if sent[k] < stop_at:
                    await stream.write(seqs[k].next())
                    in_flight += 1
            await stream.done_writing()
    return done


def _client(target: str, mode: str, model: str, features: int, slots: list[int], mode_seed: int, start_at: float,
            window: tuple[float, float], stop_at: float, cpus, out) -> None:  # fmt: skip
    if cpus:
        os.sched_setaffinity(0, cpus)
    seqs = [_Sequence(_chunks(model, features, slot, mode_seed)) for slot in slots]  # "one": slot == index
    try:
        out.put(asyncio.run(_drive(target, mode, seqs, start_at, window, stop_at)))
    except BaseException as exc:  # the parent reports it rather than waiting for nothing
        out.put({"chunks": 0, "errors": 1, "first_error": f"client failed: {exc!r}"[:300]})
        raise


def _statistics(target: str, model: str) -> tuple[int, int, int]:
    """(inferences, executions, ns in ORT runs) of the model so far."""
    import grpc

    from server.proto import grpc_service_pb2 as pb
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=30)
    ms = stats.model_stats
    runs_ns = sum(b.compute_infer.ns for s in ms for b in s.batch_stats)  # each ORT run once
    return sum(s.inference_count for s in ms), sum(s.execution_count for s in ms), runs_ns


class _PerfStat:
    """`perf stat` counting a process's instructions (where the machine has the counter) and
    context switches until `stop()`."""

    EVENTS = ("instructions", "context-switches")

    def __init__(self, pid: int) -> None:
        import subprocess

        self.proc = subprocess.Popen(["perf", "stat", "-x", ",", "-e", ",".join(self.EVENTS), "-p", str(pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def stop(self) -> dict[str, float]:
        import signal

        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        out = {}
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] in self.EVENTS and fields[0].replace(".", "").isdigit():
                out[fields[2].replace("-", "_")] = float(fields[0])
        return out


def served(target: str, pid: int, mode: str, model: str, features: int, warmup: float, duration: float,
           client_cpus, processes: int, mode_seed: int, perf: bool = False, stats: bool = True) -> dict:  # fmt: skip
    """One mode against a running server: frames/s, server CPU per chunk, mean merged batch."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = 1 if mode == "one" else processes
    start_at = time.time() + 3.0  # spawned clients import grpc and build their requests first
    window = (start_at + warmup, start_at + warmup + duration)
    stop_at = window[1] + 0.2
    parts = [list(range(SEQUENCES))[i::procs] for i in range(procs)]
    workers = [ctx.Process(target=_client, args=(target, mode, model, features, part, mode_seed, start_at, window,
                                                 stop_at, client_cpus, out)) for part in parts]  # fmt: skip
    for w in workers:
        w.start()
    time.sleep(max(0.0, window[0] - time.time()))
    counters = _PerfStat(pid) if perf else None
    statistics = _statistics if stats else (lambda target, model: (0, 0, 0))  # the floor keeps none
    cpu0, threads0, stats0 = _proc_cpu_s(pid), _thread_cpu_s(pid), statistics(target, model)
    time.sleep(max(0.0, window[1] - time.time()))
    cpu1, threads1, stats1 = _proc_cpu_s(pid), _thread_cpu_s(pid), statistics(target, model)
    counted = counters.stop() if counters is not None else {}
    results = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    chunks = sum(r["chunks"] for r in results)
    errors = sum(r["errors"] for r in results)
    latency = np.concatenate([np.asarray(r.get("latency_s", ()), float) for r in results])
    inferences, executions = stats1[0] - stats0[0], stats1[1] - stats0[1]
    cpu = cpu1 - cpu0
    row = {
        "mode": mode,
        "chunks": chunks,
        "errors": errors,
        "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
        "frames_per_s": chunks * FRAMES / duration,
        "server_cpu_s": cpu,
        "server_cpu_ms_per_chunk": cpu / chunks * 1e3 if chunks else float("nan"),
        # wall time of the runs (ModelStatistics): with the loop on the same core, this includes
        # the time the loop's thread ran while a run was in progress; run_cpu_ms_per_chunk does not
        "ort_ms_per_chunk": (stats1[2] - stats0[2]) / 1e6 / inferences if inferences else float("nan"),
        "mean_batch": inferences / executions if executions else float("nan"),
        # a chunk's round trip as its client saw it (written to answer read)
        "p50_ms": float(np.percentile(latency, 50)) * 1e3 if latency.size else float("nan"),
        "p99_ms": float(np.percentile(latency, 99)) * 1e3 if latency.size else float("nan"),
    }
    for part, seconds in cpu_split(threads0, threads1).items():
        row[f"{part}_cpu_ms_per_chunk"] = seconds / chunks * 1e3 if chunks else float("nan")
    for event, value in counted.items():  # instructions and thread switches: steadier than CPU time on a busy machine
        row[f"{event}_per_chunk"] = value / chunks if chunks else float("nan")
    # a 10 ms-frame stream needs 1/FRAME_S frames/s; one core gives 1 s of CPU per s
    row["realtime_streams_per_core"] = chunks * FRAMES / cpu * FRAME_S if cpu > 0 else float("nan")
    return row


def in_process(model_file: Path, features: int, seconds: float, threads: int) -> dict:
    """The model alone at batch SEQUENCES, FRAMES frames, its state fed back in: frames/s."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    x = np.random.default_rng(0).standard_normal((SEQUENCES, FRAMES, features)).astype(np.float32)
    feeds = {"x": x, "lengths": np.full((SEQUENCES,), FRAMES, np.int64)}
    for name in names:
        if name not in feeds:  # h0 / c0: (layers, batch, hidden)
            feeds[name] = np.zeros([shapes[name][0], SEQUENCES, shapes[name][2]], np.float32)
    outputs = [o.name for o in sess.get_outputs()]
    times = []
    for _ in range(3):
        sess.run(outputs, feeds)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        out = dict(zip(outputs, sess.run(outputs, feeds)))
        times.append(time.perf_counter() - t0)
        feeds["h0"] = out.get("h_n", feeds.get("h0"))
        if "c0" in feeds:
            feeds["c0"] = out.get("c_n", feeds["c0"])
    best = float(np.median(times))
    return {"frames_per_s": SEQUENCES * FRAMES / best, "ms_per_run": best * 1e3,
            "cpu_ms_per_chunk": best * 1e3 / SEQUENCES}  # fmt: skip


TAIL = 64  # bytes at the end of a chunk request that tell its slot (see `serve_floor`)


def serve_floor(model_file: Path, model: str, features: int) -> None:
    """The transport alone (`--serve-floor`): a minimal grpc.aio server answering the modes' very
    requests (bytes in, bytes out: no parsing, no model, no state) with replies of the real
    sizes (each output's true shape, zeros; the request's id and sequence parameters), read and
    answered one after another as a plain grpc.aio servicer would. Its CPU per chunk under the
    same clients is what gRPC in Python costs per chunk before any work of the server's own."""
    import grpc
    import onnxruntime as ort

    from server.proto import grpc_service_pb2 as pb

    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = {"x": np.zeros((1, FRAMES, features), np.float32), "lengths": np.array([FRAMES], np.int64)}
    for i in sess.get_inputs():
        if i.name not in feeds:  # h0 / c0: (layers, batch, hidden)
            feeds[i.name] = np.zeros([i.shape[0], 1, i.shape[2]], np.float32)
    outputs = [(o.name, value) for o, value in zip(sess.get_outputs(), sess.run(None, feeds), strict=True)]
    # a request's last bytes (the end of its x and its lengths, raw) tell its slot: x is the slot's
    # own random draw; the whole message cannot be the key (protobuf writes a map's entries in no
    # fixed order, so the clients' bytes differ from this process's)
    unary, stream = {}, {}
    for slot in range(SEQUENCES):
        start = _chunks(model, features, slot, 1)[0]
        asked = pb.ModelInferRequest.FromString(start)
        reply = pb.ModelInferResponse(model_name=model, model_version="1", id=asked.id)
        for name, value in outputs:
            reply.outputs.add(name=name, datatype="FP32", shape=list(value.shape))
            reply.raw_output_contents.append(np.zeros_like(value).tobytes())
        for key in ("sequence_id", "sequence_end"):
            reply.parameters[key].CopyFrom(asked.parameters[key])
        unary[start[-TAIL:]] = reply.SerializeToString()
        stream[start[-TAIL:]] = pb.ModelStreamInferResponse(infer_response=reply).SerializeToString()
    if len(unary) != SEQUENCES:
        raise RuntimeError("two slots' requests end alike: the floor cannot tell them apart")

    async def infer(request: bytes, context) -> bytes:
        return unary[request[-TAIL:]]

    async def infer_stream(requests, context) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:
            await context.write(stream[request[-TAIL:]])

    async def main() -> None:
        handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(infer_stream)})  # fmt: skip
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def ensure_model(models: Path, name: str = "stream_encoder") -> Path:
    """`models`, with `name` exported into it when missing (the family's stream_encoder shape: 80
    features, 2 unidirectional LSTM layers of 256, h0/c0 inputs)."""
    if not (models / name / "1" / "model.onnx").exists():
        import subprocess

        print(f"streaming: exporting {name} into {models}", flush=True)
        subprocess.run([sys.executable, "-m", "export", "--out", str(models), "--name", name, "--unidirectional",
                        "--initial-state", "--no-report"], cwd=ROOT, check=True)  # fmt: skip
    return models


def run_line(models: Path, model: str = "stream_encoder", server_cpus=None, client_cpus=None, warmup: float = 1.0,
             duration: float = 4.0, processes: int = 2, server_args: tuple[str, ...] = (), root: Path = ROOT,
             modes: tuple[str, ...] = MODES, perf: bool = False, floor: bool = True) -> dict:  # fmt: skip
    """The whole line: in-process reference, then each mode against one server process, then
    (`floor`) against the transport alone (`transport_floor`)."""
    from scale.replicas import start_replica

    model_file = models / model / "1" / "model.onnx"

    features = features_of(model_file)
    here = os.sched_getaffinity(0)
    if server_cpus:
        os.sched_setaffinity(0, server_cpus)
    try:
        reference = in_process(model_file, features, max(1.0, duration / 2), 1 if server_cpus else 0)
    finally:
        os.sched_setaffinity(0, here)
    replica = start_replica(models.resolve(), list(server_args), server_cpus, root)
    rows = []
    try:
        time.sleep(1.0)
        for seed, mode in enumerate(modes, start=1):
            row = served(replica.address, replica.proc.pid, mode, model, features, warmup, duration, client_cpus,
                         processes, seed, perf)  # fmt: skip
            row["ratio"] = row["frames_per_s"] / reference["frames_per_s"]
            rows.append(row)
            print(format_row(row), flush=True)
    finally:
        replica.stop()
    line = {"reference": reference, "rows": rows, "sequences": SEQUENCES, "frames": FRAMES, "model": model}
    if floor:
        line["floor"] = transport_floor(models, model, server_cpus, client_cpus, warmup, duration, processes, modes,
                                        features, reference)  # fmt: skip
    return line


def transport_floor(models: Path, model: str, server_cpus, client_cpus, warmup: float, duration: float,
                    processes: int, modes, features: int, reference: dict) -> list[dict]:  # fmt: skip
    """Each mode against the transport alone (`serve_floor`, same core, same clients): its CPU per
    chunk, and the ceiling it sets: the ratio a server would reach whose only costs were this
    transport and ONNX Runtime's CPU per chunk at batch SEQUENCES (one core)."""
    from scale.replicas import start_process

    floor = start_process(["-m", "bench.streaming", "--serve-floor", "--models", str(models), "--model", model],
                          server_cpus)  # fmt: skip
    rows = []
    try:
        time.sleep(1.0)
        for seed, mode in enumerate(modes, start=1):
            row = served(floor.address, floor.proc.pid, mode, model, features, warmup, duration, client_cpus,
                         processes, seed, stats=False)  # fmt: skip
            ort_ms = reference["cpu_ms_per_chunk"]
            row["ceiling"] = ort_ms / (ort_ms + row["server_cpu_ms_per_chunk"])
            rows.append(row)
            print(f"streaming {mode:7} transport alone: {row['frames_per_s']:8.0f} frames/s, "
                  f"{row['server_cpu_ms_per_chunk']:.3f} ms CPU/chunk: ceiling {row['ceiling']:.2f}x in-process "
                  f"(ORT {ort_ms:.3f} + transport, one core)  errors {row['errors']}", flush=True)  # fmt: skip
    finally:
        floor.stop()
    return rows


def format_row(row: dict) -> str:
    def get(key: str) -> float:  # figures an older run's JSON may lack
        return row.get(key, float("nan"))

    text = (f"streaming {row['mode']:7} {SEQUENCES} seq x {FRAMES} frames: {row['frames_per_s']:8.0f} frames/s "
            f"({row['ratio']:.2f}x in-process)  server CPU {row['server_cpu_ms_per_chunk']:.3f} ms/chunk "
            f"(run threads {get('run_cpu_ms_per_chunk'):.3f}, loop {get('loop_cpu_ms_per_chunk'):.3f}, "
            f"other {get('other_cpu_ms_per_chunk'):.3f})  mean batch {row['mean_batch']:.1f}  "
            f"latency p50 {get('p50_ms'):.1f} p99 {get('p99_ms'):.1f} ms  "
            f"real-time streams/core {row['realtime_streams_per_core']:.0f}  errors {row['errors']}")  # fmt: skip
    if "instructions_per_chunk" in row:
        text += f"  server {row['instructions_per_chunk'] / 1e6:.2f} M instructions/chunk"
    if "context_switches_per_chunk" in row:
        text += f"  server {row['context_switches_per_chunk']:.1f} thread switches/chunk"
    if row["first_error"]:
        text += f"  first error: {row['first_error']}"
    return text


TARGETS = {"unary": 0.2, "streams": 0.4, "one": 0.4}  # served / in-process frames/s, same run


def targets(line: dict) -> list[dict]:
    """The streaming targets as ratios from this run (the make bench target format)."""
    out = []
    floors = {row["mode"]: row for row in line.get("floor", ())}
    for row in line["rows"]:
        goal = TARGETS[row["mode"]]
        floor = floors.get(row["mode"])
        ceiling = (f"; transport alone {floor['server_cpu_ms_per_chunk']:.3f} ms/chunk, ceiling "
                   f"{floor['ceiling']:.2f}x") if floor and floor["chunks"] else ""  # fmt: skip
        out.append({"key": f"streaming_{row['mode']}",
                    "target": f"streaming {row['mode']} >= {goal}x in-process batch {SEQUENCES}",
                    "value": row["ratio"], "goal": f">= {goal}", "ok": row["ratio"] >= goal,
                    "detail": f"{row['frames_per_s']:.0f} vs {line['reference']['frames_per_s']:.0f} frames/s; "
                              f"server CPU {row['server_cpu_ms_per_chunk']:.3f} ms/chunk{ceiling}"})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="stream_encoder")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--server-args", default="")
    parser.add_argument("--server-root", type=Path, default=ROOT, help="the source tree the server runs from")
    parser.add_argument(
        "--perf",
        action="store_true",
        help="also count the server's instructions and thread switches per chunk (`perf stat`)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the line's figures here")
    parser.add_argument("--no-floor", action="store_true", help="skip the transport-alone runs")
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor:
        model_file = args.models / args.model / "1" / "model.onnx"
        serve_floor(model_file, args.model, features_of(model_file))
        return 0
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    server_cpus = {cpus[0]} if pin else None
    client_cpus = set(cpus[1:]) if pin else None
    modes = tuple(args.modes.split(","))
    models = ensure_model(args.models, args.model)
    extra = tuple(args.server_args.split())
    line = run_line(models, args.model, server_cpus, client_cpus, args.warmup, args.duration, args.client_processes,
                    extra, args.server_root.resolve(), modes, args.perf, not args.no_floor)  # fmt: skip
    ref = line["reference"]
    print(f"streaming in-process batch {SEQUENCES}: {ref['frames_per_s']:.0f} frames/s "
          f"({ref['ms_per_run']:.2f} ms per run, {ref['cpu_ms_per_chunk']:.3f} ms CPU per chunk)")  # fmt: skip
    for t in targets(line):
        print(f"target {'MET ' if t['ok'] else 'MISS'} {t['target']}: {t['value']:.2f} ({t['detail']})")
    if args.json:
        args.json.write_text(json.dumps(line, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
