"""The edge's small pure parts: frame guard, flag parsing, fault validation, selectors, pages."""

from __future__ import annotations

import pytest

from tests.frames import FrameFactory
from tunnel_lab.edge.cli import build_parser, config_from_args
from tunnel_lab.edge.config import Address, parse_address, parse_tunnel_listen
from tunnel_lab.edge.pages import error_page, no_connection_page, no_route_page
from tunnel_lab.edge.state import Faults, History, parse_fault
from tunnel_lab.edge.warp import parse_destination
from tunnel_lab.wire.errors import ConfigError, ProtocolError
from tunnel_lab.wire.guard import FrameGuard

SETTINGS = FrameFactory().settings({0x3: 100})


def test_frame_guard_accepts_settings_then_frames_in_any_pieces():
    data = SETTINGS + FrameFactory().data(3, b"abcd")
    # A header claiming 16385 bytes: caught only if the guard kept track of where each frame ends.
    oversized = FrameFactory.raw(0x0, stream_id=5, length=16385)
    for step in (1, 2, 5, len(data)):
        guard = FrameGuard(16384)
        for i in range(0, len(data), step):
            guard.feed(data[i:i + step])
        guard.feed(oversized[:4])  # an incomplete header is only buffered
        with pytest.raises(ProtocolError, match="frame of 16385 bytes exceeds our MAX_FRAME_SIZE 16384"):
            guard.feed(oversized[4:])


def test_frame_guard_rejects_text_and_oversized_frames():
    with pytest.raises(ProtocolError, match="not an HTTP/2 SETTINGS frame"):
        FrameGuard(16384).feed(b"HTTP/1.1 400 Bad Request\r\n")
    guard = FrameGuard(16384)
    guard.feed(SETTINGS)
    with pytest.raises(ProtocolError, match="exceeds our MAX_FRAME_SIZE"):
        guard.feed(FrameFactory.raw(0x0, stream_id=3, length=1 << 16))


def test_addresses_and_tunnel_listeners():
    assert parse_address("127.0.0.2:0", source="x") == Address("127.0.0.2", 0)
    assert parse_address("[::1]:7844", source="x") == Address("::1", 7844)
    assert str(Address("::1", 1)) == "[::1]:1"
    assert parse_tunnel_listen("127.0.0.1:0", 3).location == "LAB3"
    assert parse_tunnel_listen("AMS=127.0.0.1:0", 1).location == "AMS"
    for bad in ("127.0.0.1", "x:y", "127.0.0.1:70000"):
        with pytest.raises(ConfigError):
            parse_address(bad, source="--http-listen")
    with pytest.raises(ConfigError, match="location"):
        parse_tunnel_listen("bad name=127.0.0.1:0", 1)


def test_command_line_to_config(tmp_path):
    args = build_parser().parse_args(["--state", str(tmp_path), "--tunnel-listen", "127.0.0.1:0",
                                      "--tunnel-listen", "X=127.0.0.2:0", "--http-listen", "127.0.0.1:0",
                                      "--origin-timeout", "5"])
    cfg = config_from_args(args)
    assert [t.location for t in cfg.tunnel_listens] == ["LAB1", "X"]
    assert cfg.origin_timeout == 5 and cfg.https_listens == () and cfg.api_listen == Address("127.0.0.1", 0)
    dup = build_parser().parse_args(["--state", str(tmp_path), "--tunnel-listen", "A=127.0.0.1:0",
                                     "--tunnel-listen", "A=127.0.0.2:0"])
    with pytest.raises(ConfigError, match="share a location"):
        config_from_args(dup)


def test_fault_validation():
    assert parse_fault({"kind": "latency", "ms": 5}) == ("latency", {"ms": 5})
    _, params = parse_fault({"kind": "refuse-registrations"})
    assert params == {"cause": "Unauthorized: Invalid tunnel secret", "should_retry": False}
    for bad in ({"kind": "nope"}, [], {"kind": "latency"}, {"kind": "latency", "ms": True},
                {"kind": "swap-cert", "location": "LAB1", "cert": "shiny"}, {"kind": "dc-down"},
                {"kind": "delay-registrations", "seconds": 1, "count": 0}):
        with pytest.raises(ConfigError):
            parse_fault(bad)


def test_counted_faults_are_used_up_in_order():
    faults = Faults()
    faults.add("refuse-registrations", {"cause": "A", "should_retry": True}, remaining=1)
    faults.add("refuse-registrations", {"cause": "B"}, remaining=2)
    taken = [faults.take_registration_refusal() for _ in range(4)]
    assert taken == [("A", True), ("B", False), ("B", False), None]
    assert faults.active == {}
    faults.add("latency", {"ms": 100})
    faults.add("latency", {"ms": 50})
    assert faults.latency() == pytest.approx(0.15)


def test_history_since():
    history = History(limit=3)
    for i in range(5):
        history.record(path=f"/{i}")
    assert [e["path"] for e in history.since(0)] == ["/2", "/3", "/4"]
    assert [e["seq"] for e in history.since(4)] == [5]


def test_pages_name_the_host_and_escape():
    headers, body = no_route_page("<evil>.test", "abc-LAB1")
    assert b"&lt;evil&gt;.test" in body and b"<evil>" not in body
    assert dict(headers)[b"content-length"] == str(len(body)).encode()
    assert b"Error 1033" in no_connection_page("a.test", "t", "r")[1]
    assert b"524" in error_page(524, "slow")[1]


def test_connect_destinations():
    assert parse_destination("10.0.0.1:22") == ("10.0.0.1", 22)
    assert parse_destination("[fd00::1]:443") == ("fd00::1", 443)
    for bad in ("example.com:22", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:99999"):
        with pytest.raises(ValueError):
            parse_destination(bad)
