"""`make bench` / `python -m bench`: the server side by side with its alternatives, in one run.

Lines, on the same model (default `encoder`) and the same seeded requests:
  (a) PyTorch eager, packed sequences, in-process     (b) ONNX Runtime session, in-process
  (c) server, batching off                            (d) server, batching on
  (e) the static T=50 model served (payloads that fit)  [(d2) batching on, 2 workers: --lines]
  (f) the float32 matmul ceiling: every line shows achieved GFLOP/s and its fraction of it.
LSTM FLOPs: 2 x 4H x (input + H) per valid step, per direction, per layer, per sequence.

Pinned by default on a machine with >= 2 CPUs (the fair setup for a shared 2-core machine): the
server, the in-process lines and the ceiling run on CPU 0 with one thread; the load generator
runs on the other CPUs. Then the project's speed targets are checked as ratios from this same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.loadgen import PAYLOADS, LoadResult, closed_loop, make_requests, run_grpc_load
from bench.report import write_report

ROOT = Path(__file__).resolve().parents[1]
SERVER_CPU = 0


def lstm_flops_per_step(cfg) -> float:
    total = 0.0
    for layer in range(cfg.num_layers):
        in_size = cfg.input_size if layer == 0 else cfg.hidden_size * cfg.num_directions
        total += 2 * 4 * cfg.hidden_size * (in_size + cfg.hidden_size) * cfg.num_directions
    return total


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_ceiling(n: int = 2048, repeats: int = 5, pinned: bool = False) -> dict:
    """Best float32 GFLOP/s of an n x n matmul. Pinned: torch with one thread only (numpy's BLAS
    threads were started at import, before the pinning, and would use every core)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    na, nb = a.numpy(), b.numpy()
    na @ nb
    best_np = min(_timed(lambda: na @ nb) for _ in range(repeats))
    flops = 2.0 * n**3
    return {
        "n": n,
        "torch_gflops": flops / best / 1e9,
        "numpy_gflops": flops / best_np / 1e9,
        "gflops": (flops / best if pinned else max(flops / best, flops / best_np)) / 1e9,
    }


class ServerProcess:
    """`python -m server` on a free port, as a separate process (like a real deployment)."""

    def __init__(self, repo: Path, args: list[str], cpus: set[int] | None) -> None:
        from scale.replicas import start_replica

        self.replica = start_replica(repo, args, cpus)
        self.proc = self.replica.proc
        self.target = self.replica.address
        time.sleep(1.0)  # let every worker process finish loading

    def batch_counts(self, model: str) -> tuple[int, int]:
        """(sequences inferred, ORT runs) so far, from ModelStatistics."""
        import grpc

        from server.proto import grpc_service_pb2 as pb
        from server.proto import grpc_service_pb2_grpc as pb_grpc

        with grpc.insecure_channel(self.target) as ch:
            stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name=model))
        return (sum(s.inference_count for s in stats.model_stats), sum(s.execution_count for s in stats.model_stats))

    def stop(self) -> None:
        self.replica.stop()


