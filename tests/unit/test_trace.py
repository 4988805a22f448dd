"""The protocol trace's builders (wire/trace.py), its reader (lab/trace_view.py) and redaction: no secret
ever reaches a record (docs/trace.md)."""

from __future__ import annotations

import base64
import json
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import h2.config
import h2.connection
import hpack
from hypothesis import assume, given
from hypothesis import strategies as st

from tunnel_lab.lab import trace_view as tv
from tunnel_lab.wire import registration as reg
from tunnel_lab.wire.headers import RESPONSE_HEADERS, serialize_response_headers
from tunnel_lab.wire.rpc import RpcClient, RpcServer
from tunnel_lab.wire.trace import (
    H2FrameDecoder,
    QuicStreamDecoder,
    RpcDecoder,
    TraceRedactor,
    body_summary,
    datagram_record,
    http1_head_fields,
    tls_record,
)

RAY = "0123456789abcdef-LAB1"


def _params(secret: bytes) -> reg.RegisterConnectionParams:
    return reg.RegisterConnectionParams(
        auth=reg.TunnelAuth("acct", secret), tunnel_id=uuid.UUID(int=7), conn_index=1,
        options=reg.ConnectionOptions(client=reg.ClientInfo(b"\x01" * 16, ("serialized_headers",), "v1", "a"),
                                      origin_local_ip=b"\0" * 16))


def _dump(records: list[dict[str, Any]], redactor: TraceRedactor) -> str:
    return "\n".join(json.dumps(redactor.record(r)) for r in records)


def test_h2_frames_decoded_with_headers_bodies_and_the_ray() -> None:
    redactor = TraceRedactor()
    rays: dict[int, str] = {}
    out = H2FrameDecoder(direction="out", redactor=redactor, preface=True, rays=rays)
    back = H2FrameDecoder(direction="in", redactor=redactor, rays=rays)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    client.send_headers(3, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"a.test"),
                            (b":path", b"/up"), (b"cf-ray", RAY.encode()), (b"cookie", b"c=sekrit-cookie"),
                            (b"x-long", b"v" * 40000)])  # several frames: HEADERS + CONTINUATION
    client.send_data(3, b"hello body", end_stream=True)
    client_bytes = client.data_to_send()
    server.receive_data(client_bytes)
    server.send_headers(3, [(b":status", b"200"), (RESPONSE_HEADERS, serialize_response_headers(
        [(b"Set-Cookie", b"id=sekrit-set")]))])
    server.send_data(3, b"x" * 100, end_stream=False)
    server.reset_stream(3, 8)
    server_bytes = server.data_to_send()
    records = [r for i in range(0, len(client_bytes), 7) for r in out.feed(client_bytes[i:i + 7])]
    records += back.feed(server_bytes[:-1]) + back.feed(server_bytes[-1:])
    kinds = [(r["kind"], r.get("type")) for r in records]
    assert kinds[0] == ("h2.preface", None)
    assert ("h2.frame", "CONTINUATION") in kinds and ("h2.frame", "RST_STREAM") in kinds
    [request] = [r for r in records if r.get("type") == "HEADERS" and r["stream"] == 3 and "headers" in r
                 and r["headers"][0] == [":method", "POST"]]
    assert ["cookie", "<redacted>"] in request["headers"] and request["ray"] == RAY
    [response] = [r for r in records if r.get("type") == "HEADERS" and r.get("origin_headers")]
    assert response["origin_headers"] == [["Set-Cookie", "<redacted>"]] and response["ray"] == RAY
    bodies = [r for r in records if r["kind"] == "h2.body"]
    assert bodies[0] == {"kind": "h2.body", "stream": 3, "complete": True, "ray": RAY,
                         **body_summary(b"hello body")}
    assert bodies[1]["complete"] is False and bodies[1]["length"] == 100
    assert [r["error_code"] for r in records if r.get("type") == "RST_STREAM"] == ["CANCEL"]
    assert "sekrit" not in _dump(records, redactor)


def test_h2_garbage_is_reported_once_and_decoding_stops() -> None:
    decoder = H2FrameDecoder(direction="in", redactor=TraceRedactor(), preface=True)
    [record] = decoder.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert record["kind"] == "h2.undecodable" and "preface" in record["error"]
    assert decoder.feed(b"more") == []


