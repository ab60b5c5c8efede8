"""deploy/: the compose files, the Kubernetes pod and the systemd unit stay consistent with
toolmend's own defaults (port 8080, OTLP/HTTP 4318, Jaeger UI 16686) and its settings."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from toolmend.cli import build_parser
from toolmend.config import ENV_PREFIX, Settings

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
