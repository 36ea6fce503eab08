"""What the server reads from an ONNX file before ONNX Runtime loads it: metadata and graph size
(the exporter counts nodes the same way, to load its files as the server will).

Read from the protobuf wire format, without the `onnx` package (the server does not depend on it)
and without decoding tensors (skipped by their length), so a 10 MB file takes ~10 ms.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_MODEL_GRAPH = 7  # ModelProto.graph
_MODEL_METADATA = 14  # ModelProto.metadata_props: StringStringEntryProto {1: key, 2: value}
_GRAPH_NODE = 1  # GraphProto.node


@dataclass
class FileSummary:
    metadata: dict[str, str] = field(default_factory=dict)
    nodes: int | None = None  # nodes of the top-level graph; None: no graph found


def varint(buf, pos: int) -> tuple[int, int]:
    """The base-128 varint at buf[pos] and the position after it (protobuf's wire format); IndexError
    past the end, ValueError for one longer than 64 bits."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def varint_bytes(value: int) -> bytes:
    """`value` (>= 0) as a base-128 varint: what `varint` reads."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def fields(buf, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, stop) of each length-delimited field in buf[pos:end]; other wire
    types are skipped. Raises ValueError on anything that is not a well-formed message."""
    while pos < end:
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:  # field 0 does not exist (and a run of zero bytes would parse 2 at a time)
            raise ValueError("field number 0")
        if wire == 0:
            _, pos = varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated")
            yield number, pos, pos + size
            pos += size
        else:
            raise ValueError("not a protobuf message")
        if pos > end:
            raise ValueError("truncated")


def summarize(path: Path) -> FileSummary:
    """Metadata and top-level node count of an ONNX file; an empty summary for anything that is
    not a readable, well-formed ModelProto."""
    summary = FileSummary()
    try:
        with Path(path).open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for number, start, stop in fields(buf, 0, len(buf)):
                if number == _MODEL_METADATA:
                    entry = {k: bytes(buf[s:e]).decode() for k, s, e in fields(buf, start, stop)}
                    summary.metadata[entry.get(1, "")] = entry.get(2, "")
                elif number == _MODEL_GRAPH:  # a message field given twice is merged: nodes add up
                    nodes = sum(1 for k, _, _ in fields(buf, start, stop) if k == _GRAPH_NODE)
                    summary.nodes = (summary.nodes or 0) + nodes
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return FileSummary()
    return summary


def graph_nodes(path: Path) -> int | None:
    """Nodes in the top-level graph of an ONNX file (None when it cannot be read)."""
    return summarize(path).nodes
