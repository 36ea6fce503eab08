"""tritonclient (gRPC and HTTP) against a running server: the classification extension
(`class_count`) and load with a `config` override, as Triton's own clients send them; run with the
interpreter of the tritonclient venv (tests/test_dropin.py starts the server and runs this).

    python tests/tritonclient_dropin_check.py GRPC_PORT HTTP_PORT

Model "cls" of tests/test_dropin.py. Prints one JSON line of what came back.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

ROWS = np.array([[0.5, 3.25, -1.0, 3.25, 2.0], [7.0, 1.0, 0.0, 8.5, -2.5]], np.float32)


def _classes(module, client, k: int) -> list[str]:
    tensor = module.InferInput("INPUT0", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS)
    result = client.infer("cls", [tensor], outputs=[module.InferRequestedOutput("OUTPUT0", class_count=k)])
    return [x.decode() for x in result.as_numpy("OUTPUT0").ravel().tolist()]


def _config(max_batch_size: int) -> str:
    return json.dumps({
        "max_batch_size": max_batch_size,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [5]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [5], "label_filename": "other.txt"},
                   {"name": "OUTPUT1", "data_type": "TYPE_INT32", "dims": [5]}],
    })  # fmt: skip


def main(grpc_port: int, http_port: int) -> dict:
    got: dict = {}
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    h = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    got["grpc_classes"] = _classes(grpcclient, g, 2)
    got["http_classes"] = _classes(httpclient, h, 2)
    g.load_model("cls", config=_config(2))
    got["grpc_load_config"] = g.get_model_config("cls", as_json=True)["config"]["max_batch_size"]
    got["labels_after_grpc_load"] = _classes(grpcclient, g, 1)
    h.load_model("cls", config=_config(3))
    got["http_load_config"] = h.get_model_config("cls")["max_batch_size"]
    for name, client in (("grpc", g), ("http", h)):
        try:
            client.load_model("cls", config="{not json")
            got[f"{name}_bad_config"] = "accepted"
        except InferenceServerException as exc:
            got[f"{name}_bad_config"] = exc.message()
        try:
            client.load_model("cls", config="{}", files={"file:1/model.onnx": b"\x00"})
            got[f"{name}_file"] = "accepted"
        except InferenceServerException as exc:
            got[f"{name}_file"] = exc.message()
    h.load_model("cls")  # back to config.pbtxt
    got["reloaded"] = h.get_model_config("cls")["max_batch_size"]
    # the trace extension: tracing is off; reading works, an update that changes nothing too, turning
    # it on is refused by name
    got["grpc_trace"] = dict(g.get_trace_settings(as_json=True)["settings"])
    got["http_trace"] = h.get_trace_settings()
    got["http_trace_update"] = h.update_trace_settings()
    got["http_model_trace"] = h.get_trace_settings(model_name="cls")["trace_level"]
    got["grpc_trace_update"] = g.update_trace_settings(settings={"trace_level": ["OFF"]}, as_json=True)["settings"][
        "trace_level"
    ]
    for name, client in (("grpc", g), ("http", h)):
        try:
            client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
            got[f"{name}_trace_on"] = "accepted"
        except InferenceServerException as exc:
            got[f"{name}_trace_on"] = [exc.status(), exc.message()]
    return got


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
