"""`python -m export`: export the default family (and the comparison report) or one model."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from pathlib import Path

# torch's C++ side warns on every export that "the shape inference of prim::PackPadded type is
# missing, so it may result in wrong shape inference" (three lines per export, before any output
# of ours). The graph's shapes are named here and every file is checked against eager PyTorch before
# it is written, so the warning says nothing about the result; errors still show. Must be set
# before torch is imported.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from contract.cli import fail
from contract.cli import version as package_version
from contract.graphs import MAX_STATIC_T
from export import family
from export.verify import ExportError

# torch and the exporters are imported after the arguments are checked: --help and a mistyped
# flag answer at once.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.exit(fail(message))


def _lengths(text: str) -> list[int]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"static length {part!r} is not an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"static length T must be >= 1, got {value}")
        if value > MAX_STATIC_T:
            raise argparse.ArgumentTypeError(
                f"static length T must be <= {MAX_STATIC_T}, got {value} (an unrolled graph holds T cells per layer "
                "and direction; the dynamic model serves any length)"
            )
        out.append(value)
    return out


def _precisions(text: str) -> list[str]:
    from export.precision import parse_precisions  # numpy and onnx only: no torch for argument checks

    try:
        return parse_precisions(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _twins(requested: list[list[str]] | None) -> list[str] | None:
    """The twins asked for with --precision (repeatable, comma-separated), None when not given."""
    if requested is None:
        return None
    flat = [p for group in requested for p in group]
    return [p for p in dict.fromkeys(flat) if p != "fp32"]


def _print_twin(res, reference) -> None:
    for line in res.lines(reference.stat().st_size):
        print(line, flush=True)


def _report_line(res) -> None:
    size = res.path.stat().st_size
    print(f"  -> {res.path} ({size:,} bytes){'; ' + res.parity.line() if res.parity else ''}", flush=True)


def _family_twins(requested: list[str] | None) -> list[str]:
    """The family's twins: as asked with --precision, else int8, and fp16 where CUDA is usable."""
    from contract.cuda import cuda_usable

    if requested is not None:
        return requested
    ok, why = cuda_usable()
    if ok:
        return ["int8", "fp16"]
    print(
        f"fp16 twins skipped: fp16 is for ONNX Runtime's CUDA provider, and {why} (--precision fp32,int8,fp16 "
        "writes them anyway, checked on the CPU provider)",
        flush=True,
    )
    return ["int8"]


def _export_family(
    out: Path, report: bool, report_lengths: list[int], requested: list[str] | None = None, io16: bool = False
) -> None:
    from export.onnx_export import export_dynamic, export_static
    from export.pinned import standard_normal
    from export.precision import make_twin, twin_name
    from export.progress import step

    twins = _family_twins(requested)
    for member in family.FAMILY:
        encoder = family.build(member)
        with step(f"{member.name}: dynamic {member.config.cell.upper()} export + parity check"):
            res = export_dynamic(encoder, family.model_path(out, member.name), initial_state=member.initial_state)
        _report_line(res)
        for precision in (p for p in twins if p in member.twins):
            name = twin_name(member.name, precision)
            with step(f"{name}: {precision} twin + parity check against {member.name}"):
                # the family's random-weight encoders take standard-normal x (the gate, tests and bench feed it)
                cal = standard_normal(member.config.input_size) if precision == "int8" else None
                twin = make_twin(res.path, precision, family.model_path(out, name), member.name, io_float16=io16,
                                 calibration=cal)  # fmt: skip
            _print_twin(twin, res.path)
        for steps in member.static_lengths:
            with step(f"{member.name}: static T={steps} export + parity check (ONNX Runtime loads the unrolled graph)"):
                sres = export_static(encoder, steps, family.model_path(out, family.static_name(member.name, steps)))
            _report_line(sres)
    speaker = _export_speaker_id(out, twins, io16)
    if not report:
        return
    from export.report import build_report, family_precision_rows

    # The comparison files live under report/, which has no version folders: not served. They
    # are measured, not served: the parity check of the served twins covers their arithmetic, and
    # checking them too would load each unrolled file once more (seconds; minutes before the
    # server's memory-reuse policy, see contract.graphs.LARGE_GRAPH_NODES).
    member = family.FAMILY[0]
    encoder = family.build(member)
    report_dir = out / "report"
    with step("report: dynamic export"):
        dyn = export_dynamic(encoder, report_dir / "encoder_dynamic" / "model.onnx", verify=False)
    statics = []
    for steps in report_lengths:
        with step(f"report: static T={steps} export"):
            statics.append(
                export_static(encoder, steps, report_dir / f"encoder_static_t{steps}" / "model.onnx", verify=False)
            )
    static = family.model_path(out, family.static_name("speaker_id", SPEAKER_ID_STATIC_T))
    speaker_files = (*speaker, static, SPEAKER_ID_STATIC_T) if speaker is not None else None
    rows = family_precision_rows(report_dir, dyn, statics, speaker_files)
    build_report(dyn, statics, report_dir, rows)
    print((report_dir / "report.md").read_text())


