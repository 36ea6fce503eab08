"""Server settings: one object with defaults, overridable by CLI flags and LSTM_SERVE_* variables.

Precedence: CLI flag > environment variable > default. Each field is documented once, here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "LSTM_SERVE_"


@dataclass
class Settings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 to listen on all)"})
    port: int = field(default=8001, metadata={"help": "gRPC port; 0 picks a free one (printed at start)"})
    http_port: int = field(
        default=-1, metadata={"help": "HTTP/REST (OIP v2) port, e.g. 8000; 0 picks a free one; -1 = off"}
    )
    model_repository: Path = field(default=Path("models"), metadata={"help": "folder of <model>/<version>/model.onnx"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    cuda_tf32: bool = field(default=False, metadata={"help": "allow TF32 in CUDA kernels (moves results by ~3e-4)"})
    intra_op_threads: int = field(
        default=0, metadata={"help": "ONNX Runtime intra-op threads per session (0 = one per core)"}
    )
    inter_op_threads: int = field(default=0, metadata={"help": "ONNX Runtime inter-op threads (0 = default)"})
    graph_optimization: str = field(
        default="all", metadata={"help": "ORT graph optimization: disable|basic|extended|all"}
    )
    grpc_workers: int = field(default=32, metadata={"help": "gRPC handler threads (concurrent calls in progress)"})
    max_message_mb: int = field(default=256, metadata={"help": "maximum gRPC message size, both ways (MiB)"})
    grace_s: float = field(default=10.0, metadata={"help": "seconds in-flight calls get to finish on SIGTERM/SIGINT"})
    max_elements: int = field(default=64 * 1024 * 1024, metadata={"help": "maximum elements of one input tensor"})
    max_request_batch: int = field(default=4096, metadata={"help": "maximum sequences in one request"})
    batching: bool = field(
        default=True, metadata={"help": "merge concurrent requests into one run (per model: config.json)"}
    )
    max_batch: int = field(default=64, metadata={"help": "batcher: maximum sequences per merged run"})
    max_queue_delay_us: int = field(
        default=0,
        metadata={"help": "batcher: longest wait for more requests (µs); 0 = batch what queued while the last run ran"},
    )
    max_queue: int = field(default=1024, metadata={"help": "batcher: queued requests before RESOURCE_EXHAUSTED"})
    instances: int = field(default=1, metadata={"help": "concurrent ONNX Runtime runs per model version"})
    metrics_port: int = field(default=8002, metadata={"help": "Prometheus HTTP port; 0 = any free port; -1 = off"})
    max_sequences: int = field(default=1024, metadata={"help": "live stateful sequences (sequence_id) at most"})
    sequence_idle_s: float = field(default=60.0, metadata={"help": "free a sequence after this many idle seconds"})
    tls_cert: str = field(default="", metadata={"help": "PEM server certificate (chain): turns TLS on"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(default="", metadata={"help": "PEM CA: require client certificates signed by it"})
    auth_tokens: str = field(default="", metadata={"help": "comma-separated bearer tokens (prefer the env variable)"})
    auth_tokens_file: str = field(default="", metadata={"help": "file with one bearer token per line"})
    drain_delay_s: float = field(
        default=0.0, metadata={"help": "on SIGTERM: seconds of NOT_SERVING health before refusing calls"}
    )
    poll_s: float = field(
        default=0.0, metadata={"help": "re-scan the model repository every N s (0 = off); loads new versions"}
    )
    workers: int = field(default=1, metadata={"help": "server processes sharing the port (SO_REUSEPORT)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG | INFO | WARNING | ERROR"})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not 0 < self.sequence_idle_s <= 10**9:  # NaN fails too
            raise ValueError(f"sequence_idle_s must be a number of seconds in (0, 1e9], got {self.sequence_idle_s}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be -1 (off) or in 0..65535, got {self.http_port}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.graph_optimization not in ("disable", "basic", "extended", "all"):
            raise ValueError(f"graph_optimization must be disable|basic|extended|all, got {self.graph_optimization!r}")
        for name in (
            "grpc_workers",
            "max_message_mb",
            "max_elements",
            "max_request_batch",
            "max_batch",
            "max_queue",
            "instances",
            "workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _caster(f: dataclasses.Field):
    return {int: int, float: float, bool: _parse_bool, Path: Path}.get(
        {"int": int, "float": float, "bool": bool, "Path": Path, "str": str}.get(str(f.type), str), str
    )


def build_parser(prog: str = "python -m server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="LSTM inference server (Open Inference Protocol v2 over gRPC)"
    )
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        parser.add_argument(
            flag,
            dest=f.name,
            type=_caster(f),
            default=None,
            help=f"{f.metadata['help']} (env {env}; default {f.default})",
        )
    return parser


def load_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    args = build_parser().parse_args(argv)
    values = {}
    for f in dataclasses.fields(Settings):
        cli = getattr(args, f.name)
        env = environ.get(ENV_PREFIX + f.name.upper())
        if cli is not None:
            values[f.name] = cli
        elif env is not None:
            try:
                values[f.name] = _caster(f)(env)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ValueError(f"{ENV_PREFIX + f.name.upper()}={env!r}: {exc}") from None
    return Settings(**values)
