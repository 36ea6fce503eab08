"""Whether ONNX Runtime can really run on a GPU here: the server's `--device auto|cuda` and the
exporter's fp16 twins ask the same question the same way.

onnxruntime-gpu lists CUDAExecutionProvider even where no GPU exists and then falls back to CPU with
an error log, so the answer comes from a real session: the CUDA driver library must load, and a
one-node session must report CUDA first in `get_providers()`.
"""

from __future__ import annotations

import base64
import ctypes

# A one-node model (b = a + a, float[1], opset 17, IR 8). Stored serialized so that the server needs
# no `onnx` package at run time; tests/test_server.py rebuilds it with onnx.helper and compares.
PROBE_MODEL_B64 = "CAg6OQoOCgFhCgFhEgFiIgNBZGQSBXByb2JlWg8KAWESCgoICAESBAoCCAFiDwoBYhIKCggIARIECgIIAUIECgAQEQ=="


def probe_model_bytes() -> bytes:
    return base64.b64decode(PROBE_MODEL_B64)


def driver_loads() -> bool:
    """The CUDA driver library loads (no GPU, no driver: it does not)."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def cuda_usable(device_id: int = 0, tf32: bool = False) -> tuple[bool, str]:
    """(True, "") where ONNX Runtime can run a session on CUDA device `device_id`, else (False, why)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDAExecutionProvider"
    if not driver_loads():
        return False, "no CUDA driver (libcuda.so.1 does not load): no usable GPU on this machine"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    cuda = ("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": int(tf32)})
    try:
        session = ort.InferenceSession(probe_model_bytes(), opts, providers=[cuda, "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        detail = " ".join(str(exc).split())[:300]
        return False, f"a CUDA session on device {device_id} failed ({type(exc).__name__}: {detail})"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return False, f"a CUDA session on device {device_id} fell back to {session.get_providers()}"
    return True, ""
