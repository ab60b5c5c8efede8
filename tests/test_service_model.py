"""The service model: how long the queue expects a request to hold its slot."""

from __future__ import annotations

import math

import pytest

from toolmend.scheduling.service import ServiceModel


def test_before_any_request_the_stated_defaults_apply() -> None:
    m = ServiceModel(decode=0.02, first_token_base=0.05, prefill_per_token=0.001)
    assert m.expect(100, 11) == pytest.approx(0.05 + 0.1 + 10 * 0.02)
    assert m.expect(100, None) == math.inf  # nothing bounds its output


def test_first_token_time_is_fitted_to_the_prompt_length() -> None:
    m = ServiceModel()
    for _ in range(50):  # a backend that takes 10 ms plus 1 ms per 100 prompt tokens
        m.observe(100, 1, 0.011, first_token_after=0.011)
        m.observe(1100, 1, 0.021, first_token_after=0.021)
    assert m.first_token(600) == pytest.approx(0.016)
    assert m.first_token(0) == pytest.approx(0.010)


def test_decode_speed_is_learnt_after_the_first_token() -> None:
    m = ServiceModel()
    m.observe(100, 31, 0.32, first_token_after=0.02)
    assert m.decode == pytest.approx(0.01)
    assert m.expect(100, 31) == pytest.approx(0.02 + 0.30)


def test_without_a_first_token_time_decode_comes_from_the_whole_duration() -> None:
    m = ServiceModel(decode=0.02, first_token_base=0.05, prefill_per_token=0.0)
    m.observe(100, 11, 0.15)
    assert m.decode == pytest.approx(0.01)


def test_nonsense_durations_teach_nothing() -> None:
    m = ServiceModel(decode=0.02, first_token_base=0.05, prefill_per_token=0.0)
    for seconds, first in ((-1.0, None), (math.nan, None), (0.1, 0.5), (math.inf, 0.1)):
        m.observe(100, 11, seconds, first_token_after=first)
    assert m.expect(100, 11) == pytest.approx(0.05 + 10 * 0.02)
    assert m.first_token(10) >= 0
