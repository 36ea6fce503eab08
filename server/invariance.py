"""Batch invariance: a request's answer must not depend on who else was in its merged run.

Checked once when a model version loads, after the output-layout probe, on a few seeded random
rows of different sizes and lengths: each row run alone, then all of them merged the way the
batcher merges requests (`batcher.merge_and_run`), outputs compared row by row.

The contract, and who merges:
- this project's float32 exports (`lstm.*` metadata, precision fp32): merged; alone vs merged must
  agree to `FLOAT_BOUND` (of max(1, |output|)), or they are served unmerged;
- every other model that may merge (its file names a batch axis or config.pbtxt's
  `max_batch_size > 0` gives one): bit-identical alone vs merged, or it is served unmerged; the
  project's twins (int8, fp16) included;
- a file from elsewhere is merged only when its config turns batching on (config.pbtxt
  `dynamic_batching`, `sequence_batching`, `max_batch_size > 0` or `instance_group`, which the
  config reader maps to `batching.enabled`, or config.json `{"batching": {"enabled": true}}`), as
  Triton merges only models whose config asks for it; and then only when the check passes;
- `ALLOW` (config.pbtxt `parameters { key: "allow_batch_dependent_results" value { string_value:
  "true" } }`, or config.json `{"allow_batch_dependent_results": true}`) merges a model that fails
  the check anyway; the measured difference is then reported as its bound.

The verdict is kept on the runtime (`ModelRuntime.batch_invariance`) for ModelConfig's
`batch_invariance` parameter; a model served unmerged because of it gets one log line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from contract import metadata
from server.batcher import Work, _Item, merge_and_run
from server.dtypes import OBJECT, numpy_dtype
from server.layout import feed_shape
from server.runtime import Runtime

log = logging.getLogger("server.invariance")

ALLOW = "allow_batch_dependent_results"
FLOAT_BOUND = 1e-5  # this project's float32 exports: the parity every test of theirs holds
ROWS = (1, 2, 1, 1)  # rows per checked request: merged, 5 rows of 4 requests
SCALES = (1.0, 4.0, 0.25, 2.0)  # their values' scale: batch-mates differ in range, as real ones do
FULL_ROWS = 32  # rows of the second merged run (at most the model's max_batch)
STEPS = 8  # longest ragged row (lengths 1..STEPS): cheap, and still pads every shorter row
FREE_DIM = 3  # size given to any other free dim (the same in every request, as merging requires)
BUDGET_S = 2.0  # the check stops here; what it could not show, it does not claim
SWITCH = f'config.pbtxt parameters {{ key: "{ALLOW}" value {{ string_value: "true" }} }}'


@dataclass(frozen=True)
class Verdict:
    merge: bool  # requests to this version may be merged
    text: str  # ModelConfig's `batch_invariance` parameter
    diff: float | None = None  # max |alone - merged| measured (None: not measured)
    output: str = ""  # the output where it was largest


def opted_in(config: dict) -> bool:
    """The model's config turns batching on (config.pbtxt or config.json, see the module doc)."""
    batching = config.get("batching")
    return isinstance(batching, dict) and batching.get("enabled") is True


def allowed(config: dict) -> bool:
    """The config merges this model even where its answers depend on batch-mates."""
    triton = config.get("triton")
    value = triton.parameters.get(ALLOW, "") if triton is not None else config.get(ALLOW, False)
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def project_export(meta: dict) -> bool:
    """A file this project's exporter wrote (a float32 model or one of its twins)."""
    return metadata.EXPORT_MODE in meta or metadata.CONFIG in meta


def own_float_export(meta: dict) -> bool:
    """This project's float32 export (its twins, int8 or fp16, are not)."""
    return project_export(meta) and meta.get(metadata.PRECISION, "fp32") == "fp32"