SPEAKER_ID_STATIC_T = 29  # the longest Japanese Vowels utterance in the sktime files
SPEAKER_ID_TWINS = ("int8", "fp16")


def _speaker_data():
    from export.precision import japanese_vowels_test

    return japanese_vowels_test()


def _export_speaker_id(out: Path, twins: list[str] = (), io16: bool = False) -> tuple[Path, list] | None:
    """The trained speaker classifier, from the committed checkpoint (no data set needed), and its
    twins, whose accuracy is checked on the held-out split where sktime (which ships it) is installed."""
    from export.onnx_export import export_classifier
    from export.precision import japanese_vowels_calibration, make_twin, twin_name
    from export.train import CHECKPOINT, load_checkpoint

    if not CHECKPOINT.is_file():
        print(f"speaker_id: no checkpoint at {CHECKPOINT}; run `make train`", file=sys.stderr)
        return None
    from export.progress import step

    model, result = load_checkpoint(CHECKPOINT)
    extra = {
        "classifier.task": "speaker identification, Japanese Vowels (9 speakers, 12 LPC coefficients)",
        "classifier.labels": ",".join(f"speaker{i + 1}" for i in range(model.num_classes)),
        "classifier.test_accuracy": f"{result['test_accuracy']:.4f}",
    }
    with step("speaker_id: dynamic export + parity check"):
        res = export_classifier(model, family.model_path(out, "speaker_id"), extra_metadata=extra)
    _report_line(res)
    made = []
    wanted = [p for p in twins if p in SPEAKER_ID_TWINS]
    data = _speaker_data() if wanted else None
    if wanted and data is None:
        print("speaker_id twins: accuracy gate not run: the Japanese Vowels data ships with sktime "
              "(pip install -r requirements-dev.txt); the parity gate still runs", flush=True)  # fmt: skip
    for precision in wanted:
        name = twin_name("speaker_id", precision)
        with step(f"{name}: {precision} twin + parity and accuracy check against speaker_id"):
            cal = japanese_vowels_calibration() if precision == "int8" else None
            twin = make_twin(res.path, precision, family.model_path(out, name), "speaker_id", data, io16, cal)
        _print_twin(twin, res.path)
        made.append(twin)
    name = family.static_name("speaker_id", SPEAKER_ID_STATIC_T)
    with step(f"speaker_id: static T={SPEAKER_ID_STATIC_T} export + parity check"):
        sres = export_classifier(model, family.model_path(out, name), SPEAKER_ID_STATIC_T, extra)
    _report_line(sres)
    return res.path, made


MAX_VERSION = 10**18 - 1  # the server serves version folders of at most 18 digits

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _name(text: str) -> str:
    if not _NAME.fullmatch(text) or ".." in text:
        raise argparse.ArgumentTypeError(
            f"model name {text!r}: expected letters, digits, '_', '-', '.' (1-100 characters, no '..', no '/')"
        )
    return text


def _names(text: str) -> list[str]:
    return [_name(part.strip()) for part in text.split(",") if part.strip()]


