"""The server's and client's command-line helpers: the contract's, shared with the exporter
(`contract.cli`: the package version, one-line argument errors, exit code 2)."""

from __future__ import annotations

from contract.cli import DIST_NAME, Parser, fail, version

__all__ = ["DIST_NAME", "Parser", "fail", "version"]