def _random_request(rt: Runtime, rng: np.random.Generator, rows: int, scale: float, free_dim: int, ints: bool) -> Work:
    """Complete feeds for `rows` sequences of random values (floats scaled by `scale`, so that rows
    differ in range as real batch-mates do); ragged rows of random lengths up to STEPS; other free
    dims `free_dim`; integer inputs of unknown range 0 or 1 where `ints`, else zeros (an index or a
    count: another value may be out of range)."""
    sig = rt.signature
    steps = None
    if sig.ragged is not None:
        top = STEPS if sig.static_length is None else min(STEPS, sig.static_length)
        lengths = rng.integers(1, top + 1, rows)
        steps = int(lengths.max())
    feeds = {}
    for spec in sig.all_inputs:
        if spec.name == sig.lengths:
            continue
        shape = feed_shape(sig, spec, rows, steps, free_dim)
        dtype = numpy_dtype(spec.datatype)
        if dtype == OBJECT:
            # numerals: text to a model that reads text, numbers to one that casts them (Triton's
            # string models, a string CORRID)
            value = rng.choice(np.array(["0", "1", "17", "-3"], OBJECT), shape)
        elif dtype.kind == "f":
            value = (rng.standard_normal(shape) * scale).astype(dtype)
        elif dtype.kind == "b":
            value = rng.integers(0, 2, shape).astype(dtype)
        elif spec.value_range is not None:
            low, high = spec.value_range
            value = rng.integers(low, high + 1, shape).astype(dtype)
        else:
            value = rng.integers(0, 2, shape).astype(dtype) if ints else np.zeros(shape, dtype)
        if spec.name == sig.ragged:
            for row, n in enumerate(lengths):  # padding is zeros, as the client would send
                index = [slice(None)] * value.ndim
                index[spec.batch_axis], index[spec.time_axis] = row, slice(int(n), None)
                value[tuple(index)] = 0
        feeds[spec.name] = value
    if sig.lengths is not None:
        feeds[sig.lengths] = lengths.astype(numpy_dtype(sig.input(sig.lengths).datatype))
    outputs = [o.name for o in sig.all_outputs]
    return Work(feeds, outputs, rows, steps, signature=sig)


def _difference(alone: np.ndarray, merged: np.ndarray) -> tuple[float, float]:
    """(max |alone - merged|, the same over max(1, max |alone|)); inf where shapes or non-float
    values differ."""
    if alone.shape != merged.shape:
        return float("inf"), float("inf")
    if alone.dtype.kind not in "fc":
        same = np.array_equal(alone, merged)
        return (0.0, 0.0) if same else (float("inf"), float("inf"))
    a, m = alone.astype(np.float64), merged.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(m)
    diff = np.where(both_nan, 0.0, np.abs(a - m))
    worst = float(diff.max()) if diff.size else 0.0
    if np.isnan(worst):
        return float("inf"), float("inf")
    scale = max(1.0, float(np.nanmax(np.abs(a)))) if a.size and not np.isnan(a).all() else 1.0
    return worst, worst / scale


def _rows_can_differ(rt: Runtime, ints: bool) -> bool:
    """Some input takes random values, so the random rows differ (else the check shows nothing)."""
    sig = rt.signature
    if sig.lengths is not None:
        return True
    for spec in sig.all_inputs:
        kind = numpy_dtype(spec.datatype).kind
        if kind in "fbcO" or spec.value_range is not None or (ints and kind in "iu"):
            return True
    return False


def measure(rt: Runtime, seed: int = 0, budget_s: float | None = None) -> tuple[float, float, str] | None:
    """Max difference (absolute, relative) between each random request run alone and merged with
    the others (as they are, then reversed behind a block of other rows, up to FULL_ROWS in all:
    kernels may change with the batch size and a row's offset), and the output where it was
    largest; None when it could not finish in `budget_s`. Where the model refuses the random
    values, free dims of FREE_DIM, then 32, then zeros for integers of unknown range are tried;
    the last refusal is raised."""
    deadline = time.perf_counter() + (BUDGET_S if budget_s is None else budget_s)
    failure: Exception = ValueError("no attempt")
    for free_dim, ints in ((FREE_DIM, True), (32, True), (FREE_DIM, False)):
        if not _rows_can_differ(rt, ints):
            failure = ValueError("its random rows cannot differ (no float, bool, string or ranged integer input)")
            continue
        try:
            return _measure(rt, np.random.default_rng(seed), deadline, free_dim, ints)
        except Exception as exc:  # noqa: BLE001 - the model refused these values: try others
            failure = exc
        if time.perf_counter() > deadline:
            return None
    raise failure


