"""Test-wide settings: hypothesis profiles (the golden vectors' paths are in `tests/golden.py`)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI: fixed examples so a red run can be reproduced; dev: explore more.
settings.register_profile("ci", derandomize=True, max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
