"""Run by tests/test_tritonclient.py inside .venv-triton (tritonclient needs protobuf < 7).

Usage: python tritonclient_check.py HOST:PORT MODEL IN.npz OUT.npz
Calls ServerLive, ServerMetadata, ModelMetadata, ModelConfig and ModelInfer with tritonclient's own gRPC
client (nothing of this project is imported) and saves what came back for the test to compare.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> None:
    url, model, in_path, out_path = sys.argv[1:5]
    client = grpcclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(model), "model not ready"
    server = client.get_server_metadata(as_json=True)
    meta = client.get_model_metadata(model, as_json=True)
    config = client.get_model_config(model, as_json=True)
    data = np.load(in_path)
    x, lengths = data["x"], data["lengths"]
    inputs = [
        grpcclient.InferInput("x", list(x.shape), "FP32"),
        grpcclient.InferInput("lengths", list(lengths.shape), "INT64"),
    ]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(lengths)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("y", "h_n", "c_n")]
    result = client.infer(model, inputs, outputs=outputs)
    np.savez(out_path, **{n: result.as_numpy(n) for n in ("y", "h_n", "c_n")})
    # an error case through tritonclient: wrong feature size
    try:
        bad = grpcclient.InferInput("x", [1, 2, x.shape[2] + 1], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 2, x.shape[2] + 1), np.float32))
        client.infer(model, [bad])
        error = ""
    except Exception as exc:  # tritonclient raises InferenceServerException
        error = str(exc)
    print(json.dumps({"server": server, "metadata": meta, "config": config, "error": error}))


if __name__ == "__main__":
    main()
