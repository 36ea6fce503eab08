"""Transport security: TLS credentials and bearer-token authentication (an asyncio server interceptor)."""

from __future__ import annotations

import hmac
import ssl
from pathlib import Path

import grpc

from server.errors import StartupError, clip

# Open without a token, so that load balancers and orchestrators can probe health.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
ENV_TOKENS = "LSTM_SERVE_AUTH_TOKENS"


def load_tokens(tokens: str | None, tokens_file: Path | str | None) -> list[str]:
    """Tokens from a comma-separated string (env/flag) and/or a file with one token per line
    (blank lines and lines starting with '#' skipped). A source that is given but holds no token
    (only commas or blanks; a file of comments) is a StartupError: it would otherwise start the
    server with authentication silently off (`--auth-tokens ""`, or the variable set to nothing,
    as `--auth-tokens "$UNSET"` gives). `tokens` None and `tokens_file` None or "" mean "not given";
    an unreadable file is a StartupError too."""
    found = []
    if tokens is not None:
        found = [t.strip() for t in tokens.split(",") if t.strip()]
        if not found:
            raise StartupError(
                f"--auth-tokens / {ENV_TOKENS} is set but holds no token (got {clip(tokens)}); give "
                "comma-separated tokens, or unset it to run without authentication"
            )
    if tokens_file is not None and str(tokens_file):
        try:
            lines = Path(tokens_file).read_text().splitlines()
        except (OSError, ValueError) as exc:
            raise StartupError(f"--auth-tokens-file {tokens_file}: cannot be read: {exc}") from None
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not from_file:
            raise StartupError(
                f"--auth-tokens-file {tokens_file} holds no token (only blank lines or '#' comments); put one "
                "token per line, or drop the flag to run without authentication"
            )
        found += from_file
    return found


def bearer_matches(value: str, tokens: list[bytes]) -> bool | None:
    """For an authorization value `Bearer <token>` (the scheme case-insensitive, RFC 9110): whether
    the token is one of `tokens`, compared in constant time against each; None for another scheme."""
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    presented = credentials.strip().encode()
    return any([hmac.compare_digest(presented, t) for t in tokens])


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health must carry `authorization: Bearer <token>` with a known token.

    A refused call is answered UNAUTHENTICATED as soon as its headers arrive: the refusal is
    served as a request-streaming handler, so the server never waits for the request message (a
    client that opens calls and never sends them holds nothing)."""

    def __init__(self, tokens: list[str]) -> None:
        if not tokens:
            raise ValueError("token authentication needs at least one token")
        self._tokens = [t.encode() for t in tokens]

    def _allowed(self, metadata) -> bool:
        """Exactly one `authorization` value, a known bearer token (more than one is refused: access
        and the per-client shares must read the same token, as REST refuses a repeated header)."""
        values = [value for key, value in metadata or () if key == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return False
        return bool(bearer_matches(values[0], self._tokens))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        if self._allowed(handler_call_details.invocation_metadata):
            return handler
        headers = sum(1 for k, _ in handler_call_details.invocation_metadata or () if k == "authorization")
        message = (
            f"{headers} 'authorization' metadata values; send exactly one" if headers > 1
            else "invalid bearer token" if headers else "missing 'authorization: Bearer <token>' metadata"
        )  # fmt: skip

        async def deny(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)


# Admin-only protocol groups, as Triton's --grpc-restricted-protocol / --http-restricted-api: a call
# of a restricted group must carry a header key=value the operator chose (beside any bearer token).
RESTRICTED_GROUPS = {
    "model-repository": (
        frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}),  # gRPC methods
        "/v2/repository",  # REST routes under it
    ),
    "shared-memory": (
        frozenset(
            {f"{kind}SharedMemory{op}" for kind in ("System", "Cuda") for op in ("Status", "Register", "Unregister")}
        ),
        "/v2/systemsharedmemory, /v2/cudasharedmemory",
    ),
}


def parse_restricted(spec: str) -> dict[str, tuple[str, str]]:
    """'group[,group...]:key=value[;...]' (e.g. `model-repository:admin-key=s3cret`) -> {group:
    (key, value)}; ValueError naming what is wrong."""
    out: dict[str, tuple[str, str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        groups, _, pair = part.partition(":")
        key, eq, value = pair.partition("=")
        key = key.strip().lower()
        if not eq or not key or not value or not key.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"{part!r}: expected group[,group]:key=value, e.g. model-repository:admin-key=SECRET")
        for group in (g.strip() for g in groups.split(",")):
            if group not in RESTRICTED_GROUPS:
                raise ValueError(f"{part!r}: unknown group {group!r}; known: {', '.join(RESTRICTED_GROUPS)}")
            out[group] = (key, value)
    return out


def restricted_refusal(group_keys: dict[str, tuple[str, str]], group: str, header) -> str | None:
    """Why a call of `group` is refused (its header missing or wrong), or None. `header(key)`: the
    call's value for a header (None when absent)."""
    if group not in group_keys:
        return None
    key, value = group_keys[group]
    sent = header(key)
    if sent is not None and hmac.compare_digest(sent.encode(), value.encode()):
        return None
    return f"the {group} protocol is restricted: it needs the '{key}' header the operator configured"


class RestrictedApiInterceptor(grpc.aio.ServerInterceptor):
    """gRPC methods of a restricted group need their header key=value (PERMISSION_DENIED otherwise)."""

    def __init__(self, group_keys: dict[str, tuple[str, str]]) -> None:
        self._keys = group_keys
        self._methods = {f"/inference.GRPCInferenceService/{m}": g
                         for g in group_keys for m in RESTRICTED_GROUPS[g][0]}  # fmt: skip

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        group = self._methods.get(handler_call_details.method)
        if handler is None or group is None:
            return handler
        metadata = handler_call_details.invocation_metadata or ()

        def header(key: str):
            values = [v for k, v in metadata if k == key and isinstance(v, str)]
            return values[0] if len(values) == 1 else None

        message = restricted_refusal(self._keys, group, header)
        if message is None:
            return handler

        async def deny(request_iterator, context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

        return grpc.stream_unary_rpc_method_handler(
            deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def server_credentials(cert: bytes, key: bytes, client_ca: bytes | None) -> grpc.ServerCredentials:
    """TLS for the gRPC port from PEM bytes: the server's certificate chain and key; with
    `client_ca`, clients must present a certificate signed by it (mutual TLS)."""
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def tls_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """Server-side TLS for the HTTP/REST port (ssl), from the same files as `server_credentials`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
