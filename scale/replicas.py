"""Start N server replicas (`python -m server`), each on its own loopback port, and stop them.

Each replica is a full, independent server (own sessions, batcher, metrics off); a balancer in
front (Envoy, or gRPC client-side round_robin) spreads calls over them and routes around a dead one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Replica:
    proc: subprocess.Popen
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """Abrupt death (SIGKILL): what a balancer must route around."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_replica(models: Path, args: list[str] = (), cpus: set[int] | None = None, root: Path = ROOT) -> Replica:
    cmd = ["-m", "server", "--model-repository", str(models), "--port", "0", "--metrics-port", "-1",
           "--log-level", "WARNING", *args]  # fmt: skip
    return start_process(cmd, cpus, root)


def start_process(args: list[str], cpus: set[int] | None = None, root: Path = ROOT) -> Replica:
    """`python ARGS` from the source tree `root` (this checkout by default; optionally pinned to
    `cpus`), once it prints `listening on HOST:PORT`; its later output is kept in `Replica.log`."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, *args]
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=preexec)  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("replica exited: " + "".join(lines))
        lines.append(line)
        m = re.match(r"listening on [\d.]+:(\d+)", line)
        if m:
            replica = Replica(proc, int(m.group(1)), lines)

            def drain(out=proc.stdout, replica=replica):
                with out:
                    for ln in out:
                        replica.log.append(ln)

            threading.Thread(target=drain, daemon=True).start()
            return replica
    proc.kill()
    raise RuntimeError("replica did not start: " + "".join(lines))


def free_port() -> int:
    """A loopback port free right now (for processes that must be told their port up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replicas(models: Path, n: int, args: list[str] = (), pin: bool = False) -> list[Replica]:
    cpus = sorted(os.sched_getaffinity(0))
    return [start_replica(models, args, {cpus[i % len(cpus)]} if pin else None) for i in range(n)]


def round_robin_target(replicas: list[Replica]) -> str:
    """A multi-address target for gRPC's client-side round_robin: ipv4:127.0.0.1:P1,127.0.0.1:P2."""
    return "ipv4:" + ",".join(r.address for r in replicas)
