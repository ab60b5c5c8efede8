"""Configuration: defaults < TOML file < TOOLMEND_* environment < flags; --help lists all."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from toolmend.server.cli import build_parser
from toolmend.server.config import Settings


def load(argv: list[str], env: dict[str, str], path: Path | None = None) -> Settings:
    ns = build_parser().parse_args(["serve", *argv])
    return Settings.load(ns, str(path) if path else None, environ=env)


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "toolmend.toml"
    cfg.write_text('port = 9001\nidle_timeout = 7.5\nupstream = ["http://a:1"]\n'
                   'tool-mode = "incremental"\n[agents.alice]\nweight = 2\n')
    s = load([], {}, cfg)
    assert (s.port, s.idle_timeout, s.upstream, s.tool_mode) == (9001, 7.5, ["http://a:1"],
                                                                 "incremental")
    s = load([], {"TOOLMEND_PORT": "9002", "TOOLMEND_UPSTREAM": "http://b:1,http://c:1"}, cfg)
    assert s.port == 9002 and s.upstream == ["http://b:1", "http://c:1"]
    s = load(["--port", "9003", "--upstream", "http://d:1"], {"TOOLMEND_PORT": "9002"}, cfg)
    assert s.port == 9003 and s.upstream == ["http://d:1"]
    assert s.idle_timeout == 7.5  # untouched by env and flags


def test_config_path_from_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("keepalive_interval = 2.5\n")
    assert load([], {"TOOLMEND_CONFIG": str(cfg)}).keepalive_interval == 2.5


def test_bad_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TOOLMEND_PORT"):
        load([], {"TOOLMEND_PORT": "eighty"})
    cfg = tmp_path / "c.toml"
    cfg.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown option 'prot'"):
        load([], {}, cfg)


def test_bool_env_and_flag() -> None:
    assert load([], {"TOOLMEND_LOG_REQUESTS": "false"}).log_requests is False
    assert load(["--no-log-requests"], {}).log_requests is False


def test_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "toolmend", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for f in fields(Settings):
        assert "TOOLMEND_" + f.name.upper() in out.replace("\n", " ").replace("  ", ""), f.name


def test_cli_reports_configuration_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 'x'\n")
    r = subprocess.run([sys.executable, "-m", "toolmend", "serve", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "configuration error" in r.stderr and "port" in r.stderr


def test_readme_documents_every_option() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [f.name for f in fields(Settings)
               if f.metadata.get("help") and f"| `{f.name}` |" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
