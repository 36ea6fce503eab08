"""Static vs dynamic comparison: what unrolling costs in bytes, nodes, export, load, memory, latency.

Every figure is measured here: export seconds in this process, load/memory/latency in a fresh
process per file (`export.probe`). Writes report.json, report.md and report.png.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime
import torch

from export.onnx_export import ExportResult, describe
from export.verify import ExportError

LATENCY_BATCH = 8


def _probe(path: Path, times: list[int], probe_lengths: list[int]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "export.probe",
        str(path),
        "--batch",
        str(LATENCY_BATCH),
        "--probe-lengths",
        ",".join(map(str, probe_lengths)),
    ]
    for steps in times:
        cmd += ["--time", str(steps)]
    from export.progress import step

    label = path.parent.parent.name if path.parent.name.isdigit() else path.parent.name  # <model>/<version>/
    with step(f"report: measuring {label} (load time, memory, latency; a fresh process)"):
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1][:300]
        raise ExportError(f"report: measuring {path} failed (exit code {out.returncode}: {last})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _accepts_text(accepts: dict[str, bool], static_len: int | None) -> str:
    ok = [k for k, v in accepts.items() if v]
    refused = [k for k, v in accepts.items() if not v]
    if static_len is None:
        return f"any T (probed T={', '.join(ok)}; refused: {', '.join(refused) or 'none'})"
    return f"only T={static_len} (lengths 1..{static_len}); refused T={', '.join(refused)}"


def build_report(dynamic: ExportResult, statics: list[ExportResult], out_dir: Path) -> dict:
    lengths = sorted(r.steps for r in statics if r.steps is not None)
    rows = []
    dyn_probe = _probe(dynamic.path, lengths, [1, 7, 1000])
    rows.append(
        {
            "model": "dynamic",
            "T": None,
            **describe(dynamic.path),
            "export_s": dynamic.seconds,
            "load_s": dyn_probe["load_s"],
            "load_peak_mib": dyn_probe["load_peak_mib"],
            "latency_ms": dyn_probe["latency_ms"],
            "accepts": _accepts_text(dyn_probe["accepts"], None),
        }
    )
    for res in sorted(statics, key=lambda r: r.steps or 0):
        steps = res.steps or 0
        pr = _probe(res.path, [steps], [p for p in (steps - 1, steps, steps + 1) if p >= 1])
        rows.append(
            {
                "model": f"static T={steps}",
                "T": steps,
                **describe(res.path),
                "export_s": res.seconds,
                "load_s": pr["load_s"],
                "load_peak_mib": pr["load_peak_mib"],
                "latency_ms": pr["latency_ms"][str(steps)],
                "dynamic_latency_ms": dyn_probe["latency_ms"][str(steps)],
                "accepts": _accepts_text(pr["accepts"], steps),
            }
        )
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "provider": dyn_probe["providers"][0],
        "latency_batch": LATENCY_BATCH,
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    plot(report, out_dir / "report.png")
    return report


def markdown(report: dict) -> str:
    dyn = report["rows"][0]
    lines = [
        f"Machine: {report['machine']}; provider {report['provider']}; versions "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".",
        "",
        f"| model | bytes on disk | weights | graph | nodes | export s | load s | load peak MiB "
        f"| latency ms (batch {report['latency_batch']}, T steps) | dynamic at same T, ms | accepts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        if r["T"] is None:
            lat = ", ".join(f"T={k}: {v:.2f}" for k, v in r["latency_ms"].items())
            same = "-"
        else:
            lat = f"{r['latency_ms']:.2f}"
            same = f"{r['dynamic_latency_ms']:.2f}"
        lines.append(
            f"| {r['model']} | {r['bytes_total']:,} ({r['bytes_total'] / dyn['bytes_total']:.2f}x) "
            f"| {r['bytes_weights']:,} | {r['bytes_graph']:,} | {r['nodes']:,} "
            f"| {r['export_s']:.2f} | {r['load_s']:.2f} | {r['load_peak_mib']:.1f} | {lat} | {same} "
            f"| {r['accepts']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dyn = report["rows"][0]
    stat = [r for r in report["rows"] if r["T"] is not None]
    ts = [r["T"] for r in stat]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("bytes_total", "file size (MB)", 1e-6),
        ("nodes", "graph nodes", 1.0),
        ("export_s", "export time (s)", 1.0),
        ("load_s", "ORT load time (s)", 1.0),
    ]
    for ax, (key, label, scale) in zip(axes.flat, panels):
        ax.plot(ts, [r[key] * scale for r in stat], "o-", label="static (unrolled)")
        ax.axhline(dyn[key] * scale, color="C1", linestyle="--", label="dynamic (any T)")
        ax.set_xlabel("T (steps)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)  # from zero: a 1.3x size growth must not look like 10x
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("Static vs dynamic ONNX export of the same recurrent weights")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
