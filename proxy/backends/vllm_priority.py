"""Request priorities for vLLM: the values sent, and the start-up check that they are taken.

vLLM started with ``--scheduling-policy priority`` serves its waiting requests by the request's
``priority`` (lower first) and may preempt running ones for a more urgent arrival. With
``--vllm-priority`` toolmend sends each request's class there, with its agent's loop steps ahead
of long requests of the same class (:func:`upstream_priority`), so a step that reached vLLM's own
queue (toolmend letting more requests through than vLLM runs at once) still overtakes the ones
waiting there. ``--launch vllm`` starts vLLM with the policy and turns the option on.

Without the policy, vLLM versions that check refuse any non-zero ``priority`` with "Priority
scheduling is not enabled" (400), which would fail every request; so with the option on,
toolmend probes once at start-up with ``priority: 1`` and sends nothing to a vLLM that refuses.
The V1 engine (vLLM 0.32 here) no longer checks: it accepts the field and, without the policy,
serves first come, first served, so a probe cannot tell the policy is missing there; sending
the field costs nothing then. ``toolmend doctor`` runs the same probe against a running vLLM.
The probe is one generation of one token, which is why it is not made unasked.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import aiohttp
import orjson

if TYPE_CHECKING:
    from toolmend.server.config import Settings

log = logging.getLogger("toolmend.backends.vllm_priority")

REFUSAL = "Priority scheduling is not enabled"
PROBE_TIMEOUT = 30.0  # one token; a CPU server under load can take a while


async def probe(session: aiohttp.ClientSession, base_url: str, model: str | None, *,
                api_key: str = "") -> bool | None:
    """True: the server accepted a request with ``priority: 1``; False: it refused it as vLLM
    does without priority scheduling; None: no answer that tells."""
    body: dict[str, object] = {"prompt": "0", "max_tokens": 1, "priority": 1}
    if model:
        body["model"] = model
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        async with session.post(base_url.rstrip("/") + "/v1/completions",
                                data=orjson.dumps(body), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as r:
            text = (await r.content.read(64 * 1024)).decode("utf-8", "replace")
            if r.status == 200:
                return True
            if r.status == 400 and REFUSAL.lower() in text.lower():
                return False
            return None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


def settle(settings: Settings, accepted: bool | None) -> str:
    """With ``--vllm-priority`` on, turn it off when vLLM refused the probe; returns what to
    log."""
    if accepted is False:
        settings.vllm_priority = False
        return ("vLLM refuses request priorities (start it with --scheduling-policy priority); "
                "--vllm-priority is ignored, none are sent")
    if accepted is True:
        return ("vLLM accepts request priorities: each request's class is sent, loop steps "
                "ahead of long requests (they take effect with --scheduling-policy priority)")
    return "could not check that vLLM takes request priorities; sending them (--vllm-priority)"


def doctor_note(accepted: bool | None) -> str | None:
    """What ``toolmend doctor`` says about a running vLLM's answer to the probe."""
    if accepted is False:
        return ("this vLLM refuses request priorities: start it with --scheduling-policy "
                "priority, then toolmend with --vllm-priority, so agents' loop steps overtake "
                "long requests waiting inside vLLM")
    if accepted is True:
        return ("this vLLM accepts request priorities (with --scheduling-policy priority they "
                "order its queue): start toolmend with --vllm-priority")
    return None


async def configure(settings: Settings, session: aiohttp.ClientSession, base_url: str,
                    model: str | None) -> None:
    """Probe the vLLM at ``base_url`` and settle the setting; logs the outcome."""
    accepted = await probe(session, base_url, model, api_key=settings.api_key)
    log.info("%s", settle(settings, accepted))


def upstream_priority(priority_class: int, loop_step: bool) -> int:
    """vLLM's ``priority`` (lower first) for a request of ``priority_class`` (higher first):
    classes stay strictly ordered, and within one class a loop step goes first."""
    return -(2 * priority_class + (1 if loop_step else 0))
