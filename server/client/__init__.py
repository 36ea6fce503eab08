"""Python client for the LSTM server: send variable-length numpy sequences, get trimmed outputs.

Needs only grpcio, protobuf and numpy (no torch, no onnxruntime):

    from server.client import LSTMClient
    with LSTMClient("127.0.0.1:8001") as client:
        results = client.infer("encoder", [np.random.randn(12, 80).astype("float32"),
                                           np.random.randn(30, 80).astype("float32")])
        results[0]["y"].shape   # (12, 512): trimmed to the sequence's own length
        results[0]["h_n"].shape  # (4, 256): (layers*directions, hidden)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

import grpc
import numpy as np
from google.protobuf import json_format

from server.codec import decode_outputs, encode_input, to_parameter
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc

__all__ = ["LSTMClient", "SequenceStream", "pad_sequences", "split_outputs"]


def pad_sequences(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(T_i, F) arrays -> x (B, max T, F) float32 zero-padded, lengths (B,) int64; (T_i,) integer
    token ids -> x (B, max T) int64 padded with id 0."""
    if not sequences:
        raise ValueError("no sequences to send")
    if all(np.asarray(s).ndim == 1 and np.asarray(s).dtype.kind in "iu" for s in sequences):
        ids = [np.asarray(s, np.int64) for s in sequences]
        if any(a.shape[0] < 1 for a in ids):
            raise ValueError("every sequence of token ids needs at least one id")
        lengths = np.array([a.shape[0] for a in ids], np.int64)
        x = np.zeros((len(ids), int(lengths.max())), np.int64)  # (B, T)
        for i, a in enumerate(ids):
            x[i, : a.shape[0]] = a
        return x, lengths
    arrays = [np.asarray(s, dtype=np.float32) for s in sequences]
    for i, a in enumerate(arrays):
        if a.ndim != 2 or a.shape[0] < 1:
            raise ValueError(f"sequence {i}: expected shape (time >= 1, features), got {a.shape}")
    features = {a.shape[1] for a in arrays}
    if len(features) != 1:
        raise ValueError(f"sequences have different feature sizes: {sorted(features)}")
    lengths = np.array([a.shape[0] for a in arrays], np.int64)
    x = np.zeros((len(arrays), int(lengths.max()), features.pop()), np.float32)  # (B, T, F)
    for i, a in enumerate(arrays):
        x[i, : a.shape[0]] = a
    return x, lengths


# The project's own encoders, for a server that sends no `lstm-roles` / `lstm-axes`.
DEFAULT_ROLES = {
    "ragged": "x",
    "lengths": "lengths",
    "states": [{"input": n, "output": n[0] + "_n", "implicit": False} for n in ("h0", "c0")],
}

DEFAULT_AXES = {"y": {"batch": 0, "time": 1}, "h_n": {"batch": 1}, "c_n": {"batch": 1}}


def _sequence_inputs(roles: dict) -> tuple[str, str]:
    """The input the sequences go in and its lengths input; this project's names where the model
    has none (a model without a ragged input whose sequence input is called x still answers)."""
    return roles.get("ragged") or DEFAULT_ROLES["ragged"], roles.get("lengths") or DEFAULT_ROLES["lengths"]


def split_outputs(
    outputs: dict[str, np.ndarray], lengths: np.ndarray, axes: dict[str, dict[str, int]] | None = None
) -> list[dict[str, np.ndarray]]:
    """Batch outputs -> one dict per sequence: each output indexed on its batch axis, and its time
    axis (if it has one) cut to the sequence's length. `axes` {output: {"batch": i, "time": j}}
    comes from the model's metadata (`LSTMClient.axes`); outputs it does not name use axis 0.
    With the default encoders: y (T_i, D*H), h_n/c_n (L*D, H)."""
    axes = DEFAULT_AXES if axes is None else axes
    per_seq = []
    for i, n in enumerate(lengths.tolist()):
        item = {}
        for name, value in outputs.items():
            dims = axes.get(name, {})
            batch, time = dims.get("batch", 0), dims.get("time")
            index: list = [slice(None)] * value.ndim
            if time is not None and time < value.ndim:
                index[time] = slice(0, n)
            index[batch] = i
            item[name] = value[tuple(index)]
        per_seq.append(item)
    return per_seq


ROUND_ROBIN_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.02s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


