"""Generate the gRPC stubs from protos/*.proto into server/proto, with relative imports.

`python server/proto/generate.py OUT [--check]`, with the generator venv's python (`make proto`,
`make proto-check`): with --check, generate into a temporary folder and fail (exit 1) if any generated
file differs from the committed one. It imports only grpc_tools and the standard library, and refuses
a grpcio-tools other than the one requirements-protogen.txt pins: its protoc sets the stubs' floors.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
PINS = ROOT / "requirements-protogen.txt"


def _check_generator() -> None:
    """Exit with a one-line error unless the installed grpcio-tools is the pinned one."""
    (pinned,) = re.findall(r"^grpcio-tools==(\S+)", PINS.read_text(), flags=re.M)
    have = metadata.version("grpcio-tools")
    if have != pinned:
        raise SystemExit(
            f"error: the stubs are generated with grpcio-tools {pinned} ({PINS.name}), this python has {have}: "
            "use .venv-protogen (`make proto`, `make proto-check`)"
        )


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(PROTOS.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}",
        f"--grpc_python_out={out}", f"--pyi_out={out}", *map(str, sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    files = []
    for src in sources:
        stem = src.stem
        for name in (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"):
            path = out / name
            text = path.read_text()
            # protoc writes absolute imports; make them relative to this package.
            text = re.sub(rf"^import {stem}_pb2 as", f"from . import {stem}_pb2 as", text, flags=re.M)
            path.write_text(text)
            files.append(path)
    return files


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    _check_generator()
    if not args.check:
        for path in generate(args.out):
            print(f"wrote {path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [p.name for p in fresh if not (args.out / p.name).exists()
                 or not filecmp.cmp(p, args.out / p.name, shallow=False)]
    if stale:
        print(f"stubs out of date: {', '.join(stale)}; run `make proto`", file=sys.stderr)
        return 1
    print("stubs match protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
