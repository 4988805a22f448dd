"""The multi-process edge's pure parts: control messages and the forwarding preamble (wire.edge_link), the
merge of history and metrics (edge.state), the configuration across the process boundary and the mirrored
faults (edge.worker), the split of data centres (edge.cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.edge.cluster import check_supported, split_locations
from tunnel_lab.edge.config import Address, EdgeConfig, TunnelListen
from tunnel_lab.edge.state import Faults, MergedHistory, Metrics, Registry
from tunnel_lab.edge.worker import MirroredFaults, config_from_json, config_to_json, fault_to_json
from tunnel_lab.wire.edge_link import (
    MAX_FRAME,
    MAX_LINE,
    MAX_PREAMBLE,
    PARENT_OPS,
    WORKER_OPS,
    Forwarded,
    FrameDecoder,
    LineDecoder,
    encode_frame,
    encode_message,
    forward_preamble,
    parse_forward_preamble,
)
from tunnel_lab.wire.errors import ConfigError, ProtocolError

messages = st.fixed_dictionaries({"op": st.sampled_from(sorted(PARENT_OPS))},
                                 optional={"id": st.integers(0, 2**40), "args": st.dictionaries(
                                     st.text(max_size=5), st.text(max_size=20) | st.integers(), max_size=4)})


@given(st.lists(messages, max_size=5), st.integers(1, 50))
def test_messages_survive_any_split(msgs, size):
    data = b"".join(encode_message(**m) for m in msgs)
    decoder = LineDecoder(PARENT_OPS)
    got = []
    for i in range(0, len(data), size):
        got += decoder.feed(data[i:i + size])
    assert got == msgs and decoder.pending == 0


def test_an_incomplete_line_waits():
    decoder = LineDecoder(WORKER_OPS)
    assert decoder.feed(b'{"op":"took","fault":"f1"') == []
    assert decoder.feed(b'}\n{"op":"ready"') == [{"op": "took", "fault": "f1"}]
    assert decoder.pending == len(b'{"op":"ready"')


@pytest.mark.parametrize(("line", "why"), [
    (b"not json\n", "not JSON"),
    (b"[1,2]\n", "not a JSON object"),
    (b'{"id":1}\n', "unknown control message op=None"),
    (b'{"op":"start"}\n', "unknown control message op='start'"),  # a parent op, from a worker
])
def test_bad_lines_are_refused_saying_why(line, why):
    with pytest.raises(ProtocolError, match=why):
        LineDecoder(WORKER_OPS).feed(line)


def test_lines_are_bounded_both_ways():
    with pytest.raises(ProtocolError, match="over"):
        LineDecoder(WORKER_OPS).feed(b"x" * (MAX_LINE + 1))
    with pytest.raises(ProtocolError, match="over the"):
        encode_message("reply", result="x" * MAX_LINE)


@pytest.mark.parametrize(("ip", "scheme"), [("127.0.0.1", "http"), ("::1", "https"), ("10.1.2.3", "https")])
def test_forward_preamble_round_trip(ip, scheme):
    line = forward_preamble(ip, scheme)
    assert line.endswith(b"\r\n")
    assert parse_forward_preamble(line[:-2]) == Forwarded(client_ip=ip, scheme=scheme)
    assert line.count(b" ") == 2  # the http(s) preamble as before warp and udp were forwarded


@given(st.ip_addresses().map(str), st.integers(0, 65535), st.ip_addresses().map(str), st.integers(1, 65535))
def test_warp_and_udp_preambles_round_trip(ip, port, dest_ip, dest_port):
    warp = forward_preamble(ip, "warp", client_port=port)
    assert parse_forward_preamble(warp[:-2]) == Forwarded(client_ip=ip, scheme="warp", client_port=port)
    udp = forward_preamble(ip, "udp", client_port=port, destination=(dest_ip, dest_port))
    assert len(udp) - 2 <= MAX_PREAMBLE
    assert parse_forward_preamble(udp[:-2]) == Forwarded(client_ip=ip, scheme="udp", client_port=port,
                                                         destination=(dest_ip, dest_port))


@pytest.mark.parametrize(("line", "why"), [
    (b"GET / HTTP/1.1", "not a forwarding preamble"),
    (b"TLFWD1 nonsense http", "bad client address"),
    (b"TLFWD1 127.0.0.1 ftp", "none of http, https, warp, udp"),
    (b"TLFWD1 " + b"1" * 200 + b" http", "over"),
    (b"TLFWD1 127.0.0.1 http 80", "http takes 3 fields, not 4"),
    (b"TLFWD1 127.0.0.1 warp", "warp takes 4 fields, not 3"),
    (b"TLFWD1 127.0.0.1 warp -1", "bad client port"),
    (b"TLFWD1 127.0.0.1 warp 70000", "client port 70000 out of range"),
    (b"TLFWD1 127.0.0.1 udp 5000 10.0.0.1", "udp takes 6 fields, not 5"),
    (b"TLFWD1 127.0.0.1 udp 5000 dns.test 53", "bad destination"),
    (b"TLFWD1 127.0.0.1 udp 5000 10.0.0.1 0", "destination port 0 out of range"),
])
def test_bad_preambles_are_refused(line, why):
    with pytest.raises(ProtocolError, match=why):
        parse_forward_preamble(line)


def test_forward_preamble_refuses_bad_input():
    with pytest.raises(ProtocolError):
        forward_preamble("127.0.0.1", "gopher")
    with pytest.raises(ProtocolError, match="destination comes with udp"):
        forward_preamble("127.0.0.1", "udp", client_port=1)
    with pytest.raises(ProtocolError, match="destination comes with udp"):
        forward_preamble("127.0.0.1", "warp", client_port=1, destination=("10.0.0.1", 53))
    with pytest.raises(ValueError):
        forward_preamble("not-an-ip", "http")


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 40))
def test_udp_frames_survive_any_split(datagrams, size):
    wire = b"".join(encode_frame(d) for d in datagrams)
    decoder = FrameDecoder()
    out = [d for i in range(0, len(wire), size) for d in decoder.feed(wire[i:i + size])]
    assert out == datagrams and decoder.pending == 0


def test_udp_frames_are_bounded():
    assert encode_frame(b"x" * MAX_FRAME)[:2] == b"\xff\xff"
    with pytest.raises(ProtocolError, match="does not fit a frame"):
        encode_frame(b"x" * (MAX_FRAME + 1))
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x05abc") == [] and decoder.pending == 5  # a frame cut short: held


def test_merged_history_renumbers_and_never_repeats():
    merged = MergedHistory()
    merged.absorb(0, [{"seq": 1, "time": 1.0, "path": "/a"}, {"seq": 2, "time": 2.0, "path": "/b"}])
    merged.absorb(1, [{"seq": 1, "time": 1.5, "path": "/c"}])
    merged.absorb(0, [{"seq": 2, "time": 2.0, "path": "/b"}, {"seq": 3, "time": 3.0, "path": "/d"}])
    assert [(e["seq"], e["path"], e["worker"], e["worker_seq"]) for e in merged.since(0)] == [
        (1, "/a", 0, 1), (2, "/b", 0, 2), (3, "/c", 1, 1), (4, "/d", 0, 3)]
    assert merged.since(3) == merged.since(0)[3:] and merged.cursors == {0: 3, 1: 1}


def test_metrics_merge_adds_series_and_keeps_the_parents():
    parent, worker0, worker1 = Metrics(), Metrics(), Metrics()
    parent.faults.inc(kind="latency")
    worker0.requests.inc(status=200, outcome="ok")
    worker1.requests.inc(2, status=200, outcome="ok")
    worker1.requests.inc(status=530, outcome="no-connection")
    snaps = [json.loads(json.dumps(m.snapshot())) for m in (worker0, worker1)]  # through the channel
    merged = parent.merged(snaps)
    text = merged.render(Registry())
    assert 'tunnel_lab_edge_requests_total{outcome="ok",status="200"} 3' in text
    assert 'tunnel_lab_edge_requests_total{outcome="no-connection",status="530"} 1' in text
    assert 'tunnel_lab_edge_faults_total{kind="latency"} 1' in text
    assert parent.requests.values == {}  # the merge made a new object
    merged.merged([{"unknown_total": [[[], 1]]}])  # a name this version does not know is ignored


def test_config_crosses_the_process_boundary_unchanged(tmp_path: Path):
    config = EdgeConfig(state_dir=tmp_path, tunnel_listens=(TunnelListen("LAB1", Address("127.0.0.1", 0)),
                                                            TunnelListen("LAB2", Address("::1", 7844))),
                        http_listens=(Address("127.0.0.1", 8080), Address("::1", 8080)),
                        https_listens=(Address("127.0.0.1", 0),), origin_timeout=5.0, quic=False,
                        udp_forwards=((("127.0.0.1", 0), ("10.0.0.53", 53)),), trace=tmp_path / "t")
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config
    with pytest.raises(ProtocolError, match="unknown fields"):
        config_from_json({**config_to_json(config), "bogus": 1})


def test_mirrored_faults_report_what_they_use():
    parent = Faults()
    parent.add("refuse-registrations", {"cause": "no", "should_retry": False}, remaining=2)
    parent.add("latency", {"ms": 5})
    taken: list[str] = []
    mirror = MirroredFaults(taken.append)
    mirror.replace(json.loads(json.dumps([fault_to_json(f) for f in parent.active.values()])))
    assert mirror.latency() == 0.005 and taken == []
    assert mirror.take_registration_refusal() == ("no", False)
    assert taken == ["f1"] and mirror.active["f1"].remaining == 1
    assert mirror.take_registration_refusal() == ("no", False)
    assert taken == ["f1", "f1"] and "f1" not in mirror.active
    assert mirror.take_registration_refusal() is None and taken == ["f1", "f1"]


def test_mirrored_quic_refusals_are_reported():
    taken: list[str] = []
    mirror = MirroredFaults(taken.append)
    mirror.replace([{"id": "f3", "kind": "quic-refuse-handshake", "params": {}, "created": 0,
                     "remaining": 1}])
    assert mirror.take_quic_handshake_refusal("LAB1") is not None
    assert taken == ["f3"] and mirror.take_quic_handshake_refusal("LAB1") is None


def test_data_centres_are_dealt_out_in_turn(tmp_path: Path):
    listens = tuple(TunnelListen(f"LAB{i}", Address("127.0.0.1", 0)) for i in range(1, 6))
    config = EdgeConfig(state_dir=tmp_path, tunnel_listens=listens)
    assert split_locations(config, 2) == [["LAB1", "LAB3", "LAB5"], ["LAB2", "LAB4"]]
    assert split_locations(config, 1) == [["LAB1", "LAB2", "LAB3", "LAB4", "LAB5"]]
    with pytest.raises(ConfigError, match="6 processes need at least 6 data centres"):
        split_locations(config, 6)
    # the trace, warp and UDP forwards work in several processes now (docs/architecture.md)
    check_supported(EdgeConfig(state_dir=tmp_path, warp_listen=Address("127.0.0.1", 0), trace=tmp_path / "t",
                               udp_forwards=((("127.0.0.1", 0), ("10.0.0.1", 53)),)))
    # several addresses of one kind too; only one address given twice is refused (one socket, two listeners)
    check_supported(EdgeConfig(state_dir=tmp_path, https_listens=(Address("127.0.0.1", 0),
                                                                   Address("::1", 0))))
    with pytest.raises(ConfigError, match="given twice") as refused:
        check_supported(EdgeConfig(state_dir=tmp_path, http_listens=(Address("127.0.0.2", 0),
                                                                      Address("127.0.0.2", 0))))
    assert refused.value.source == "--http-listen"


def _exchange(headers, *, target="/x", has_body=False, websocket=False):
    from types import SimpleNamespace

    from tunnel_lab.wire.eyeball import EyeballRequest

    req = EyeballRequest(method="POST" if has_body else "GET", target=target, headers=tuple(headers),
                         scheme="http", client_ip="127.0.0.1", host="app.test")
    return SimpleNamespace(request=req, has_body=has_body, websocket=websocket)


def test_a_forwarded_request_leaves_this_hops_fields_behind():
    from tunnel_lab.edge.forward import _request_head

    head = _request_head(_exchange([(b"Host", b"app.test"), (b"Connection", b"keep-alive, X-Hop"),
                                    (b"X-Hop", b"gone"), (b"Keep-Alive", b"timeout=5"), (b"X-Kept", b"1"),
                                    (b"Transfer-Encoding", b"chunked")], has_body=True))
    assert [(bytes(n), bytes(v)) for n, v in head.headers] == [
        (b"host", b"app.test"), (b"x-kept", b"1"), (b"connection", b"close"),
        (b"transfer-encoding", b"chunked")]


def test_a_forwarded_request_gets_a_host_and_the_origin_form():
    from tunnel_lab.edge.forward import _request_head

    head = _request_head(_exchange([], target="http://app.test/a/b?c=d"))  # an h2 eyeball: no Host field
    assert head.target == b"/a/b?c=d" and (b"host", b"app.test") in head.headers
    upgrade = _request_head(_exchange([(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
                                      websocket=True))
    assert (b"connection", b"upgrade") in upgrade.headers and (b"upgrade", b"websocket") in upgrade.headers
    assert (b"connection", b"close") not in upgrade.headers
