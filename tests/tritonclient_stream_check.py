"""Run inside .venv-triton: tritonclient's gRPC client, unary and bidirectional streaming.

Usage: python tritonclient_stream_check.py HOST:PORT MODEL IN.npz OUT.npz
Saves the unary outputs and the streamed outputs for the test to compare with PyTorch.
"""

import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> None:
    url, model, in_path, out_path = sys.argv[1:5]
    data = np.load(in_path)
    x, lengths = data["x"], data["lengths"]
    client = grpcclient.InferenceServerClient(url=url)
    assert client.is_server_live()
    config = client.get_model_config(model, as_json=True)["config"]  # ModelConfig RPC on this path too
    assert config["name"] == model and config["platform"] == "onnxruntime_onnx", config

    def inputs():
        ins = [
            grpcclient.InferInput("x", list(x.shape), "FP32"),
            grpcclient.InferInput("lengths", list(lengths.shape), "INT64"),
        ]
        ins[0].set_data_from_numpy(x)
        ins[1].set_data_from_numpy(lengths)
        return ins

    unary = client.infer(model, inputs())
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(3):
        client.async_stream_infer(model, inputs(), request_id=str(i))
    streamed = [results.get(timeout=60) for _ in range(3)]
    client.stop_stream()
    for _result, error in streamed:
        assert error is None, error
    out = {n: unary.as_numpy(n) for n in ("y", "h_n", "c_n")}
    out.update({f"stream{i}_{n}": r.as_numpy(n) for i, (r, _) in enumerate(streamed) for n in ("y", "h_n")})
    np.savez(out_path, **out)
    print("ok")


if __name__ == "__main__":
    main()
