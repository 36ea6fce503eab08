"""`make soak` / `python -m bench.soak`: saturate the server for a fixed time and account for every request.

Several client processes send mixed-length requests back to back for `--duration` seconds. Each
request's outcome is recorded (status code), so that lost = sent - answered is known exactly; one
reply in `--check-every` is compared with an in-process ONNX Runtime run of the same model file
(itself equal to PyTorch at 1e-5, see tests/test_export.py); the server's RSS is sampled every
0.5 s and the mean of the last third compared with the first third. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.__main__ import ROOT, ServerProcess
from bench.loadgen import make_requests


def _client(target: str, model_file: str, model: str, payload: str, threads: int, duration: float, seed: int,
            check_every: int, queue) -> None:  # fmt: skip
    import grpc
    import onnxruntime as ort

    from server.codec import decode_outputs, encode_input
    from server.proto import grpc_service_pb2 as pb
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ref = ort.InferenceSession(model_file, so, providers=["CPUExecutionProvider"])
    features = ref.get_inputs()[0].shape[2]
    requests = make_requests(payload, features, 128, seed)
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    outcomes: Counter = Counter()
    checked, wrong, max_err, attempted = 0, 0, 0.0, 0
    lock = threading.Lock()
    end = time.monotonic() + duration

    def loop(k: int) -> None:
        nonlocal checked, wrong, max_err, attempted
        i = k
        while time.monotonic() < end:
            r = requests[i % len(requests)]
            i += 1
            req = pb.ModelInferRequest(model_name=model, id=f"{seed}-{k}-{i}")
            encode_input(req, "x", r.x)
            encode_input(req, "lengths", r.lengths)
            with lock:
                attempted += 1
            try:
                reply = stub.ModelInfer(req, timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            check = code == "OK" and i % check_every == 0
            if check:
                got = decode_outputs(reply)
                want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, {"x": r.x, "lengths": r.lengths})))
                err = max(float(np.abs(got[n] - want[n]).max()) for n in got)
            with lock:
                outcomes[code] += 1
                if check:
                    checked += 1
                    max_err = max(max_err, err)
                    wrong += err > 1e-5 or reply.id != req.id

    pool = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    sent = attempted
    queue.put({"sent": sent, "outcomes": dict(outcomes), "checked": checked, "wrong": wrong, "max_err": max_err})


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def soak(models: Path, model: str, duration: float, processes: int, threads: int, payload: str,
         check_every: int, server_args: list[str]) -> dict:  # fmt: skip
    srv = ServerProcess(models, server_args, None)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(0.5):
            samples.append((time.monotonic() - t0, _rss_mib(srv.proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    model_file = str(models / model / "1" / "model.onnx")
    procs = [
        ctx.Process(
            target=_client, args=(srv.target, model_file, model, payload, threads, duration, seed, check_every, queue)
        )  # fmt: skip
        for seed in range(processes)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration + 300) for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - start
    stop.set()
    alive = srv.proc.poll() is None
    srv.stop()
    outcomes: Counter = Counter()
    for r in results:
        outcomes.update(r["outcomes"])
    sent = sum(r["sent"] for r in results)
    rss = [m for _, m in samples]
    third = max(1, len(rss) // 3)
    first, last = float(np.mean(rss[:third])), float(np.mean(rss[-third:]))
    return {
        "duration_s": round(elapsed, 1), "processes": processes, "threads_per_process": threads,
        "payload": payload, "model": model, "sent": sent, "answered": sum(outcomes.values()),
        "lost": sent - sum(outcomes.values()), "outcomes": dict(outcomes),
        "ok_per_s": outcomes.get("OK", 0) / elapsed, "checked": sum(r["checked"] for r in results),
        "wrong": sum(r["wrong"] for r in results), "max_abs_err": max(r["max_err"] for r in results),
        "rss_first_third_mib": first, "rss_last_third_mib": last, "rss_drift": (last - first) / first,
        "server_alive_at_end": alive,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="encoder")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--payload", default="mixed")
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--server-args", default="")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    result = soak(args.models, args.model, args.duration, args.processes, args.threads, args.payload,
                  args.check_every, args.server_args.split())  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    ok = result["lost"] == 0 and result["wrong"] == 0 and result["server_alive_at_end"]
    ok = ok and set(result["outcomes"]) <= {"OK"} and result["rss_drift"] < 0.10
    print("soak:", "PASS" if ok else "FAIL", "(lost 0, wrong 0, only OK, RSS drift < 10 %)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
