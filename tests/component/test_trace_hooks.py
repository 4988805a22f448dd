"""The protocol trace's hooks on both tunnel ends (TunnelPair): registration, a request's frames, the
origin heads, and no secret anywhere (docs/trace.md)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import trio

from tests.component.connector_edge import RawOrigin, http_rule
from tests.component.tunnel_pair import open_tunnel_pair, request_headers
from tunnel_lab.edge.live import trace_answer
from tunnel_lab.transport.trace import RayRing, Tracer
from tunnel_lab.wire.headers import first_value
from tunnel_lab.wire.trace import VERSION

COOKIE = b"session=sekrit-cookie-value-123"
BEARER = b"Bearer sekrit-bearer-token-456"


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_both_ends_trace_a_registration_and_a_request(tmp_path: Path) -> None:
    origin = RawOrigin(lambda rec: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                       b"Set-Cookie: id=sekrit-set-cookie\r\nX-Seen: yes\r\n\r\nhello")
    edge_file, conn_file = tmp_path / "edge.jsonl", tmp_path / "connector.jsonl"
    edge_trace = Tracer(edge_file, component="edge", ring=RayRing())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(origin.serve)
            connector_trace = Tracer(conn_file, component="connector")
            async with open_tunnel_pair(tmp_path, (http_rule(port),), edge_trace=edge_trace,
                                        trace=connector_trace) as pair:
                secret = pair.connector_conn.settings.credentials.tunnel_secret
                headers = request_headers("POST", "/x?y=1", ((b"Content-Length", b"4"), (b"Cookie", COOKIE),
                                                            (b"Authorization", BEARER)))
                ray = (first_value(headers, b"cf-ray") or b"").decode()
                stream = await pair.edge_conn.open_stream(headers, end_stream=False)
                await stream.send(b"ping", end=True)
                await stream.response_headers()
                while (item := await stream.receive()) is not None:
                    await stream.ack(item[1])
                await stream.release()
                tunnel_id = str(pair.edge_conn.registration.tunnel_id)  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()
    edge_trace.close()
    connector_trace.close()
    edge, conn = _records(edge_file), _records(conn_file)
    for records in (edge, conn):
        assert all(r["v"] == VERSION for r in records)
        assert records[0]["kind"] == "trace.start" and records[-1]["kind"] == "trace.end"
        assert records[-1]["dropped"] == 0
        times = [r["t"] for r in records]
        assert times == sorted(times)
        assert not [r for r in records if r["kind"] in ("trace.error", "h2.undecodable", "rpc.undecodable")]
        text = "\n".join(json.dumps(r) for r in records)
        for leak in (base64.b64encode(secret).decode(), "sekrit", secret.hex()):
            assert leak not in text
    # registration, decoded on both sides, in both directions
    for records, sent in ((conn, "out"), (edge, "in")):
        [call] = [r for r in records if r.get("method") == "registerConnection" and r["message"] == "call"]
        assert call["dir"] == sent and call["params"]["tunnel_id"] == tunnel_id
        assert call["params"]["auth"]["tunnel_secret"] == "<redacted>"
        [answer] = [r for r in records
                    if r.get("method") == "registerConnection" and r["message"] == "return"]
        assert answer["results"]["connection_details"]["location_name"] == "LAB1"
        assert any(r.get("method") == "updateLocalConfiguration" for r in records)
    # after registration the edge's records carry the tunnel; the request's frames carry the ray
    edge_frames = [r for r in edge if r["kind"] == "h2.frame" and r.get("ray") == ray]
    assert {f["type"] for f in edge_frames} >= {"HEADERS", "DATA"}
    [request_headers_frame] = [f for f in edge_frames if f["type"] == "HEADERS" and f["dir"] == "out"]
    assert request_headers_frame["tunnel"] == tunnel_id and request_headers_frame["dc"] == "LAB1"
    fields = dict(map(tuple, request_headers_frame["headers"]))
    assert fields[":path"] == "/x?y=1" and fields["cookie"] == "<redacted>"
    [response] = [f for f in edge_frames if f["type"] == "HEADERS" and f["dir"] == "in"]
    assert ["Set-Cookie", "<redacted>"] in response["origin_headers"]
    bodies = [r for r in edge if r["kind"] == "h2.body" and r.get("ray") == ray]
    assert {(b["dir"], b["length"], b["head"]) for b in bodies} == {("out", 4, "ping"), ("in", 5, "hello")}
    # the connector: classification and the origin heads, tied by the ray
    assert any(r["kind"] == "stream.classified" and r["stream_kind"] == "http" and r["ray"] == ray
               for r in conn)
    [origin_request] = [r for r in conn if r["kind"] == "origin.request"]
    assert origin_request["method"] == "POST" and origin_request["target"] == "/x?y=1"
    assert origin_request["ray"] == ray and origin_request["conn_uuid"]
    assert ["Cookie", "<redacted>"] in origin_request["headers"]
    assert ["Authorization", "<redacted>"] in origin_request["headers"]
    [origin_response] = [r for r in conn if r["kind"] == "origin.response"]
    assert origin_response["status"] == 200 and origin_response["ray"] == ray
    # the edge's ring holds what the file holds for the ray, in order, and the live view draws it
    assert [json.loads(line) for line in edge_trace.ring.get(ray)[0]] == [  # type: ignore[union-attr]
        r for r in edge if r.get("ray") == ray]
    answer = trace_answer(edge_trace, ray)
    assert answer["status"] == "ok" and answer["problems"] == [] and answer["omitted"] == 0
    assert [(s["source"], s["target"], s["kind"]) for s in answer["steps"]][:2] == [
        ("Edge", "Connector", "h2.frame"), ("Edge", "Connector", "h2.frame")]
    assert answer["steps"][0]["text"] == "HEADERS stream 3 POST /x?y=1"


def test_a_tracer_that_cannot_keep_up_drops_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path, component="edge", max_items=2)
    with tracer._cond:  # hold the writer thread back: the queue fills
        for i in range(10):
            tracer._put((0.0, "event", None, {"kind": "x", "i": i}, 0))
    tracer.close()
    records = _records(path)
    assert records[-1]["kind"] == "trace.end" and records[-1]["dropped"] >= 8
    assert len([r for r in records if r["kind"] == "x"]) + records[-1]["dropped"] == 10


def test_dropped_bytes_end_that_connections_decoding_with_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path, component="edge", max_bytes=100)
    conn = tracer.connection(h2_client_out=True)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # preface + SETTINGS
    conn.sent(preface)
    with tracer._cond:  # the writer thread is held back: the next write does not fit in the byte budget
        conn.sent(b"\0" * 200)
    conn.sent(bytes.fromhex("000000040100000000"))  # SETTINGS ACK: undecodable after the gap
    tracer.close()
    kinds = [r["kind"] for r in _records(path)]
    assert kinds == ["trace.start", "h2.preface", "h2.frame", "trace.gap", "trace.end"]
    assert _records(path)[-1]["dropped"] == 1
