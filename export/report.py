"""Static vs dynamic comparison: what unrolling costs in bytes, nodes, export, load, memory, latency;
and the precision axis: the same model as dynamic fp32, int8 and fp16 twins, and static fp32.

Every figure is measured here: export seconds in this process, load/memory/latency in a fresh
process per file (`export.probe`). Writes report.json, report.md and report.png.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime
import torch

from export.onnx_export import ExportResult, describe
from export.verify import ExportError

LATENCY_BATCH = 8
PRECISION_THREADS = 1  # the precision rows run ORT on one thread: int8 vs float32 kernels, not thread scaling
PRECISION_ROUNDS = 2  # each precision row's file is probed this often, in turn with the others; best kept
PRECISION_SECONDS = 0.3  # each probe's latency: the median of runs over at least this long (and 20 runs)


@dataclass
class PrecisionRow:
    """One file of the precision table: a model at one precision (or its static float32 twin)."""

    model: str
    precision: str  # fp32 | int8 | fp16
    path: Path
    steps: int  # the latency T
    static: bool = False
    max_abs: float | None = None  # vs the float32 model, from the twin's gate
    max_scaled: float | None = None
    accuracy: float | None = None
    checked_on: str = ""
    export_s: float | None = None

    @classmethod
    def of_twin(cls, twin, steps: int) -> PrecisionRow:
        """From an export.precision.TwinResult."""
        acc = twin.accuracy.twin if twin.accuracy is not None else None
        p = twin.parity
        return cls(twin.twin_of, twin.precision, twin.path, steps, False, p.max_abs, p.max_scaled, acc, p.provider,
                   twin.seconds)  # fmt: skip

    @property
    def variant(self) -> str:
        return f"static {self.precision} T={self.steps}" if self.static else f"dynamic {self.precision}"


def family_precision_rows(
    report_dir: Path,
    encoder: ExportResult,
    statics: list[ExportResult],
    speaker: tuple[Path, list, Path, int] | None,
) -> list[PrecisionRow]:
    """The family report's precision axis: every precision of the large encoder and of a small model
    (whose unrolled graph, not its weights, fills its file), and the speaker classifier with its
    accuracy: `speaker` = (its float file, the twins the family made, its static file, that T).
    Twins missing from the family are written into `report_dir` with their gate (fp16 on the CPU
    provider where no GPU is usable)."""
    from export import family
    from export.onnx_export import export_dynamic, export_static
    from export.pinned import standard_normal
    from export.precision import japanese_vowels_calibration, japanese_vowels_test, make_twin
    from export.progress import step

    rows: list[PrecisionRow] = []
    small, steps = family.REPORT_SMALL, family.PRECISION_REPORT_T
    with step(f"report: {small.name} dynamic and static T={steps} export"):
        small_dyn = export_dynamic(family.build(small), report_dir / f"{small.name}_dynamic" / "model.onnx")
        small_static = export_static(
            family.build(small), steps, report_dir / f"{small.name}_static_t{steps}" / "model.onnx", verify=False
        )
    encoder_static = next((r for r in statics if r.steps == steps), None)
    for model, base, static, features in (
        ("encoder", encoder, encoder_static, family.FAMILY[0].config.input_size),
        (small.name, small_dyn, small_static, small.config.input_size),
    ):
        rows.append(PrecisionRow(model, "fp32", base.path, steps))
        for precision in ("int8", "fp16"):
            with step(f"report: {model} {precision} twin + parity check"):
                # the int8 twin as `make export` writes it (pinned from standard-normal x, like the family's)
                cal = standard_normal(features) if precision == "int8" else None
                target = report_dir / f"{model}_{precision}" / "model.onnx"
                twin = make_twin(base.path, precision, target, model, calibration=cal)
            rows.append(PrecisionRow.of_twin(twin, steps))
        if static is not None:
            rows.append(PrecisionRow(model, "fp32", static.path, static.steps or 0, static=True))
    if speaker is None:
        return rows
    base, twins, static_path, steps = speaker
    made = {t.precision: t for t in twins}
    for precision in ("int8", "fp16"):
        if precision not in made:
            with step(f"report: speaker_id {precision} twin + parity and accuracy check"):
                target = report_dir / f"speaker_id_{precision}" / "model.onnx"
                cal = japanese_vowels_calibration() if precision == "int8" else None
                made[precision] = make_twin(base, precision, target, "speaker_id", japanese_vowels_test(),
                                            calibration=cal)  # fmt: skip
    accuracy = next((t.accuracy.reference for t in made.values() if t.accuracy is not None), None)
    rows.append(PrecisionRow("speaker_id", "fp32", base, steps, accuracy=accuracy))
    rows += [PrecisionRow.of_twin(made[p], steps) for p in ("int8", "fp16")]
    rows.append(PrecisionRow("speaker_id", "fp32", static_path, steps, static=True))
    return rows


def _probe(path: Path, times: list[int], probe_lengths: list[int], threads: int = 0, seconds: float = 0.0) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "export.probe",
        str(path),
        "--batch",
        str(LATENCY_BATCH),
        "--threads",
        str(threads),
        "--seconds",
        str(seconds),
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


def measure_precision(rows: list[PrecisionRow]) -> list[dict]:
    """Bytes, nodes, load time and latency of each file, each in a fresh process, one ORT thread.
    Every file is probed PRECISION_ROUNDS times, the files in turn, and the best of its rounds is kept:
    on a shared machine a neighbour's burst then slows one round of every file, not one file."""
    best: dict[int, dict] = {}
    for _ in range(PRECISION_ROUNDS):
        for i, row in enumerate(rows):
            pr = _probe(row.path, [row.steps], [], threads=PRECISION_THREADS, seconds=PRECISION_SECONDS)
            if i not in best:
                best[i] = pr
            else:
                best[i]["load_s"] = min(best[i]["load_s"], pr["load_s"])
                lat = str(row.steps)
                best[i]["latency_ms"][lat] = min(best[i]["latency_ms"][lat], pr["latency_ms"][lat])
    out = []
    for i, row in enumerate(rows):
        pr = best[i]
        out.append(
            {
                "model": row.model,
                "variant": row.variant,
                "precision": row.precision,
                "static": row.static,
                "T": row.steps,
                **describe(row.path),
                "load_s": pr["load_s"],
                "latency_ms": pr["latency_ms"][str(row.steps)],
                "max_abs": row.max_abs,
                "max_scaled": row.max_scaled,
                "accuracy": row.accuracy,
                "checked_on": row.checked_on,
                "provider": pr["providers"][0],
            }
        )
    return out


