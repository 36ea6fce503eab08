"""`make bench` / `python -m bench`: the server side by side with its alternatives, in one run.

Lines, on the same model (default `encoder`) and the same seeded requests:
  (a) PyTorch eager, packed sequences, in-process     (b) ONNX Runtime session, in-process
  (c) server, batching off                            (d) server, batching on
  (e) the static T=50 model served (payloads that fit)  [(d2) batching on, 2 workers: --lines]
  (t) the gRPC transport alone: a no-model server on the server's CPU, single50 at c=64 (targets)
  (i) the int8 twin (`encoder_int8`) and its float model served by one server, single50 at c=1/16/64,
      and in-process at batch 1/16/64; the int8 speaker classifier's served accuracy (bench.precision)
  (m) system shared memory: the encoder's tensors in client regions vs in the message (bench.shm)
  (s) streaming: 64 sequences of 10-frame chunks to `stream_encoder` (server-kept state), unary, one
      stream per sequence and all on one stream, vs in-process batch 64 (bench.streaming)
  (f) the float32 matmul ceiling: every line shows achieved GFLOP/s and its fraction of it.
LSTM FLOPs: 2 x 4H x (input + H) per valid step, per direction, per layer, per sequence.

Pinned by default on a machine with >= 2 CPUs (the fair setup for a shared 2-core machine): the
server, the in-process lines and the ceiling run on CPU 0 with one thread; the load generator
runs on the other CPUs, and the servers run with their default settings (ONNX Runtime's thread
count comes from the CPUs the process may use: one). Then the project's speed targets are checked
as ratios from this same run, and every server thread's CPUs are read from /proc/PID/task.

`--before DIR` (or BENCH_BEFORE=DIR): DIR is a checkout of an earlier commit (`git worktree add
DIR COMMIT`) that shares this venv; every server line runs from it too, side by side in the same
run (before, then after, line by line), and the tables show both.
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
from contract import metadata

ROOT = Path(__file__).resolve().parents[1]
SERVER_CPU = 0


def _describe_tree(root: Path) -> str:
    """`<commit> <subject>` of a checkout, `+ uncommitted changes` when its tracked files differ."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{git('log', '-1', '--format=%h %s')[:90]}{' + uncommitted changes' if dirty else ''}"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _cpu() -> dict:
    from bench.precision import cpu_features

    return cpu_features()


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
    """`python -m server` on a free port, as a separate process (like a real deployment), from the
    source tree `root` (this checkout, or an earlier one given with --before)."""

    def __init__(self, models: Path, args: list[str], cpus: set[int] | None, root: Path = ROOT) -> None:
        from scale.replicas import start_replica

        self.replica = start_replica(models.resolve(), args, cpus, root)
        self.proc = self.replica.proc
        self.target = self.replica.address
        time.sleep(1.0)  # let every worker process finish loading

    def threads(self) -> list[dict]:
        """Every thread of the server process: name, the CPUs it may run on, the CPU it last ran on."""
        out = []
        for task in sorted(Path(f"/proc/{self.proc.pid}/task").iterdir()):
            try:
                status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
                stat = (task / "stat").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            out.append({"tid": int(task.name), "name": status["Name"].strip(),
                        "cpus_allowed": status["Cpus_allowed_list"].strip(), "last_cpu": int(fields[36])})  # fmt: skip
        return out

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
    parser.add_argument("--lines", default="a,b,c,d,e,i,m,s")
    parser.add_argument("--int8-model", default=None, help="line (i): the int8 twin (default: MODEL_int8)")
    parser.add_argument("--classifier", default="speaker_id", help="line (i): the classifier whose _int8 twin's "
                        "served accuracy is measured")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N]: the server's and ORT's device")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and load to separate CPUs")
    parser.add_argument("--no-targets", action="store_true")
    parser.add_argument("--server-args", default="", help="extra flags for every server line")
    parser.add_argument("--quick", action="store_true", help="about a minute: a harness check (tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--before", type=Path, default=os.environ.get("BENCH_BEFORE") or None,
                        help="an earlier checkout: its server runs each server line too ($BENCH_BEFORE)")  # fmt: skip
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
            if payload == "ServerLive":  # calls, not sequences: no compute
                row["seq_per_s"], row["sequences"], row["steps_per_s"] = 0.0, 0, 0.0
                row["calls_per_s"] = row["requests"] / res.window_s
                res.steps = 0
            if line == "t":  # no model ran: no compute to count
                res.steps = 0
                row["steps_per_s"] = 0.0
            row["gflops"] = res.steps * flops_step / res.window_s / 1e9
            row["ceiling_fraction"] = row["gflops"] / ceiling["gflops"]
            text = f"{extra.get('variant', ''):6} {line:3} {payload:10} c={conc:<3} {row['seq_per_s']:8.1f} seq/s"
            text += f"  p50 {row['p50_ms']:7.2f} ms"
            text += f"  p99 {row['p99_ms']:7.2f} ms  {row['gflops']:6.2f} GFLOP/s  errors {row['errors']}"
            print(text, flush=True)
        else:
            print(f"{extra.get('variant', ''):6} {line:3} {payload:10} c={conc:<3} n/a: {note}", flush=True)
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
    server_flags = {
        "c": ["--no-batching"],
        "d": ["--batching"],
        "d2": ["--batching", "--workers", "2"],
    }
    # the servers' own defaults (ORT threads from the CPUs they may use), as a deployment runs them
    base = ["--device", args.device, *args.server_args.split()]
    before = args.before.resolve() if args.before else None
    variants = [("before", before), ("after", ROOT)] if before else [("", ROOT)]
    served: dict[str, dict[str, dict]] = {v: {} for v, _ in variants}
    thread_report: dict[str, dict] = {}
    for line, flags in server_flags.items():
        if line not in lines:
            continue
        for variant, root in variants:
            srv = ServerProcess(args.models, base + flags, server_cpus if line != "d2" else None, root)
            got = served[variant]

            def load(model: str, payload: str, conc: int, srv=srv, method: str = "ModelInfer") -> LoadResult:
                return run_grpc_load(srv.target, model, payload, cfg.input_size, conc, args.warmup, args.duration,
                                     args.client_processes, cpus=client_cpus, method=method)  # fmt: skip

            def rec(line, payload, conc, res, note="", variant=variant, **extra) -> dict:
                return record(line, payload, conc, res, note, **({"variant": variant} if variant else {}), **extra)

            try:
                for payload in payloads:
                    for conc in concurrency:
                        rec(line, payload, conc, load(args.model, payload, conc))
                if targets_on and line == "c":
                    got["off_c16"] = rec(line, "single50", tc["c16"], load(args.model, "single50", tc["c16"]))
                if targets_on and line == "d":
                    got["live_c1"] = rec(line, "ServerLive", 1, load(args.model, "single50", 1, method="ServerLive"))
                    got["on_c1"] = rec(line, "single50", 1, load(args.model, "single50", 1))
                    got["on_c16"] = rec(line, "single50", tc["c16"], load(args.model, "single50", tc["c16"]))
                    counts = srv.batch_counts(args.model)
                    res = load(args.model, "single50", tc["c64"])
                    after = srv.batch_counts(args.model)
                    mean_batch = (after[0] - counts[0]) / max(1, after[1] - counts[1])
                    got["on_c64"] = rec(line, "single50", tc["c64"], res, mean_batch=mean_batch)
                if line == "d":  # every thread, after the load (pools grow on demand)
                    tasks = srv.threads()
                    outside = [
                        t
                        for t in tasks
                        if pin and (t["cpus_allowed"] != str(SERVER_CPU) or t["last_cpu"] != SERVER_CPU)
                    ]
                    thread_report[variant or "after"] = {"threads": tasks, "outside": len(outside)}
                    names = ", ".join(sorted({t["name"] for t in tasks}))
                    allowed, ran = sorted({t["cpus_allowed"] for t in tasks}), sorted({t["last_cpu"] for t in tasks})
                    print(f"{variant} server threads (line d): {len(tasks)}, {len(outside)} outside CPU {SERVER_CPU}; "
                          f"may run on {allowed}, last ran on {ran}; {names}", flush=True)  # fmt: skip
                if line == "d" and "e" in lines:
                    static_file = args.models / args.static_model / "1" / "model.onnx"
                    static_len = int(read_metadata(static_file)[metadata.STATIC_LENGTH])
                    for payload in payloads:
                        if PAYLOADS[payload][1] > static_len:
                            for conc in concurrency:
                                rec("e", payload, conc, None, f"lengths up to {PAYLOADS[payload][1]} > T={static_len}")
                            continue
                        for conc in concurrency:
                            rec("e", payload, conc, load(args.static_model, payload, conc))
            finally:
                srv.stop()

    int8 = {}
    if "i" in lines:
        from bench import precision

        int8 = precision.run_line(
            args.models, args.model, args.int8_model or f"{args.model}_int8", args.classifier,
            server=lambda flags: ServerProcess(args.models, base + flags, server_cpus),
            load=lambda target, model, payload, conc: run_grpc_load(
                target, model, payload, cfg.input_size, conc, args.warmup, args.duration, args.client_processes,
                cpus=client_cpus),
            record=record,
            inprocess=lambda run, batch: batch_throughput(run, cfg.input_size, batch, PAYLOADS["single50"][0],
                                                          0.5 if args.quick else 3.0),
            concurrency=list(dict.fromkeys([tc["c1"], tc["c16"], tc["c64"]])),
            batches=list(dict.fromkeys([1, tc["c16"], tc["c64"]])), threads=threads,
        )  # fmt: skip

    if "m" in lines:  # (m) tensors in system shared memory vs in the message: bench.shm -> bench_shm.json
        from bench import shm

        shm.run_line(args.models, args.model, cpus, args.warmup, args.duration, args.client_processes,
                     args.out.with_name("bench_shm.json"), pin, args.quick)  # fmt: skip

    floor = None
    if targets_on:
        # The transport alone, on the same core and with the same clients: a minimal grpc.aio server
        # that decodes each request and answers zeros of the model's real output shapes. Its rate
        # at c=64 bounds what any Python gRPC server sharing the core can serve.
        from scale.replicas import start_process

        noop = start_process(["-m", "bench.transport", "--serve", "noop", "--models", str(args.models)], server_cpus)
        try:
            res = run_grpc_load(noop.address, args.model, "single50", cfg.input_size, tc["c64"], args.warmup,
                                args.duration, args.client_processes, cpus=client_cpus)  # fmt: skip
            floor = record("t", "single50", tc["c64"], res)
        finally:
            noop.stop()

    targets = []
    needed = {"on_c1", "on_c16", "on_c64", "off_c16", "live_c1"}
    if targets_on and all(needed <= set(got) for got in served.values()):
        seconds = 0.5 if args.quick else 3.0
        steps = PAYLOADS["single50"][0]
        ort1, ort1_ms = batch_throughput(ort_run, cfg.input_size, 1, steps, seconds)
        ort16, _ = batch_throughput(ort_run, cfg.input_size, tc["c16"], steps, seconds)
        ort64, _ = batch_throughput(ort_run, cfg.input_size, tc["c64"], steps, seconds)
        best_b, best = (tc["c16"], ort16) if ort16 >= ort64 else (tc["c64"], ort64)
        batches = {max(1, round(got["on_c64"]["mean_batch"])) for got in served.values()}
        at_batch = {b: batch_throughput(ort_run, cfg.input_size, b, steps, seconds)[0] for b in batches}
        torch_at = {b: batch_throughput(torch_run, cfg.input_size, b, steps, seconds)[0] for b in batches}
        print(f"in-process ORT (CPU {SERVER_CPU}, 1 thread), T=50: batch 1 {ort1:.0f} seq/s ({ort1_ms:.2f} ms), "
              f"batch {tc['c16']} {ort16:.0f}, batch {tc['c64']} {ort64:.0f}; at the served mean batches "
              + ", ".join(f"{b}: ORT {at_batch[b]:.0f}, PyTorch {torch_at[b]:.0f}" for b in sorted(batches)),
              flush=True)  # fmt: skip

        def figures(got: dict, variant: str) -> list[dict]:
            b = max(1, round(got["on_c64"]["mean_batch"]))
            on64, ortb, torchb = got["on_c64"]["seq_per_s"], at_batch[b], torch_at[b]
            gain = got["on_c16"]["seq_per_s"] / got["off_c16"]["seq_per_s"]
            live_ms, c1_ms = got["live_c1"]["p50_ms"], got["on_c1"]["p50_ms"]
            over = c1_ms - ort1_ms - live_ms
            th = thread_report.get(variant or "after")
            cpu = SERVER_CPU
            if th and pin:
                allowed = sorted({t["cpus_allowed"] for t in th["threads"]})
                ran = sorted({t["last_cpu"] for t in th["threads"]})
                th_detail = f"{len(th['threads'])} threads; may run on {allowed}, last ran on {ran}"
            else:
                th_detail = "not pinned"
            c16, c64 = tc["c16"], tc["c64"]
            mean = got["on_c64"]["mean_batch"]
            served16, off16 = got["on_c16"]["seq_per_s"], got["off_c16"]["seq_per_s"]
            floor_rate = floor["seq_per_s"] if floor and floor["seq_per_s"] > 0 else float("inf")
            bound = (1 / best) / (1 / best + 1 / floor_rate)
            return [
                {"key": "threads", "target": f"server threads outside CPU {cpu} (default settings, pinned to it)",
                 "value": th["outside"] if th and pin else float("nan"), "goal": "= 0",
                 "ok": bool(th) and pin and th["outside"] == 0, "detail": th_detail},
                {"key": "c64_best", "target": f"served, batching on, c={c64} / best in-process batch ({c16} or {c64})",
                 "value": on64 / best, "goal": ">= 0.85", "ok": on64 / best >= 0.85,
                 "detail": f"{on64:.0f} vs {best:.0f} seq/s (batch {best_b}); served mean batch {mean:.1f}"},
                {"key": "c64_floor", "target": f"bound on the c={c64} ratio above: best in-process time per sequence / "
                 "(that + transport-alone time per call)",
                 "value": bound, "goal": ">= 0.85 (else the goal above is out of reach of this transport)",
                 "ok": bound >= 0.85,
                 "detail": f"1/{best:.0f} s vs 1/{floor_rate:.0f} s per call (line t, c={c64})"},
                {"key": "c1_over_live", "target": "c=1, batching on: p50 - in-process run - ServerLive p50 (ms)",
                 "value": over, "goal": "<= 0.5", "ok": over <= 0.5,
                 "detail": f"{c1_ms:.2f} - {ort1_ms:.2f} - {live_ms:.2f} ms"},
                {"key": "c64_meanbatch", "target": f"served, batching on, c={c64} / in-process, served mean batch",
                 "value": on64 / ortb, "goal": ">= 0.85", "ok": on64 / ortb >= 0.85,
                 "detail": f"{on64:.0f} vs {ortb:.0f} seq/s (batch {b})"},
                {"key": "gain", "target": f"batching gain on/off at c={c16} / in-process gain batch {c16} vs 1",
                 "value": gain / (ort16 / ort1), "goal": ">= 0.8", "ok": gain / (ort16 / ort1) >= 0.8,
                 "detail": f"served {gain:.2f}x ({served16:.0f}/{off16:.0f}); in-process {ort16 / ort1:.2f}x "
                           f"({ort16:.0f}/{ort1:.0f})"},
                {"key": "c1_over_run", "target": "c=1, batching on: p50 - in-process batch-1 run (ms)",
                 "value": c1_ms - ort1_ms, "goal": "<= 0.5", "ok": c1_ms - ort1_ms <= 0.5,
                 "detail": f"{c1_ms:.2f} vs {ort1_ms:.2f} ms"},
                {"key": "vs_torch", "target": f"served ORT (c={c64}) / PyTorch eager at the served mean batch",
                 "value": on64 / torchb, "goal": ">= 1.3", "ok": on64 / torchb >= 1.3,
                 "detail": f"{on64:.0f} vs {torchb:.0f} seq/s (batch {b})"},
            ]  # fmt: skip

        if before is not None:
            old = {t["key"]: t for t in figures(served["before"], "before")}
            targets = []
            for t in figures(served["after"], "after"):
                t["before"], t["before_detail"], t["before_ok"] = (
                    old[t["key"]]["value"],
                    old[t["key"]]["detail"],
                    old[t["key"]]["ok"],
                )
                targets.append(t)
        else:
            targets = figures(served[""], "")
    if targets_on and int8:
        from bench import precision

        transport = floor["seq_per_s"] if floor and floor.get("seq_per_s") else None
        targets += precision.targets(int8, precision.cpu_features(), judged=tc["c16"], transport=transport)
    if "s" in lines:  # (s) streaming: 64 sequences of 10-frame chunks, unary and streamed (bench/streaming.py)
        from bench import streaming

        line_s = streaming.run_line(streaming.ensure_model(args.models), server_cpus=server_cpus,
                                    client_cpus=client_cpus, warmup=args.warmup, duration=args.duration,
                                    processes=args.client_processes, server_args=tuple(base))  # fmt: skip
        Path(f"{args.out}_streaming.json").write_text(json.dumps(line_s, indent=1))
        targets += streaming.targets(line_s) if targets_on else []
    for t in targets:
        was = f"before {t['before']:.2f} ({t['before_detail']}); " if "before" in t else ""
        met = "INFO" if t["ok"] is None else ("MET " if t["ok"] else "MISS")
        print(f"target {met} {t['target']}: {was}{t['value']:.2f} ({t['goal']}; {t['detail']})")

    import grpc

    info = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "grpcio": grpc.__version__, "numpy": np.__version__},  # fmt: skip
        "model": args.model, "config": json.loads(cfg.to_json()), "flops_per_step": flops_step,
        "ceiling": ceiling, "warmup_s": args.warmup, "duration_s": args.duration, "device": args.device,
        "client_processes": args.client_processes, "quick": args.quick,
        "before": _describe_tree(before) if before else None, "after": _describe_tree(ROOT),
        "server_threads": thread_report, "load_average": _load(),
        "pinning": (f"server, in-process lines and ceiling on CPU {SERVER_CPU} with 1 thread; load generator on "
                    f"CPUs {sorted(client_cpus)}") if pin else "none (all processes share all CPUs)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _cpu(),
    }  # fmt: skip
    write_report(info, rows, targets, args.out)
    print(f"wrote {args.out}.json and {args.out}.png (make docs renders the performance page)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
