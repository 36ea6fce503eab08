"""Measure one ONNX file in a fresh process: load time, peak memory of loading, latency.

Run as `python -m export.probe FILE --batch B --time T [--time T2 ...] [--memory-reuse on|off]`;
prints one JSON line.
A fresh process per file keeps the peak-RSS reading about that file alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.graphs import LARGE_GRAPH_NODES, memory_reuse
from contract.onnxfile import graph_nodes


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM (peak RSS) so that the next reading covers the load alone (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _accepts(session: ort.InferenceSession, features: int, steps: int) -> bool:
    x = np.zeros((1, steps, features), np.float32)
    try:
        session.run(None, {"x": x, "lengths": np.array([steps], np.int64)})
        return True
    except Exception:  # noqa: BLE001 - ORT raises several types for a shape refusal
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, action="append", required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=0.0, help="keep repeating until this long (median)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--probe-lengths", default="")
    parser.add_argument(
        "--memory-reuse",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"ORT's memory-reuse planner: auto = as the server loads the file (off above {LARGE_GRAPH_NODES} nodes)",
    )
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = args.threads
    options.enable_mem_reuse = memory_reuse(args.memory_reuse, graph_nodes(Path(args.path)))
    _reset_peak()
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    session = ort.InferenceSession(args.path, options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    load_peak = _status_mib("VmHWM") - before

    features = session.get_inputs()[0].shape[2]
    rng = np.random.default_rng(0)
    latency: dict[str, float] = {}
    for steps in args.time:
        x = rng.standard_normal((args.batch, steps, features), dtype=np.float32)
        lengths = np.full((args.batch,), steps, np.int64)
        feeds = {"x": x, "lengths": lengths}
        for _ in range(3):  # warm-up, excluded
            session.run(None, feeds)
        runs = []
        end = time.perf_counter() + args.seconds
        while len(runs) < args.repeats or time.perf_counter() < end:
            t0 = time.perf_counter()
            session.run(None, feeds)
            runs.append(time.perf_counter() - t0)
        latency[str(steps)] = statistics.median(runs) * 1e3
    accepts = {}
    for steps in [int(s) for s in args.probe_lengths.split(",") if s]:
        accepts[str(steps)] = _accepts(session, features, steps)
    print(
        json.dumps(
            {
                "load_s": load_s,
                "memory_reuse": options.enable_mem_reuse,
                "load_peak_mib": load_peak,
                "latency_ms": latency,
                "accepts": accepts,
                "providers": session.get_providers(),
                "ort_version": ort.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