def test_registration_conversation_decoded_both_ways() -> None:
    secret = b"S" * 32
    client, server, decoder = RpcClient(), RpcServer(), RpcDecoder()
    client.register_connection(_params(secret))
    sent = client.data_to_send()
    records = decoder.feed("out", sent)
    [event] = [e for e in server.receive_data(sent) if hasattr(e, "params")]
    server.answer_registration(event.question_id, reg.ConnectionDetails(uuid.UUID(int=9), "LAB1"))
    records += decoder.feed("in", server.data_to_send())
    messages = [(r["message"], r.get("method")) for r in records]
    assert messages == [("bootstrap", None), ("call", "registerConnection"), ("return", "bootstrap"),
                        ("return", "registerConnection")]
    call = records[1]
    assert call["params"]["auth"] == {"account_tag": "acct", "tunnel_secret": "<redacted>",
                                      "tunnel_secret_length": 32}
    assert call["params"]["tunnel_id"] == str(uuid.UUID(int=7)) and call["target"] == "promisedAnswer(0)"
    assert records[3]["results"] == {"connection_details": {
        "uuid": str(uuid.UUID(int=9)), "location_name": "LAB1", "tunnel_is_remotely_managed": False}}
    client.update_local_configuration(b'{"ingress":[{"service":"http_status:404"}]}')
    [config] = decoder.feed("out", client.data_to_send())[-1:]
    assert config["method"] == "updateLocalConfiguration"
    assert config["params"]["config"] == {"ingress": [{"service": "http_status:404"}]}


def test_rpc_garbage_is_reported_once() -> None:
    decoder = RpcDecoder()
    [record] = decoder.feed("in", b"\xff\xff\xff\xff" + b"\0" * 12)
    assert record["kind"] == "rpc.undecodable"
    assert decoder.feed("in", b"\0" * 16) == []


secrets = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=12,
                  max_size=40)
sensitive = st.sampled_from(["Authorization", "cookie", "Set-Cookie", "Cf-Access-Client-Secret",
                             "cf-access-jwt-assertion", "Proxy-Authorization", "CF-Access-Token"])


def _records_with(secret: str, name: str, tunnel_secret: bytes) -> str:
    """Every kind of record that can carry a credential, built with `secret` in each such place."""
    b64 = base64.b64encode(tunnel_secret).decode()
    redactor = TraceRedactor([b64])
    block = hpack.Encoder().encode([(b":method", b"GET"), (name.lower().encode(), secret.encode()),
                                    (b"x-note", f"Bearer {secret}".encode()), (b"x-cred", b64.encode())])
    frame = len(block).to_bytes(3, "big") + b"\x01\x05" + (3).to_bytes(4, "big") + block
    records = H2FrameDecoder(direction="in", redactor=redactor).feed(frame)
    client = RpcClient()
    client.register_connection(_params(tunnel_secret))
    records += RpcDecoder().feed("out", client.data_to_send())
    records.append({"kind": "origin.request", **http1_head_fields(
        f"GET /?token={secret} HTTP/1.1\r\n{name}: {secret}\r\nHost: a\r\n\r\n".encode(), redactor)})
    records.append({"kind": "eyeball.request", "headers": redactor.headers([(name, secret)])})
    return _dump(records, redactor)


@given(secret=secrets, name=sensitive,
       tunnel_secret=st.binary(min_size=32, max_size=32).filter(lambda b: len(set(b)) >= 5))
def test_no_secret_ever_appears_in_a_record(secret: str, name: str, tunnel_secret: bytes) -> None:
    # a "secret" that the records hold anyway (a header name, a run of hex zeros) proves nothing
    assume(secret not in _records_with("\u2603" * 12, name, tunnel_secret))
    text = _records_with(secret, name, tunnel_secret)
    b64 = base64.b64encode(tunnel_secret).decode()
    for leak in (secret, b64, base64.b64encode(b64.encode()).decode(), tunnel_secret.hex()):
        assert leak not in text
    assert "<redacted>" in text


def test_quic_streams_heads_bodies_and_rpc() -> None:
    from tunnel_lab.wire import quic_stream as qs

    redactor = TraceRedactor()
    decoder = QuicStreamDecoder(request_direction="in", redactor=redactor)
    request = qs.ConnectRequest(dest="http://a.test/x", type=qs.ConnectionType.HTTP,
                                metadata=(("HttpMethod", "GET"), ("HttpHeader:Cf-Ray", RAY),
                                          ("HttpHeader:Cookie", "c=sekrit")))
    data = qs.encode_connect_request(request) + b"body!"
    records = decoder.feed("in", 4, data[:5]) + decoder.feed("in", 4, data[5:], fin=True)
    head, body = records
    assert head["message"] == "ConnectRequest" and head["dest"] == "http://a.test/x" and head["ray"] == RAY
    assert ["HttpHeader:Cookie", "<redacted>"] in head["metadata"]
    assert body["kind"] == "quic.body" and body["length"] == 5 and body["ray"] == RAY
    response = qs.encode_connect_response(qs.ConnectResponse(metadata=(("HttpStatus", "200"),)))
    [answer] = decoder.feed("out", 4, response)
    assert answer["message"] == "ConnectResponse" and answer["ray"] == RAY
    [bad] = decoder.feed("in", 8, b"\x00" * 8)
    assert bad["kind"] == "quic.undecodable"
    client = RpcClient()
    client.register_connection(_params(b"z" * 32))
    assert [r["message"] for r in decoder.feed("out", 0, client.data_to_send())] == ["bootstrap", "call"]


