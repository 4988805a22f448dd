"""Test-wide settings: hypothesis profiles (the golden vectors' paths are in `tests/golden.py`)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

# CI: fixed examples so a red run can be reproduced; dev: explore more.
settings.register_profile("ci", derandomize=True, max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=500, deadline=None)
# explore (scripts/hypothesis-explore.sh): a fresh seed per round (--hypothesis-seed, printed so a failure
# can be replayed), many more examples, no example database (every round starts from nothing).
settings.register_profile("explore", max_examples=int(os.environ.get("HYPOTHESIS_EXPLORE_EXAMPLES", "2000")),
                          deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# mutation (scripts/mutation.sh): the ci examples, but a failure is not shrunk or explained: a killed mutant
# only needs the first failing example, and shrinking it cost most of a mutation run's time.
settings.register_profile("mutation", derandomize=True, max_examples=100, deadline=None, database=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
