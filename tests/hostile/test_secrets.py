"""No secret a `tunnel-lab run` creates appears in any file it writes (issue 11, defect 5): tunnel secrets
(in any base64 wrapping, e.g. a `--token`), the API token, private keys. Results are the owner's only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from tunnel_lab.lab.runner.leaks import leaks, secrets_in
from tunnel_lab.lab.runner.procs import PROJECT_ROOT

SCENARIOS = "connector-token or https-eyeball or registration-unauthorized or http-get-echo"
def test_no_secret_in_any_file_a_run_writes(tmp_path):
    tmp, results = tmp_path / "tmp", tmp_path / "results"
    tmp.mkdir()
    reports = [tmp_path / "junit.xml", tmp_path / "report.json"]
    run = subprocess.run(
        [sys.executable, "-m", "tunnel_lab", "run", "-k", SCENARIOS, "--keep-state", "--results",
         str(results),
         "--junit", str(reports[0]), "--json", str(reports[1]), str(PROJECT_ROOT / "scenarios")],
        env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout.decode()[-2000:] + run.stderr.decode()[-2000:]
    states = sorted(tmp.glob("tunnel-lab-*"))
    secrets: dict[str, str] = {}
    for state in states:
        secrets.update({f"{state.name}: {k}": v for k, v in secrets_in(state).items()})
    assert len(states) == 4 and sum("TunnelSecret" in k for k in secrets) >= 5  # incl. a wrong secret
    written = [p for p in results.rglob("*") if p.is_file()] + reports
    assert len(written) > 15
    for path in written:
        assert leaks(path.read_bytes(), secrets) == [], path
    assert leaks(run.stdout + run.stderr, secrets) == []
    for scenario_dir in (p for p in results.iterdir() if p.is_dir()):
        assert stat.S_IMODE(scenario_dir.stat().st_mode) == 0o700, scenario_dir
        for log in scenario_dir.iterdir():
            assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0, log
