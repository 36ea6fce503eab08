"""Offline validation of the manifests in deploy/ with a JSON-schema validator.

    python -m deploy.validate [FILE.yaml ...]      # default: every deploy/**/*.yaml

Kubernetes kinds (Deployment, Service, HorizontalPodAutoscaler, ...) are validated by
kubernetes-validate against the Kubernetes JSON schemas it bundles (strict: unknown fields fail).

KServe kinds (ClusterServingRuntime, ServingRuntime, InferenceService, ...) are validated against
a JSON schema (draft 2020-12) built here from KServe's own published API types: the model classes
of the KServe Python SDK wheel (``kserve`` on PyPI, pinned by version and sha256 in
requirements-kserve-schema.txt, Apache-2.0; downloaded by ``make venv`` into .cache/kserve/, never
installed or imported). The SDK's classes are generated (openapi-generator) from the same Go API
types that controller-gen turns into KServe's CRDs (kserve/kserve config/crd/full), so the schema
has the CRD's fields, nesting, types and required fields. It is read statically (ast) from each
class's ``openapi_types`` / ``attribute_map`` and its "must not be `None`" setters. Kubernetes
types the KServe types embed (V1Container, V1Probe, ResourceQuantity, ...) resolve to the same
strict kubernetes-validate definitions as above. Every object schema is closed
(``additionalProperties: false``): an unknown or misspelt field fails, as with
``kubectl apply --validate=strict``. ``status`` is left out of the roots: a manifest to apply has
none.

What it does not check (the SDK does not carry it; the CRD YAML does, and this machine's package
registries do not ship the CRD files): kubebuilder value markers such as enums (e.g. the allowed
``scaleMetric`` values) and numeric bounds. tests/test_deploy.py checks the values the runtime
needs field by field on top of this.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PIN_FILE = ROOT / "requirements-kserve-schema.txt"
WHEEL_DIR = ROOT / ".cache" / "kserve"
K8S_VERSION = "1.37.0"
KSERVE_GROUP = "serving.kserve.io"
K8S_DEFS_URI = "https://kubernetes.io/api/_definitions.json"
UNRESOLVED = "x-sdk-type-missing"

_SCALARS = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},
    "datetime": {"type": "string"},
    "date": {"type": "string"},
}
# Kubernetes types the SDK names in its own style -> kubernetes-validate definition names.
_K8S_ALIASES = {
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "V1Time": "io.k8s.apimachinery.pkg.apis.meta.v1.Time",
}


class SchemaError(Exception):
    """The pinned SDK wheel is missing or altered: no schema can be built."""


class UnknownKind(SchemaError):
    """The manifest names a kind/apiVersion that KServe does not define."""


def _pinned() -> tuple[str, str, str]:
    """(name, version, sha256) from requirements-kserve-schema.txt."""
    for line in PIN_FILE.read_text().splitlines():
        m = re.match(r"^(\S+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line.strip())
        if m:
            return m.group(1), m.group(2), m.group(3)
    raise SchemaError(f"{PIN_FILE.name}: no 'name==version --hash=sha256:...' line")


def sdk_wheel() -> Path:
    """The pinned KServe SDK wheel, its sha256 checked."""
    name, version, sha = _pinned()
    wheel = WHEEL_DIR / f"{name}-{version}-py3-none-any.whl"
    if not wheel.is_file():
        raise SchemaError(f"{wheel} is missing: run `make venv` (it downloads the pinned wheel)")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha:
        raise SchemaError(f"{wheel.name}: sha256 {digest} != pinned {sha}")
    return wheel


@functools.lru_cache(maxsize=4)
def _sdk_classes(wheel: Path) -> dict[str, dict]:
    """Class name -> {"types": attr->type, "json": attr->json key, "required": set(attr)}."""
    classes: dict[str, dict] = {}
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if not re.fullmatch(r"kserve/models/\w+\.py", member) or member.endswith("__init__.py"):
                continue
            tree = ast.parse(zf.read(member).decode())
            for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
                info = {"types": {}, "json": {}, "required": set()}
                for stmt in cls.body:
                    if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                        target = stmt.targets[0].id
                        if target == "openapi_types":
                            info["types"] = ast.literal_eval(stmt.value)
                        elif target == "attribute_map":
                            info["json"] = ast.literal_eval(stmt.value)
                    elif isinstance(stmt, ast.FunctionDef) and _setter_rejects_none(stmt):
                        info["required"].add(stmt.name)
                if info["types"]:
                    classes[cls.name] = info
    if not classes:
        raise SchemaError(f"{wheel.name}: no model classes under kserve/models/")
    return classes


def _setter_rejects_none(fn: ast.FunctionDef) -> bool:
    """A generated setter that raises "Invalid value for `x`, must not be `None`": a required field."""
    is_setter = any(isinstance(d, ast.Attribute) and d.attr == "setter" for d in fn.decorator_list)
    if not is_setter:
        return False
    for node in ast.walk(fn):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            arg = node.exc.args[0]
            if isinstance(arg, ast.Constant) and "must not be `None`" in str(arg.value):
                return True
    return False


@functools.lru_cache(maxsize=None)
def _k8s_defs() -> dict:
    import importlib.resources

    ref = importlib.resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json"
    )
    return json.loads(ref.read_text())["$defs"]


def _k8s_name(sdk_type: str, defs: dict) -> str | None:
    """V1Probe -> io.k8s.api.core.v1.Probe; K8sIoApiAppsV1DeploymentStrategy -> io.k8s.api.apps.v1...."""
    if sdk_type in _K8S_ALIASES:
        return _K8S_ALIASES[sdk_type]
    m = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:alpha\d+|beta\d+)?)(\w+)", sdk_type)
    if m:
        name = f"io.k8s.api.{m.group(1).lower()}.{m.group(2).lower()}.{m.group(3)}"
        return name if name in defs else None
    m = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w+)", sdk_type)
    if not m:
        return None
    suffix = f".{m.group(1).lower()}.{m.group(2)}"
    hits = sorted(k for k in defs if k.endswith(suffix))
    core = [k for k in hits if k.startswith(("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta."))]
    if len(core) == 1:
        return core[0]
    return hits[0] if len(hits) == 1 else None


class _Builder:
    def __init__(self, classes: dict[str, dict]):
        self.classes = classes
        self.k8s = _k8s_defs()
        self.defs: dict[str, dict] = {}

    def type_schema(self, sdk_type: str) -> dict:
        sdk_type = sdk_type.strip()
        if sdk_type in _SCALARS:
            return dict(_SCALARS[sdk_type])
        m = re.fullmatch(r"list\[(.+)\]", sdk_type)
        if m:
            return {"type": "array", "items": self.type_schema(m.group(1))}
        m = re.fullmatch(r"dict\(str,\s*(.+)\)", sdk_type)
        if m:
            return {"type": "object", "additionalProperties": self.type_schema(m.group(1))}
        if sdk_type in self.classes:
            self.class_schema(sdk_type)
            return {"$ref": f"#/$defs/{sdk_type}"}
        k8s = _k8s_name(sdk_type, self.k8s)
        if k8s:
            return {"$ref": f"{K8S_DEFS_URI}#/$defs/{k8s}"}
        # The SDK names a type it does not define (0.21.0: V1alpha1WorkerSpec). Such a field cannot be
        # checked offline, so using it fails with that reason rather than passing unchecked.
        return {"not": {}, UNRESOLVED: sdk_type}

    def class_schema(self, name: str, *, omit: tuple[str, ...] = ()) -> dict:
        if name in self.defs:
            return self.defs[name]
        info = self.classes[name]
        schema: dict = {"type": "object", "additionalProperties": False, "properties": {}}
        self.defs[name] = schema  # before recursing: types refer to themselves
        for attr, sdk_type in info["types"].items():
            key = info["json"][attr]
            if key in omit:
                continue
            schema["properties"][key] = self.type_schema(sdk_type)
        required = sorted(info["json"][a] for a in info["required"] if info["json"][a] not in omit)
        if required:
            schema["required"] = required
        return schema


def kserve_schema(kind: str, api_version: str) -> dict:
    """The JSON schema for a KServe kind at an apiVersion, e.g. ("InferenceService", "serving.kserve.io/v1beta1")."""
    group, _, version = api_version.partition("/")
    if group != KSERVE_GROUP:
        raise SchemaError(f"{api_version}: not a KServe apiVersion ({KSERVE_GROUP}/...)")
    classes = _sdk_classes(sdk_wheel())
    root = f"{version[:1].upper()}{version[1:]}{kind}"  # v1beta1 + InferenceService
    if root not in classes:
        raise UnknownKind(f"kind {kind!r} at {api_version!r} is not a KServe type (the SDK has no {root})")
    builder = _Builder(classes)
    schema = dict(builder.class_schema(root, omit=("status",)))
    schema["properties"] = dict(schema["properties"])
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata", "spec"})
    builder.defs[root] = schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:lstm-serve:kserve-sdk-schema:{root}",
        "$ref": f"#/$defs/{root}",
        "$defs": builder.defs,
    }


def _validator(schema: dict):
    import jsonschema
    from referencing import Registry, Resource

    k8s_doc = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": K8S_DEFS_URI, "$defs": _k8s_defs()}
    registry = Registry().with_resource(K8S_DEFS_URI, Resource.from_contents(k8s_doc))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def kserve_errors(doc: dict) -> list[str]:
    """Every schema violation in a KServe object, as 'path: message' lines (empty: valid)."""
    try:
        schema = kserve_schema(str(doc.get("kind", "")), str(doc.get("apiVersion", "")))
    except UnknownKind as exc:
        return [f"kind: {exc}"]
    validator = _validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    lines = []
    for e in errors:
        message = e.message
        if isinstance(e.schema, dict) and UNRESOLVED in e.schema:
            message = f"its type {e.schema[UNRESOLVED]} is not defined in the KServe SDK: cannot be validated offline"
        lines.append(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {message}")
    return lines


def validate_doc(doc: dict) -> list[str]:
    """Errors for one manifest document: KServe kinds by the SDK schema, the rest by kubernetes-validate."""
    if str(doc.get("apiVersion", "")).startswith(KSERVE_GROUP + "/"):
        return kserve_errors(doc)
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}"]
    return []


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = argv if argv is not None else sys.argv[1:]
    paths = [Path(a) for a in args] or sorted(DEPLOY.rglob("*.yaml"))
    failed = 0
    for path in paths:
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            try:
                errors = validate_doc(doc)
            except SchemaError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            label = f"{path}[{i}] {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            print(f"{'FAIL' if errors else 'ok  '} {label}")
            for err in errors:
                print(f"     {err}")
            failed += bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
