"""`tunnel-lab run` stopped from outside (issue 11, defect 4): SIGTERM is handled like Ctrl-C (every
component stopped, every state directory removed, exit 143), and a runner killed hard leaves no
component running and no state directory behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from tunnel_lab.lab.runner.procs import PROJECT_ROOT


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if text.encode() in cmdline and ") Z " not in stat:  # zombies are gone already
            found.append(int(entry))
    return found


async def start_run(tmp_path: Path) -> tuple[trio.Process, Path, Path]:
    """`tunnel-lab run -k failover-dc-down` with its temp dir and results under tmp_path; returns once the
    connector registered (the whole topology is up)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    results = tmp_path / "results"
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tunnel_lab", "run", "-k", "failover-dc-down", "--results", str(results),
         str(PROJECT_ROOT / "scenarios")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = results / "failover-dc-down" / "connector.log"
    while not (log.exists() and "Registered tunnel connection" in log.read_text()):
        assert proc.returncode is None, "the run ended before its connector registered"
        await trio.sleep(0.1)
    return proc, tmp, results


def kill_leftovers(tmp: Path) -> None:
    """The test's own processes, should the runner have left any (so a failure does not leak them)."""
    for pid in processes_mentioning(str(tmp)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_sigterm_stops_every_component_and_removes_the_state(tmp_path):
    try:
        with trio.fail_after(120):
            proc, tmp, _results = await start_run(tmp_path)
            assert len(processes_mentioning(str(tmp))) >= 3  # edge, connector, origins
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 143
            assert proc.stderr is not None
            err = (await proc.stderr.receive_some(65536)).decode()
            assert "terminated (SIGTERM); every component was stopped" in err
            assert processes_mentioning(str(tmp)) == []
            assert [p.name for p in tmp.iterdir() if p.name.startswith("tunnel-lab-")] == []
    finally:
        kill_leftovers(tmp_path)


async def test_a_runner_killed_hard_leaves_nothing_behind(tmp_path):
    try:
        with trio.fail_after(120):
            proc, tmp, _results = await start_run(tmp_path)
            proc.kill()
            await proc.wait()
            # the reaper notices the runner's end and stops the components (SIGTERM, then SIGKILL)
            while processes_mentioning(str(tmp)) or any(p.name.startswith("tunnel-lab-")
                                                        for p in tmp.iterdir()):
                await trio.sleep(0.1)
    finally:
        kill_leftovers(tmp_path)
