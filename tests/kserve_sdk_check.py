"""KServe's own Python SDK (v2 REST and gRPC clients) against a running server; run with the
interpreter of a venv holding `kserve` (tests/test_dropin.py starts the server and runs this).

    python tests/kserve_sdk_check.py GRPC_PORT HTTP_PORT

Model "cls" of tests/test_dropin.py: INPUT0 FP32 [N, 5] -> OUTPUT0 (identity), OUTPUT1 (INT32).
Prints one JSON line of what came back; exits non-zero on any failure.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

ROWS = np.array([[0.5, 3.25, -1.0, 3.25, 2.0], [7.0, 1.0, 0.0, 8.5, -2.5]], np.float32)


def _request(binary: bool, outputs=None) -> InferRequest:
    tensor = InferInput("INPUT0", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary)
    return InferRequest(model_name="cls", infer_inputs=[tensor], request_id="kserve-1", request_outputs=outputs)


def _outputs(response) -> dict:
    return {o.name: o.as_numpy() for o in response.outputs}


async def main(grpc_port: int, http_port: int) -> dict:
    got: dict = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    base = f"http://127.0.0.1:{http_port}"
    for binary in (False, True):  # data in the JSON, then raw bytes after it
        out = _outputs(await rest.infer(base, _request(binary), model_name="cls"))
        got[f"rest_binary_{binary}"] = bool(np.array_equal(out["OUTPUT0"], ROWS))
    cls = [RequestedOutput("OUTPUT0", {"classification": 2})]
    out = _outputs(await rest.infer(base, _request(False, cls), model_name="cls"))
    got["rest_classification"] = [x.decode() if isinstance(x, bytes) else x for x in out["OUTPUT0"].ravel().tolist()]
    client = InferenceGRPCClient(url=f"127.0.0.1:{grpc_port}", timeout=30)
    got["grpc_ready"] = await client.is_model_ready("cls")
    out = _outputs(await client.infer(_request(True)))
    got["grpc"] = bool(np.array_equal(out["OUTPUT0"], ROWS))
    out = _outputs(await client.infer(_request(True, [RequestedOutput("OUTPUT0", {"classification": 1})])))
    got["grpc_classification"] = [x.decode() if isinstance(x, bytes) else x for x in out["OUTPUT0"].ravel().tolist()]
    await client.close()
    return got


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))))
