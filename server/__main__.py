"""`python -m server`: start the server; SIGINT/SIGTERM drain in-flight calls and exit 0.

With `--workers N` (N > 1) N processes serve one port through SO_REUSEPORT, as in grpc's
multiprocessing example: each has its own ONNX Runtime sessions, batcher and statistics; the
kernel spreads connections over them. Worker i serves metrics on metrics_port + i.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import socket
import sys

from contract.cli import fail
from server.config import load_settings


@contextlib.contextmanager
def _reserve_port(host: str, port: int):
    """Bind (and hold) the port with SO_REUSEPORT so that workers can share it; yields the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _prog() -> str:
    return "lstm-serve" if os.path.basename(sys.argv[0]) == "lstm-serve" else "python -m server"


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv, prog=_prog())
    except ValueError as exc:
        return fail(str(exc))
    # onnxruntime and grpc load only now: --help, --version and flag errors answer without them
    from server.app import serve

    if settings.workers == 1:
        return serve(settings, announce=True)
    ctx = multiprocessing.get_context("spawn")
    with _reserve_port(settings.host, settings.port) as port:
        procs = []
        for i in range(settings.workers):
            metrics = settings.metrics_port + i if settings.metrics_port > 0 else settings.metrics_port
            worker = dataclasses.replace(settings, port=port, metrics_port=metrics)
            procs.append(ctx.Process(target=serve, args=(worker, i == 0), name=f"server-{i}"))
        for p in procs:
            p.start()

        def _forward(signum, frame):  # noqa: ARG001
            for p in procs:
                if p.is_alive():
                    p.terminate()  # SIGTERM: each worker drains

        signal.signal(signal.SIGTERM, _forward)
        signal.signal(signal.SIGINT, _forward)
        for p in procs:
            p.join()
    codes = [p.exitcode for p in procs]
    return 0 if all(c == 0 for c in codes) else max(c or 0 for c in codes) or 1


if __name__ == "__main__":
    sys.exit(main())
