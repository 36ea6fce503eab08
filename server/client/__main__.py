"""`python -m server.client`: send sequences from .npy/.npz/.json to the server; print or save outputs.

Input files: .npy with one sequence (T, F) or a padded batch (B, T, F) (all full length);
.npz with one (T, F) array per sequence; .json with a list of sequences (lists of frames).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
import numpy as np

from server.client import LSTMClient


def read_sequences(path: Path) -> list[np.ndarray]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.client", description=__doc__)
    parser.add_argument("input", type=Path, help=".npy, .npz or .json file of sequences")
    parser.add_argument("--model", default="encoder")
    parser.add_argument("--version", default="")
    parser.add_argument("--target", default="127.0.0.1:8001")
    parser.add_argument("--outputs", default="", help="comma-separated outputs to request (default all)")
    parser.add_argument("--save", type=Path, help="write outputs to this .npz (keys seq<i>_<output>)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument(
        "--token", default=os.environ.get("LSTM_SERVE_TOKEN"), help="bearer token (env LSTM_SERVE_TOKEN)"
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server certificate (turns TLS on)")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM client key (mutual TLS)")
    args = parser.parse_args(argv)
    try:
        sequences = read_sequences(args.input)
        read = lambda p: p.read_bytes() if p else None  # noqa: E731
        tls = dict(tls_ca=read(args.tls_ca), tls_cert=read(args.tls_cert), tls_key=read(args.tls_key))
        with LSTMClient(args.target, timeout=args.timeout, token=args.token, **tls) as client:
            outputs = [o for o in args.outputs.split(",") if o] or None
            results = client.infer(args.model, sequences, outputs=outputs, version=args.version)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    for i, result in enumerate(results):
        parts = []
        for name, value in result.items():
            if value.size <= 12:
                parts.append(f"{name}={np.round(value, 4).tolist()}")
            else:
                parts.append(f"{name} shape={list(value.shape)} mean={value.mean():+.4f}")
        print(f"seq {i} (T={len(sequences[i])}): " + "; ".join(parts))
    if args.save:
        np.savez(args.save, **{f"seq{i}_{k}": v for i, r in enumerate(results) for k, v in r.items()})
        print(f"saved {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
