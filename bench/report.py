"""Write the benchmark's JSON and PNG plots; render them as Markdown (`page`: the docs' performance page,
built from docs/bench.json by `make docs`, so no table of figures is ever copied by hand)."""

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
    "t": "gRPC transport alone (no model; bench.transport noop)",
    "i32": "server, batching on, float32 model (beside its int8 twin)",
    "i8": "server, batching on, int8 twin (same server)",
}


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _header(info: dict) -> str:
    c = info["ceiling"]
    text = (
        f"Machine: {info['machine']}. Device: {info['device']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f". Model `{info['model']}` {json.dumps(info['config'])}; {info['flops_per_step'] / 1e6:.2f} MFLOP"
        f" per valid step per sequence. Pinning: {info['pinning']}. Matmul ceiling (float32 {c['n']}x{c['n']},"
        f" same CPUs as the server): {c['gflops']:.1f} GFLOP/s. Closed loop, {info['warmup_s']} s warm-up excluded,"
        f" {info['duration_s']} s measured per line; 1-4 sequences per request (single50: one of T = 50); gRPC"
        f" load from {info['client_processes']} client processes. {info['date']}."
    )
    cpu = info.get("cpu")
    if cpu:
        flags = ", ".join(f"{f} {'yes' if cpu[f] else 'no'}" for f in ("avx2", "avx512_vnni", "amx_int8") if f in cpu)
        text += f" CPU: {cpu['model_name']} ({flags})."
    if info.get("load_average"):
        text += f" Load average at the end: {info['load_average']}."
    if info.get("before"):
        text += f" Before: `{info['before']}`; after: `{info['after']}` (server lines run from each, side by side)."
    if info.get("quick"):
        text += " QUICK MODE: harness check, not a measurement."
    return text


def _rate(r: dict | None) -> str:
    """seq/s, or calls/s for the ServerLive row (no sequences)."""
    if not r or "seq_per_s" not in r:
        return ""
    return f"{r['calls_per_s']:.0f} calls/s" if "calls_per_s" in r else f"{r['seq_per_s']:.1f}"


def _name(r: dict) -> str:
    model = f" `{r['model']}`" if r.get("model") else ""
    return f"({r['line']}) {LINES.get(r['line'], r['line'])}{model}"


