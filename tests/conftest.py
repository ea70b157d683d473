"""Shared test settings: Hypothesis profiles and optional-framework skips."""

from __future__ import annotations

import importlib.util
import os

from hypothesis import HealthCheck, settings

# deadline=None: these machines are shared and noisy; no test asserts a time.
settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
