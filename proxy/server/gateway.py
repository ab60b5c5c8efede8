"""Identity across an inference gateway, both ways: the fairness id and the objective.

Kubernetes' inference gateway (the Gateway API Inference Extension, whose endpoint picker now
lives in llm-d's inference scheduler) keys its flow control on two request headers:
``x-gateway-inference-fairness-id`` (who is asking; requests of one id share one fair queue)
and ``x-gateway-inference-objective`` (the name of an InferenceObjective, which carries a
priority). toolmend speaks both:

- **In front of a gateway** (``gateway_upstream``): each request leaves with the agent as its
  fairness id and its priority class as an objective, so the gateway's fair queues are the
  agents toolmend knows and not one toolmend pod.
- **Behind a gateway** (``trusted_gateways``): a request from a trusted address has its agent
  and priority read from those headers (the trust table's ``gateway`` row), so the sidecar's
  own queue keeps the gateway's view of who is asking. From anyone else they are ignored: a
  header is not an identity unless the sender is trusted.

The objective is a name, the priority a number; ``objectives`` maps one to the other both ways
(``10=realtime``), and a class not listed travels as ``priority-N`` (``priority--1`` for -1: a
valid Kubernetes name either way).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from toolmend.server import auth

if TYPE_CHECKING:
    from toolmend.server.config import Settings
    from toolmend.server.context import RequestContext

FAIRNESS_ID_MAX = 128  # as X-Agent-Id
OBJECTIVE_MAX = 253  # a Kubernetes object name
_DEFAULT_NAME = re.compile(r"priority-(-?\d{1,9})")
#: what an InferenceObjective may be called (a DNS-1123 subdomain)
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The gateway options, parsed once at start-up."""

    upstream: bool = False
    fairness_header: str = "x-gateway-inference-fairness-id"
    objective_header: str = "x-gateway-inference-objective"
    names: dict[int, str] = field(default_factory=dict)  # priority -> objective
    priorities: dict[str, int] = field(default_factory=dict)  # objective -> priority
    trusted: tuple[auth.Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayConfig:
        """Raises ValueError naming the option for a malformed one."""
        names: dict[int, str] = {}
        for entry in settings.objectives:
            prio, sep, name = entry.partition("=")
            name = name.strip()
            try:
                p = int(prio.strip())
            except ValueError:
                p = None
            if not sep or p is None or not _K8S_NAME.fullmatch(name) or len(name) > OBJECTIVE_MAX:
                raise ValueError(f"objectives: {entry!r} is not PRIORITY=NAME with an integer "
                                 "priority and a Kubernetes object name")
            if p in names:
                raise ValueError(f"objectives: priority {p} is named twice")
            names[p] = name
        priorities = {name: p for p, name in names.items()}
        if len(priorities) != len(names):
            raise ValueError("objectives: one objective name stands for two priorities")
        for option in ("fairness_header", "objective_header"):
            value = getattr(settings, option)
            if not value or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
                raise ValueError(f"{option}: {value!r} is not an HTTP header name")
        return cls(settings.gateway_upstream, settings.fairness_header,
                   settings.objective_header, names, priorities,
                   tuple(auth.parse_networks(settings.trusted_gateways, "trusted_gateways")))

    # both ways between a priority class and an objective name ---------------------------------
    def objective(self, priority: int) -> str:
        return self.names.get(priority) or f"priority-{priority}"

    def priority(self, objective: str) -> int | None:
        """The class an objective stands for; None for a name that is neither listed nor
        ``priority-N`` (the request then runs in its agent's own class)."""
        p = self.priorities.get(objective)
        if p is not None:
            return p
        m = _DEFAULT_NAME.fullmatch(objective)
        return int(m.group(1)) if m else None

    # behind a gateway -------------------------------------------------------------------------
    def trusts(self, request: web.Request) -> bool:
        """Whether the request comes straight from a trusted gateway (its peer address)."""
        if not self.trusted or not request.remote:
            return False
        try:
            addr = ipaddress.ip_address(request.remote.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted)

    def fairness_id(self, request: web.Request) -> str | None:
        """The agent a trusted gateway names; None when untrusted or not named."""
        if not self.trusts(request):
            return None
        value = auth.header_text(request, self.fairness_header)
        value = value.strip() if value else ""
        return value[:FAIRNESS_ID_MAX] or None

    def gateway_priority(self, request: web.Request) -> int | None:
        """The priority class a trusted gateway's objective stands for, else None."""
        if not self.trusts(request):
            return None
        value = auth.header_text(request, self.objective_header)
        return self.priority(value.strip()) if value else None

    # in front of a gateway --------------------------------------------------------------------
    def stamp(self, ctx: RequestContext, priority: int) -> None:
        """Add the fairness id and the objective to the headers the upstream call carries."""
        if self.upstream:
            ctx.upstream_headers = {**(ctx.upstream_headers or {}),
                                    self.fairness_header: ctx.agent_id,
                                    self.objective_header: self.objective(priority)}


GATEWAY = web.AppKey("gateway", GatewayConfig)


def config(app: web.Application) -> GatewayConfig | None:
    return app.get(GATEWAY)
