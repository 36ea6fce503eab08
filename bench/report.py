"""Write the benchmark's JSON and Markdown report (the README quotes the Markdown)."""

from __future__ import annotations

import json
from pathlib import Path

LINES = {
    "a": "PyTorch eager, packed (in-process)",
    "b": "ONNX Runtime session (in-process)",
    "c": "server, batching off",
    "d": "server, batching on",
    "d2": "server, batching on, 2 workers",
    "e": "static T=50 model served",
}


def markdown(info: dict, rows: list[dict]) -> str:
    c = info["ceiling"]
    out = [
        f"Machine: {info['machine']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f". Model `{info['model']}` {json.dumps(info['config'])}; {info['flops_per_step'] / 1e6:.2f} MFLOP"
        f" per valid step per sequence. Matmul ceiling (float32 {c['n']}x{c['n']}): {c['gflops']:.1f} GFLOP/s"
        f" (torch {c['torch_gflops']:.1f}, numpy {c['numpy_gflops']:.1f}). Closed loop, {info['warmup_s']} s"
        f" warm-up excluded, {info['duration_s']} s measured per line; 1-4 sequences per request; "
        f"gRPC load from {info['client_processes']} client processes on the same machine. {info['date']}.",
        "",
        "| line | payload | clients | seq/s | p50 ms | p95 ms | p99 ms | GFLOP/s | of ceiling | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"({r['line']}) {LINES.get(r['line'], r['line'])}"
        if "seq_per_s" not in r:
            out.append(f"| {name} | {r['payload']} | {r['concurrency']} | n/a | | | | | | {r['note']} |")
            continue
        out.append(
            f"| {name} | {r['payload']} | {r['concurrency']} | {r['seq_per_s']:.1f} | {r['p50_ms']:.2f} "
            f"| {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['gflops']:.2f} | {100 * r['ceiling_fraction']:.1f}% "
            f"| {r['errors']} |"
        )
    return "\n".join(out) + "\n"


def write_report(info: dict, rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(info, rows))
