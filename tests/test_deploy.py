"""deploy/: the compose files, the Kubernetes pod and the systemd unit stay consistent with
toolmend's own defaults (port 8080, OTLP/HTTP 4318, Jaeger UI 16686) and its settings; every
compose file is valid by the Compose Specification's schema, and the trace viewers (Jaeger,
Phoenix, a collector feeding both) receive toolmend's spans where the files say."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from toolmend.server.cli import build_parser
from toolmend.server.config import ENV_PREFIX, Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DEFAULT_PORT = Settings().port
COMPOSE = {"compose.vllm.yaml": ("vllm", 8000, "vllm"),
           "compose.llamacpp.yaml": ("llama-server", 8081, "llamacpp"),
           "compose.ollama.yaml": ("ollama", 11434, "ollama")}


def _load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def _env(env: Any) -> dict[str, str]:
    if isinstance(env, list):  # "KEY=value" form
        return dict(e.split("=", 1) for e in env)
    return {str(k): str(v) for k, v in (env or {}).items()}


def _settings_from_env(env: dict[str, str]) -> Settings:
    """Every TOOLMEND_* variable must be a real setting with a valid value."""
    names = {f.upper() for f in Settings.__dataclass_fields__}
    for key in env:
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG":
            assert key[len(ENV_PREFIX):] in names, f"{key} is not a toolmend setting"
    return Settings.load(None, environ=env)


def _published(service: dict[str, Any]) -> set[tuple[int, int]]:
    out = set()
    for p in service.get("ports") or ():
        host, _, container = str(p).partition(":")
        out.add((int(host), int(container)))
    return out


@pytest.mark.parametrize("name", sorted(COMPOSE))
def test_compose_file(name: str) -> None:
    backend_service, backend_port, kind = COMPOSE[name]
    doc = _load(name)
    services = doc["services"]
    assert {"toolmend", "jaeger", backend_service} <= set(services)
    for svc in services.values():
        assert "image" in svc or "build" in svc

    tm = services["toolmend"]
    settings = _settings_from_env(_env(tm["environment"]))
    assert settings.port == DEFAULT_PORT
    assert settings.host == "0.0.0.0"  # reachable from outside its container
    assert (DEFAULT_PORT, DEFAULT_PORT) in _published(tm)
    assert settings.backend == kind

    (upstream,) = settings.upstream
    u = urlparse(upstream)
    assert u.hostname == backend_service
    assert u.port == backend_port
    backend = services[backend_service]
    args = " ".join(map(str, backend.get("command") or backend.get("entrypoint") or []))
    exposed = {int(p) for p in backend.get("expose") or ()}
    assert backend_port in exposed or str(backend_port) in args or kind == "ollama"
    if kind == "ollama":
        assert _env(backend["environment"])["OLLAMA_KEEP_ALIVE"] == "-1"
        assert _env(backend["environment"])["OLLAMA_HOST"].endswith(f":{backend_port}")
    if kind == "vllm":
        assert "--enable-auto-tool-choice" in args and "--tool-call-parser" in args
    if kind == "llamacpp":
        assert "--jinja" in args and backend_port != DEFAULT_PORT

    otlp = urlparse(settings.otlp_endpoint)
    assert (otlp.hostname, otlp.port) == ("jaeger", 4318)
    jaeger_ports = _published(services["jaeger"])
    assert (16686, 16686) in jaeger_ports and (4318, 4318) in jaeger_ports

    deps = tm.get("depends_on") or {}
    assert backend_service in deps and "jaeger" in deps
    build = tm.get("build")
    if build:
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file()


def test_kubernetes_sidecar_pod() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "toolmend-vllm-pod.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "Pod")
    assert pod["apiVersion"] == "v1"
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"vllm", "toolmend"}
    tm, vllm = containers["toolmend"], containers["vllm"]
    env = {e["name"]: e["value"] for e in tm["env"]}
    settings = _settings_from_env(env)
    assert settings.port == DEFAULT_PORT
    assert [p["containerPort"] for p in tm["ports"]] == [DEFAULT_PORT]
    ready = tm["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/readyz", DEFAULT_PORT)
    assert tm["livenessProbe"]["httpGet"]["path"] == "/healthz"
    (upstream,) = settings.upstream
    u = urlparse(upstream)
    assert u.hostname in ("127.0.0.1", "localhost")  # same pod, same network namespace
    assert u.port in [p["containerPort"] for p in vllm["ports"]]
    assert f"--port={u.port}" in vllm["args"]
    assert urlparse(settings.otlp_endpoint).port == 4318
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["selector"] == pod["metadata"]["labels"]
    assert svc["spec"]["ports"][0]["targetPort"] == DEFAULT_PORT


def test_systemd_unit_and_its_config() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "toolmend.service")
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    svc = unit["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert Path(argv[0]).name == "toolmend" and argv[1] == "serve"
    ns = build_parser().parse_args(argv[1:])
    assert ns.config == "/etc/toolmend/toolmend.toml"
    assert svc["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # the example config it points at is valid toolmend configuration
    settings = Settings.load(ns, str(DEPLOY / "systemd" / "toolmend.toml"), environ={})
    assert settings.port == DEFAULT_PORT
    assert settings.host == "127.0.0.1"
    assert urlparse(settings.otlp_endpoint).port == 4318
    assert all(urlparse(u).port != DEFAULT_PORT for u in settings.upstream)


def test_dockerfile_exposes_the_default_port() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert f"EXPOSE {DEFAULT_PORT}" in text
    assert f"TOOLMEND_PORT={DEFAULT_PORT}" in text
    assert 'ENTRYPOINT ["toolmend"]' in text


# --- tracing: Jaeger, Phoenix, and a collector that feeds both ---------------------------------
SCHEMAS = Path(__file__).resolve().parent / "schemas"
TRACING_COMPOSE = ("docker-compose.jaeger.yml", "docker-compose.phoenix.yml",
                   "docker-compose.collector.yml")
#: Exporter types of the collector's core distribution (the otel/opentelemetry-collector image),
#: with the names of v0.144.0 and later.
CORE_EXPORTERS = {"otlp_grpc", "otlp_http", "debug", "nop"}


def _compose_validator() -> Any:
    """The Compose Specification's own JSON Schema (vendored, see tests/schemas/README.md)."""
    import json

    import jsonschema

    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _compose_files() -> list[str]:
    return sorted(p.name for p in DEPLOY.glob("*.y*ml") if "compose" in p.name)


