"""The one place where a data plane is built from the settings.

The server (`server.app`), the Ray Serve deployment (`scale.ray_serve`) and the transport
benchmark's minimal servers (`bench.transport`) all call `build_plane`, so they share every default:
execution provider choice, ONNX Runtime options, limits, the batching policy, sequence limits,
model-control mode and the executor threads that run ONNX Runtime for the asyncio frontends.
Nothing is loaded here: `plane.repository.load_all()` loads the models.
"""

from __future__ import annotations

import logging

from server.batcher import BatchPolicy
from server.codec import Limits
from server.config import Settings
from server.dataplane import DataPlane
from server.memory import default_budget
from server.metrics import Metrics
from server.osthread import thread_pool
from server.repository import ModelRepository
from server.runtime import RuntimeOptions, select_providers
from server.sequences import SequenceStore
from server.stats import Statistics

log = logging.getLogger(__name__)


def runtime_options(settings: Settings) -> RuntimeOptions:
    return RuntimeOptions(
        device=settings.device,
        cuda_tf32=settings.cuda_tf32,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        spinning=settings.ort_spinning,
        graph_optimization=settings.graph_optimization,
        memory_reuse=settings.ort_memory_reuse,
        max_run_s=settings.max_run_s,
    )


def batch_policy(settings: Settings) -> BatchPolicy:
    return BatchPolicy(
        enabled=settings.batching,
        max_batch=settings.max_batch,
        max_queue_delay_us=settings.max_queue_delay_us,
        max_cells=settings.max_elements,
        max_queue=settings.max_queue,
        instances=settings.instances,
    )


def sequence_memory(settings: Settings) -> int:
    """Bytes all live sequences may keep: --sequence-memory-mb, or a quarter of the memory budget."""
    if settings.sequence_memory_mb:
        return settings.sequence_memory_mb << 20
    budget = settings.memory_budget_mb << 20 if settings.memory_budget_mb else default_budget(settings.workers)[0]
    return budget // 4


def build_plane(settings: Settings, metrics: Metrics | None = None) -> DataPlane:
    """A data plane over `settings.model_repository`, models not loaded yet. Raises StartupError
    when `--device cuda` is asked for and CUDA cannot be used."""
    options = runtime_options(settings)
    providers = select_providers(options)
    log.info("execution provider in use: %s", providers.kind)
    policy = batch_policy(settings)
    repository = ModelRepository(
        settings.model_repository,
        providers,
        options,
        settings.model_control_mode,
        settings.exit_on_error,
        policy,
        # a model whose kept state could never fit one sequence's cap fails to load (not every start)
        max_state_bytes=settings.max_sequence_state_mb << 20 if settings.max_sequence_state_mb else None,
    )
    metrics = metrics or Metrics()
    metrics.provider.labels(providers.kind).set(1)

    def sequences_changed(live: int, evicted: int) -> None:
        metrics.live_sequences.set(live)
        if evicted:
            metrics.sequence_evictions.inc(evicted)

    return DataPlane(
        repository,
        Statistics(),
        Limits(settings.max_elements, settings.max_request_batch),
        policy,
        metrics,
        SequenceStore(
            settings.max_sequences,
            settings.sequence_idle_s,
            sequences_changed,
            settings.sequence_client_share,
            max_state_bytes=settings.max_sequence_state_mb << 20 if settings.max_sequence_state_mb else None,
            state_memory=sequence_memory(settings),
        ),
        max_message_bytes=settings.max_message_mb << 20,
        # ONNX Runtime runs (batching off, or a retired version's late requests), request decoding
        # of large inputs and model loads: off the event loop. ORT releases the GIL while it runs.
        executor=thread_pool("infer", settings.grpc_workers),
    )
