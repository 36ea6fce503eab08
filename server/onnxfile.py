"""What the server reads from an ONNX file before ONNX Runtime loads it: the contract's reader,
shared with the exporter (`contract.onnxfile`: metadata and graph size, without the `onnx` package)."""

from __future__ import annotations

from contract.onnxfile import FileSummary, graph_nodes, summarize

__all__ = ["FileSummary", "graph_nodes", "summarize"]
