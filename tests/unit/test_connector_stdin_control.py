"""`--stdin-control` command parsing and the flag's status."""

from __future__ import annotations

from tests.unit.test_connector_cli import TUNNEL_ID, settings_for
from tests.unit.test_connector_cli import lab as lab  # a fixture
from tunnel_lab.connector.flags import FLAGS
from tunnel_lab.connector.stdin_control import BadArgument, Help, Reconnect, Unknown, parse_command


def test_reconnect_commands() -> None:
    assert parse_command("reconnect") == Reconnect(0.0)
    assert parse_command("reconnect\n") == Reconnect(0.0)
    assert parse_command("reconnect 0s") == Reconnect(0.0)
    assert parse_command("reconnect 15s\r\n") == Reconnect(15.0)
    assert parse_command("reconnect 1m30s") == Reconnect(90.0)
    assert parse_command("reconnect 250ms") == Reconnect(0.25)


def test_other_lines() -> None:
    assert parse_command("") is None
    assert parse_command("\n") is None
    assert parse_command("help") == Help()
    assert parse_command("restart now") == Unknown("restart now")
    # Go's time.ParseDuration error, which cloudflared logs as it is
    assert parse_command("reconnect soon") == BadArgument("reconnect soon", 'time: invalid duration "soon"')


def test_flag_is_implemented() -> None:
    flag = next(f for f in FLAGS if f.name == "stdin-control")
    assert flag.support == "yes" and flag.env == ("STDIN_CONTROL",) and flag.usage


def test_cli_sets_stdin_control(lab: object) -> None:
    argv = ["tunnel", "--edge", "127.0.0.1:1", "run", "--credentials-file", "creds.json", TUNNEL_ID]
    assert settings_for(argv)[0].stdin_control is False
    assert settings_for([*argv[:1], "--stdin-control", *argv[1:]])[0].stdin_control is True
    assert settings_for(argv, {"STDIN_CONTROL": "true"})[0].stdin_control is True
