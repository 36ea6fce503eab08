"""The server stays inside the CPUs it is given: ONNX Runtime's thread count comes from the
process's affinity mask and cgroup quota, never from the machine's cores, and no thread is pinned
elsewhere (ORT's own default pins one thread per session to other cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scale.replicas import start_replica
from server.runtime import RuntimeOptions, available_cpus, describe_threads


def _threads_cpus(pid: int) -> list[str]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out.append(line.split()[1])
    return out


def test_available_cpus_follows_the_affinity_mask():
    count, why = available_cpus()
    assert 1 <= count <= len(os.sched_getaffinity(0))
    assert "affinity mask" in why
    assert RuntimeOptions().threads() == (count, 1)
    assert RuntimeOptions(intra_op_threads=3, inter_op_threads=2).threads() == (3, 2)
    assert "spinning off" in describe_threads(RuntimeOptions())
    assert "memory-reuse planner auto (off for graphs over 1000 nodes)" in describe_threads(RuntimeOptions())
    assert describe_threads(RuntimeOptions(memory_reuse="on")).endswith("memory-reuse planner on")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin the server to one of them")
@pytest.mark.slow
def test_default_server_pinned_to_one_cpu_keeps_every_thread_there(repo):
    """`taskset -c 0 python -m server` with the default settings: every thread on CPU 0."""
    cpu = min(os.sched_getaffinity(0))
    replica = start_replica(repo, ["--log-level", "INFO"], cpus={cpu})
    try:
        from server.client import LSTMClient

        with LSTMClient(replica.address) as client:  # threads that start on first use count too
            import numpy as np

            client.infer("bi", [np.ones((5, 6), np.float32)])
        cpus = _threads_cpus(replica.proc.pid)
        assert len(cpus) > 3 and set(cpus) == {str(cpu)}, cpus
        assert any("1 intra-op" in line for line in replica.log), replica.log
    finally:
        replica.stop()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_server_threads_are_named_by_role(repo):
    """`python -m server` (two intra-op threads, so ONNX Runtime starts threads of its own): the
    event loop, each model's run threads and ONNX Runtime's threads carry their role as the kernel
    thread name (what `top -H` and the benchmarks' CPU split read); the threads the loop started
    (gRPC's poller) do not keep its name."""
    import numpy as np

    from bench.streaming import _thread_cpu_s, cpu_split
    from server.client import LSTMClient

    replica = start_replica(repo, ["--intra-op-threads", "2"])
    try:
        with LSTMClient(replica.address) as client:
            for _ in range(200):  # enough loop CPU to pass the clock's 10 ms ticks
                client.infer("bi", [np.ones((5, 6), np.float32)])
        threads = _thread_cpu_s(replica.proc.pid)
        names = [name for name, _ in threads.values()]
        assert names.count("loop") == 1 and "grpc-poll" in names, names
        assert any(n.startswith("run:bi") for n in names) and any(n.startswith("ort:bi") for n in names), names
        parts = cpu_split({}, threads)
        assert parts["loop"] > 0 and parts["other"] > 0, parts  # the loop served; loading ran elsewhere
    finally:
        replica.stop()
