"""`tunnel-lab login`: a cert.pem cloudflared can decode, for the state's account, never silently replaced."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from tunnel_lab.lab import login
from tunnel_lab.lab.store import Store
from tunnel_lab.lab.v4base import load_accounts


def decode(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    assert lines[0] == "-----BEGIN ARGO TUNNEL TOKEN-----" and lines[-1] == "-----END ARGO TUNNEL TOKEN-----"
    data: dict[str, str] = json.loads(base64.b64decode("".join(lines[1:-1])))
    return data


def test_login_writes_a_private_cert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, target = tmp_path / "state", tmp_path / "home" / ".cloudflared" / "cert.pem"
    assert login.main(["--state", str(state), "--path", str(target)]) == 0
    cert = decode(target)
    with Store(state / "state.db") as store:
        assert cert["accountID"] == store.account_tag
    accounts = load_accounts(state)
    assert cert["zoneID"] == accounts.zone_tag and accounts.knows(cert["apiToken"])
    assert set(cert) == {"zoneID", "accountID", "apiToken"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert str(target) in capsys.readouterr().out


def test_an_existing_cert_is_kept_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, target = tmp_path / "state", tmp_path / "cert.pem"
    target.write_text("mine")
    assert login.main(["--state", str(state), "--path", str(target)]) == 1
    assert target.read_text() == "mine" and "already exists" in capsys.readouterr().err
    assert login.main(["--state", str(state), "--path", str(target), "--force"]) == 0
    first = decode(target)["apiToken"]
    assert login.main(["--state", str(state), "--path", str(target), "--force"]) == 0
    second = decode(target)["apiToken"]
    assert first != second and load_accounts(state).knows(first) and load_accounts(state).knows(second)


def test_an_unusable_state_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert login.main(["--state", str(blocker), "--path", str(tmp_path / "cert.pem")]) == 1
    assert "--state: cannot create state directory" in capsys.readouterr().err
    assert not (tmp_path / "cert.pem").exists()
