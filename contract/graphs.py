"""Graph sizes both sides agree on: the longest static (unrolled) export, and when ONNX Runtime's
memory-reuse planner is turned off so that a large unrolled graph loads in seconds."""

from __future__ import annotations

# An unrolled graph holds T cells per layer and direction, and its cost grows faster than T (the
# encoder: ONNX Runtime loads T = 50 in 7 s, T = 200 in 135 s; --static 100000 ran out of patience
# at 2.6 GB after a minute). Longer sequences are what the dynamic model is for.
MAX_STATIC_T = 1000

# ORT's memory-reuse planner (SessionOptions.enable_mem_reuse) is super-linear in graph size: on this
# project's static T=50 encoder (8,327 nodes) it is 24 of the 26 s the session takes to create
# (2.0 s with it off), on the T=29 classifier (4,825 nodes) 9 of 10 s; run time and peak memory
# were the same either way (docs/static-vs-dynamic.md). The native-LSTM models have
# under 100 nodes. Above this many nodes `auto` turns the planner off.
LARGE_GRAPH_NODES = 1000


def memory_reuse(mode: str, nodes: int | None) -> bool:
    """Whether a session gets ORT's memory-reuse planner: on|off, or auto = on unless the file's
    top-level graph has more than LARGE_GRAPH_NODES nodes (`nodes`: None when unknown)."""
    if mode in ("on", "off"):
        return mode == "on"
    return nodes is None or nodes <= LARGE_GRAPH_NODES