def _single(rows: list[dict]) -> list[str]:
    out = [
        "| line | payload | clients | seq/s | p50 ms | p95 ms | p99 ms | GFLOP/s | of ceiling | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "seq_per_s" not in r:
            out.append(f"| {_name(r)} | {r['payload']} | {r['concurrency']} | n/a | | | | | | {r['note']} |")
            continue
        out.append(
            f"| {_name(r)} | {r['payload']} | {r['concurrency']} | {_rate(r)} | {r['p50_ms']:.2f} "
            f"| {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['gflops']:.2f} | {100 * r['ceiling_fraction']:.1f}% "
            f"| {r['errors']} |"
        )
    return out


def _side_by_side(rows: list[dict]) -> list[str]:
    """In-process lines once; each server line as before -> after (same run)."""
    out = [
        "| line | payload | clients | seq/s before | seq/s after | p50 ms before | p50 ms after "
        "| p99 ms before | p99 ms after | GFLOP/s after (of ceiling) | errors before/after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    olds = {(r["line"], r["payload"], r["concurrency"]): r for r in rows if r.get("variant") == "before"}
    for r in rows:
        if r.get("variant") == "before":
            continue
        key = (r["line"], r["payload"], r["concurrency"])
        old = olds.get(key)
        head = f"| {_name(r)} | {r['payload']} | {r['concurrency']} "
        if "seq_per_s" not in r:
            out.append(head + f"| n/a | n/a | | | | | | {r['note']} |")
            continue

        def was(field: str, fmt: str, old=old) -> str:
            return format(old[field], fmt) if old and field in old else ""

        errors = f"{old['errors']}/{r['errors']}" if old and "errors" in old else str(r["errors"])
        out.append(
            head + f"| {_rate(old)} | {_rate(r)} | {was('p50_ms', '.2f')} | {r['p50_ms']:.2f} "
            f"| {was('p99_ms', '.2f')} | {r['p99_ms']:.2f} | {r['gflops']:.2f} ({100 * r['ceiling_fraction']:.1f}%) "
            f"| {errors} |"
        )
    return out


def _targets(targets: list[dict]) -> list[str]:
    if any("before" in t for t in targets):
        out = ["| target | before | after | goal | met (after) | figures after | figures before |",
               "|---|---:|---:|---|---|---|---|"]  # fmt: skip
        for t in targets:
            out.append(
                f"| {t['target']} | {_num(t.get('before'))} | {t['value']:.2f} | {t['goal']} "
                f"| {_met(t['ok'])} | {t['detail']} | {t.get('before_detail', '-')} |"
            )
        return out
    out = ["| target | measured | goal | met | figures |", "|---|---:|---|---|---|"]
    for t in targets:
        out.append(f"| {t['target']} | {t['value']:.2f} | {t['goal']} | {_met(t['ok'])} | {t['detail']} |")
    return out


def _threads(info: dict) -> list[str]:
    out = []
    for variant, report in (info.get("server_threads") or {}).items():
        tasks = report["threads"]
        out += [
            "",
            f"Server threads ({variant}, line d, after its load; /proc/PID/task/*/status and stat): {len(tasks)}, "
            f"{report['outside']} outside the server's CPU. "
            + "; ".join(f"{t['name']} (may run on {t['cpus_allowed']}, last on {t['last_cpu']})" for t in tasks),
        ]
    return out


def markdown(info: dict, rows: list[dict], targets: list[dict]) -> str:
    """The run's description, its table of every line and its targets, as Markdown."""
    paired = any(r.get("variant") for r in rows)
    out = [_header(info), ""] + (_side_by_side(rows) if paired else _single(rows)) + _threads(info)
    if targets:
        out += [""] + _targets(targets)
    return "\n".join(out) + "\n"


def _compact(rows: list[dict]) -> list[str]:
    """Every line of one run, one row per (line, payload, clients); lines by letter (named above)."""
    paired = any(r.get("variant") for r in rows)
    head = "| line | payload | clients | seq/s | p50 ms | p99 ms | GFLOP/s (of ceiling) | errors |"
    out = [head if not paired else head.replace("| line |", "| line | variant |"),
           "|---|---|---:|---:|---:|---:|---:|---:|" + ("---|" if paired else "")]  # fmt: skip
    for r in rows:
        line = f"({r['line']})" + (f" `{r['model']}`" if r.get("model") else "")
        cells = [line] + ([r.get("variant") or "after"] if paired else [])
        cells += [r["payload"], str(r["concurrency"])]
        if "seq_per_s" not in r:
            cells += ["n/a", "", "", "", r["note"]]
        else:
            gflops = f"{r['gflops']:.1f} ({100 * r['ceiling_fraction']:.0f}%)"
            cells += [_rate(r), f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", gflops, str(r["errors"])]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _threads_summary(info: dict) -> list[str]:
    out = []
    for variant, report in (info.get("server_threads") or {}).items():
        tasks = report["threads"]
        allowed = sorted({t["cpus_allowed"] for t in tasks})
        last = sorted({t["last_cpu"] for t in tasks})
        out.append(
            f"Server threads ({variant}, line d, after its load): {len(tasks)}, {report['outside']} outside the "
            f"server's CPU; allowed on CPUs {', '.join(allowed)}, last ran on {', '.join(map(str, last))}."
        )
    return out


def page(data: dict, plot: str | None = "bench.png", heading: str = "##") -> str:
    """A docs page's generated part for one run (`{"info", "rows", "targets"}` as in docs/bench.json):
    when and where it ran, its targets, the plot (a PNG beside the page; None: none), every line."""
    info, rows, targets = data["info"], data["rows"], data["targets"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    out = [
        f"**Run:** {info['date']}, commit `{(info.get('after') or 'unknown').split()[0]}`. "
        f"**Machine:** {info['machine']}; device {info['device']}. **Versions:** {versions}.",
        "",
    ]
    if info.get("quick"):
        out += ["!!! warning", "    This run is a `--quick` harness check, not a measurement.", ""]
    if targets:
        out += [f"{heading} Targets", "", "Ratios from this same run, so the machine's speed cancels out.", ""]
        out += _targets(targets) + [""]
    if plot:
        out += [
            f"{heading} Throughput and latency",
            "",
            f"![throughput and latency by concurrency, per payload]({plot})",
            "",
        ]
    out += [f"{heading} Every line", "", _header(info), ""] + _threads_summary(info) + [""] + _compact(rows) + [""]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = ("single50", "ServerLive")  # the targets' own rows
    payloads = sorted({r["payload"] for r in rows if "seq_per_s" in r and r["payload"] not in skip})
    if not payloads:
        return
    fig, axes = plt.subplots(2, len(payloads), figsize=(5 * len(payloads), 8), squeeze=False)
    for col, payload in enumerate(payloads):
        for line in LINES:
            pts = sorted(
                (r["concurrency"], r)
                for r in rows
                if r["line"] == line and r["payload"] == payload and "seq_per_s" in r and r.get("variant") != "before"
            )
            if not pts:
                continue
            xs = [c for c, _ in pts]
            axes[0][col].plot(xs, [r["seq_per_s"] for _, r in pts], "o-", label=f"({line}) {LINES[line]}")
            axes[1][col].plot(xs, [r["p50_ms"] for _, r in pts], "o-", label=f"({line}) p50")
            axes[1][col].plot(xs, [r["p99_ms"] for _, r in pts], "x--", color=axes[1][col].lines[-1].get_color())
        axes[0][col].set_title(f"{payload}: throughput")
        axes[1][col].set_title(f"{payload}: latency p50 (o) and p99 (x)")
        for ax, label in ((axes[0][col], "sequences/s"), (axes[1][col], "ms")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(info: dict, rows: list[dict], targets: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows, "targets": targets}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
