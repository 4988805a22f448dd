"""The edge's repeatable eyeball listen flags (`--http-listen`, `--https-listen`): parsed in order, a bad
or repeated address refused with the flag named (docs/edge.md, "Command line")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel_lab.edge.cli import build_parser, config_from_args
from tunnel_lab.edge.config import Address, EdgeConfig, parse_listens
from tunnel_lab.wire.errors import ConfigError


def config(tmp_path: Path, *flags: str) -> EdgeConfig:
    return config_from_args(build_parser().parse_args(["--state", str(tmp_path), *flags]))


def test_each_flag_takes_several_addresses_in_order(tmp_path: Path) -> None:
    cfg = config(tmp_path, "--http-listen", "127.0.0.1:80", "--http-listen", "[2001:db8::1]:80",
                 "--https-listen", "[::1]:443", "--https-listen", "127.0.0.1:443")
    assert cfg.http_listens == (Address("127.0.0.1", 80), Address("2001:db8::1", 80))
    assert cfg.https_listens == (Address("::1", 443), Address("127.0.0.1", 443))


def test_no_flag_no_listener(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cfg.http_listens == () and cfg.https_listens == ()


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--http-listen", "127.0.0.1", "bad address '127.0.0.1'"),
    ("--https-listen", "[::1]443", "bad address '[::1]443'"),
    ("--https-listen", "[::1:443", "bad address '[::1:443'"),
    ("--http-listen", "2001:db8::1:80", "an IPv6 address needs brackets"),
    ("--http-listen", "::1:80", "an IPv6 address needs brackets"),
    ("--https-listen", "127.0.0.1:65536", "bad address '127.0.0.1:65536'"),
])
def test_a_bad_address_names_the_flag_and_the_value(tmp_path: Path, flag: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, "--http-listen", "127.0.0.1:0", flag, value)
    text = str(caught.value)
    assert says in text and flag in text, text


def test_a_repeated_address_is_refused_but_port_zero_may_repeat() -> None:
    with pytest.raises(ConfigError, match=r"\[::1\]:80 is given twice"):
        parse_listens(["[::1]:80", "127.0.0.1:80", "[::1]:80"], source="--http-listen")
    assert parse_listens(["127.0.0.1:0", "127.0.0.1:0"], source="--http-listen") == (
        Address("127.0.0.1", 0), Address("127.0.0.1", 0))
