"""Per-agent policy: the ``[agents.NAME]`` tables of the config file.

Kept apart from the queue so the config loader and the key ring can read policies without the
scheduler, and so the queue core stays a pure state machine.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_AGENT = "*"  # [agents."*"]: the policy of every agent not named


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    """How one agent is treated: its share, its class, how high it may ask, how much it may queue.

    ``priority``: higher classes are served strictly first. ``max_priority``: the highest value
    the agent may ask for with ``X-Priority`` (it may always ask for less). ``max_queue``: its own
    queue limit, or None for the global per-agent limit.
    """

    weight: float = 1.0
    priority: int = 0
    max_priority: int | None = None
    max_queue: int | None = None

    @property
    def priority_ceiling(self) -> int:
        return self.priority if self.max_priority is None else self.max_priority


@dataclass(slots=True)
class AgentPolicies:
    by_agent: dict[str, AgentPolicy] = field(default_factory=dict)
    default: AgentPolicy = field(default_factory=AgentPolicy)

    def get(self, agent: str) -> AgentPolicy:
        return self.by_agent.get(agent, self.default)


_POLICY_KEYS = {"weight": float, "priority": int, "max_priority": int, "max_queue": int}


def policies_from_dict(agents: dict[str, Any], source: str = "config") -> AgentPolicies:
    """Build policies from the ``agents`` table; errors name the exact key, like config.py's."""
    out = AgentPolicies()
    for name, table in agents.items():
        where = f"{source}: [agents.{name}]"
        if not isinstance(table, dict):
            raise ValueError(f"{where} must be a table")
        kw: dict[str, Any] = {}
        for key, raw in table.items():
            k = key.replace("-", "_")
            kind = _POLICY_KEYS.get(k)
            if kind is None:
                raise ValueError(f"{where}: unknown key {key!r}; one of {sorted(_POLICY_KEYS)}")
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ValueError(f"{where}: {key} must be a number, got {raw!r}")
            if kind is int and raw != int(raw):
                raise ValueError(f"{where}: {key} must be an integer, got {raw!r}")
            kw[k] = kind(raw)
        if kw.get("weight", 1.0) <= 0:
            raise ValueError(f"{where}: weight must be greater than 0")
        if kw.get("max_queue", 1) < 0:
            raise ValueError(f"{where}: max_queue must be 0 or more")
        policy = AgentPolicy(**kw)
        if name == DEFAULT_AGENT:
            out.default = policy
        else:
            out.by_agent[name] = policy
    return out


def load_agent_policies(path: str | Path | None) -> AgentPolicies:
    """Read ``[agents.NAME]`` tables from the TOML config (config.py skips table sections)."""
    if not path:
        return AgentPolicies()
    p = Path(path)
    data = tomllib.loads(p.read_text())
    agents = data.get("agents", {})
    if not isinstance(agents, dict):
        raise ValueError(f"{p}: 'agents' must be a table of [agents.NAME] sections")
    return policies_from_dict(agents, str(p))
