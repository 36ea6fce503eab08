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

from server.codec import decode_outputs, encode_input
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc

__all__ = ["LSTMClient", "pad_sequences", "split_outputs"]


def pad_sequences(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(T_i, F) arrays -> x (B, max T, F) float32 zero-padded, lengths (B,) int64."""
    if not sequences:
        raise ValueError("no sequences to send")
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


def split_outputs(outputs: dict[str, np.ndarray], lengths: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Batch outputs -> one dict per sequence: y cut to its length, states (L*D, H), others by row."""
    per_seq = []
    for i, n in enumerate(lengths.tolist()):
        item = {}
        for name, value in outputs.items():
            if name == "y":
                item[name] = value[i, :n]  # (T_i, D*H)
            elif name in ("h_n", "c_n"):
                item[name] = value[:, i]  # (L*D, H)
            else:
                item[name] = value[i]
        per_seq.append(item)
    return per_seq


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
    ) -> None:
        """`token`: sent as `authorization: Bearer <token>`. TLS when `tls` or `tls_ca` is given
        (`tls_ca`: PEM roots, None = system roots); `tls_cert`/`tls_key`: client certificate."""
        size = max_message_mb * 1024 * 1024
        options = [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]
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
        tensors = lambda ts: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]  # noqa: E731
        return {
            "name": response.name,
            "versions": list(response.versions),
            "platform": response.platform,
            "inputs": tensors(response.inputs),
            "outputs": tensors(response.outputs),
            "export": json.loads(headers.get("lstm-export-metadata", "{}")),
            "provider": headers.get("lstm-provider", ""),
            "static_length": int(headers["lstm-static-length"]) if headers.get("lstm-static-length") else None,
        }

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
        req = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        encode_input(req, "x", np.asarray(x, np.float32), raw=raw)
        if lengths is not None:
            encode_input(req, "lengths", np.asarray(lengths, np.int64), raw=raw)
        for name in outputs or ():
            req.outputs.add(name=name)
        return req

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
        """Variable-length sequences (T_i, F) in; one dict of outputs per sequence, trimmed."""
        x, lengths = pad_sequences(sequences)
        return split_outputs(self.infer_batch(model, x, lengths, outputs, raw, version), lengths)

    def stream(self, requests: Iterable[pb.ModelInferRequest]) -> Iterator[dict[str, np.ndarray] | Exception]:
        """ModelStreamInfer: yields decoded outputs, or a RuntimeError for a request the server refused."""
        for reply in self.stub.ModelStreamInfer(iter(requests), timeout=self.timeout, metadata=self.call_metadata):
            if reply.error_message:
                yield RuntimeError(reply.error_message)
            else:
                yield decode_outputs(reply.infer_response)
