"""Run by tests/test_any_model.py inside .venv-triton (tritonclient needs protobuf < 7).

Usage: python tritonclient_tensors_check.py grpc|http HOST:PORT MODEL IN.npz OUT.npz
Sends every array of IN.npz as the input of that name (datatype from the numpy dtype; `S` arrays
are BYTES) with tritonclient's own client, asks for every output the server's metadata lists, and
saves them in OUT.npz (BYTES outputs as `S` arrays). Prints the metadata and config as JSON.
Nothing of this project is imported here.
"""

import json
import sys

import numpy as np


def main() -> None:
    protocol, url, model, in_path, out_path = sys.argv[1:]
    if protocol == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib
    from tritonclient.utils import np_to_triton_dtype

    client = client_lib.InferenceServerClient(url=url)
    assert client.is_model_ready(model), f"{model} not ready"
    if protocol == "grpc":
        metadata = client.get_model_metadata(model, as_json=True)
        config = client.get_model_config(model, as_json=True)["config"]
    else:
        metadata = client.get_model_metadata(model)
        config = client.get_model_config(model)
    data = np.load(in_path)
    inputs = []
    for name in data.files:
        array = data[name]
        if array.dtype.kind == "S":
            array = array.astype(object)
            datatype = "BYTES"
        else:
            datatype = np_to_triton_dtype(array.dtype)
        tensor = client_lib.InferInput(name, list(array.shape), datatype)
        if protocol == "grpc":
            tensor.set_data_from_numpy(array)
        else:
            tensor.set_data_from_numpy(array, binary_data=name != data.files[0])  # one JSON, the rest binary
        inputs.append(tensor)
    names = [o["name"] for o in metadata["outputs"]]
    outputs = [client_lib.InferRequestedOutput(n) for n in names]
    result = client.infer(model, inputs, outputs=outputs)
    saved = {}
    for name in names:
        value = result.as_numpy(name)
        saved[name] = value.astype(bytes) if value.dtype == object else value
    np.savez(out_path, **saved)
    print(json.dumps({"metadata": metadata, "config": config}))


if __name__ == "__main__":
    main()
