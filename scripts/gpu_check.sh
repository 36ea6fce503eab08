#!/usr/bin/env bash
# GPU check of the server's CUDA path, to run on a machine with a CUDA GPU.
# Prepare here:  echo /.ort/ >> .git/info/exclude; bash ../shared/gpu/pack-onnxruntime-gpu.sh .ort
# On the GPU machine (one call per part, named in `carry`, copied to /tmp/ort), then:
#   bash scripts/gpu_check.sh /tmp/ort
# It exports a small model family with PyTorch, then prints a table: for each model, the provider
# ONNX Runtime really used and the max |CUDA - CPU| and |CUDA - PyTorch| with use_tf32=0 and =1;
# then starts the server with --device cuda (if grpcio is importable there) and checks parity over gRPC.
set -euo pipefail
parts=${1:-/tmp/ort}
site=/tmp/ort-site
bash "$parts/unpack.sh" "$parts" "$site"
export PYTHONPATH="$site:$PWD"
python3 - <<'PY'
import sys, tempfile
from pathlib import Path
import numpy as np, torch  # torch first: it puts the CUDA 13 libraries on the loader path
import onnxruntime as ort
from export.model import LSTMConfig, LSTMEncoder
from export.onnx_export import export_dynamic, export_static

out = Path(tempfile.mkdtemp())
torch.manual_seed(0)
enc = LSTMEncoder(LSTMConfig(80, 256, 2, True)).eval()
files = {"dynamic": export_dynamic(enc, out / "d.onnx").path, "static_t50": export_static(enc, 50, out / "s.onnx").path}
rng = np.random.default_rng(0)
x = rng.standard_normal((16, 50, 80)).astype(np.float32)
lengths = rng.integers(1, 51, 16).astype(np.int64); lengths[0] = 50
with torch.no_grad():
    ref = [t.numpy() for t in enc(torch.from_numpy(x), torch.from_numpy(lengths))]
print(f"{'model':12} {'tf32':5} {'provider':24} {'|cuda-cpu|':>11} {'|cuda-torch|':>13}")
worst = 0.0
for name, path in files.items():
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x, "lengths": lengths})
    for tf32 in (0, 1):
        s = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {"use_tf32": tf32}), "CPUExecutionProvider"])
        got = s.run(None, {"x": x, "lengths": lengths})
        d_cpu = max(float(np.abs(a - b).max()) for a, b in zip(got, cpu))
        d_ref = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
        if tf32 == 0:
            worst = max(worst, d_cpu, d_ref)
        print(f"{name:12} {tf32:<5} {s.get_providers()[0]:24} {d_cpu:11.3g} {d_ref:13.3g}")
print(f"use_tf32=0 worst: {worst:.3g} -> {'PASS' if worst <= 1e-5 else 'FAIL'} (tolerance 1e-5)")
try:
    import grpc  # noqa: F401
except ImportError:
    print("grpcio not installed here: server check skipped"); sys.exit(0 if worst <= 1e-5 else 1)
from server.app import InferenceServer
from server.config import Settings
from server.client import LSTMClient
repo = out / "repo"; (repo / "enc" / "1").mkdir(parents=True)
(repo / "enc" / "1" / "model.onnx").write_bytes(Path(files["dynamic"]).read_bytes())
srv = InferenceServer(Settings(port=0, model_repository=repo, device="cuda", metrics_port=-1)); port = srv.start()
with LSTMClient(f"127.0.0.1:{port}") as c:
    meta = c.metadata("enc"); got = c.infer_batch("enc", x, lengths)
d = max(float(np.abs(got[k] - r).max()) for k, r in zip(("y", "h_n", "c_n"), ref))
print(f"server --device cuda: provider {meta['provider']}, |server-torch| {d:.3g} -> {'PASS' if d <= 1e-5 else 'FAIL'}")
srv.stop(1)
sys.exit(0 if worst <= 1e-5 and d <= 1e-5 else 1)
PY