class LSTMClient:
    """A thin client over the generated Open Inference Protocol v2 stubs."""

    def __init__(
        self,
        target: str = "127.0.0.1:8001",
        timeout: float | None = 30.0,
        max_message_mb: int = 256,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls_ca: bytes | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        tls: bool = False,
        round_robin: bool = False,
    ) -> None:
        """`token`: sent as `authorization: Bearer <token>`. TLS when `tls` or `tls_ca` is given
        (`tls_ca`: PEM roots, None = system roots); `tls_cert`/`tls_key`: client certificate.
        `round_robin`: spread calls over every address of a multi-address target
        (`ipv4:127.0.0.1:P1,127.0.0.1:P2`), skip replicas whose health check fails, and retry
        UNAVAILABLE on another one. Not for stateful sequences: their state lives in one replica
        (unary chunks would land on different replicas; a ModelStreamInfer stream stays on one)."""
        size = max_message_mb * 1024 * 1024
        options = [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]
        if round_robin:
            options.append(("grpc.service_config", json.dumps(ROUND_ROBIN_SERVICE_CONFIG)))
        if channel is None:
            if tls or tls_ca is not None:
                creds = grpc.ssl_channel_credentials(tls_ca, tls_key, tls_cert)
                channel = grpc.secure_channel(target, creds, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        self.channel = channel
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.timeout = timeout
        self.call_metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._axes: dict[tuple[str, str], dict] = {}

    def __enter__(self) -> LSTMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def live(self) -> bool:
        return self.stub.ServerLive(pb.ServerLiveRequest(), timeout=self.timeout, metadata=self.call_metadata).live

    def ready(self) -> bool:
        return self.stub.ServerReady(pb.ServerReadyRequest(), timeout=self.timeout, metadata=self.call_metadata).ready

    def model_ready(self, model: str, version: str = "") -> bool:
        return self.stub.ModelReady(
            pb.ModelReadyRequest(name=model, version=version), timeout=self.timeout, metadata=self.call_metadata
        ).ready

    def metadata(self, model: str, version: str = "") -> dict:
        """Model metadata, plus the export metadata and provider the server sends as headers."""
        response, call = self.stub.ModelMetadata.with_call(
            pb.ModelMetadataRequest(name=model, version=version), timeout=self.timeout, metadata=self.call_metadata
        )
        headers = dict(call.initial_metadata())
        export = json.loads(headers.get("lstm-export-metadata", "{}"))
        if export.pop("_omitted", 0):  # the header is bounded: ModelConfig's export.<key> parameters hold it all
            params = self.config(model, version).get("parameters", {})
            export = {
                k[len("export.") :]: v.get("string_value", "") for k, v in params.items() if k.startswith("export.")
            }
        tensors = lambda ts: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]  # noqa: E731
        return {
            "name": response.name,
            "versions": list(response.versions),
            "platform": response.platform,
            "inputs": tensors(response.inputs),
            "outputs": tensors(response.outputs),
            "export": export,
            "provider": headers.get("lstm-provider", ""),
            "provider_note": headers.get("lstm-provider-note", ""),
            "precision": headers.get("lstm-precision", ""),
            "static_length": int(headers["lstm-static-length"]) if headers.get("lstm-static-length") else None,
            "axes": json.loads(headers["lstm-axes"]) if headers.get("lstm-axes") else None,
            "roles": json.loads(headers["lstm-roles"]) if headers.get("lstm-roles") else None,
        }

    def _meta(self, model: str, version: str = "") -> dict:
        key = (model, version)
        if key not in self._axes:
            self._axes[key] = self.metadata(model, version)
        return self._axes[key]

    def axes(self, model: str, version: str = "") -> dict[str, dict[str, int]] | None:
        """{tensor: {"batch": i, "time": j}} of a model, read once from its metadata and cached."""
        return self._meta(model, version)["axes"]

    def roles(self, model: str, version: str = "") -> dict:
        """The model's ragged input, lengths input and state pairs (from its metadata, cached);
        this project's names when the server does not say."""
        return self._meta(model, version).get("roles") or DEFAULT_ROLES

    def config(self, model: str, version: str = "") -> dict:
        """The model's configuration in Triton's ModelConfig form, as a dict (protobuf JSON names)."""
        response = self.stub.ModelConfig(
            pb.ModelConfigRequest(name=model, version=version), timeout=self.timeout, metadata=self.call_metadata
        )
        return json_format.MessageToDict(response.config, preserving_proto_field_name=True)

    def request(
        self,
        model: str,
        x: np.ndarray,
        lengths: np.ndarray | None = None,
        outputs: Sequence[str] | None = None,
        raw: bool = True,
        version: str = "",
        request_id: str = "",
    ) -> pb.ModelInferRequest:
        """A request for a model with a ragged input (this project's exports: `x` and `lengths`,
        or the names the server's metadata gives): x keeps its dtype if it is integer (token ids)."""
        known = getattr(self, "_axes", None) or {}  # also callable unbound (LSTMClient.request(None, ...))
        roles = known.get((model, version), {}).get("roles") or DEFAULT_ROLES
        x_name, lengths_name = _sequence_inputs(roles)
        x = np.asarray(x)
        inputs = {x_name: x if x.dtype.kind in "iu" else np.asarray(x, np.float32)}
        if lengths is not None:
            inputs[lengths_name] = np.asarray(lengths, np.int64)
        return LSTMClient.tensors_request(model, inputs, outputs, raw=raw, version=version, request_id=request_id)

    @staticmethod
    def tensors_request(
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        parameters: dict[str, object] | None = None,
        raw: bool = True,
        version: str = "",
        request_id: str = "",
    ) -> pb.ModelInferRequest:
        """A ModelInferRequest with any named tensors (their numpy dtypes give the OIP datatypes;
        str/bytes/object arrays go as BYTES) and request parameters (bool, int, float, str)."""
        req = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, array in inputs.items():
            encode_input(req, name, np.asarray(array), raw=raw)
        for name in outputs or ():
            req.outputs.add(name=name)
        for key, value in (parameters or {}).items():
            req.parameters[key].CopyFrom(to_parameter(key, value))
        return req

    def infer_tensors(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        parameters: dict[str, object] | None = None,
        raw: bool = True,
        version: str = "",
    ) -> dict[str, np.ndarray]:
        """Call any model: named numpy tensors in, named outputs out (as the model returns them,
        no splitting). `parameters`: OIP request parameters, e.g. sequence_id / sequence_start."""
        req = self.tensors_request(model, inputs, outputs, parameters, raw, version)
        return decode_outputs(self.stub.ModelInfer(req, timeout=self.timeout, metadata=self.call_metadata))

    def infer_batch(
        self,
        model: str,
        x: np.ndarray,
        lengths: np.ndarray | None = None,
        outputs: Sequence[str] | None = None,
        raw: bool = True,
        version: str = "",
    ) -> dict[str, np.ndarray]:
        """One padded batch in, batch outputs out (no trimming)."""
        req = self.request(model, x, lengths, outputs, raw, version)
        return decode_outputs(self.stub.ModelInfer(req, timeout=self.timeout, metadata=self.call_metadata))

    def infer(
        self,
        model: str,
        sequences: Sequence[np.ndarray],
        outputs: Sequence[str] | None = None,
        raw: bool = True,
        version: str = "",
    ) -> list[dict[str, np.ndarray]]:
        """Variable-length sequences (T_i, F) in (or (T_i,) token ids); one dict of outputs per
        sequence, trimmed."""
        self.roles(model, version)  # the model's input names, read once
        x, lengths = pad_sequences(sequences)
        out = self.infer_batch(model, x, lengths, outputs, raw, version)
        return split_outputs(out, lengths, self.axes(model, version))

    def sequence(self, model: str, sequence_id: int | str | None = None, use_stream: bool = False,
                 h0: np.ndarray | None = None, c0: np.ndarray | None = None) -> SequenceStream:  # fmt: skip
        """A server-side stateful sequence: send a long signal in chunks (unidirectional models
        exported with --initial-state: LSTM h0/c0, GRU/RNN h0). `h0`/`c0` (L*D, H): the state to start
        from (zeros by default)."""
        return SequenceStream(self, model, sequence_id, use_stream, h0, c0)

    def stream(self, requests: Iterable[pb.ModelInferRequest]) -> Iterator[dict[str, np.ndarray] | Exception]:
        """ModelStreamInfer: yields decoded outputs, or a RuntimeError for a request the server refused."""
        for reply in self.stub.ModelStreamInfer(iter(requests), timeout=self.timeout, metadata=self.call_metadata):
            if reply.error_message:
                yield RuntimeError(reply.error_message)
            else:
                yield decode_outputs(reply.infer_response)


