"""Shared pytest configuration for the msbp core tests."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Modest, deterministic property tests: the whole default run must stay fast on a small CPU.
settings.register_profile(
    "msbp",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("msbp-thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "msbp"))
