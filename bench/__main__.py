"""`make bench` / `python -m bench`: the server side by side with its alternatives, one run.

Lines, on the same model (the default `encoder`) and the same seeded inputs:
  (a) PyTorch eager, packed sequences, in-process     (b) ONNX Runtime session, in-process
  (c) server, batching off                            (d) server, batching on
  (d2) server, batching on, 2 worker processes        (e) the static T=50 model served (short only)
  (f) the machine's float32 matmul ceiling: every line shows achieved GFLOP/s and its fraction.
LSTM FLOPs: 2 x 4H x (input + H) per valid step, per direction, per layer, per sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.loadgen import LoadResult, closed_loop, make_requests, run_grpc_load
from bench.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def lstm_flops_per_step(cfg) -> float:
    total = 0.0
    for layer in range(cfg.num_layers):
        in_size = cfg.input_size if layer == 0 else cfg.hidden_size * cfg.num_directions
        total += 2 * 4 * cfg.hidden_size * (in_size + cfg.hidden_size) * cfg.num_directions
    return total


def matmul_ceiling(n: int = 2048, repeats: int = 5) -> dict:
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
        "gflops": max(flops / best, flops / best_np) / 1e9,
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class ServerProcess:
    """`python -m server` on a free port, as a separate process (like a real deployment)."""

    def __init__(self, repo: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--model-repository",
                str(repo),
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--log-level",
                "WARNING",
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 300
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited: " + "".join(lines))
            lines.append(line)
            m = re.match(r"listening on ([\d.]+):(\d+)", line)
            if m:
                self.target = f"{m.group(1)}:{m.group(2)}"
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain
                time.sleep(1.0)  # let every worker process finish loading
                return
        raise RuntimeError("server did not start: " + "".join(lines))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="encoder")
    parser.add_argument("--static-model", default="encoder_static_t50")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--payloads", default="short,long,mixed")
    parser.add_argument("--lines", default="a,b,c,d,d2,e")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--server-args", default="", help="extra flags for every server line")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    from export.model import LSTMEncoder
    from export.onnx_export import config_from_metadata, read_metadata

    model_file = args.models / args.model / "1" / "model.onnx"
    meta = read_metadata(model_file)
    cfg = config_from_metadata(meta)
    flops_step = lstm_flops_per_step(cfg)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    payloads = args.payloads.split(",")
    lines = args.lines.split(",")
    ceiling = matmul_ceiling()
    print(f"matmul ceiling: {ceiling['gflops']:.1f} GFLOP/s", flush=True)
    rows = []

    def record(line: str, payload: str, conc: int, res: LoadResult | None, note: str = "") -> None:
        row = {"line": line, "payload": payload, "concurrency": conc, "note": note}
        if res is not None:
            row.update(res.summary())
            row["gflops"] = res.steps * flops_step / res.window_s / 1e9
            row["ceiling_fraction"] = row["gflops"] / ceiling["gflops"]
        rows.append(row)
        if res is not None:
            print(
                f"{line:3} {payload:6} c={conc:<3} {row['seq_per_s']:8.1f} seq/s  p50 {row['p50_ms']:7.2f} ms"
                f"  p99 {row['p99_ms']:7.2f} ms  {row['gflops']:6.2f} GFLOP/s  errors {row['errors']}",
                flush=True,
            )
        else:
            print(f"{line:3} {payload:6} c={conc:<3} n/a: {note}", flush=True)

    # (a) PyTorch eager and (b) ONNX Runtime, in-process, same requests
    torch.manual_seed(0)
    encoder = LSTMEncoder(cfg).eval()
    from export import family

    member = next((m for m in family.FAMILY if m.name == args.model), None)
    if member is not None:
        encoder = family.build(member)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])

    def torch_call(r) -> None:
        with torch.inference_mode():
            encoder(torch.from_numpy(r.x), torch.from_numpy(r.lengths))

    def ort_call(r) -> None:
        session.run(None, {"x": r.x, "lengths": r.lengths})

    for line, call in (("a", torch_call), ("b", ort_call)):
        if line not in lines:
            continue
        for payload in payloads:
            reqs = make_requests(payload, cfg.input_size, 256, seed=0)
            for conc in concurrency:
                record(line, payload, conc, closed_loop(call, reqs, conc, args.warmup, args.duration))

    servers = {
        "c": ("--batching", "false"),
        "d": ("--batching", "true"),
        "d2": ("--batching", "true", "--workers", "2"),
    }
    for line, flags in servers.items():
        if line not in lines:
            continue
        srv = ServerProcess(args.models, *flags, *args.server_args.split())
        try:
            for payload in payloads:
                for conc in concurrency:
                    res = run_grpc_load(
                        srv.target,
                        args.model,
                        payload,
                        cfg.input_size,
                        conc,
                        args.warmup,
                        args.duration,
                        args.client_processes,
                    )
                    record(line, payload, conc, res)
            if line == "d" and "e" in lines:
                static_len = int(
                    read_metadata(args.models / args.static_model / "1" / "model.onnx")["lstm.static_length"]
                )
                for payload in payloads:
                    from bench.loadgen import PAYLOADS

                    if PAYLOADS[payload][1] > static_len:
                        for conc in concurrency:
                            record(
                                "e",
                                payload,
                                conc,
                                None,
                                f"lengths up to {PAYLOADS[payload][1]} > T={static_len}",
                            )
                        continue
                    for conc in concurrency:
                        res = run_grpc_load(
                            srv.target,
                            args.static_model,
                            payload,
                            cfg.input_size,
                            conc,
                            args.warmup,
                            args.duration,
                            args.client_processes,
                        )
                        record("e", payload, conc, res)
        finally:
            srv.stop()

    import grpc

    info = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "grpcio": grpc.__version__,
            "numpy": np.__version__,
        },
        "model": args.model,
        "config": json.loads(cfg.to_json()),
        "flops_per_step": flops_step,
        "ceiling": ceiling,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "client_processes": args.client_processes,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_report(info, rows, args.out)
    print(f"wrote {args.out}.json and {args.out}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
