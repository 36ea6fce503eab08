"""Server settings: one object with defaults, overridable by CLI flags and LSTM_SERVE_* variables.

Precedence: CLI flag > environment variable > default. Each field is documented once, here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from contract.cli import Parser

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
        default=0,
        metadata={"help": "ONNX Runtime intra-op threads per session (0 = the CPUs this process may use: "
                  "affinity mask and cgroup quota, whichever is smaller)"},
    )  # fmt: skip
    inter_op_threads: int = field(default=0, metadata={"help": "ONNX Runtime inter-op threads (0 = 1)"})
    ort_spinning: bool = field(
        default=False,
        metadata={"help": "let ONNX Runtime threads busy-wait between ops (off: the transport shares the CPUs)"},
    )
    graph_optimization: str = field(
        default="all", metadata={"help": "ORT graph optimization: disable|basic|extended|all"}
    )
    ort_memory_reuse: str = field(
        default="auto",
        metadata={"help": "ONNX Runtime memory-reuse planner: auto (off for graphs over 1000 nodes, whose "
                  "load it slows super-linearly: the unrolled static models) | on | off"},
    )  # fmt: skip
    max_run_s: float = field(
        default=0.0,
        metadata={"help": "stop any ONNX Runtime run after this many seconds (DEADLINE_EXCEEDED/504 naming this "
                  "flag); 0 = no cap (a run by itself still stops at its client's deadline or when the client "
                  "goes away)"},
    )  # fmt: skip
    grpc_workers: int = field(
        default=32,
        metadata={
            "help": "executor threads for ONNX Runtime runs with batching off, large decodes and model loads; "
            "with --max-queue, the inference calls in progress at once (gRPC and REST; then RESOURCE_EXHAUSTED/429)"
        },
    )
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
    sequence_client_share: float = field(
        default=0.25,
        metadata={"help": "fraction of --max-sequences one client (its bearer token, else its connection) may "
                  "hold: the rest stay free for others"},
    )  # fmt: skip
    max_sequence_state_mb: int = field(
        default=64,
        metadata={"help": "state (MiB) one stateful sequence may keep between chunks: a start whose state is larger, "
                  "or a chunk whose state output grows past it, is refused (RESOURCE_EXHAUSTED naming this flag; "
                  "a growing sequence is freed); raise it for a model whose state is declared to grow; 0 = no cap"},
    )  # fmt: skip
    sequence_memory_mb: int = field(
        default=0,
        metadata={"help": "state (MiB) all live sequences may keep at once, one client at most "
                  "--sequence-client-share of it; 0 = a quarter of the memory budget"},
    )  # fmt: skip
    memory_budget_mb: int = field(
        default=0,
        metadata={"help": "memory (MiB) the inference calls in progress may hold at once: request, estimated "
                  "ONNX Runtime working memory and response, until the response is sent (then the call waits "
                  "within its deadline, or RESOURCE_EXHAUSTED); 0 = 60 percent of the machine's or the cgroup's "
                  "memory, shared among --workers"},
    )  # fmt: skip
    max_request_memory_mb: int = field(
        default=1024,
        metadata={"help": "memory (MiB) one inference call may hold: request, estimated ONNX Runtime working memory "
                  "and response; a larger call is refused (RESOURCE_EXHAUSTED/429 naming this flag): send long "
                  "sequences in chunks (sequence_id, or ModelStreamInfer) or fewer per request; 0 = no cap but "
                  "the per-client share"},
    )  # fmt: skip
    ort_arena_cap: bool = field(
        default=False,
        metadata={"help": "every model version allocates ONNX Runtime CPU memory from the shared arena, capped "
                  "then at the memory budget (a run needing more fails with RESOURCE_EXHAUSTED instead of growing "
                  "the process); without it only versions sized by input values do, capped at "
                  "--max-request-memory-mb (or the budget where smaller)"},
    )  # fmt: skip
    memory_client_share: float = field(
        default=0.5,
        metadata={"help": "fraction of the memory budget one client (its bearer token, else its connection) may "
                  "hold; a request needing more is refused"},
    )  # fmt: skip
    memory_wait_s: float = field(
        default=30.0,
        metadata={"help": "longest wait for memory budget by a call without a deadline (with one: its deadline)"},
    )
    max_streams_per_connection: int = field(
        default=128, metadata={"help": "gRPC: concurrent calls one HTTP/2 connection may have open"}
    )
    max_connection_age_s: float = field(
        default=600.0,
        metadata={"help": "gRPC: connections get GOAWAY after this many seconds (clients reconnect; 0 = never); "
                  "with --connection-age-grace-s it cuts off a client whose replies are not being read"},
    )  # fmt: skip
    connection_age_grace_s: float = field(
        default=60.0,
        metadata={"help": "gRPC: seconds the calls of a connection past its age get to finish before it is closed"},
    )
    send_timeout_s: float = field(
        default=60.0,
        metadata={"help": "HTTP/REST: a connection whose client takes none of its reply for this long is closed"},
    )
    tls_cert: str = field(default="", metadata={"help": "PEM server certificate (chain): turns TLS on"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(default="", metadata={"help": "PEM CA: require client certificates signed by it"})
    auth_tokens: str | None = field(
        default=None,
        metadata={"help": "comma-separated bearer tokens (prefer the env variable); set but empty: refused at start"},
    )
    auth_tokens_file: str = field(default="", metadata={"help": "file with one bearer token per line"})
    restricted_api: str = field(
        default="",
        metadata={"help": "admin-only protocol groups, as Triton's restricted APIs: 'model-repository:KEY=VALUE' "
                  "makes repository index/load/unload (gRPC and REST) need the header KEY: VALUE "
                  "(PERMISSION_DENIED/403 otherwise); groups: model-repository, shared-memory "
                  "(e.g. 'model-repository,shared-memory:KEY=VALUE'); empty = not restricted"},
    )  # fmt: skip
    drain_delay_s: float = field(
        default=0.0, metadata={"help": "on SIGTERM: seconds of NOT_SERVING health before refusing calls"}
    )
    poll_s: float = field(
        default=0.0,
        metadata={"help": "--model-control-mode poll: re-scan the model repository every N s (0 there = 15)"},
    )
    model_control_mode: str = field(
        default="none",
        metadata={
            "help": "none: load every model at start, refuse load/unload requests | explicit: also load/unload "
            "by request | poll: follow the disk every --poll-s s (as Triton)"
        },
    )
    exit_on_error: bool = field(
        default=True,
        metadata={"help": "exit 2 at start if a model fails to load (--no-exit-on-error: start, not ready)"},
    )
    system_shared_memory: bool = field(
        default=True,
        metadata={"help": "Triton's system shared-memory extension: co-located clients pass tensors in /dev/shm "
                  "regions instead of the message (off with --workers > 1)"},
    )  # fmt: skip
    max_shm_regions: int = field(default=256, metadata={"help": "registered shared-memory regions at most"})
    max_shm_mb: int = field(default=8192, metadata={"help": "MiB of registered shared-memory regions at most"})
    workers: int = field(default=1, metadata={"help": "server processes sharing the port (SO_REUSEPORT)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG | INFO | WARNING | ERROR | CRITICAL (any case)"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            problem = field_problem(f.name, getattr(self, f.name))
            if problem:  # named as the caller wrote it; load_settings names the flag or variable
                raise ValueError(f"{f.name} {problem}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.model_control_mode == "poll" and self.poll_s == 0:
            self.poll_s = 15.0  # Triton's --repository-poll-secs default
        if self.poll_s > 0 and self.model_control_mode != "poll":
            raise ValueError(
                f"--poll-s {self.poll_s:g} re-scans the model repository only with --model-control-mode poll "
                f"(got {self.model_control_mode!r})"
            )


# What each setting accepts. Integers and floats: (lowest, highest) inclusive, None = unbounded;
# floats must also be finite. Strings: the allowed values (log levels in any case).
_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "port": (0, 65535),
    "http_port": (-1, 65535),
    "metrics_port": (-1, 65535),
    "intra_op_threads": (0, None),
    "inter_op_threads": (0, None),
    "grpc_workers": (1, None),
    "max_message_mb": (1, 2047),  # gRPC takes the byte count as a 32-bit int
    "grace_s": (0, None),
    "max_run_s": (0, 86400 * 365),
    "max_elements": (1, None),
    "max_request_batch": (1, None),
    "max_batch": (1, None),
    "max_queue_delay_us": (0, None),
    "max_queue": (1, None),
    "instances": (1, None),
    "max_sequences": (0, None),
    "drain_delay_s": (0, None),
    "poll_s": (0, None),
    "memory_budget_mb": (0, None),
    "max_sequence_state_mb": (0, None),
    "sequence_memory_mb": (0, None),
    "max_request_memory_mb": (0, None),
    "memory_wait_s": (0, 86400),
    "max_streams_per_connection": (1, 2**31 - 1),
    "max_connection_age_s": (0, 2**31 / 1000),
    "connection_age_grace_s": (0, 2**31 / 1000),
    "send_timeout_s": (0.1, None),
    "workers": (1, None),
    "max_shm_regions": (1, None),
    "max_shm_mb": (1, None),
}
_CHOICES = {
    "graph_optimization": ("disable", "basic", "extended", "all"),
    "ort_memory_reuse": ("auto", "on", "off"),
    "model_control_mode": ("none", "explicit", "poll"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_problem(name: str, value) -> str | None:
    """Why `value` is not acceptable for setting `name` ("must be >= 0, got -5"), or None."""
    if name == "sequence_idle_s":
        if not 0 < value <= 10**9:  # NaN fails too
            return f"must be a number of seconds in (0, 1e9], got {value:g}"
        return None
    if name in ("sequence_client_share", "memory_client_share"):
        if not 0 < value <= 1:  # NaN fails too
            return f"must be a fraction in (0, 1], got {value:g}"
        return None
    if name == "restricted_api":
        from server.security import parse_restricted

        try:
            parse_restricted(value)
        except ValueError as exc:
            return str(exc)
        return None
    if name == "device":
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value).strip().lower()):
            return f"{value!r}: expected auto, cpu, cuda or cuda:N"
        return None
    if name in _CHOICES:
        allowed = _CHOICES[name]
        if (value.upper() if name == "log_level" else value) not in allowed:
            return f"must be one of {', '.join(allowed)}, got {value!r}"
        return None
    if name in _BOUNDS:
        lo, hi = _BOUNDS[name]
        shown = f"{value:g}" if isinstance(value, float) else value
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {shown}"
        if lo is not None and value < lo:
            return f"must be >= {lo}, got {shown}"
        if hi is not None and value > hi:
            return f"must be <= {hi}, got {shown}"
    return None


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _caster(f: dataclasses.Field):
    return {"int": _parse_int, "float": _parse_float, "bool": _parse_bool, "Path": Path}.get(str(f.type), str)


def _shown_default(f: dataclasses.Field) -> str:
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return repr(f.default) if f.default == "" else str(f.default)


def build_parser(prog: str = "python -m server") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        description="LSTM inference server: KServe Open Inference Protocol v2 over gRPC (and HTTP/REST) on "
        "ONNX Runtime. Every flag can also be set with the environment variable named in its help "
        "(flag > environment > default).",
    )
    for f in dataclasses.fields(Settings):
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} (env {env}; default {_shown_default(f)})"
        if str(f.type) == "bool":  # a switch: --batching / --no-batching
            parser.add_argument(
                flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            metavar = {"int": "N", "float": "SECONDS", "Path": "DIR"}.get(str(f.type))
            if f.name.endswith("_share"):
                metavar = "FRACTION"
            parser.add_argument(
                flag_name(f.name), dest=f.name, type=_caster(f), default=None, metavar=metavar, help=help_text
            )
    return parser


def load_settings(
    argv: list[str] | None = None, environ: dict[str, str] | None = None, prog: str = "python -m server"
) -> Settings:
    """Flags > LSTM_SERVE_* variables > defaults. A malformed flag exits 2 (argparse, one line); a value
    out of range raises ValueError naming the flag or variable ("--grace-s must be >= 0, got -5")."""
    environ = dict(os.environ if environ is None else environ)
    args = build_parser(prog).parse_args(argv)
    values = {}
    for f in dataclasses.fields(Settings):
        cli = getattr(args, f.name)
        env_name = ENV_PREFIX + f.name.upper()
        env = environ.get(env_name)
        if cli is not None:
            values[f.name] = cli
            problem = field_problem(f.name, cli)
            if problem:
                raise ValueError(f"{flag_name(f.name)} {problem}")
        elif env is not None:
            try:
                values[f.name] = _caster(f)(env)
            except argparse.ArgumentTypeError as exc:
                raise ValueError(f"{env_name}={env!r}: {exc}") from None
            problem = field_problem(f.name, values[f.name])
            if problem:
                raise ValueError(f"{env_name}={env!r}: {problem}")
    if "log_level" in values:
        values["log_level"] = values["log_level"].upper()
    return Settings(**values)
