"""TLS (server and mutual) and bearer tokens, with certificates generated in the test."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client import LSTMClient

cryptography = pytest.importorskip("cryptography", reason="cryptography is in requirements-dev.txt")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool, san: bool):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = _cert("test CA", ca_key, ca_name, ca_key, ca=True, san=False)
    out = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, key, ca_name, ca_key, ca=False, san=(who == "server"))
        (d / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{who}.key").write_bytes(_pem_key(key))
        out[who] = cert.public_bytes(serialization.Encoding.PEM)
        out[f"{who}_key"] = _pem_key(key)
        out[f"{who}_path"] = d / f"{who}.pem"
        out[f"{who}_key_path"] = d / f"{who}.key"
    (d / "ca.pem").write_bytes(out["ca"])
    out["ca_path"] = d / "ca.pem"
    out["dir"] = d
    return out


def _start(repo, **kw):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(
        Settings(port=0, model_repository=repo, device="cpu", metrics_port=-1, log_level="WARNING", **kw)
    )
    srv.start()
    return srv


X = np.ones((1, 3, 6), np.float32)


def test_tls_server(repo, pki):
    srv = _start(repo, tls_cert=str(pki["server_path"]), tls_key=str(pki["server_key_path"]))
    try:
        with LSTMClient(f"127.0.0.1:{srv.port}", tls_ca=pki["ca"]) as c:
            assert c.infer_batch("bi", X)["h_n"].shape == (4, 1, 8)
        with LSTMClient(f"127.0.0.1:{srv.port}", timeout=5) as plain:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError) as err:
                plain.live()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(1)


def test_mutual_tls(repo, pki):
    srv = _start(repo, tls_cert=str(pki["server_path"]), tls_key=str(pki["server_key_path"]),
                 tls_client_ca=str(pki["ca_path"]))  # fmt: skip
    try:
        with LSTMClient(f"127.0.0.1:{srv.port}", tls_ca=pki["ca"], tls_cert=pki["client"],
                        tls_key=pki["client_key"]) as c:  # fmt: skip
            assert c.live()
        with LSTMClient(f"127.0.0.1:{srv.port}", tls_ca=pki["ca"], timeout=5) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.live()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(1)


def test_bearer_tokens(repo, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("# one per line\nfile-token\n")
    srv = _start(repo, auth_tokens="env-token", auth_tokens_file=str(tokens))
    target = f"127.0.0.1:{srv.port}"
    try:
        for good in ("env-token", "file-token"):
            with LSTMClient(target, token=good) as c:
                assert c.infer_batch("bi", X)["y"].shape == (1, 3, 16)
                replies = list(c.stream([c.request("bi", X)]))
                assert not isinstance(replies[0], Exception)
        for bad, needle in ((None, "missing"), ("wrong", "invalid")):
            with LSTMClient(target, token=bad) as c:
                with pytest.raises(grpc.RpcError) as err:
                    c.infer_batch("bi", X)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and needle in err.value.details()
                with pytest.raises(grpc.RpcError) as err:
                    list(c.stream([c.request("bi", X)]))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(target) as ch:  # health stays open for probes
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop(1)


def test_tls_settings_must_pair():
    from server.config import Settings

    with pytest.raises(ValueError, match="go together"):
        Settings(tls_cert="a.pem")
    with pytest.raises(ValueError, match="needs"):
        Settings(tls_client_ca="ca.pem")