class SequenceStream:
    """Send one long sequence in chunks; the server keeps (h, c) between them.

        stream = client.sequence("stream_encoder")
        for chunk in chunks:                  # (T_i, F) arrays
            out = stream.send(chunk)          # y (T_i, H), h_n (and c_n for LSTM) (L*D, H) after this chunk
        final = stream.close()                # final h_n (c_n); the server frees the state

    With `use_stream=True` the chunks go over one ModelStreamInfer call instead of unary calls.
    """

    def __init__(
        self,
        client: LSTMClient,
        model: str,
        sequence_id: int | str | None = None,
        use_stream: bool = False,
        h0: np.ndarray | None = None,
        c0: np.ndarray | None = None,
    ) -> None:
        import queue
        import secrets

        self.client = client
        self.model = model
        self.sequence_id = secrets.randbits(63) if sequence_id is None else sequence_id
        self._started = False
        self._ended = False
        self._initial = (h0, c0)
        self._queue: queue.Queue | None = None
        self._replies = None
        if use_stream:
            self._queue = queue.Queue()
            sentinel = object()
            self._sentinel = sentinel
            requests = iter(self._queue.get, sentinel)
            metadata = (*(client.call_metadata or ()), ("x-sequence-id", str(self.sequence_id)))
            self._replies = client.stub.ModelStreamInfer(requests, metadata=metadata)

    def _request(self, chunk: np.ndarray | None, end: bool, outputs) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=self.model)
        if chunk is not None:
            roles = self.client.roles(self.model)
            chunk = np.asarray(chunk, np.float32)
            if chunk.ndim != 2 or chunk.shape[0] < 1:
                raise ValueError(f"chunk: expected shape (time >= 1, features), got {chunk.shape}")
            x_name, lengths_name = _sequence_inputs(roles)
            encode_input(req, x_name, chunk[None])
            encode_input(req, lengths_name, np.array([chunk.shape[0]], np.int64))
            if not self._started:
                states = [s["input"] for s in roles["states"] if not s["implicit"]]
                for name, value in zip(states, self._initial):
                    if value is not None:
                        encode_input(req, name, np.asarray(value, np.float32)[:, None])  # (L*D, 1, H)
        sid = req.parameters["sequence_id"]
        if isinstance(self.sequence_id, str):
            sid.string_param = self.sequence_id
        else:
            sid.uint64_param = int(self.sequence_id)
        req.parameters["sequence_start"].bool_param = not self._started
        req.parameters["sequence_end"].bool_param = end
        for name in outputs or ():
            req.outputs.add(name=name)
        return req

    def _call(self, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
        if self._queue is None:
            # x-sequence-id lets a balancer keep every chunk on the replica holding the state
            metadata = (*(self.client.call_metadata or ()), ("x-sequence-id", str(self.sequence_id)))
            return self.client.stub.ModelInfer(req, timeout=self.client.timeout, metadata=metadata)
        self._queue.put(req)
        reply = next(self._replies)
        if reply.error_message:
            raise RuntimeError(reply.error_message)
        return reply.infer_response

    def send(self, chunk: np.ndarray, end: bool = False, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One chunk (T, F); returns y (T, D*H) and the state after it, h_n / c_n (L*D, H)."""
        if self._ended:
            raise RuntimeError(f"sequence {self.sequence_id} already ended")
        out = decode_outputs(self._call(self._request(chunk, end, outputs)))
        self._started = True
        self._ended = end
        if end:
            self._finish()
        return split_outputs(out, np.array([np.asarray(chunk).shape[0]]), self.client.axes(self.model))[0]

    def close(self) -> dict[str, np.ndarray]:
        """End the sequence; returns its final h_n, c_n (L*D, H) and frees it on the server."""
        if self._ended:
            return {}
        if not self._started:
            raise RuntimeError("nothing was sent: a sequence needs at least one chunk")
        out = decode_outputs(self._call(self._request(None, True, None)))
        self._ended = True
        self._finish()
        return {k: v[:, 0] for k, v in out.items()}

    def _finish(self) -> None:
        if self._queue is not None:
            self._queue.put(self._sentinel)
            for _ in self._replies:  # let the stream end cleanly
                pass

    def __enter__(self) -> SequenceStream:
        return self

    def __exit__(self, *exc) -> None:
        if not self._ended and self._started:
            self.close()