def _input_dtype(text: str) -> str:
    if text not in ("float32", "int64"):  # export.user.INPUT_DTYPES, without importing torch
        raise argparse.ArgumentTypeError(
            f"{text!r} is not supported; expected float32 (x: (batch, time, features)) or int64 "
            "(x: (batch, time) token ids for an nn.Embedding)"
        )
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m export",
        description="Export PyTorch recurrent models to ONNX (dynamic: native LSTM/GRU/RNN nodes; static: "
        "unrolled). With no --name: the default family and the static-vs-dynamic report.",
        epilog="Your own model: --weights FILE (a state dict of an nn.LSTM/GRU/RNN, or of a model holding one) "
        "or --module package.module:factory [--weights FILE] --feature-size N. See docs/export.md.",
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository folder (default: models)")
    parser.add_argument("--name", type=_name, help="export one model with this name instead of the family")
    parser.add_argument("--model-version", type=int, default=1, help="the model's version folder to write (default: 1)")
    parser.add_argument("--version", action="version", version=f"python -m export {package_version()}",
                        help="print the program's version and exit")  # fmt: skip
    own = parser.add_argument_group("your own model")
    own.add_argument("--weights", type=Path, help="checkpoint: torch.save(layer.state_dict()) or a model's state dict")
    own.add_argument("--prefix", help="with --weights: the key prefix of the layer to export (e.g. encoder.rnn)")
    own.add_argument(
        "--nonlinearity", choices=("tanh", "relu"), default="tanh", help="nn.RNN's activation (default tanh)"
    )
    own.add_argument("--module", help="package.module:factory returning your nn.Module with forward(x, lengths)")
    own.add_argument("--feature-size", type=int, help="with --module: features per time step of x")
    own.add_argument(
        "--input-dtype",
        type=_input_dtype,
        help="with --module: float32 (x: (batch, time, features)) or int64 (x: (batch, time) token ids); "
        "default: int64 when the first module applied to x is an nn.Embedding, else float32",
    )
    own.add_argument("--output-names", type=_names, help="with --module: comma-separated output names")
    own.add_argument("--report", action="store_true", help="also measure static vs dynamic into <out>/report/<name>")
    demo = parser.add_argument_group("random-weight LSTM (no --weights/--module)")
    demo.add_argument("--input-size", type=int, default=80, help="features per step (default 80)")
    demo.add_argument("--hidden-size", type=int, default=256, help="units per direction (default 256)")
    demo.add_argument("--layers", type=int, default=2, help="stacked layers (default 2)")
    demo.add_argument("--unidirectional", action="store_true", help="forward direction only")
    demo.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument(
        "--initial-state", action="store_true", help="add h0 (and c0 for LSTM) inputs: stateful streaming"
    )
    parser.add_argument("--static", type=_lengths, default=[], help="comma-separated static T values, e.g. 20,50")
    parser.add_argument(
        "--precision",
        type=_precisions,
        action="append",
        metavar="LIST",
        help="fp32, int8, fp16, comma-separated or repeated: beside the float32 model (always written, the "
        "reference) also write NAME_int8 (ONNX Runtime dynamic quantization; LSTM only) and/or NAME_fp16 (for "
        "CUDA), each checked against it. Family default: int8, plus fp16 where CUDA is usable",
    )
    parser.add_argument(
        "--fp16-io-float16",
        action="store_true",
        help="fp16 twins take and return float16 (default: float32 x and outputs, cast at the boundary)",
    )
    parser.add_argument(
        "--int8-calibration",
        type=Path,
        metavar="FILE.npy",
        help="with --precision int8 and --name: inputs like the model's real ones, (N, T, features) float32 (token "
        "ids: (N, T)); the int8 twin then has its activation ranges pinned from them (the whole batch in one run) "
        "instead of running row by row, and is gated on them. Both forms answer a sequence the same alone or merged",
    )
    parser.add_argument("--no-report", action="store_true", help="family only: skip the comparison")
    parser.add_argument(
        "--report-lengths",
        type=_lengths,
        default=list(family.REPORT_STATIC_LENGTHS),
        help="static T values of the report (default 10,25,50: the whole make export ~51 s on a 2-core "
        "machine; adding 100,200 makes it ~141 s)",
    )
    return parser


class _Written:
    """What one invocation wrote, so that a failure leaves nothing behind (files and new folders)."""

    def __init__(self, out: Path, names: list[str], version: int) -> None:
        self.dirs = [out, *(d for n in names for d in (out / n, out / n / str(version)))]
        self.existed = {d: d.exists() for d in self.dirs}
        self.files: list[Path] = []
        # The model files this invocation may write, known before any is: a later step failing
        # (a static twin refused, SIGTERM) removes the earlier ones it wrote, not only those it returned.
        self.targets = {path: path.exists() for path in (family.model_path(out, n, version) for n in names)}

    def undo(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)
        for path, existed in self.targets.items():
            if not existed:
                path.unlink(missing_ok=True)
        for d in reversed(self.dirs):
            if not self.existed[d]:
                with contextlib.suppress(OSError):
                    d.rmdir()


def _own_model(args) -> list:
    from export.user import export_module, export_state_dict, load_module, resolve_input_dtype

    if args.module:
        if args.initial_state:
            raise ExportError(
                "--initial-state works with --weights of a bare layer; a module's forward takes (x, lengths)"
            )
        module = load_module(args.module, args.weights)
        dtype, _ = resolve_input_dtype(module, args.input_dtype)
        if dtype == "float32" and args.feature_size is None:
            raise ExportError("--module needs --feature-size N (features per time step of x)")
        if dtype == "int64" and args.report:  # export.probe times float32 features only
            raise ExportError("--report measures models on float32 features; a token model (int64 x): drop --report")
        path = family.model_path(args.out, args.name, args.model_version)
        return export_module(module, path, args.feature_size, tuple(args.static), args.output_names, input_dtype=dtype)
    for flag in ("feature_size", "output_names"):
        if getattr(args, flag) is not None:
            raise ExportError(f"--{flag.replace('_', '-')} applies to --module exports only")
    return export_state_dict(
        args.weights, args.out, args.name, args.model_version, tuple(args.static), args.initial_state, args.prefix,
        args.nonlinearity,
    )  # fmt: skip


