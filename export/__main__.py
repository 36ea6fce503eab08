"""`python -m export`: export the default family (and the comparison report) or one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from export import family
from export.model import LSTMConfig, LSTMEncoder
from export.onnx_export import export_dynamic, export_static


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _lengths(text: str) -> list[int]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"static length {part!r} is not an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"static length T must be >= 1, got {value}")
        out.append(value)
    return out


def _export_family(out: Path, report: bool, report_lengths: list[int]) -> None:
    from export.report import build_report

    for member in family.FAMILY:
        encoder = family.build(member)
        res = export_dynamic(encoder, family.model_path(out, member.name), initial_state=member.initial_state)
        print(f"{member.name}: dynamic -> {res.path} ({res.seconds:.2f} s)")
        for steps in member.static_lengths:
            sres = export_static(encoder, steps, family.model_path(out, family.static_name(member.name, steps)))
            print(f"{member.name}: static T={steps} -> {sres.path} ({sres.seconds:.2f} s)")
    _export_speaker_id(out)
    if not report:
        return
    # The comparison files live under report/, which has no version folders: not served.
    member = family.FAMILY[0]
    encoder = family.build(member)
    report_dir = out / "report"
    dyn = export_dynamic(encoder, report_dir / "encoder_dynamic" / "model.onnx")
    statics = []
    for steps in report_lengths:
        res = export_static(encoder, steps, report_dir / f"encoder_static_t{steps}" / "model.onnx")
        print(f"report: static T={steps} exported in {res.seconds:.2f} s")
        statics.append(res)
    print("report: measuring load time, memory and latency (a fresh process per file) ...")
    build_report(dyn, statics, report_dir)
    print((report_dir / "report.md").read_text())


SPEAKER_ID_STATIC_T = 29  # the longest Japanese Vowels utterance in the sktime files


def _export_speaker_id(out: Path) -> None:
    """The trained speaker classifier, from the committed checkpoint (no data set needed)."""
    from export.onnx_export import export_classifier
    from export.train import CHECKPOINT, load_checkpoint

    if not CHECKPOINT.is_file():
        print(f"speaker_id: no checkpoint at {CHECKPOINT}; run `make train`", file=sys.stderr)
        return
    model, result = load_checkpoint(CHECKPOINT)
    extra = {
        "classifier.task": "speaker identification, Japanese Vowels (9 speakers, 12 LPC coefficients)",
        "classifier.labels": ",".join(f"speaker{i + 1}" for i in range(model.num_classes)),
        "classifier.test_accuracy": f"{result['test_accuracy']:.4f}",
    }
    res = export_classifier(model, family.model_path(out, "speaker_id"), extra_metadata=extra)
    print(f"speaker_id: dynamic -> {res.path} ({res.seconds:.2f} s)")
    name = family.static_name("speaker_id", SPEAKER_ID_STATIC_T)
    res = export_classifier(model, family.model_path(out, name), SPEAKER_ID_STATIC_T, extra)
    print(f"speaker_id: static T={SPEAKER_ID_STATIC_T} -> {res.path} ({res.seconds:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m export", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository folder")
    parser.add_argument("--name", help="export one model with this name instead of the family")
    parser.add_argument("--input-size", type=int, default=80)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--unidirectional", action="store_true")
    parser.add_argument("--initial-state", action="store_true", help="add h0/c0 inputs (stateful streaming)")
    parser.add_argument("--static", type=_lengths, default=[], help="comma-separated static T values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--no-report", action="store_true", help="family only: skip the comparison")
    parser.add_argument("--report-lengths", type=_lengths, default=list(family.REPORT_STATIC_LENGTHS))
    args = parser.parse_args(argv)

    if args.name is None:
        _export_family(args.out, not args.no_report, args.report_lengths)
        return 0
    try:
        config = LSTMConfig(args.input_size, args.hidden_size, args.layers, not args.unidirectional)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.version < 1:
        print(f"error: version must be >= 1, got {args.version}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    encoder = LSTMEncoder(config).eval()
    res = export_dynamic(
        encoder, family.model_path(args.out, args.name, args.version), initial_state=args.initial_state
    )
    print(f"{args.name}: dynamic -> {res.path} ({res.seconds:.2f} s)")
    for steps in args.static:
        path = family.model_path(args.out, family.static_name(args.name, steps), args.version)
        sres = export_static(encoder, steps, path)
        print(f"{args.name}: static T={steps} -> {sres.path} ({sres.seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
