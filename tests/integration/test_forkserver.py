"""The runner's fork server (lab/runner/forkserver.py): a forked `tunnel-lab ARGS` behaves as an exec'd one
for everything the runner and a user can see (output, exit code, environment, session, parent, command
line), and the runner execs again when the server is gone."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from tunnel_lab.lab.runner.forkserver import ForkedProcess, ForkServer, open_launcher
from tunnel_lab.lab.runner.procs import TUNNEL_LAB, Component, ComponentError, child_env, run_command


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


async def test_a_forked_command_is_what_exec_would_have_started(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = child_env({"TUNNEL_LAB_STATE": str(state)})
    server = ForkServer(child_env())
    with trio.fail_after(60):
        async with open_launcher(server) as launcher:
            assert launcher is not None and launcher.broken is None
            out = await run_command([*TUNNEL_LAB, "tunnel", "create", "first"], env=env,
                                    log_path=tmp_path / "admin.log")
            assert "Created tunnel first with id" in out  # the state directory came from the environment
            assert (state / "credentials").is_dir()

            with pytest.raises(ComponentError, match=r"exit 1\): tunnel-lab: .*nosuch"):
                await run_command([*TUNNEL_LAB, "tunnel", "info", "nosuch"], env=env,
                                  log_path=tmp_path / "admin.log")
            with pytest.raises(ComponentError, match=r"exit 2\)"):
                await run_command([*TUNNEL_LAB, "tunnel", "--no-such-flag"], env=env,
                                  log_path=tmp_path / "admin.log")

            ready = tmp_path / "origin.ready.json"
            argv = [*TUNNEL_LAB, "origin", "echo", "--listen", "127.0.0.1:0", "--state", str(state),
                    "--ready-file", str(ready), "--history", str(tmp_path / "history.jsonl")]
            origin = Component("origin:app", argv, tmp_path / "origin.log", env=env, ready_file=ready)
            await origin.start()
            assert isinstance(origin.process, ForkedProcess)
            pid = origin.process.pid
            await origin.wait_ready_file(30)
            assert os.getsid(pid) == pid  # its own session, as start_new_session gives
            assert _parent(pid) == os.getpid()  # handed to the runner, which reaps it
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert cmdline.startswith(" ".join(argv))
            origin.send_signal(signal.SIGKILL)
            assert await origin.process.wait() == -signal.SIGKILL
            assert origin.process.returncode == -signal.SIGKILL
    server.close()
    assert server.process.returncode is not None


async def test_without_a_server_the_runner_execs(tmp_path: Path) -> None:
    env = child_env({"TUNNEL_LAB_STATE": str(tmp_path / "state")})
    server = ForkServer(child_env())
    with trio.fail_after(60):
        async with open_launcher(server) as launcher:
            assert launcher is not None
            server.process.kill()
            server.process.wait()
            out = await run_command([*TUNNEL_LAB, "tunnel", "create", "first"], env=env,
                                    log_path=tmp_path / "admin.log")
            assert "Created tunnel first" in out
            assert launcher.broken is not None  # said once; every later process is exec'd
    server.close()
    with trio.fail_after(60):
        async with open_launcher(None) as none:
            assert none is None
            out = await run_command([*TUNNEL_LAB, "tunnel", "create", "second"], env=env,
                                    log_path=tmp_path / "admin.log")
            assert "Created tunnel second" in out
