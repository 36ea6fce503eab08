"""Run by tests/test_rest.py inside .venv-triton: tritonclient's HTTP client against the REST port.

Usage: python tritonclient_http_check.py HOST:PORT MODEL IN.npz OUT.npz
Health, metadata, config, then inference twice: with binary tensors (tritonclient's default,
Triton's binary extension) and with JSON tensors; then a bad request. Nothing of this project is
imported; what came back is saved for the test to compare.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient


def infer(client, model, x, lengths, binary: bool):
    inputs = [
        httpclient.InferInput("x", list(x.shape), "FP32"),
        httpclient.InferInput("lengths", list(lengths.shape), "INT64"),
    ]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    inputs[1].set_data_from_numpy(lengths, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("y", "h_n", "c_n")]
    return client.infer(model, inputs, outputs=outputs, request_id="r1")


def main() -> None:
    url, model, in_path, out_path = sys.argv[1:5]
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live() and client.is_server_ready(), "server not live/ready"
    assert client.is_model_ready(model), "model not ready"
    assert not client.is_model_ready("no_such_model")
    server = client.get_server_metadata()
    meta = client.get_model_metadata(model)
    config = client.get_model_config(model)
    data = np.load(in_path)
    x, lengths = data["x"], data["lengths"]
    binary = infer(client, model, x, lengths, True)
    plain = infer(client, model, x, lengths, False)
    saved = {f"bin_{n}": binary.as_numpy(n) for n in ("y", "h_n", "c_n")}
    saved.update({f"json_{n}": plain.as_numpy(n) for n in ("y", "h_n", "c_n")})
    np.savez(out_path, **saved)
    try:
        bad = httpclient.InferInput("x", [1, 2, x.shape[2] + 1], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 2, x.shape[2] + 1), np.float32))
        client.infer(model, [bad])
        error = ""
    except Exception as exc:  # InferenceServerException
        error = str(exc)
    stats = client.get_inference_statistics(model)
    index = client.get_model_repository_index()
    report = {"server": server, "metadata": meta, "config": config, "error": error, "stats": stats, "index": index}
    print(json.dumps({**report, "id": binary.get_response().get("id")}))


if __name__ == "__main__":
    main()