def _measure(rt: Runtime, rng: np.random.Generator, deadline: float, free_dim: int, ints: bool):
    """One attempt of `measure` with these feeds."""
    requests = [_random_request(rt, rng, rows, scale, free_dim, ints) for rows, scale in zip(ROWS, SCALES)]
    batches = [requests]
    filler = min(FULL_ROWS, rt.policy.max_batch if rt.policy is not None else FULL_ROWS) - sum(ROWS)
    if filler > 0:
        batches.append([_random_request(rt, rng, filler, 1.0, free_dim, ints), *reversed(requests)])
    sig = rt.signature
    alone = {}
    for work in requests:
        alone[id(work)] = merge_and_run([_Item(work, None)], rt.run, sig)[0][0]
        if time.perf_counter() > deadline:
            return None
    worst = (0.0, 0.0, "")
    for batch in batches:
        if time.perf_counter() > deadline:
            return None
        could = sig.merge
        merged, _ = merge_and_run([_Item(w, None) for w in batch], rt.run, sig)
        if could and not sig.merge:  # merge_and_run saw an output not follow the batch: never merged anyway
            return float("inf"), float("inf"), ""
        for work, together in zip(batch, merged):
            for name, value in alone.get(id(work), {}).items():
                absolute, relative = _difference(value, together[name])
                if relative > worst[1] or (relative == worst[1] and absolute > worst[0]):
                    worst = (absolute, relative, name)
    return worst


def check(rt: Runtime) -> Verdict:
    """Decide whether requests to `rt` may be merged (see the module doc); sets
    `rt.signature.merge` and `rt.batch_invariance`, and logs one line where it turns merging off."""
    sig, config = rt.signature, rt.repo_config
    policy = rt.policy
    where = f"model {rt.name} version {rt.version}"
    if sig.batching_rule == "none":
        verdict = Verdict(False, "not merged (batching_rule none)")
    elif policy is not None and not policy.enabled:
        verdict = Verdict(sig.merge, "not checked (batching off)")  # nothing merges: no rule to change
    elif not project_export(rt.export_metadata) and not opted_in(config):
        log.info(
            "%s: its file names a batch axis but its config does not turn batching on (config.pbtxt "
            "dynamic_batching or max_batch_size > 0, or config.json batching.enabled); requests are not merged",
            where,
        )
        verdict = Verdict(False, "not merged (its config does not turn batching on)")
    else:
        verdict = _judge(rt, where)
    if not verdict.merge:
        sig.merge = False
    rt.batch_invariance = verdict.text
    return verdict


def _judge(rt: Runtime, where: str) -> Verdict:
    own = own_float_export(rt.export_metadata)
    try:
        found = measure(rt)
    except Exception as exc:  # noqa: BLE001 - the model still serves, one request at a time
        found = exc
    if found is None or isinstance(found, Exception):
        why = f"the check did not finish in {BUDGET_S:g} s" if found is None else f"the check failed: {found}"
        if own:  # this project's exports are merged: their parity is tested at export
            return Verdict(True, f"not checked ({why[:200]})")
        log.warning("%s: %s; requests are not merged (to merge anyway: %s)", where, why[:300], SWITCH)
        return Verdict(False, "not checked (not merged)")
    absolute, relative, output = found
    bound = FLOAT_BOUND if own else 0.0
    if relative <= bound:
        text = "bit-identical" if absolute == 0 else f"max diff {absolute:.1e} (within {FLOAT_BOUND:g})"
        return Verdict(True, text, absolute, output)
    if not output:
        what = "a merged run's outputs did not follow the batch"
    elif np.isinf(absolute):
        what = f"output '{output}' differs (a non-float value or a shape)"
    else:
        what = f"max diff {absolute:.1e}"
    if allowed(rt.repo_config):
        log.info("%s: merged results differ from single runs (%s%s); merged anyway (%s)",
                 where, what, f" on output '{output}'" if what.startswith("max") else "", ALLOW)  # fmt: skip
        return Verdict(True, f"opted in: {what}", absolute, output)
    log.warning(
        "%s: a request's outputs depend on its batch-mates (%s%s, alone vs merged with up to %d other random rows; "
        "allowed: %s); requests are not merged (to merge anyway: %s)",
        where, what, f" on output '{output}'" if what.startswith("max") else "", FULL_ROWS - 1,
        "1e-05 of the range" if own else "bit-identical", SWITCH,
    )  # fmt: skip
    return Verdict(False, f"{what} (not merged)", absolute, output)
