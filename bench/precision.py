"""`make bench` line (i): the int8 twin against its float32 model, side by side in one run.

Served: one server (batching on, the benchmark's pinning) serves both files; single-sequence T = 50
requests at c = 1, 16 and 64, float32 then int8 at each concurrency, so the two rates share the
machine's state. In-process: ONNX Runtime sessions of both files at batch 1, 16 and 64, one
thread. Then the classifier twin's accuracy served, on its held-out data, beside its float model's.
Ratios go into the targets table; int8 at c=16 must reach 1.8x float32 where the CPU has AVX-512
VNNI (or AMX); elsewhere the ratio is reported, not judged. The int8 twin is batch-invariant (its
activation ranges pinned in the graph from calibration data, or, without any, each batch row run on
its own; the rows name the form), so the line also checks in-process that a row's answer is the same
bits alone and in a batch of 16 with a louder batch-mate (goal: 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# served int8 / served float32 at c=16, on AVX-512 VNNI or AMX machines: the goal with batch invariance
# on. Row by row (no int8 GEMM over the merged rows) the twin measured 1.64x, 1.70x and 1.87x served, 1.9x
# in-process at batch 16, on this project's 2-CPU host under other load, against 2.4x served and 2.7x
# in-process for the batch-dependent twin; with its ranges pinned it runs the merged rows in one GEMM
# again (docs/precision.md has the figures).
INT8_SERVED_GOAL = 1.8
ACCURACY_GOAL = 0.97  # served int8 classifier on its held-out data


def cpu_features() -> dict[str, object]:
    """The CPU's model name and the flags that decide int8 speed (`lscpu` reads the same file)."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"model_name": name, **{f: f in flags for f in wanted}}


def _int8_fast(cpu: dict) -> bool:
    return bool(cpu.get("avx512_vnni") or cpu.get("amx_int8"))


def served_accuracy(target: str, model: str, data, per_request: int = 16) -> float:
    """Accuracy of a served classifier on `data` (export.precision.LabelledData), requests in turn."""
    from server.client import LSTMClient

    right = 0
    with LSTMClient(target, timeout=60) as client:
        for start in range(0, len(data.labels), per_request):
            seqs = list(data.sequences[start : start + per_request])
            results = client.infer(model, seqs, outputs=[data.output])
            right += sum(int(r[data.output].argmax() == y) for r, y in zip(results, data.labels[start:]))
    return right / len(data.labels)


def batch_dependence(session, features: int, batch: int = 16, steps: int = 50, seed: int = 0) -> float:
    """Largest |merged - alone| over `session`'s outputs: a ragged (batch, steps) batch whose row 1 is
    10x louder, each row also run alone (cut to its length). 0.0 for a batch-invariant model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, steps + 1, batch).astype(np.int64)
    x = rng.standard_normal((batch, steps, features)).astype(np.float32)
    x[1] *= 10.0
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0
    outputs = session.get_outputs()
    merged = session.run(None, {"x": x, "lengths": lengths})
    worst = 0.0
    for i, n in enumerate(lengths):
        alone = session.run(None, {"x": x[i : i + 1, :n], "lengths": lengths[i : i + 1]})
        for out, whole, one in zip(outputs, merged, alone):
            row = np.take(whole, [i], axis=out.shape.index("batch"))
            if "time" in out.shape:
                row = np.take(row, range(n), axis=out.shape.index("time"))
            worst = max(worst, float(np.abs(row - one).max()))
    return worst


def twin_form(path: Path) -> str:
    """'pinned' or 'row_loop' (export.precision.FORMS), from the twin's lstm.precision_method."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    method = meta.get("lstm.precision_method", "")
    return "pinned" if "ranges pinned" in method else "row_loop" if "per row" in method else "unknown"


def run_line(
    models: Path,
    model: str,
    int8_model: str,
    classifier: str,
    server: Callable,  # (flags) -> a started bench ServerProcess
    load: Callable,  # (target, model, payload, concurrency) -> LoadResult
    record: Callable,  # bench's record(line, payload, conc, res, note, **extra) -> row
    inprocess: Callable,  # (run, batch) -> (seq/s, median ms)
    concurrency: list[int],
    batches: list[int],
    threads: int,
) -> dict:
    """Line (i): rows recorded through `record`; returns the figures its targets need."""
    import onnxruntime as ort

    files = {m: models / m / "1" / "model.onnx" for m in (model, int8_model)}
    missing = [m for m, f in files.items() if not f.is_file()]
    if missing:
        for conc in concurrency:
            record("i8", "single50", conc, None, f"no {missing[0]} in {models} (make export writes it)")
        return {}
    out: dict = {"served": {}, "inprocess": {}, "accuracy": {}, "form": twin_form(files[int8_model])}
    srv = server(["--batching"])
    try:
        for conc in concurrency:
            for line, name in (("i32", model), ("i8", int8_model)):
                row = record(line, "single50", conc, load(srv.target, name, "single50", conc), model=name)
                out["served"][(name, conc)] = row["seq_per_s"]
        from export.precision import japanese_vowels_test

        data = japanese_vowels_test()
        for name in (classifier, f"{classifier}_int8"):
            if data is not None and (models / name / "1" / "model.onnx").is_file():
                out["accuracy"][name] = served_accuracy(srv.target, name, data)
                print(f"served accuracy of {name} on the {data.name}: {out['accuracy'][name]:.4f}", flush=True)
    finally:
        srv.stop()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    for name, path in files.items():
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        def run(x, lengths, session=session) -> None:
            session.run(None, {"x": x, "lengths": lengths})

        for batch in batches:
            rate, ms = inprocess(run, batch)
            out["inprocess"][(name, batch)] = rate
            print(f"in-process {name:14} batch {batch:<3} {rate:8.1f} seq/s  median {ms:7.2f} ms", flush=True)
        if name == int8_model:
            out["batch_dependence"] = batch_dependence(session, session.get_inputs()[0].shape[2])
            print(f"in-process {name}: alone vs merged max |diff| {out['batch_dependence']:.3g}", flush=True)
    out.update(models=(model, int8_model, classifier), concurrency=concurrency, batches=batches)
    return out


