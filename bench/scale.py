"""`python -m bench.scale`: throughput of 1 and 2 replicas behind Envoy vs one server, as ratios.

Replicas are pinned to separate CPUs (replica i on CPU i) with one ONNX Runtime thread each; the
load generator and Envoy share the machine. Same seeded requests as `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench.loadgen import run_grpc_load
from scale.envoy import Envoy
from scale.replicas import ROOT, start_replica


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="encoder")
    parser.add_argument("--features", type=int, default=80)
    parser.add_argument("--payload", default="short")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3, help="the whole comparison, this many times")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scale.json")
    args = parser.parse_args(argv)
    runs = [_once(args) for _ in range(args.repeats)]
    setups = [r["setup"] for r in runs[0]]
    median = {s: statistics.median(run[i]["ratio_to_one_server"] for run in runs) for i, s in enumerate(setups)}
    result = {"machine": f"{os.cpu_count()} CPUs", "payload": args.payload, "concurrency": args.concurrency,
              "duration_s": args.duration, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "median_ratio_to_one_server": median, "runs": runs}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for s, m in median.items():
        print(f"{s:30} median x{m:.2f} over {args.repeats} runs", flush=True)
    return 0


def _once(args) -> list[dict]:
    cpus = sorted(os.sched_getaffinity(0))
    rows = []

    def measure(label: str, target: str) -> None:
        res = run_grpc_load(target, args.model, args.payload, args.features, args.concurrency, 1.0, args.duration, 2)
        row = {"setup": label, **res.summary()}
        rows.append(row)
        print(
            f"{label:28} {row['seq_per_s']:8.1f} seq/s  p50 {row['p50_ms']:7.2f} ms  errors {row['errors']}", flush=True
        )

    one = start_replica(args.models, ["--intra-op-threads", "1"], {cpus[0]})
    try:
        measure("one server (CPU 0)", one.address)
        envoy = Envoy([("127.0.0.1", one.port)])
        try:
            envoy.wait_healthy(1)
            measure("Envoy + 1 replica (CPU 0)", envoy.address)
        finally:
            envoy.stop()
        two = start_replica(args.models, ["--intra-op-threads", "1"], {cpus[1 % len(cpus)]})
        try:
            envoy = Envoy([("127.0.0.1", one.port), ("127.0.0.1", two.port)])
            try:
                envoy.wait_healthy(2)
                measure("Envoy + 2 replicas (CPU 0, 1)", envoy.address)
            finally:
                envoy.stop()
        finally:
            two.stop()
    finally:
        one.stop()
    base = rows[0]["seq_per_s"]
    for r in rows:
        r["ratio_to_one_server"] = r["seq_per_s"] / base
    return rows


if __name__ == "__main__":
    sys.exit(main())