def test_datagram_and_tls_and_head_records() -> None:
    from tunnel_lab.wire.datagram import encode_v2_session

    session = uuid.UUID(int=5)
    record = datagram_record(encode_v2_session(session, b"dns?"))
    assert record["session_id"] == str(session) and record["payload"]["length"] == 4
    assert "error" in datagram_record(b"")
    peer = {"subject": ((("commonName", "h2.cftunnel.com"),),), "issuer": ((("organizationName", "lab"),),),
            "subjectAltName": (("DNS", "h2.cftunnel.com"),)}
    tls = tls_record(version="TLSv1.3", cipher=("TLS_AES_128_GCM_SHA256", "TLSv1.3", 128), alpn="h2",
                     sni="h2.cftunnel.com", peer_cert=peer, side="client")
    assert tls["peer_subject"] == "CN=h2.cftunnel.com" and tls["peer_issuer"] == "O=lab"
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    fields = http1_head_fields(head, TraceRedactor())
    assert fields["method"] == "POST" and fields["headers"] == [["Host", "a"], ["Content-Length", "3"]]


# ---- the reader ---------------------------------------------------------------------------------------

def _line(**fields: Any) -> str:
    return json.dumps({"v": 1, "t": 1.0, **fields}) + "\n"


def test_reader_reports_what_it_cannot_read() -> None:
    lines = [_line(kind="trace.start"), "not json\n", _line(kind="h2.frame", type="PING"), '{"v": 1}\n',
             json.dumps({"v": 2, "t": 2.0, "kind": "h3.frame"}) + "\n", json.dumps({"kind": "x"}) + "\n",
             '{"v": 1, "t": 3, "kind": "h2.fr']
    trace = tv.read_trace(lines, "t.jsonl")
    assert [r["kind"] for r in trace.records] == ["trace.start", "h2.frame", "h3.frame"]
    problems = "\n".join(trace.problems)
    assert "t.jsonl:2: not JSON" in problems and "t.jsonl:4: not a trace record" in problems
    assert "t.jsonl:6: no format version" in problems and "t.jsonl:7: truncated" in problems
    assert "format version 2 (newer" in problems and "no trace.end record" in problems
    assert tv.read_trace([_line(kind="trace.end")], "ok").problems == []
    # every record renders, whatever its kind
    for r in trace.records:
        assert tv.event_line(r, start=0.0)


def test_select_and_sequence_and_diagrams() -> None:
    recs = [
        {"v": 1, "t": 1.0, "kind": "eyeball.request", "component": "edge", "ray": RAY, "method": "GET",
         "target": "/a;b#c", "host": "a.test"},
        {"v": 1, "t": 1.1, "kind": "h2.frame", "component": "edge", "conn": "edge#1", "dir": "out",
         "stream": 3, "type": "HEADERS", "flags": ["END_STREAM"], "ray": RAY,
         "headers": [[":method", "GET"], [":path", "/a"]]},
        {"v": 1, "t": 1.15, "kind": "h2.frame", "component": "connector", "dir": "in", "stream": 3,
         "type": "HEADERS", "ray": RAY, "headers": []},
        {"v": 1, "t": 1.2, "kind": "origin.request", "component": "connector", "ray": RAY, "method": "GET",
         "target": "/a", "http_version": "1.1", "stream": 3},
        {"v": 1, "t": 1.3, "kind": "origin.response", "component": "connector", "ray": RAY, "status": 200,
         "http_version": "1.1", "stream": 3},
        {"v": 1, "t": 1.4, "kind": "h2.frame", "component": "edge", "dir": "in", "stream": 3, "type": "DATA",
         "flags": ["END_STREAM"], "data_length": 2, "ray": RAY},
        {"v": 1, "t": 1.5, "kind": "eyeball.response", "component": "edge", "ray": RAY, "status": 200},
        {"v": 1, "t": 1.6, "kind": "h2.frame", "component": "edge", "stream": 5, "type": "PING"},
    ]
    assert len(tv.select(recs, ray=RAY)) == 7 and len(tv.select(recs, kinds=["h2"])) == 4
    assert len(tv.select(recs, stream=3, kinds=["origin"])) == 2
    steps = tv.sequence(recs, RAY)
    assert [(s.source, s.target) for s in steps] == [
        ("Eyeball", "Edge"), ("Edge", "Connector"), ("Connector", "Origin"), ("Origin", "Connector"),
        ("Connector", "Edge"), ("Edge", "Eyeball")]  # the connector's copy of the edge's frame is left out
    text = tv.mermaid(steps, RAY)
    assert text.startswith("sequenceDiagram")
    assert "Edge->>Connector: HEADERS stream 3 GET /a END_STREAM" in text
    assert ";" not in text.split("\n", 2)[2] and "#" not in text
    ET.fromstring(tv.svg(steps, RAY))  # well-formed
    assert tv.sequence(recs, "unknown") == [] and tv.rays(recs) == [RAY]
