"""The server's data plane as a Ray Serve deployment, reached through Ray Serve's gRPC proxy.

Optional (`make serve-ray`; `ray[serve]` lives in its own venv, .venv-ray, from
requirements-ray.txt: it is ~500 MB and never enters the default install). Unchanged OIP clients
(tritonclient, server.client) call the proxy with the project's own `inference` stubs: the proxy
hands each request proto to a replica method of the same name as the RPC.

Facts this relies on (ray 2.60): Serve pickles request protos to ship them to replicas, and
protobuf names the message classes after the generated module (`grpc_service_pb2`), so that module
must import by its own name on every node: server/proto goes on PYTHONPATH (`ray_pythonpath()`).
Proxies prefer replicas on their own node unless RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0.
With more than one Serve application, clients must send an `application` metadata header.

`python -m scale.ray_serve --nodes 2 --replicas 2` starts a local Ray cluster of N nodes on this
machine (ray.cluster_utils.Cluster, one raylet per node) and the application; once the proxy routes
calls to it (`wait_routed`), it prints the proxy's address.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICER = "server.proto.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"


def ray_pythonpath() -> str:
    return os.pathsep.join([str(ROOT), str(ROOT / "server" / "proto")])


def wait_routed(port: int, timeout_s: float = 120.0, in_a_row: int = 8) -> None:
    """Return once the proxy on `port` routes a call without an `application` header to the
    application. `serve.run` returns before every proxy has learned the route (it arrives by long
    poll): a call in between gets NOT_FOUND "Application metadata not set". ServerReady must answer
    on `in_a_row` fresh connections in a row (each node's proxy may listen on the port);
    SystemExit after `timeout_s`."""
    import time

    import grpc

    from server.proto import grpc_service_pb2 as pb
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    answered = 0
    while answered < in_a_row:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=10)
                answered += 1
                continue
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise SystemExit(f"ray serve: the gRPC proxy on port {port} does not route to the application "
                                     f"after {timeout_s:g} s: {exc.code().name} {exc.details()}") from None  # fmt: skip
        answered = 0
        time.sleep(0.2)


def build_app(models: str, replicas: int, cpus_per_replica: float, autoscaling: dict | None = None):
    """`autoscaling`: Ray Serve's autoscaling_config (min_replicas, max_replicas,
    target_ongoing_requests, ...); when given it replaces the fixed replica count."""
    from ray import serve

    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}

    @serve.deployment(ray_actor_options={"num_cpus": cpus_per_replica}, **scaling)
    class LSTMDeployment:
        """One replica: a model repository and data plane, as in the plain server."""

        def __init__(self, model_repository: str) -> None:
            import ray

            from server.config import load_settings
            from server.factory import build_plane

            # the server's settings and defaults (LSTM_SERVE_* variables apply), one ONNX Runtime
            # thread per replica unless LSTM_SERVE_INTRA_OP_THREADS says otherwise
            environ = {"LSTM_SERVE_INTRA_OP_THREADS": "1", **os.environ}
            settings = load_settings(["--model-repository", model_repository], environ)
            from server.gate import Gate
            from server.handlers import Admission
            from server.memory import budget_from_settings

            self.plane = build_plane(settings)
            budget = budget_from_settings(settings)
            self.plane.repository.load_all()
            # the server's call gate: structure caps, deadlines (Triton's `timeout`), the memory budget
            self.gate = Gate(self.plane, Admission(limit=settings.grpc_workers + settings.max_queue), budget)
            self.node_id = ray.get_runtime_context().get_node_id()

        def _fail(self, exc: Exception, grpc_context) -> None:
            from server.status import error_status

            code, _, message = error_status(exc)
            grpc_context.set_code(code)
            grpc_context.set_details(message)

        def _response(self, response, request):
            from server.grpc_codec import to_infer_response

            out = to_infer_response(response, request)
            out.parameters["ray_node_id"].string_param = self.node_id  # which node answered
            return out

        async def _infer(self, request):
            """Through the server's gate (no client identity here: Ray's proxy is the peer)."""
            from server.servicer import infer_message

            response, hold = await infer_message(self.gate, request, None, "", [])
            try:
                return self._response(response, request)
            finally:
                if hold is not None:
                    hold.release()

        async def ModelInfer(self, request, grpc_context):  # noqa: N802 - RPC names
            from server.proto import grpc_service_pb2 as pb

            try:
                return await self._infer(request)
            except Exception as exc:  # noqa: BLE001 - mapped to its gRPC status
                self._fail(exc, grpc_context)
                return pb.ModelInferResponse()

        async def ModelStreamInfer(self, request_iterator, grpc_context):  # noqa: N802
            from server.proto import grpc_service_pb2 as pb
            from server.status import error_status

            async for request in request_iterator:
                try:
                    yield pb.ModelStreamInferResponse(infer_response=await self._infer(request))
                except Exception as exc:  # noqa: BLE001
                    _, _, message = error_status(exc)
                    yield pb.ModelStreamInferResponse(error_message=message)  # bare text, as Triton's

        def ServerLive(self, request):  # noqa: N802
            from server.proto import grpc_service_pb2 as pb

            return pb.ServerLiveResponse(live=True)

        def ServerReady(self, request):  # noqa: N802
            from server.proto import grpc_service_pb2 as pb

            return pb.ServerReadyResponse(ready=True)

        def ModelReady(self, request):  # noqa: N802
            from server.proto import grpc_service_pb2 as pb

            try:
                self.plane.repository.get(request.name, request.version)
                return pb.ModelReadyResponse(ready=True)
            except Exception:  # noqa: BLE001
                return pb.ModelReadyResponse(ready=False)

        def ServerMetadata(self, request):  # noqa: N802
            from server.describe import server_metadata
            from server.handlers import extensions
            from server.proto import grpc_service_pb2 as pb

            return pb.ServerMetadataResponse(**server_metadata(extensions()))

        def ModelMetadata(self, request, grpc_context):  # noqa: N802
            from server.proto import grpc_service_pb2 as pb

            try:
                from server.describe import model_metadata

                described, _headers = model_metadata(self.plane, request.name, request.version)
                return pb.ModelMetadataResponse(**described)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, grpc_context)
                return pb.ModelMetadataResponse()

        def ModelConfig(self, request, grpc_context):  # noqa: N802
            from server.proto import grpc_service_pb2 as pb

            try:
                from server.describe import model_config

                return pb.ModelConfigResponse(config=model_config(self.plane, request.name, request.version))
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, grpc_context)
                return pb.ModelConfigResponse()

    return LSTMDeployment.bind(models)


def parse_autoscale(spec: str, delay_s: float | None = None) -> dict | None:
    """'min:max[:target_ongoing_requests]' -> Ray Serve autoscaling_config (None for '')."""
    if not spec:
        if delay_s is not None:
            raise ValueError("--autoscale-delay needs --autoscale")
        return None
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        lo, hi = int(parts[0]), int(parts[1])
        target = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise ValueError(f"--autoscale {spec!r}: expected min:max[:target_ongoing_requests], e.g. 1:4:8") from None
    if not 0 <= lo <= hi or hi < 1 or (target is not None and target <= 0):
        raise ValueError(f"--autoscale {spec!r}: need 0 <= min <= max, max >= 1, target > 0")
    config: dict = {"min_replicas": lo, "max_replicas": hi}
    if target is not None:
        config["target_ongoing_requests"] = target
    if delay_s is not None:
        config["upscale_delay_s"] = config["downscale_delay_s"] = delay_s
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale.ray_serve", description=__doc__)
    parser.add_argument("--models", default=str(ROOT / "models"))
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=float, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument(
        "--autoscale", default="", help="min:max[:target_ongoing_requests], e.g. 1:4:8 (replaces --replicas)"
    )
    parser.add_argument(
        "--autoscale-delay",
        type=float,
        default=None,
        help="seconds of sustained load (or idleness) before scaling up (or down); Ray's defaults: 30 / 600",
    )
    args = parser.parse_args(argv)
    try:
        autoscaling = parse_autoscale(args.autoscale, args.autoscale_delay)
    except ValueError as exc:
        parser.error(str(exc))
    os.environ["PYTHONPATH"] = ray_pythonpath()
    os.environ.setdefault("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
    sys.path[:0] = ray_pythonpath().split(os.pathsep)
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import gRPCOptions

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=args.cpus_per_node)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": ray_pythonpath()}})
    serve.start(grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[SERVICER]))
    serve.run(build_app(args.models, args.replicas, args.cpus_per_replica, autoscaling), name="lstm")
    wait_routed(args.grpc_port)  # the line below means calls are routed
    scaling = f"autoscaling {autoscaling}" if autoscaling else f"{args.replicas} replicas"
    print(f"ray serve gRPC proxy on 127.0.0.1:{args.grpc_port} ({args.nodes} nodes, {scaling})", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
