"""Test-wide settings: hypothesis profiles and paths to the shared ground truth."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

# CI: fixed examples so a red run can be reproduced; dev: explore more.
settings.register_profile("ci", derandomize=True, max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=500, deadline=None)
# explore (scripts/hypothesis-explore.sh): a fresh seed per round (--hypothesis-seed, printed so a failure
# can be replayed), many more examples, no example database (every round starts from nothing).
settings.register_profile("explore", max_examples=int(os.environ.get("HYPOTHESIS_EXPLORE_EXAMPLES", "2000")),
                          deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ROOT = Path(__file__).resolve().parent.parent
# ../shared sits beside the checkout (also in CI, as a read-only copy).
SHARED = Path(os.environ.get("TUNNEL_LAB_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "vectors" / "cloudflared-2026.8.2"
VECTORS_GO126 = SHARED / "vectors" / "cloudflared-2026.8.2-go1.26"
