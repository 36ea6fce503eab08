"""Deployment manifests, checked offline (no cluster, no Docker engine here).

Kubernetes objects are validated against the Kubernetes JSON schemas that kubernetes-validate
bundles (strict: unknown fields fail). The KServe objects' containers are validated the same way
(as the container spec of a Pod); their KServe-specific fields are checked for what the runtime
needs. The KServe CRD schemas themselves are not bundled here (see the README), so those fields
are checked by name, not by the CRD's schema. Every server command line in the manifests and
Dockerfiles is parsed by the server's own settings parser, so a renamed flag fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

from server.config import load_settings  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.37.0"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _server_args(args: list[str]) -> None:
    settings = load_settings(args, {})  # raises SystemExit on an unknown flag
    assert settings.host == "0.0.0.0", "a container must listen beyond loopback"


@pytest.mark.parametrize("path", sorted((DEPLOY / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_validate(path):
    docs = _docs(path)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    _server_args(container["args"])
    assert container["readinessProbe"]["grpc"]["port"] == 8001


def test_kserve_serving_runtime():
    (runtime,) = _docs(DEPLOY / "kserve" / "clusterservingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ClusterServingRuntime"
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    assert [f["name"] for f in spec["supportedModelFormats"]] == ["onnx"]
    (container,) = spec["containers"]
    ports = container["ports"]
    assert len(ports) == 1 and ports[0]["name"] == "h2c", "KServe wants exactly one port, named h2c for gRPC"
    assert container["readinessProbe"]["grpc"]["port"] == ports[0]["containerPort"]
    args = [a for arg in container["args"] for a in arg.split("=", 1)]
    _server_args(args)
    assert "/mnt/models" in args  # where KServe mounts storageUri
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [container]}}
    kv.validate(pod, K8S_VERSION, strict=True)  # the container spec against the Kubernetes schema


def test_kserve_inference_service():
    (isvc,) = _docs(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] > 0
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    model = predictor["model"]
    assert model["runtime"] == "lstm-serve" and model["modelFormat"]["name"] == "onnx"
    assert model["protocolVersion"] == "grpc-v2"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_commands(name):
    text = (DEPLOY / name).read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    _server_args(cmd)
    assert re.search(r'^ENTRYPOINT \["python", "-m", "server"\]$', text, re.M)
    assert "requirements-server.txt" in text and "USER 10001" in text
    lines = (DEPLOY.parent / "requirements-server.txt").read_text().splitlines()
    pkgs = [ln.split("==")[0] for ln in lines if ln and not ln.startswith("#")]
    assert "torch" not in pkgs and "onnx" not in pkgs and "onnxruntime-gpu" in pkgs  # no torch in the image