def targets(result: dict, cpu: dict, judged: int, transport: float | None = None) -> list[dict]:
    """Ratio rows: served int8 / served float32 at each concurrency (the goal at `judged`, c=16),
    the bound on that ratio from the in-process rates and `transport` (line t's calls/s: what a
    call costs with no model), the in-process pair, the served classifier's accuracy."""
    if not result:
        return []
    model, int8_model, classifier = result["models"]
    concurrency, batches = result["concurrency"], result["batches"]
    fast = _int8_fast(cpu)
    isa = "AVX-512 VNNI" if cpu.get("avx512_vnni") else ("AMX" if cpu.get("amx_int8") else "AVX2 only")
    rows = []
    for conc in concurrency:
        a, b = result["served"][(model, conc)], result["served"][(int8_model, conc)]
        ratio = b / a if a > 0 else float("nan")  # a load point that completed nothing: no ratio
        goal = f">= {INT8_SERVED_GOAL:g}" if conc == judged and fast else "measured"
        ok = (ratio >= INT8_SERVED_GOAL) if conc == judged and fast else None
        rows.append({"key": f"int8_served_c{conc}", "target": f"served {int8_model} / served {model}, c={conc} "
                     "(same server, batching on, single50)", "value": ratio, "goal": goal, "ok": ok,
                     "detail": f"{b:.0f} vs {a:.0f} seq/s; CPU {isa}; twin {result.get('form', '?')}"})  # fmt: skip
    if transport and (model, judged) in result["inprocess"]:
        # each served sequence costs its run plus one call's transport, which int8 does not shrink
        a, b = result["inprocess"][(model, judged)], result["inprocess"][(int8_model, judged)]
        bound = (1 / a + 1 / transport) / (1 / b + 1 / transport)
        goal = f">= {INT8_SERVED_GOAL:g} (else out of reach of this transport)" if fast else "measured"
        rows.append(
            {
                "key": "int8_served_bound",
                "target": f"bound on the c={judged} ratio above: (fp32 in-process time per sequence at batch "
                f"{judged} + transport-alone time per call) / (int8's + the same)",
                "value": bound,
                "goal": goal,
                "ok": bound >= INT8_SERVED_GOAL if fast else None,
                "detail": f"1/{a:.0f} s and 1/{b:.0f} s per sequence; 1/{transport:.0f} s per call (line t)",
            }
        )
    for batch in batches:
        a, b = result["inprocess"][(model, batch)], result["inprocess"][(int8_model, batch)]
        rows.append({"key": f"int8_inprocess_b{batch}", "target": f"in-process {int8_model} / {model}, batch {batch}, "
                     "T=50", "value": b / a, "goal": "measured", "ok": None,
                     "detail": f"{b:.0f} vs {a:.0f} seq/s"})  # fmt: skip
    if "batch_dependence" in result:
        diff = result["batch_dependence"]
        detail = "bit-identical" if diff == 0.0 else f"differs by {diff:.3g}"
        rows.append({"key": "int8_batch_invariant", "target": f"in-process {int8_model}: a row alone vs the same "
                     "row in a batch of 16 with a 10x louder batch-mate, max |diff|", "value": diff, "goal": "= 0",
                     "ok": diff == 0.0, "detail": detail})  # fmt: skip
    acc = result["accuracy"]
    twin = f"{classifier}_int8"
    if twin in acc:
        ref = acc.get(classifier, float("nan"))
        rows.append({"key": "int8_accuracy", "target": f"served {twin} accuracy, Japanese Vowels test split",
                     "value": acc[twin], "goal": f">= {ACCURACY_GOAL:g}", "ok": acc[twin] >= ACCURACY_GOAL,
                     "detail": f"{acc[twin]:.4f}; served {classifier} (float32): {ref:.4f}"})  # fmt: skip
    return rows
