"""`python -m server`: start the server; SIGINT/SIGTERM drain in-flight calls and exit 0."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from server.app import InferenceServer
from server.config import load_settings
from server.errors import StartupError


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        server = InferenceServer(settings)
        port = server.start()
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"listening on {settings.host}:{port}", flush=True)
    stopping = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001
        if not stopping.is_set():
            stopping.set()
            logging.getLogger("server").info("signal %d: draining (grace %.1f s)", signum, settings.grace_s)
            threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