def test_every_compose_file_is_listed_and_valid_compose() -> None:
    """Every compose file in deploy/ is a valid Compose file, by the specification's schema."""
    assert set(_compose_files()) == set(COMPOSE) | set(TRACING_COMPOSE)
    validator = _compose_validator()
    for name in _compose_files():
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(_load(name))]
        assert not errors, f"{name}: {errors}"


def test_the_compose_schema_catches_mistakes() -> None:
    """The vendored schema really checks: a misspelt key, a wrong type, an unknown condition."""
    validator = _compose_validator()
    good = _load("docker-compose.phoenix.yml")
    assert not list(validator.iter_errors(good))
    for path, value in ((("services", "phoenix", "portz"), ["6006:6006"]),
                        (("services", "phoenix", "ports"), "6006:6006"),
                        (("services", "toolmend", "depends_on", "phoenix", "condition"),
                         "service_ready")):
        bad = _load("docker-compose.phoenix.yml")
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert list(validator.iter_errors(bad)), f"{path} = {value!r} passed the schema"


def _toolmend_otlp(doc: dict[str, Any]) -> tuple[str | None, int | None]:
    settings = _settings_from_env(_env(doc["services"]["toolmend"]["environment"]))
    u = urlparse(settings.otlp_endpoint)
    return u.hostname, u.port


def test_jaeger_compose_sends_to_jaeger() -> None:
    doc = _load("docker-compose.jaeger.yml")
    assert _toolmend_otlp(doc) == ("jaeger", 4318)
    assert {(16686, 16686), (4318, 4318)} <= _published(doc["services"]["jaeger"])


