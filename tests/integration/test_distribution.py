"""What the distribution installs: one import package, `tunnel_lab` (issue 15: no top-level `wire`, `lab`,
`bench`, ... to collide with a user's own folders), with the data files the lab reads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_one_import_package_and_its_data(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--wheel-dir", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("tunnel_lab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith((".dist-info", ".data"))} == {"tunnel_lab"}
    for folder in ("wire", "transport", "edge", "connector", "lab", "bench", "origin_fixtures"):
        assert f"tunnel_lab/{folder}/__init__.py" in names
    assert "tunnel_lab/wire/tunnelrpc.capnp" in names
    assert "tunnel_lab/lab/runner/schema.json" in names
    assert {"tunnel_lab/edge/live.html", "tunnel_lab/edge/live_signin.html"} <= set(names)
    assert any(n.startswith("tunnel_lab/lab/scenarios/") and n.endswith(".yaml") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"tunnel-lab = tunnel_lab.lab.cli:main" in entry_points
    assert b"tunnel_lab = tunnel_lab.lab.pytest_plugin" in entry_points


def test_python_m_tunnel_lab_is_the_command_line() -> None:
    run = subprocess.run([sys.executable, "-m", "tunnel_lab", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "usage: tunnel-lab" in run.stdout
