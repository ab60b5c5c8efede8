"""The keys under which the app and each request keep their shared objects.

In a module of their own, importing nothing at run time, so that fronts, the pipeline and
telemetry can all reach the settings, the upstream, the scheduler and the request context
without importing the app module (and without finding keys by their names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from toolmend.backends.upstream import UpstreamClient
    from toolmend.fronts.responses_store import ResponseStore
    from toolmend.scheduling.scheduler import FairScheduler
    from toolmend.server.config import Settings
    from toolmend.server.context import RequestContext
    from toolmend.server.signing import Signer

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
UPSTREAM: web.AppKey[UpstreamClient] = web.AppKey("upstream")
SCHEDULER: web.AppKey[FairScheduler] = web.AppKey("scheduler")
#: signs what clients bring back (thinking signatures, encrypted reasoning); made on first use
SIGNER: web.AppKey[Signer] = web.AppKey("signer")
#: responses kept for previous_response_id (the Responses front makes it)
RESPONSES: web.AppKey[ResponseStore] = web.AppKey("responses")
CTX: web.RequestKey[RequestContext] = web.RequestKey("ctx")
