"""`python -m server.client`: send sequences from .npy/.npz/.json to the server; print or save outputs.

Input files: .npy with one sequence (T, F) or a padded batch (B, T, F) (all full length);
.npz with one (T, F) array per sequence; .json with a list of sequences (lists of frames).
Any model: `--input NAME=FILE.npy` (repeatable) sends each array as the input of that name, as it
is (its dtype gives the datatype), and prints every output the model returns.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from pathlib import Path

from contract.cli import Parser, fail


def read_sequences(path: Path) -> list:
    import numpy as np

    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path)
        if array.ndim == 2:
            return [array]
        if array.ndim == 3:
            return list(array)
        raise ValueError(f"{path}: expected (T, F) or (B, T, F), got shape {array.shape}")
    if suffix == ".npz":
        with np.load(path) as data:
            return [data[k] for k in data.files]
    if suffix == ".json":
        return [np.asarray(s, np.float32) for s in json.loads(path.read_text())]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .npy, .npz or .json")


def build_parser(prog: str = "python -m server.client") -> Parser:
    parser = Parser(prog=prog, description=__doc__)
    parser.add_argument("input", type=Path, nargs="?", help=".npy, .npz or .json file of sequences (see above)")
    parser.add_argument(
        "--input", dest="tensors", action="append", default=[], metavar="NAME=FILE.npy",
        help="send FILE.npy as the input NAME, as it is (repeatable; instead of the sequences file)",
    )  # fmt: skip
    parser.add_argument("--model", default="encoder", help="model name on the server (default encoder)")
    parser.add_argument(
        "--model-version", default="", metavar="N", help="model version (default: the latest loaded version)"
    )
    parser.add_argument("--target", default="127.0.0.1:8001", help="server address host:port (default %(default)s)")
    parser.add_argument(
        "--outputs", default="", metavar="NAMES", help="comma-separated outputs to request (default all)"
    )
    parser.add_argument("--save", type=Path, metavar="FILE", help="write outputs to this .npz (keys seq<i>_<output>)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="deadline of each call (default 30)"
    )
    parser.add_argument(
        "--token", default=os.environ.get("LSTM_SERVE_TOKEN"), help="bearer token (env LSTM_SERVE_TOKEN)"
    )
    parser.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="CA that signed the server certificate (turns TLS on)"
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key (mutual TLS)")
    return parser


def _tensor_args(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--input {item!r}: expected NAME=FILE.npy")
        if name in out:
            raise ValueError(f"--input {name}: given twice")
        out[name] = Path(path)
    return out


def _problem(args) -> str | None:
    if args.input is None and not args.tensors:
        return "give a sequences file, or --input NAME=FILE.npy for each input of the model"
    if args.input is not None and args.tensors:
        return "give a sequences file or --input NAME=FILE.npy, not both"
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        return f"--timeout must be a positive number of seconds, got {args.timeout:g}"
    if args.model_version and not (args.model_version.isascii() and args.model_version.isdigit()):
        return f"--model-version must be a version number, got {args.model_version!r}"
    if not args.model:
        return "--model must not be empty"
    if not args.target:
        return "--target must be host:port"
    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    if args.tls_cert and not args.tls_ca:
        return "--tls-cert and --tls-key need --tls-ca (mutual TLS runs over TLS)"
    return None


def main(argv: list[str] | None = None) -> int:
    prog = "lstm-client" if os.path.basename(sys.argv[0]) == "lstm-client" else "python -m server.client"
    args = build_parser(prog).parse_args(argv)
    problem = _problem(args)
    if problem:
        return fail(problem)
    # grpc and numpy load only now: --help, --version and flag errors answer without them
    import grpc
    import numpy as np

    from server.client import LSTMClient

    try:
        if args.tensors:
            tensors = {name: np.load(path, allow_pickle=False) for name, path in _tensor_args(args.tensors).items()}
        else:
            sequences = read_sequences(args.input)
        read = lambda p: p.read_bytes() if p else None  # noqa: E731
        tls = dict(tls_ca=read(args.tls_ca), tls_cert=read(args.tls_cert), tls_key=read(args.tls_key))
        with LSTMClient(args.target, timeout=args.timeout, token=args.token, **tls) as client:
            outputs = [o for o in args.outputs.split(",") if o] or None
            if args.tensors:
                out = client.infer_tensors(args.model, tensors, outputs=outputs, version=args.model_version)
            else:
                results = client.infer(args.model, sequences, outputs=outputs, version=args.model_version)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        return fail(str(exc))
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.tensors:
        for name, value in out.items():
            print(f"{name}: {_describe(value, np)}")
        if args.save:
            try:
                np.savez(args.save, **{k: v.astype(bytes) if v.dtype == object else v for k, v in out.items()})
            except OSError as exc:
                return fail(f"--save: {exc}")
            print(f"saved {args.save}")
        return 0
    for i, result in enumerate(results):
        parts = []
        for name, value in result.items():
            if value.size <= 12:
                parts.append(f"{name}={np.round(value, 4).tolist()}")
            else:
                parts.append(f"{name} shape={list(value.shape)} mean={value.mean():+.4f}")
        print(f"seq {i} (T={len(sequences[i])}): " + "; ".join(parts))
    if args.save:
        try:
            np.savez(args.save, **{f"seq{i}_{k}": v for i, r in enumerate(results) for k, v in r.items()})
        except OSError as exc:
            return fail(f"--save: {exc}")
        print(f"saved {args.save}")
    return 0


def _describe(value, np) -> str:
    if value.dtype == object:
        return f"BYTES shape={list(value.shape)} {[v.decode('utf-8', 'replace') for v in value.reshape(-1)[:6]]}"
    if value.size <= 12:
        return f"{value.dtype} {np.round(value, 4).tolist() if value.dtype.kind == 'f' else value.tolist()}"
    return f"{value.dtype} shape={list(value.shape)} mean={value.astype(np.float64).mean():+.4f}"


if __name__ == "__main__":
    sys.exit(main())
