"""Deployment manifests, checked offline (no cluster, no Docker engine here).

Every manifest goes through deploy.validate, a JSON-schema validator: Kubernetes objects against
the Kubernetes 1.37 schemas that kubernetes-validate bundles, KServe objects against the schema of
KServe's API types built from the pinned KServe SDK wheel (see deploy/validate.py for what that
schema does and does not carry). Both are strict: an unknown field fails. Mutated copies of the
manifests show that the validator rejects what it should. On top, the values the runtime needs are
checked field by field, and every server command line in the manifests and Dockerfiles is parsed
by the server's own settings parser, so a renamed flag fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from deploy import validate as dv
from server.config import load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _server_args(args: list[str]) -> None:
    settings = load_settings(args, {})  # raises SystemExit on an unknown flag
    assert settings.host == "0.0.0.0", "a container must listen beyond loopback"


# The server answers gRPC (health included) only after every model has loaded. On this 2-core
# machine ONNX Runtime loads the default family's static T=50 model in ~2 s and a static T=200 one
# in ~14 s with the server's default --ort-memory-reuse auto, but in 26 s and 360 s with ORT's own
# defaults (--ort-memory-reuse on; docs/static-vs-dynamic.md), and a slower node or a
# larger model of the user's takes longer: the startup probe must leave minutes before liveness
# may kill the pod.
STARTUP_BUDGET_S = 120


def _check_probes(container: dict) -> None:
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "h2c")
    startup = container.get("startupProbe")
    assert startup, "no startupProbe: the liveness probe could kill a pod that is still loading models"
    assert startup["grpc"]["port"] == grpc_port
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= STARTUP_BUDGET_S, f"startup probe allows {budget} s to load the models"
    for name in ("readinessProbe", "livenessProbe"):
        assert container[name]["grpc"]["port"] == grpc_port, name


@pytest.mark.parametrize("path", sorted((DEPLOY / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_validate(path):
    docs = _docs(path)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    _server_args(container["args"])
    assert container["readinessProbe"]["grpc"]["port"] == 8001
    _check_probes(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert ports["http"] == int(args[args.index("--http-port") + 1]) and ports["h2c"] == int(
        args[args.index("--port") + 1]
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.slow
def test_manifest_validates_against_schema(path):
    docs = _docs(path)
    assert docs
    for doc in docs:
        assert dv.validate_doc(doc) == [], f"{path.name}: {doc['kind']}"


def test_validate_cli_passes_on_the_repo(capsys):
    assert dv.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == sum(len(_docs(p)) for p in MANIFESTS) and "FAIL" not in out


def _mutated(name: str, change) -> dict:
    (doc,) = _docs(DEPLOY / "kserve" / name)
    change(doc)
    return doc


def _del(path: list, key: str):
    def change(doc):
        node = doc
        for p in path:
            node = node[p]
        del node[key]

    return change


def _set(path: list, key: str, value):
    def change(doc):
        node = doc
        for p in path:
            node = node[p]
        node[key] = value

    return change


RUNTIME_C0 = ["spec", "containers", 0]
PREDICTOR = ["spec", "predictor"]
BAD_KSERVE = [
    # (file, change, expected fragment of the error): each is a mistake the schema must catch
    ("clusterservingruntime.yaml", _set(["spec"], "protocolVersion", ["v2"]), "'protocolVersion' was unexpected"),
    (
        "clusterservingruntime.yaml",
        _set(["spec"], "multiModel", "no"),
        "spec.multiModel: 'no' is not of type 'boolean'",
    ),
    ("clusterservingruntime.yaml", _del(["spec"], "containers"), "'containers' is a required property"),
    (
        "clusterservingruntime.yaml",
        _set(RUNTIME_C0 + ["readinessProbe", "grpc"], "port", "8001"),
        "is not of type 'integer'",
    ),
    ("clusterservingruntime.yaml", _set(RUNTIME_C0, "portz", []), "'portz' was unexpected"),
    ("clusterservingruntime.yaml", _set(RUNTIME_C0 + ["ports", 0], "containerPort", None), "containerPort"),
    ("clusterservingruntime.yaml", _set(["spec", "supportedModelFormats", 0], "autoSelect", "false"), "'boolean'"),
    ("clusterservingruntime.yaml", _set(["spec"], "workerSpec", {"size": 2}), "not defined in the KServe SDK"),
    ("clusterservingruntime.yaml", _set([], "kind", "ClusterServingRuntimes"), "is not a KServe type"),
    ("clusterservingruntime.yaml", _set([], "apiVersion", "serving.kserve.io/v1beta1"), "is not a KServe type"),
    (
        "inferenceservice.yaml",
        _set(PREDICTOR, "scaleTarget", "16"),
        "spec.predictor.scaleTarget: '16' is not of type 'integer'",
    ),
    ("inferenceservice.yaml", _set(PREDICTOR, "minReplica", 1), "'minReplica' was unexpected"),
    ("inferenceservice.yaml", _set(PREDICTOR + ["model"], "storageURI", "s3://x"), "'storageURI' was unexpected"),
    ("inferenceservice.yaml", _del(PREDICTOR + ["model"], "modelFormat"), "'modelFormat' is a required property"),
    ("inferenceservice.yaml", _del(["spec"], "predictor"), "'predictor' is a required property"),
    ("inferenceservice.yaml", _set(["metadata"], "labelz", {}), "'labelz' was unexpected"),
    ("inferenceservice.yaml", _set([], "status", {}), "'status' was unexpected"),
    (
        "inferenceservice.yaml",
        _set(PREDICTOR + ["model"], "resources", {"limit": {"cpu": "1"}}),
        "'limit' was unexpected",
    ),
]


@pytest.mark.parametrize(
    "name,change,expected", BAD_KSERVE, ids=[f"{n.split('.')[0]}-{e[:30]}" for n, _, e in BAD_KSERVE]
)
@pytest.mark.slow
def test_kserve_schema_rejects(name, change, expected):
    errors = dv.validate_doc(_mutated(name, change))
    assert errors and any(expected in e for e in errors), errors


def test_kserve_schema_accepts_real_optional_fields():
    # fields the runtime does not use but KServe defines: the schema must know them, not just ours
    isvc = _mutated("inferenceservice.yaml", _set(PREDICTOR, "canaryTrafficPercent", 10))
    isvc["spec"]["predictor"]["model"]["resources"] = {"limits": {"cpu": "2", "memory": "4Gi"}}
    isvc["spec"]["transformer"] = {"containers": [{"name": "t", "image": "t:1"}]}
    isvc["metadata"]["annotations"] = {"serving.kserve.io/deploymentMode": "RawDeployment"}
    assert dv.validate_doc(isvc) == []
    runtime = _mutated("clusterservingruntime.yaml", _set(["spec"], "disabled", False))
    runtime["spec"]["nodeSelector"] = {"gpu": "h100"}
    runtime["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert dv.validate_doc(runtime) == []


def test_kubernetes_schema_rejects():
    (deployment, *_) = _docs(DEPLOY / "k8s" / "lstm-serve.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert dv.validate_doc(deployment)
    (deployment, *_) = _docs(DEPLOY / "k8s" / "lstm-serve.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] = "60"
    assert any("not of type 'integer'" in e for e in dv.validate_doc(deployment))


def test_probe_check_catches_a_missing_or_short_startup_probe():
    (deployment, *_) = _docs(DEPLOY / "k8s" / "lstm-serve.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["startupProbe"]["failureThreshold"] = 2
    with pytest.raises(AssertionError, match="startup probe allows 10 s"):
        _check_probes(container)
    del container["startupProbe"]
    with pytest.raises(AssertionError, match="no startupProbe"):
        _check_probes(container)


def test_sdk_wheel_is_pinned(tmp_path, monkeypatch):
    wheel = dv.sdk_wheel()
    altered = tmp_path / wheel.name
    altered.write_bytes(wheel.read_bytes() + b"x")
    monkeypatch.setattr(dv, "WHEEL_DIR", tmp_path)
    with pytest.raises(dv.SchemaError, match="sha256"):
        dv.sdk_wheel()


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
    _check_probes(container)
    args = [a for arg in container["args"] for a in arg.split("=", 1)]
    _server_args(args)
    assert "/mnt/models" in args  # where KServe mounts storageUri


def _runtime_flag(flag: str) -> str:
    (runtime,) = _docs(DEPLOY / "kserve" / "clusterservingruntime.yaml")
    (value,) = [a.split("=", 1)[1] for a in runtime["spec"]["containers"][0]["args"] if a.startswith(flag + "=")]
    return value


@pytest.mark.parametrize("name,protocol", [("inferenceservice.yaml", "grpc-v2"), ("inferenceservice-rest.yaml", "v2")])
def test_kserve_inference_service(name, protocol):
    (isvc,) = _docs(DEPLOY / "kserve" / name)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] > 0
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    model = predictor["model"]
    assert model["runtime"] == "lstm-serve" and model["modelFormat"]["name"] == "onnx"
    assert model["protocolVersion"] == protocol
    if protocol == "v2":  # REST: the HTTP port the runtime's server listens on, probed over HTTP
        (port,) = model["ports"]
        assert port["name"] == "http1" and port["containerPort"] == int(_runtime_flag("--http-port"))
        probe = model["readinessProbe"]["httpGet"]
        assert probe["path"] == "/v2/health/ready" and probe["port"] == port["containerPort"]


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
