"""lab.paths: where the state directory is and how it is created."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from tunnel_lab.lab import paths
from tunnel_lab.wire.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TUNNEL_LAB_STATE", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_flag_beats_env_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNEL_LAB_STATE", str(tmp_path / "env"))
    assert paths.state_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert paths.state_dir(None) == tmp_path / "env"
    monkeypatch.delenv("TUNNEL_LAB_STATE")
    assert paths.state_dir(None) == tmp_path / "home" / ".local" / "state" / "tunnel-lab"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert paths.state_dir(None) == tmp_path / "xdg" / "tunnel-lab"
    assert paths.state_dir("") == tmp_path / "xdg" / "tunnel-lab"  # an empty flag means "not given"


def test_created_private_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    got = paths.state_dir("rel/state")
    assert got == tmp_path / "rel" / "state" and got.is_absolute()
    assert stat.S_IMODE(os.stat(got).st_mode) == 0o700
    assert paths.state_dir("~/st") == tmp_path / "home" / "st"


def test_unusable_state_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--state"):
        paths.state_dir(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="cannot create state directory"):
        paths.state_dir(str(tmp_path / "file" / "below"))


def test_layout_helpers(tmp_path: Path) -> None:
    import uuid

    tid = uuid.UUID(int=1)
    assert paths.db_path(tmp_path) == tmp_path / "state.db"
    assert paths.pki_dir(tmp_path) == tmp_path / "pki"
    assert paths.credentials_path(tmp_path, tid) == tmp_path / "credentials" / f"{tid}.json"
    assert paths.edge_json_path(tmp_path) == tmp_path / "edge.json"
    assert paths.api_token_path(tmp_path) == tmp_path / "api-token"


def test_api_token_created_once(tmp_path: Path) -> None:
    tokens: list[str] = []
    threads = [threading.Thread(target=lambda: tokens.append(paths.api_token(tmp_path))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(tokens) == 6 and len(set(tokens)) == 1
    assert len(tokens[0]) == 64
    assert stat.S_IMODE(os.stat(paths.api_token_path(tmp_path)).st_mode) == 0o600
    assert paths.api_token(tmp_path) == tokens[0]


def test_without_state_skips_both_spellings_of_the_option() -> None:
    argv = ["--state", "/s", "route", "--state=/t", "ip", "--", "--state", "x"]
    assert list(paths.without_state(argv)) == [(2, "route"), (4, "ip"), (5, "--")]


def test_sandbox_and_admin_read_argv_without_the_state_option() -> None:
    from tunnel_lab.lab import admin, sandbox

    assert sandbox._drop_state(["--state", "/s", "-x", "--", "--state", "y"]) == ["-x", "--", "--state", "y"]
    assert admin._expand_route_ip_shorthand(["--state", "/s", "route", "ip", "10.0.0.0/8", "t"]) == [
        "--state", "/s", "route", "ip", "add", "10.0.0.0/8", "t"]
    assert admin._expand_route_ip_shorthand(["route", "ip", "show"]) == ["route", "ip", "show"]
