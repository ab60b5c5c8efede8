"""deploy/k8s: every manifest is valid by the published schemas, and the pieces fit together.

Core kinds are checked against the Kubernetes JSON schemas (strict: an unknown field fails) and
the inference gateway's resources against the openAPIV3Schema of its published CRDs, both
vendored under tests/schemas/ with their sources named in tests/schemas/README.md. Then the
pool, its endpoint picker and the model-server pods are checked against each other and against
toolmend's own settings: the pool targets toolmend's port, the picker reads the metric names
toolmend serves, the sidecar is native, probed and drained before its backend stops, and the
objectives are the ones the sidecar maps back to priorities.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from toolmend.server.config import ENV_PREFIX, Settings
from toolmend.server.gateway import GatewayConfig
from toolmend.telemetry import names as n

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
POOLS = ("pool-vllm.yaml", "pool-llamacpp.yaml")
#: (apiVersion, kind) -> the vendored Kubernetes schema of that kind
CORE = {("apps/v1", "Deployment"): "deployment-apps-v1", ("v1", "Service"): "service-v1",
        ("v1", "Pod"): "pod-v1", ("v1", "ConfigMap"): "configmap-v1",
        ("v1", "ServiceAccount"): "serviceaccount-v1",
        ("rbac.authorization.k8s.io/v1", "Role"): "role-rbac-v1",
        ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebinding-rbac-v1",
        ("rbac.authorization.k8s.io/v1", "ClusterRole"): "clusterrole-rbac-v1",
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "clusterrolebinding-rbac-v1",
        ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicy-networking-v1"}
GIE = SCHEMAS / "gateway-api-inference-extension"
CRDS = {("inference.networking.k8s.io/v1", "InferencePool"):
        GIE / "inference.networking.k8s.io_inferencepools.yaml",
        ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"):
        GIE / "inference.networking.x-k8s.io_inferenceobjectives.yaml"}


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in docs(p.name)]


@cache
def validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    if (api_version, kind) in CORE:
        defs = json.loads((SCHEMAS / "kubernetes" / "_definitions.json").read_text())
        schema = json.loads((SCHEMAS / "kubernetes" / f"{CORE[api_version, kind]}.json")
                            .read_text())
        registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
        jsonschema.Draft202012Validator.check_schema(schema)
        return jsonschema.Draft202012Validator(schema, registry=registry)
    crd = yaml.safe_load(CRDS[api_version, kind].read_text())
    group, version = api_version.split("/")
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = served["schema"]["openAPIV3Schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(doc: dict[str, Any]) -> list[str]:
    v = validator(doc["apiVersion"], doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def test_every_manifest_has_a_published_schema_and_is_valid() -> None:
    seen = set()
    for name, doc in all_docs():
        key = (doc["apiVersion"], doc["kind"])
        assert key in CORE or key in CRDS, f"{name}: no vendored schema for {key}"
        assert not errors(doc), f"{name} {doc['kind']} {doc['metadata']['name']}: {errors(doc)}"
        seen.add(key)
    assert {("inference.networking.k8s.io/v1", "InferencePool"),
            ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"),
            ("apps/v1", "Deployment")} <= seen


@pytest.mark.parametrize(("kind", "path", "value"), [
    ("Deployment", ("spec", "template", "spec", "initContainers", 0, "restartPolicyy"),
     "Always"),  # a misspelt field (strict schema)
    ("Deployment", ("spec", "replicas"), "two"),
    ("Deployment", ("spec", "template", "spec", "initContainers", 0, "ports", 0,
                    "containerPort"), "8080"),
    ("InferencePool", ("spec", "targetPorts"), []),
    ("InferencePool", ("spec", "targetPorts", 0, "number"), 70000),
    ("InferencePool", ("spec", "endpointPickerRef", "failureMode"), "FailSometimes"),
    ("InferencePool", ("spec", "selector", "matchLabels"), {}),
    ("InferenceObjective", ("spec", "priority"), "high"),
    ("InferenceObjective", ("spec", "poolRef"), {}),
])
def test_the_schemas_catch_mistakes(kind: str, path: tuple[Any, ...], value: Any) -> None:
    doc = next(d for d in docs("pool-vllm.yaml") if d["kind"] == kind)
    assert not errors(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert errors(doc), f"{kind} {path} = {value!r} passed the schema"


def test_a_missing_required_field_is_caught() -> None:
    pool = next(d for d in docs("pool-vllm.yaml") if d["kind"] == "InferencePool")
    del pool["spec"]["endpointPickerRef"]
    assert any("endpointPickerRef" in e for e in errors(pool))


# --- the pieces fit together --------------------------------------------------------------------

def one(items: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in items if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def sidecar_settings(container: dict[str, Any]) -> Settings:
    env = {e["name"]: e["value"] for e in container["env"]}
    names = {f.upper() for f in Settings.__dataclass_fields__}
    for key in env:
        if key.startswith(ENV_PREFIX):
            assert key[len(ENV_PREFIX):] in names, f"{key} is not a toolmend setting"
    return Settings.load(None, environ=env)


def epp_args(epp: dict[str, Any]) -> dict[str, str]:
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    return {args[i].lstrip("-"): args[i + 1] for i in range(0, len(args), 2)}


@pytest.mark.parametrize("name", POOLS)
def test_pool_fits_its_pods_picker_and_sidecar(name: str) -> None:
    items = docs(name)
    pool = one(items, "InferencePool")
    pool_name = pool["metadata"]["name"]
    server = one(items, "Deployment", pool_name)
    pod = server["spec"]["template"]
    labels = pod["metadata"]["labels"]
    # the pool selects these pods, and the Deployment's selector agrees
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert server["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["inference.networking.k8s.io/engine-type"] == "vllm"

    # toolmend: a native sidecar (an init container that keeps running), probed, bounded
    (tm,) = pod["spec"]["initContainers"]
    assert tm["name"] == "toolmend" and tm["restartPolicy"] == "Always"
    settings = sidecar_settings(tm)
    assert [p["containerPort"] for p in tm["ports"]] == [settings.port]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [settings.port]
    assert settings.host == "0.0.0.0"
    assert tm["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": settings.port}
    assert tm["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": settings.port}
    assert "startupProbe" not in tm  # the model server starts at once, not after toolmend
    for c in [tm, *pod["spec"]["containers"]]:
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]

    # the model server: the sidecar's upstream, on loopback, drained before it stops
    (model,) = pod["spec"]["containers"]
    up = urlparse(settings.upstream[0])
    assert up.hostname == "127.0.0.1"
    assert up.port in [p["containerPort"] for p in model["ports"]]
    assert up.port != settings.port
    args = " ".join(model["args"])
    assert "127.0.0.1" in args and str(up.port) in args
    hook = " ".join(model["lifecycle"]["preStop"]["exec"]["command"])
    assert f"http://127.0.0.1:{settings.port}/toolmend/v1/drain" in hook and "POST" in hook
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.drain_grace
    assert settings.backend == ("vllm" if name == "pool-vllm.yaml" else "llamacpp")
    if settings.backend == "llamacpp":
        assert "--metrics" in model["args"]  # its queue, for toolmend to report

    # behind the gateway: its headers are believed, its picker may scrape
    assert settings.trusted_gateways and settings.metrics_networks
    assert settings.client_limit_exempt == settings.trusted_gateways
    gw = GatewayConfig.from_settings(settings)
    assert (gw.fairness_header, gw.objective_header) == (
        "x-gateway-inference-fairness-id", "x-gateway-inference-objective")
    assert urlparse(settings.otlp_endpoint).port == 4318

    # the objectives are the ones the sidecar maps back to priorities, for this pool
    objectives = [d for d in items if d["kind"] == "InferenceObjective"]
    assert {o["metadata"]["name"]: o["spec"]["priority"] for o in objectives} == gw.priorities
    assert all(o["spec"]["poolRef"]["name"] == pool_name for o in objectives)


@pytest.mark.parametrize("name", POOLS)
def test_the_picker_reads_what_toolmend_serves(name: str) -> None:
    items = docs(name)
    pool = one(items, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    # the CRD's CEL rule (not run by the schema check): a Service reference names its port
    assert ref.get("kind", "Service") != "Service" or "port" in ref
    svc = one(items, "Service", ref["name"])
    assert ref["port"]["number"] in [p["port"] for p in svc["spec"]["ports"]]
    epp = one(items, "Deployment", ref["name"])
    pod = epp["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    args = epp_args(epp)
    assert args["pool-name"] == pool["metadata"]["name"]
    assert args["total-queued-requests-metric"] == n.MSP_WAITING
    assert args["total-running-requests-metric"] == n.MSP_RUNNING
    grpc = {p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ref["port"]["number"] in grpc
    # its pods may read the pool and its pods (epp-rbac.yaml)
    rbac = docs("epp-rbac.yaml")
    assert pod["spec"]["serviceAccountName"] == one(rbac, "ServiceAccount")["metadata"]["name"]
    # its configuration: flow control on, every profile plugin declared, and the KV scorer
    # exactly when a KV metric is read (llama-server reports none, so toolmend serves none)
    config_map = one(items, "ConfigMap")
    assert {"name": config_map["metadata"]["name"]} == {
        k: v for k, v in pod["spec"]["volumes"][0]["configMap"].items() if k == "name"}
    config = yaml.safe_load(config_map["data"][Path(args["config-file"]).name])
    assert config["kind"] == "EndpointPickerConfig" and "flowControl" in config["featureGates"]
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    for profile in config["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= declared
    kv = args.get("kv-cache-usage-percentage-metric", n.MSP_KV_USAGE)
    assert ("kv-cache-utilization-scorer" in declared) == (kv == n.MSP_KV_USAGE)
    assert kv in (n.MSP_KV_USAGE, "")


def test_only_the_gateway_and_the_picker_reach_the_sidecars() -> None:
    (policy,) = docs("network-policy.yaml")
    selects = policy["spec"]["podSelector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [8080]
    pickers = [f["podSelector"]["matchLabels"] for f in rule["from"] if "podSelector" in f]
    for name in POOLS:
        items = docs(name)
        pool = one(items, "InferencePool")
        server = one(items, "Deployment", pool["metadata"]["name"])
        assert selects.items() <= server["spec"]["template"]["metadata"]["labels"].items()
        epp = one(items, "Deployment", pool["spec"]["endpointPickerRef"]["name"])
        epp_labels = epp["spec"]["template"]["metadata"]["labels"]
        assert any(p.items() <= epp_labels.items() for p in pickers)


def test_the_schema_sources_are_named() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    for path in [*(SCHEMAS / "kubernetes").glob("*.json"), *GIE.glob("*.yaml")]:
        assert f"`{path.relative_to(SCHEMAS)}`" in readme or \
            f"`{path.parent.relative_to(SCHEMAS)}/`" in readme, path.name
