"""Run by tests/test_own_models.py inside .venv-triton (tritonclient needs protobuf < 7).

Usage: python tritonclient_models_check.py HOST:PORT IN.npz OUT.npz MODEL...
For each MODEL: reads its output names from the server's metadata, sends `MODEL::x` and
`MODEL::lengths` from IN.npz with tritonclient's own gRPC client, and saves every output as
`MODEL::<output>` in OUT.npz (nothing of this project is imported).
"""

import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> None:
    url, in_path, out_path, *models = sys.argv[1:]
    client = grpcclient.InferenceServerClient(url=url)
    data = np.load(in_path)
    saved = {}
    for model in models:
        assert client.is_model_ready(model), f"{model} not ready"
        names = [o["name"] for o in client.get_model_metadata(model, as_json=True)["outputs"]]
        x, lengths = data[f"{model}::x"], data[f"{model}::lengths"]
        inputs = [
            grpcclient.InferInput("x", list(x.shape), "FP32"),
            grpcclient.InferInput("lengths", [len(lengths)], "INT64"),
        ]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(lengths)
        result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in names])
        for name in names:
            saved[f"{model}::{name}"] = result.as_numpy(name)
    np.savez(out_path, **saved)


if __name__ == "__main__":
    main()