def batch_throughput(call, features: int, batch: int, steps: int, seconds: float) -> tuple[float, float]:
    """In-process: (sequences/s, median latency ms) of full-length (batch, steps) runs."""
    x = np.random.default_rng(0).standard_normal((batch, steps, features)).astype(np.float32)
    lengths = np.full((batch,), steps, np.int64)
    for _ in range(3):
        call(x, lengths)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        times.append(_timed(lambda: call(x, lengths)))
    return batch * len(times) / sum(times), statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="encoder")
    parser.add_argument("--static-model", default="encoder_static_t50")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--payloads", default="short,long,mixed")
    parser.add_argument("--lines", default="a,b,c,d,e")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N]: the server's and ORT's device")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and load to separate CPUs")
    parser.add_argument("--no-targets", action="store_true")
    parser.add_argument("--server-args", default="", help="extra flags for every server line")
    parser.add_argument("--quick", action="store_true", help="a few seconds: keeps the harness working (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.payloads, args.warmup, args.duration = "1,4", "short", 0.2, 0.5

    import onnxruntime as ort
    import torch

    from export import family
    from export.model import LSTMEncoder
    from export.onnx_export import config_from_metadata, read_metadata

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2 and args.device == "cpu"
    server_cpus = {SERVER_CPU} if pin else None
    client_cpus = set(cpus) - {SERVER_CPU} if pin else None
    threads = 1 if pin else 0
    if pin:
        os.sched_setaffinity(0, {SERVER_CPU})  # in-process lines and the ceiling: the server's core
        torch.set_num_threads(1)

    model_file = args.models / args.model / "1" / "model.onnx"
    cfg = config_from_metadata(read_metadata(model_file))
    flops_step = lstm_flops_per_step(cfg)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    payloads = args.payloads.split(",")
    lines = args.lines.split(",")
    ceiling = matmul_ceiling(1024 if args.quick else 2048, pinned=pin)
    print(f"matmul ceiling: {ceiling['gflops']:.1f} GFLOP/s ({'1 CPU, pinned' if pin else 'all CPUs'})", flush=True)
    rows: list[dict] = []

    def record(line: str, payload: str, conc: int, res: LoadResult | None, note: str = "", **extra) -> dict:
        row = {"line": line, "payload": payload, "concurrency": conc, "note": note, **extra}
        if res is not None:
            row.update(res.summary())
            row["gflops"] = res.steps * flops_step / res.window_s / 1e9
            row["ceiling_fraction"] = row["gflops"] / ceiling["gflops"]
            text = f"{line:3} {payload:8} c={conc:<3} {row['seq_per_s']:8.1f} seq/s  p50 {row['p50_ms']:7.2f} ms"
            text += f"  p99 {row['p99_ms']:7.2f} ms  {row['gflops']:6.2f} GFLOP/s  errors {row['errors']}"
            print(text, flush=True)
        else:
            print(f"{line:3} {payload:8} c={conc:<3} n/a: {note}", flush=True)
        rows.append(row)
        return row

    member = next((m for m in family.FAMILY if m.name == args.model), None)
    encoder = family.build(member) if member is not None else LSTMEncoder(cfg).eval()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if args.device.startswith("cuda"):
        dev = int(args.device.split(":")[1]) if ":" in args.device else 0
        providers = [("CUDAExecutionProvider", {"device_id": dev, "use_tf32": 0}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(model_file), so, providers=providers)

    def torch_run(x, lengths) -> None:
        with torch.inference_mode():
            encoder(torch.from_numpy(x), torch.from_numpy(lengths))

    def ort_run(x, lengths) -> None:
        session.run(None, {"x": x, "lengths": lengths})

    for line, run in (("a", torch_run), ("b", ort_run)):
        if line not in lines:
            continue
        for payload in payloads:
            reqs = make_requests(payload, cfg.input_size, 256, seed=0)
            for conc in concurrency:
                res = closed_loop(lambda r, run=run: run(r.x, r.lengths), reqs, conc, args.warmup, args.duration)
                record(line, payload, conc, res)

    targets_on = not args.no_targets
    tc = {"c1": 1, "c16": 4 if args.quick else 16, "c64": 4 if args.quick else 64}
    served: dict[str, dict] = {}
    server_flags = {
        "c": ["--no-batching"],
        "d": ["--batching"],
        "d2": ["--batching", "--workers", "2"],
    }
    base = ["--device", args.device, "--intra-op-threads", str(threads), *args.server_args.split()]
    for line, flags in server_flags.items():
        if line not in lines:
            continue
        srv = ServerProcess(args.models, base + flags, server_cpus if line != "d2" else None)

        def load(model: str, payload: str, conc: int, srv=srv) -> LoadResult:
            return run_grpc_load(srv.target, model, payload, cfg.input_size, conc, args.warmup, args.duration,
                                 args.client_processes, cpus=client_cpus)  # fmt: skip

        try:
            for payload in payloads:
                for conc in concurrency:
                    record(line, payload, conc, load(args.model, payload, conc))
            if targets_on and line == "c":
                served["off_c16"] = record(line, "single50", tc["c16"], load(args.model, "single50", tc["c16"]))
            if targets_on and line == "d":
                served["on_c1"] = record(line, "single50", 1, load(args.model, "single50", 1))
                served["on_c16"] = record(line, "single50", tc["c16"], load(args.model, "single50", tc["c16"]))
                before = srv.batch_counts(args.model)
                res = load(args.model, "single50", tc["c64"])
                after = srv.batch_counts(args.model)
                mean_batch = (after[0] - before[0]) / max(1, after[1] - before[1])
                served["on_c64"] = record(line, "single50", tc["c64"], res, mean_batch=mean_batch)
            if line == "d" and "e" in lines:
                static_file = args.models / args.static_model / "1" / "model.onnx"
                static_len = int(read_metadata(static_file)["lstm.static_length"])
                for payload in payloads:
                    if PAYLOADS[payload][1] > static_len:
                        for conc in concurrency:
                            record("e", payload, conc, None, f"lengths up to {PAYLOADS[payload][1]} > T={static_len}")
                        continue
                    for conc in concurrency:
                        record("e", payload, conc, load(args.static_model, payload, conc))
        finally:
            srv.stop()

    targets = []
    if targets_on and {"on_c1", "on_c16", "on_c64", "off_c16"} <= set(served):
        seconds = 0.5 if args.quick else 3.0
        steps = PAYLOADS["single50"][0]
        ort1, ort1_ms = batch_throughput(ort_run, cfg.input_size, 1, steps, seconds)
        ort16, _ = batch_throughput(ort_run, cfg.input_size, tc["c16"], steps, seconds)
        b = max(1, round(served["on_c64"]["mean_batch"]))
        ortb, _ = batch_throughput(ort_run, cfg.input_size, b, steps, seconds)
        torchb, _ = batch_throughput(torch_run, cfg.input_size, b, steps, seconds)
        on64 = served["on_c64"]["seq_per_s"]
        gain = served["on_c16"]["seq_per_s"] / served["off_c16"]["seq_per_s"]
        targets = [
            {"target": f"served, batching on, c={tc['c64']} / in-process ORT at the served mean batch ({b})",
             "value": on64 / ortb, "goal": ">= 0.85", "ok": on64 / ortb >= 0.85,
             "detail": f"{on64:.0f} vs {ortb:.0f} seq/s"},
            {"target": f"batching gain on/off at c={tc['c16']} / in-process gain batch {tc['c16']} vs 1",
             "value": gain / (ort16 / ort1), "goal": ">= 0.8", "ok": gain / (ort16 / ort1) >= 0.8,
             "detail": f"served {gain:.2f}x ({served['on_c16']['seq_per_s']:.0f}/{served['off_c16']['seq_per_s']:.0f});"
                       f" in-process {ort16 / ort1:.2f}x ({ort16:.0f}/{ort1:.0f})"},
            {"target": "c=1, batching on: p50 - in-process batch-1 latency (ms)",
             "value": served["on_c1"]["p50_ms"] - ort1_ms, "goal": "<= 0.5",
             "ok": served["on_c1"]["p50_ms"] - ort1_ms <= 0.5,
             "detail": f"{served['on_c1']['p50_ms']:.2f} vs {ort1_ms:.2f} ms"},
            {"target": f"served ORT (c={tc['c64']}) / PyTorch eager at the same batch ({b})",
             "value": on64 / torchb, "goal": ">= 1.3", "ok": on64 / torchb >= 1.3,
             "detail": f"{on64:.0f} vs {torchb:.0f} seq/s"},
        ]  # fmt: skip
        for t in targets:
            print(
                f"target {'MET ' if t['ok'] else 'MISS'} {t['target']}: {t['value']:.2f} ({t['goal']}; {t['detail']})"
            )

    import grpc

    info = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "grpcio": grpc.__version__, "numpy": np.__version__},  # fmt: skip
        "model": args.model, "config": json.loads(cfg.to_json()), "flops_per_step": flops_step,
        "ceiling": ceiling, "warmup_s": args.warmup, "duration_s": args.duration, "device": args.device,
        "client_processes": args.client_processes, "quick": args.quick,
        "pinning": (f"server, in-process lines and ceiling on CPU {SERVER_CPU} with 1 thread; load generator on "
                    f"CPUs {sorted(client_cpus)}") if pin else "none (all processes share all CPUs)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    write_report(info, rows, targets, args.out)
    print(f"wrote {args.out}.json, {args.out}.md and {args.out}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
