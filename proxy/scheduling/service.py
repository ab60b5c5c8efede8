"""How long a request will hold its slot, learnt from the requests the backend finished.

The fair queue holds a free slot back for a returning agent only when the long request that
would otherwise take it would keep it longer than the agent takes to come back. That needs the
request's expected service time before it runs: the time to its first token (a fixed part plus a
part growing with the prompt) and then one decode step per output token, at the speed the
backend showed on recent requests. Nothing here reads a clock; the queue passes the durations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.1  # weight of the newest observation in the moving averages
# Before the backend has finished anything: a local server's usual pace, a little slow.
DEFAULT_FIRST_TOKEN = 0.05  # seconds to the first token of a short prompt
DEFAULT_PREFILL_PER_TOKEN = 0.0002  # seconds per prompt token (5,000 tokens/s)
DEFAULT_DECODE_PER_TOKEN = 0.02  # seconds per output token (50 tokens/s)


@dataclass(slots=True)
class ServiceModel:
    """Expected slot time of a request: ``first_token(prompt) + decode × (max_tokens − 1)``.

    The first-token part is a least-squares line over (prompt tokens, seconds to first token),
    kept as exponentially weighted moments so old requests fade out; decode is a moving average
    of seconds per output token after the first. Both are clamped at zero: a noisy fit never
    predicts a negative time.
    """

    decode: float = DEFAULT_DECODE_PER_TOKEN
    first_token_base: float = DEFAULT_FIRST_TOKEN  # until a first token has been observed
    prefill_per_token: float = DEFAULT_PREFILL_PER_TOKEN  # likewise
    _mx: float = 0.0
    _my: float = 0.0
    _mxx: float = 0.0
    _mxy: float = 0.0
    _seen_first: bool = False
    _seen_decode: bool = False

    def first_token(self, prompt_tokens: int) -> float:
        if not self._seen_first:
            return self.first_token_base + self.prefill_per_token * prompt_tokens
        var = self._mxx - self._mx * self._mx
        slope = (self._mxy - self._mx * self._my) / var if var > 1e-9 else 0.0
        slope = max(0.0, slope)
        base = max(0.0, self._my - slope * self._mx)
        return base + slope * prompt_tokens

    def expect(self, prompt_tokens: int, max_tokens: int | None) -> float:
        """Seconds the request is expected to hold its slot; infinite without ``max_tokens``
        (nothing bounds how long it may generate)."""
        if max_tokens is None:
            return math.inf
        return self.first_token(prompt_tokens) + self.decode * max(0, max_tokens - 1)

    def observe(self, prompt_tokens: int, output_tokens: int, seconds: float,
                first_token_after: float | None = None) -> None:
        """Learn from one finished request (``seconds`` from dispatch to release)."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        if first_token_after is not None and not 0 <= first_token_after <= seconds:
            return  # clocks that disagree: nothing to learn from it
        if first_token_after is not None:
            x, y = float(prompt_tokens), first_token_after
            if not self._seen_first:
                self._mx, self._my, self._mxx, self._mxy = x, y, x * x, x * y
                self._seen_first = True
            else:
                a = ALPHA
                self._mx += a * (x - self._mx)
                self._my += a * (y - self._my)
                self._mxx += a * (x * x - self._mxx)
                self._mxy += a * (x * y - self._mxy)
            if output_tokens >= 2:
                self._learn_decode((seconds - first_token_after) / (output_tokens - 1))
        elif output_tokens >= 2:
            rest = seconds - self.first_token(prompt_tokens)
            if rest > 0:
                self._learn_decode(rest / (output_tokens - 1))

    def _learn_decode(self, per_token: float) -> None:
        if not self._seen_decode:
            self.decode, self._seen_decode = per_token, True
        else:
            self.decode += ALPHA * (per_token - self.decode)
