"""What every command-line entry point shares: the package version and an argument parser whose errors
are one line (`error: --port: expected an integer, got 'x'`, exit 2) instead of a usage block.

Standard library only: `--help` and `--version` must not pay for importing grpc, onnxruntime or torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DIST_NAME = "lstm-serve"


def version() -> str:
    """The installed distribution's version; from pyproject.toml when running from a checkout."""
    from importlib import metadata

    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and a --version flag."""

    def __init__(self, *args, version_flag: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if version_flag:
            self.add_argument(
                "--version",
                action="version",
                version=f"{self.prog} {version()}",
                help="print the program's version and exit",
            )

    def error(self, message: str):  # noqa: D102 - argparse's hook
        # "argument --grace-s: invalid ..." -> "--grace-s: invalid ..."; the usage block is left out
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message: str) -> int:
    """Print a one-line error for a value the parser accepted but the program cannot use; exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2
