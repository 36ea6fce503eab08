"""ONNX Runtime's working memory and its CPU arena, measured (README, "Memory budget").

    python -m bench.ort_memory peak MODEL_ONNX B T [OUTPUTS] [arena|shrink|noarena]
        one run of x (B, T, features) in a fresh process: peak RSS above the loaded session
        (VmHWM, reset before the run), RSS held after it, and the estimate `server.memory`
        makes for it
    python -m bench.ort_memory speed MODEL_ONNX B T [SECONDS]
        calls/s of small runs at 1 and 64 threads on one session: the arena, arena shrinkage
        after every run, no arena; 3 interleaved rounds, medians

Linux only (/proc/self/status, /proc/self/clear_refs).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _rss() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _session(path: str, arena: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = arena
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, batch: int, steps: int) -> dict[str, np.ndarray]:
    inputs = session.get_inputs()
    x = np.random.default_rng(0).standard_normal((batch, steps, inputs[0].shape[2])).astype(np.float32)
    feeds = {"x": x, "lengths": np.full(batch, steps, np.int64)}
    for state in inputs[2:]:  # h0/c0: (L*D, batch, H)
        feeds[state.name] = np.zeros((state.shape[0], batch, state.shape[2]), np.float32)
    return feeds


def _shrink() -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def peak(path: str, batch: int, steps: int, outputs: list[str], mode: str) -> dict:
    from server.memory import step_bytes

    session = _session(path, arena=mode != "noarena")
    feeds = _feeds(session, batch, steps)
    base = _rss()[0]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    results = session.run(outputs, feeds, _shrink() if mode == "shrink" else None)
    out_bytes = sum(r.nbytes for r in results)
    del results
    after, high = _rss()

    class _Rt:  # what server.memory reads of a ModelRuntime
        export_metadata = dict(session.get_modelmeta().custom_metadata_map)

    per_step = step_bytes(_Rt)
    in_bytes = feeds["x"].nbytes
    return {
        "model": path, "batch": batch, "steps": steps, "mode": mode, "input_mib": in_bytes / 2**20,
        "output_mib": out_bytes / 2**20, "peak_mib": (high - base) / 2**20, "after_mib": (after - base) / 2**20,
        "peak_per_input_byte": (high - base) / in_bytes, "peak_per_step": (high - base) / (batch * steps),
        "estimate_mib": None if per_step is None else per_step * batch * steps / 2**20,
    }  # fmt: skip


def speed(path: str, batch: int, steps: int, seconds: float) -> list[str]:
    sessions = {"arena": _session(path), "noarena": _session(path, arena=False)}
    modes = {"arena": (sessions["arena"], None), "shrink": (sessions["arena"], _shrink()),
             "noarena": (sessions["noarena"], None)}  # fmt: skip
    feeds = _feeds(sessions["arena"], batch, steps)
    output = sessions["arena"].get_outputs()[-1].name

    def rate(mode: str, threads: int) -> float:
        session, run_options = modes[mode]
        count, stop = [0], time.perf_counter() + seconds

        def work() -> None:
            while time.perf_counter() < stop:
                session.run([output], feeds, run_options)
                count[0] += 1

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return count[0] / seconds

    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(3):
        for threads in (1, 64):
            for mode in modes:
                rates.setdefault((mode, threads), []).append(rate(mode, threads))
    return [
        f"c={threads:2d} {mode:8s} median {sorted(v)[1]:9.1f} calls/s ({', '.join(f'{x:.1f}' for x in v)})"
        for (mode, threads), v in sorted(rates.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "peak":
        outputs = argv[4].split(",") if len(argv) > 4 else ["h_n"]
        print(json.dumps(peak(argv[1], int(argv[2]), int(argv[3]), outputs, argv[5] if len(argv) > 5 else "arena")))
        return 0
    if len(argv) >= 4 and argv[0] == "speed":
        print("\n".join(speed(argv[1], int(argv[2]), int(argv[3]), float(argv[4]) if len(argv) > 4 else 3.0)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