def build_report(
    dynamic: ExportResult, statics: list[ExportResult], out_dir: Path, precision: list[PrecisionRow] | None = None
) -> dict:
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
        "precision": measure_precision(precision or []),
        "precision_threads": PRECISION_THREADS,
        "precision_rounds": PRECISION_ROUNDS,
        "precision_seconds": PRECISION_SECONDS,
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
    if report.get("precision"):
        lines += ["", *precision_markdown(report)]
    return "\n".join(lines) + "\n"


def precision_markdown(report: dict) -> list[str]:
    """The precision table: each model's dynamic fp32 row is the 1.00x of its ratios."""
    rows = report["precision"]
    base = {r["model"]: r for r in rows if r["variant"] == "dynamic fp32"}
    lines = [
        f"Precision (ONNX Runtime on {report['precision_threads']} thread, batch {report['latency_batch']}; latency: "
        f"the median of >= {report.get('precision_seconds', 0):g} s of runs, best of "
        f"{report.get('precision_rounds', 1)} rounds of every file in turn; error: "
        "max |twin - fp32| on the export gate's ragged batches, and as a fraction of the output's range):",
        "",
        "| model | variant | bytes on disk | weights | graph | nodes | load s | latency ms (T) "
        "| max abs error (of range) | accuracy | ran on |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        b = base.get(r["model"], r)
        err = "-" if r["max_abs"] is None else f"{r['max_abs']:.2e} ({r['max_scaled']:.2e})"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['bytes_total']:,} ({r['bytes_total'] / b['bytes_total']:.2f}x) "
            f"| {r['bytes_weights']:,} | {r['bytes_graph']:,} | {r['nodes']:,} | {r['load_s']:.3f} "
            f"| {r['latency_ms']:.2f} ({r['latency_ms'] / b['latency_ms']:.2f}x; T={r['T']}) | {err} | {acc} "
            f"| {r['provider']} |"
        )
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dyn = report["rows"][0]
    stat = [r for r in report["rows"] if r["T"] is not None]
    ts = [r["T"] for r in stat]
    prec = report.get("precision") or []
    fig, grid = plt.subplots(2, 3 if prec else 2, figsize=(15 if prec else 10, 7))
    axes = grid[:, :2] if prec else grid
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
    if prec:
        _precision_bars(grid[0, 2], prec, "bytes_total", "file size, x dynamic fp32")
        _precision_bars(grid[1, 2], prec, "latency_ms", "latency (batch 8, 1 thread), x dynamic fp32")
    fig.suptitle("Static vs dynamic ONNX export of the same recurrent weights, and the precision twins")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _precision_bars(ax, rows: list[dict], key: str, label: str) -> None:
    """Grouped bars: one group per variant (dynamic fp32/int8/fp16, static fp32), one bar per model,
    each relative to that model's dynamic fp32 (the absolute value written on the bar)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = ["dynamic fp32", "dynamic int8", "dynamic fp16", "static fp32"]
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        mine = {("static fp32" if r["static"] else r["variant"]): r for r in rows if r["model"] == model}
        base = mine.get("dynamic fp32")
        if base is None:
            continue
        xs = [j + i * width for j, v in enumerate(variants) if v in mine]
        vals = [mine[v][key] / base[key] for v in variants if v in mine]
        bars = ax.bar(xs, vals, width, label=model)
        for bar, v in zip(bars, (v for v in variants if v in mine)):
            value = mine[v][key]
            text = f"{value / 1e6:.2g} MB" if key == "bytes_total" else f"{value:.3g} ms"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=6, rotation=90)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))], [v.replace(" ", "\n") for v in variants])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