def _terminated(signum, frame) -> None:  # noqa: ARG001
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary and partly written files are removed


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)  # `timeout`, a CI job cancelled, kill PID
    try:
        return _main(args)
    except ExportError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or args.out}: {exc.strerror or exc}")
    except KeyboardInterrupt:  # Ctrl-C: what this run wrote is already removed; no traceback
        print("error: interrupted; the files of this export were removed", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    twins = _twins(args.precision)
    if args.fp16_io_float16 and "fp16" not in (twins or family.FAMILY[0].twins):
        raise ExportError("--fp16-io-float16 applies to fp16 twins: add --precision fp16")
    if args.int8_calibration is not None and (args.name is None or "int8" not in (twins or ())):
        raise ExportError("--int8-calibration applies to --name exports with --precision int8")
    if args.name is None:
        if args.weights or args.module:
            raise ExportError("--weights/--module need --name NAME (the model's folder in the repository)")
        _export_family(args.out, not args.no_report, args.report_lengths, twins, args.fp16_io_float16)
        return 0
    if not 1 <= args.model_version <= MAX_VERSION:
        raise ExportError(
            f"--model-version must be 1..{MAX_VERSION} (the server reads up to 18 digits), got {args.model_version}"
        )
    import torch

    from export.model import LSTMConfig, LSTMEncoder
    from export.onnx_export import export_dynamic, export_static

    if args.input_dtype == "int64" and not args.module:
        raise ExportError("--input-dtype int64 applies to --module exports (a bare layer's x is features)")
    if args.report and args.initial_state:
        raise ExportError("--report measures models without state inputs; drop --initial-state")
    if args.report and not args.static:
        raise ExportError("--report compares static and dynamic files: give --static T (e.g. --static 20,50)")
    from export.precision import make_twin, twin_name

    names = [args.name] + [family.static_name(args.name, t) for t in args.static]
    names += [twin_name(args.name, p) for p in twins or ()]
    written = _Written(args.out, names, args.model_version)
    try:
        if args.weights or args.module:
            results = _own_model(args)
        else:
            if args.prefix or args.feature_size or args.output_names:
                raise ExportError("--prefix/--feature-size/--output-names need --weights or --module")
            try:
                config = LSTMConfig(args.input_size, args.hidden_size, args.layers, not args.unidirectional)
            except ValueError as exc:
                raise ExportError(str(exc)) from None
            torch.manual_seed(args.seed)
            encoder = LSTMEncoder(config).eval()
            results = [
                export_dynamic(
                    encoder,
                    family.model_path(args.out, args.name, args.model_version),
                    initial_state=args.initial_state,
                )
            ]
            written.files.append(results[0].path)
            for steps in args.static:
                path = family.model_path(args.out, family.static_name(args.name, steps), args.model_version)
                results.append(export_static(encoder, steps, path))
                written.files.append(path)
        written.files = [r.path for r in results]
        made = []
        for precision in twins or ():  # twins of the dynamic model, checked against it before anything is said
            path = family.model_path(args.out, twin_name(args.name, precision), args.model_version)
            cal = None
            if precision == "int8" and args.int8_calibration is not None:
                from export.pinned import from_npy

                cal = from_npy(args.int8_calibration, results[0].path)
            made.append(make_twin(results[0].path, precision, path, args.name, io_float16=args.fp16_io_float16,
                                  calibration=cal))  # fmt: skip
        for res in results:
            what = "dynamic" if res.steps is None else f"static T={res.steps}"
            print(f"{args.name}: {what} -> {res.path} ({res.seconds:.2f} s; {res.path.stat().st_size:,} bytes)")
            if res.parity is not None:
                print(f"  {res.parity.line()}")
        for twin in made:
            _print_twin(twin, results[0].path)
        if args.report:
            from export.report import PrecisionRow, build_report

            report_dir = args.out / "report" / args.name
            rows = []
            if made:
                steps = args.static[0]
                rows = [PrecisionRow(args.name, "fp32", results[0].path, steps)]
                rows += [PrecisionRow.of_twin(t, steps) for t in made]
                rows.append(PrecisionRow(args.name, "fp32", results[1].path, steps, static=True))
            count = len(results) + len(made)
            print(f"report: measuring load time, memory and latency of {count} file(s) ...", flush=True)
            build_report(results[0], results[1:], report_dir, rows)
            print((report_dir / "report.md").read_text())
    except BaseException:
        written.undo()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