def test_phoenix_compose_sends_to_phoenix() -> None:
    from tests.viewer.phoenix import PHOENIX_VERSION

    doc = _load("docker-compose.phoenix.yml")
    services = doc["services"]
    # Phoenix takes OTLP/HTTP on its UI port; toolmend adds /v1/traces to the base URL
    assert _toolmend_otlp(doc) == ("phoenix", 6006)
    phoenix = services["phoenix"]
    assert (6006, 6006) in _published(phoenix)
    # the release the viewer test tier checks toolmend's traces against
    assert phoenix["image"] == f"arizephoenix/phoenix:version-{PHOENIX_VERSION}"
    env = _env(services["toolmend"]["environment"])
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "openinference.project.name=toolmend"
    data = _env(phoenix["environment"])["PHOENIX_WORKING_DIR"]
    assert any(str(v).endswith(":" + data) for v in phoenix["volumes"])
    assert set(services["toolmend"]["depends_on"]) == {"phoenix", "sim"}


def _collector_config() -> dict[str, Any]:
    return _load("otel-collector.yaml")


def test_collector_config_fans_out_to_jaeger_and_phoenix() -> None:
    """The collector's config is complete (every component a pipeline names is defined, every
    defined one is used, all are core components) and sends traces to both viewers at the
    addresses the collector compose gives them."""
    cfg = _collector_config()
    assert set(cfg) <= {"receivers", "processors", "exporters", "extensions", "connectors",
                        "service"}
    pipelines = cfg["service"]["pipelines"]
    assert set(pipelines) == {"traces"}
    traces = pipelines["traces"]
    assert traces["receivers"] == ["otlp"]
    assert set(traces["exporters"]) == set(cfg["exporters"])
    assert set(traces.get("processors") or ()) == set(cfg.get("processors") or ())
    for name in cfg["exporters"]:
        assert name.split("/", 1)[0] in CORE_EXPORTERS, name
    protocols = cfg["receivers"]["otlp"]["protocols"]
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"

    services = _load("docker-compose.collector.yml")["services"]
    targets = {}
    for name, exp in cfg["exporters"].items():
        endpoint = exp["endpoint"]
        u = urlparse(endpoint if "://" in endpoint else "grpc://" + endpoint)
        assert u.hostname in services, f"{name} sends to {u.hostname}, not a compose service"
        targets[u.hostname] = (name.split("/", 1)[0], u.port)
    # Jaeger takes OTLP/gRPC on 4317 (insecure inside the compose network), Phoenix OTLP/HTTP
    # on its UI port
    assert targets == {"jaeger": ("otlp_grpc", 4317), "phoenix": ("otlp_http", 6006)}
    assert cfg["exporters"]["otlp_grpc/jaeger"]["tls"]["insecure"] is True
    assert cfg["exporters"]["otlp_http/phoenix"]["headers"]["x-project-name"] == "toolmend"


def test_collector_compose_wires_toolmend_through_the_collector() -> None:
    doc = _load("docker-compose.collector.yml")
    services = doc["services"]
    assert {"otel-collector", "jaeger", "phoenix", "toolmend", "sim"} == set(services)
    assert _toolmend_otlp(doc) == ("otel-collector", 4318)
    collector = services["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector:")
    # the config file is the one tested above, mounted where the image reads it
    (mount,) = collector["volumes"]
    source, target, *_ = mount.split(":")
    assert (DEPLOY / source).resolve() == (DEPLOY / "otel-collector.yaml").resolve()
    assert target == "/etc/otelcol/config.yaml"
    assert {(4317, 4317), (4318, 4318)} <= _published(collector)
    # only the collector takes OTLP from outside: the viewers publish their UIs alone
    assert _published(services["jaeger"]) == {(16686, 16686)}
    assert _published(services["phoenix"]) == {(6006, 6006)}
    assert set(collector["depends_on"]) == {"jaeger", "phoenix"}
    from tests.viewer.phoenix import PHOENIX_VERSION

    assert services["phoenix"]["image"] == f"arizephoenix/phoenix:version-{PHOENIX_VERSION}"
