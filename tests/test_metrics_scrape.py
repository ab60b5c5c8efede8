"""``/metrics`` can be scraped from another pod; the sessions endpoint stays private.

An endpoint picker scrapes each model-server pod from its own pod, so ``/metrics`` takes a
scrape key (``metrics_key``) or an allowed network (``metrics_networks``) besides loopback and
the admin key. Neither opens ``/toolmend/v1/sessions``, whose step timelines say much more.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from toolmend.server.app import build_app
from toolmend.server.config import Settings
from toolmend.server.errors import ProxyError
from toolmend.telemetry.tracing import metrics_handler, sessions_handler

SETTINGS = dict(admin_key="adm1n", metrics_key="scr4pe", metrics_networks=["10.0.0.0/8"],
                log_requests=False)


def request(app: web.Application, path: str, remote: str, **headers: str) -> web.Request:
    class Transport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return (remote, 1234) if name == "peername" else default

        def is_closing(self) -> bool:
            return False

    return make_mocked_request("GET", path, headers=headers, app=app, transport=Transport())


async def status(app: web.Application, path: str, remote: str, **headers: str) -> int:
    handler = metrics_handler if path == "/metrics" else sessions_handler
    try:
        return (await handler(request(app, path, remote, **headers))).status
    except ProxyError as e:
        return e.status


@pytest.fixture
def app() -> web.Application:
    return build_app(Settings(**SETTINGS), ["http://127.0.0.1:9"])


async def test_an_allowed_network_reads_metrics_only(app: web.Application) -> None:
    assert await status(app, "/metrics", "10.42.0.17") == 200
    assert await status(app, "/metrics", "::ffff:10.42.0.17") == 200
    assert await status(app, "/toolmend/v1/sessions", "10.42.0.17") == 403


async def test_the_scrape_key_reads_metrics_only(app: web.Application) -> None:
    bearer = {"Authorization": "Bearer scr4pe"}
    assert await status(app, "/metrics", "192.168.5.5") == 403
    assert await status(app, "/metrics", "192.168.5.5", **bearer) == 200
    assert await status(app, "/toolmend/v1/sessions", "192.168.5.5", **bearer) == 403


async def test_the_admin_key_and_loopback_still_read_both(app: web.Application) -> None:
    admin = {"Authorization": "Bearer adm1n"}
    for path in ("/metrics", "/toolmend/v1/sessions"):
        assert await status(app, path, "192.168.5.5", **admin) == 200
        assert await status(app, path, "127.0.0.1") == 200


@pytest.mark.parametrize("auth", ["Bearer scr4p", "Bearer scr4pe2", "Basic scr4pe", "scr4pe",
                                  "Bearer scr4pe\u00e9", "Bearer "])
async def test_anything_else_is_refused_with_the_way_in(app: web.Application, auth: str) -> None:
    with pytest.raises(ProxyError) as e:
        await metrics_handler(request(app, "/metrics", "192.168.5.5", Authorization=auth))
    assert e.value.status == 403 and e.value.code == "forbidden"
    assert "metrics_networks" in e.value.message and "metrics or admin key" in e.value.message


async def test_without_the_settings_metrics_stay_loopback() -> None:
    app = build_app(Settings(log_requests=False), ["http://127.0.0.1:9"])
    assert await status(app, "/metrics", "10.42.0.17") == 403
    assert await status(app, "/metrics", "127.0.0.1") == 200


def test_a_bad_network_is_named() -> None:
    r = subprocess.run([sys.executable, "-m", "toolmend", "serve", "--metrics-networks",
                        "10.0.0.0/40"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "metrics_networks" in r.stderr and "10.0.0.0/40" in r.stderr
