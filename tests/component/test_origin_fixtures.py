"""Origin fixtures over real loopback sockets (port 0), driven by a strict h11 client or raw bytes."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from tunnel_lab.origin_fixtures import KINDS, History, OriginConfig, body_sha256, generate_body, serve_origin
from tunnel_lab.wire.errors import ConfigError

TIMEOUT = 10


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    http_version: bytes = b"1.1"

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def json(self) -> dict:
        return json.loads(self.body)


class Client:
    """A tiny strict HTTP/1.1 client (h11) on one connection: several requests with keep-alive."""

    def __init__(self, stream: trio.abc.Stream, *, max_event: int = 64 * 1024) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_event)

    async def request(self, method: str, target: str, headers: Sequence[tuple[str, str]] = (),
                      body: bytes | None = None, chunks: Sequence[bytes] | None = None,
                      trailers: Sequence[tuple[str, str]] = ()) -> Response:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [("Host", "origin.test"), *headers]
        if chunks is not None:
            hdrs.append(("Transfer-Encoding", "chunked"))
        elif body is not None:
            hdrs.append(("Content-Length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
        for piece in chunks or ([body] if body else []):
            out += self.conn.send(h11.Data(data=piece)) or b""
        out += self.conn.send(h11.EndOfMessage(headers=list(trailers))) or b""
        await self.stream.send_all(out)
        return await self.read_response()

    async def read_response(self) -> Response:
        resp: Response | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                resp = Response(event.status_code, list(event.headers), b"", http_version=event.http_version)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert resp is not None
                resp.body = bytes(body)
                resp.trailers = list(event.headers)
                return resp
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("connection closed before a response")


async def start(nursery: trio.Nursery, kind: str, config: OriginConfig | None = None
                ) -> tuple[tuple[str, int], OriginConfig]:
    config = config or OriginConfig()
    addr = await nursery.start(serve_origin, kind, "127.0.0.1", 0, config)
    return addr, config


async def fetch(addr: tuple[str, int], method: str, target: str, **kw) -> Response:
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        return await Client(stream, max_event=kw.pop("max_event", 64 * 1024)).request(method, target, **kw)


async def raw_exchange(addr: tuple[str, int], data: bytes, *, idle: float = 0.5) -> bytes:
    """Send raw bytes; collect everything until the server closes (or `idle` seconds of silence)."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(data)
        got = bytearray()
        while True:
            with trio.move_on_after(idle):
                piece = await stream.receive_some(65536)
                if not piece:
                    return bytes(got)
                got += piece
                continue
            return bytes(got)


# --- echo -----------------------------------------------------------------------------------------


async def test_echo_reports_the_request_exactly(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "echo")
        resp = await fetch(addr, "POST", "/x?y=1", headers=[("X-Custom", "a b"), ("x-lower", "v")],
                           body=b"hello")
    assert resp.status == 200
    assert resp.header(b"content-type") == b"application/json"
    assert resp.header(b"x-origin") == b"echo"
    doc = resp.json()
    assert list(doc) == ["method", "target", "http_version", "headers", "head", "framing", "body_length",
                         "body_sha256", "body"]
    assert doc["method"] == "POST"
    assert doc["target"] == "/x?y=1"
    assert doc["http_version"] == "1.1"
    # h11 sends names as given (case kept), in order; the echo keeps them raw.
    assert doc["headers"] == [["Host", "origin.test"], ["X-Custom", "a b"], ["x-lower", "v"],
                              ["Content-Length", "5"]]
    assert doc["head"] == ("POST /x?y=1 HTTP/1.1\r\nHost: origin.test\r\nX-Custom: a b\r\nx-lower: v\r\n"
                           "Content-Length: 5\r\n\r\n")
    assert doc["framing"] == "content-length"
    assert doc["body_length"] == 5
    assert doc["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert doc["body"] == "hello"
    [record] = config.history.records
    assert (record.method, record.target, record.status, record.body_length) == ("POST", "/x?y=1", 200, 5)
    assert record.headers[1] == ["X-Custom", "a b"]


async def test_echo_dechunks_and_digests_a_large_chunked_body(nursery: trio.Nursery) -> None:
    pieces = [bytes([i]) * 3000 for i in range(1, 5)]
    whole = b"".join(pieces)
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "echo")
        resp = await fetch(addr, "PUT", "/up", chunks=pieces, trailers=[("X-Sum", "abc")])
    doc = resp.json()
    assert doc["framing"] == "chunked"
    assert doc["body_length"] == len(whole) == 12000
    assert doc["body_sha256"] == hashlib.sha256(whole).hexdigest()
    assert doc["body"].encode("latin-1") == whole[:4096]
    assert config.history.records[0].trailers == [["X-Sum", "abc"]]


async def test_echo_head_gets_the_head_only_and_keep_alive_works(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "echo")
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            client = Client(stream)
            head = await client.request("HEAD", "/same")
            get = await client.request("GET", "/same")
            again = await client.request("GET", "/other")
    assert head.status == 200 and head.body == b""
    assert int(head.header(b"content-length") or 0) > 0
    assert get.json()["target"] == "/same" and again.json()["target"] == "/other"
    assert get.json()["framing"] == "none"
    # One connection carried all three.
    assert len({r.peer for r in config.history.records}) == 1
    assert [r.method for r in config.history.records] == ["HEAD", "GET", "GET"]


async def test_echo_keeps_odd_bytes_repeated_headers_and_pipelined_requests(nursery: trio.Nursery) -> None:
    raw = (b"GET /a HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nx-dup: 2\r\nX-Odd: caf\xe9 \x80\r\n"
           b"cookie: a=1\r\nCookie: b=2\r\n\r\n"
           b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nxyz")
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "echo")
        data = await raw_exchange(addr, raw, idle=3)
    parts = data.split(b"HTTP/1.1 200 OK\r\n")
    assert len(parts) == 3, data[:300]
    first = json.loads(parts[1].split(b"\r\n\r\n", 1)[1])
    second = json.loads(parts[2].split(b"\r\n\r\n", 1)[1])
    assert first["headers"] == [["Host", "h"], ["X-Dup", "1"], ["x-dup", "2"], ["X-Odd", "caf\xe9 \x80"],
                                ["cookie", "a=1"], ["Cookie", "b=2"]]
    assert first["head"].encode("latin-1") == raw.split(b"POST")[0]
    assert second["target"] == "/b" and second["body"] == "xyz"
    assert b"Connection: close" in parts[2]


async def test_echo_answers_100_continue(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "echo")
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            await stream.send_all(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                                  b"Content-Length: 2\r\n\r\n")
            first = await stream.receive_some(100)
            await stream.send_all(b"ok")
            rest = await stream.receive_some(65536)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_a_bad_second_request_on_a_kept_connection_gets_400(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "echo")
        data = await raw_exchange(addr, b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\nBAD\r\n\r\n", idle=3)
    first, second = data.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK") and second.startswith(b"400 Bad Request")
    assert [r.status for r in config.history.records] == [200]


@pytest.mark.parametrize("raw", [
    b"NONSENSE\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
])
async def test_echo_rejects_unframeable_requests_with_400(nursery: trio.Nursery, raw: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "echo")
        data = await raw_exchange(addr, raw, idle=3)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in data


async def test_a_failing_connection_never_takes_the_origin_down(nursery: trio.Nursery,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "stream")
        assert (await raw_exchange(addr, b"\x16\x03\x01 not http\r\n\r\n", idle=3)).startswith(
            b"HTTP/1.1 400 ")
        # A client that goes away in the middle of an endless event stream.
        stream = await trio.open_tcp_stream(*addr)
        await stream.send_all(b"GET /sse?n=0&interval=1ms HTTP/1.1\r\nHost: h\r\n\r\n")
        await stream.receive_some(65536)
        await stream.aclose()
        await trio.sleep(0.1)  # let the event stream hit the closed socket
        resp = await fetch(addr, "GET", "/status/200")
    assert resp.status == 200
    assert [r.status for r in config.history.records] == [200, 200]  # no head, no record
    # A client going away is routine: nothing above WARNING (the 400 is the one warning).
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == ["WARNING"]


async def test_http10_request_gets_an_answer_and_a_close(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "echo")
        data = await raw_exchange(addr, b"GET /old HTTP/1.0\r\n\r\nGET /ignored HTTP/1.0\r\n\r\n", idle=3)
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"Connection: close" in head.split(b"\r\n")
    doc = json.loads(body)
    assert (doc["target"], doc["http_version"], doc["headers"]) == ("/old", "1.0", [])


async def test_unknown_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown origin kind"):
        await serve_origin("nope", "127.0.0.1", 0)
    assert "echo" in KINDS


# --- WebSocket and TCP ------------------------------------------------------------------------------


async def ws_session(addr: tuple[str, int], messages: Sequence[str | bytes]) -> tuple[list, list]:
    """Handshake, send each message and a ping, then close; return (handshake events, echoes)."""
    stream = await trio.open_tcp_stream(*addr)
    ws = WSConnection(ConnectionType.CLIENT)
    events: list = []
    echoes: list = []
    async with stream:
        await stream.send_all(ws.send(Request(host="origin.test", target="/chat")))
        while not any(isinstance(e, AcceptConnection) for e in events):
            ws.receive_data(await stream.receive_some(65536))
            events += list(ws.events())
        for message in messages:
            msg = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
            await stream.send_all(ws.send(msg))
        await stream.send_all(ws.send(Ping(payload=b"p")))
        await stream.send_all(ws.send(CloseConnection(code=1000)))
        while True:
            data = await stream.receive_some(65536)
            ws.receive_data(data or None)
            done = False
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    done = True
                echoes.append(event)
            if done or not data:
                break
    return events, echoes


@pytest.mark.parametrize("kind", ["echo", "ws-echo"])
async def test_websocket_messages_are_echoed(nursery: trio.Nursery, kind: str) -> None:
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, kind)
        handshake, echoes = await ws_session(addr, ["hello", b"\x00\x01binary", "x" * 70000])
    accept = next(e for e in handshake if isinstance(e, AcceptConnection))
    assert (b"x-origin", kind.encode()) in accept.extra_headers
    texts = "".join(e.data for e in echoes if isinstance(e, TextMessage))
    binary = b"".join(e.data for e in echoes if isinstance(e, BytesMessage))
    assert texts == "hello" + "x" * 70000
    assert binary == b"\x00\x01binary"
    assert any(isinstance(e, Pong) and e.payload == b"p" for e in echoes)
    assert isinstance(echoes[-1], CloseConnection) and echoes[-1].code == 1000
    [record] = config.history.records
    assert record.websocket and record.status == 101 and record.target == "/chat"
    assert record.body_length == 5 + 8 + 70000
    assert "3 messages echoed" in record.note


async def test_ws_echo_refuses_plain_http(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "ws-echo")
        resp = await fetch(addr, "GET", "/")
    assert resp.status == 426


async def test_tcp_echo_echoes_bytes_and_records_them(nursery: trio.Nursery) -> None:
    payload = bytes(range(256)) * 1000
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "tcp-echo")
        stream = await trio.open_tcp_stream(*addr)
        got = bytearray()
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            while piece := await stream.receive_some(65536):
                got += piece
        while not config.history.records or not config.history.records[0].body_sha256:
            await trio.sleep(0.01)
    assert bytes(got) == payload
    [record] = config.history.records
    assert record.method == "TCP" and record.body_length == len(payload)
    assert record.body_sha256 == hashlib.sha256(payload).hexdigest()


# --- stream -----------------------------------------------------------------------------------------


async def test_stream_chunked_sse_and_trailers(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "stream")
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            client = Client(stream)
            chunked = await client.request("GET", "/chunked?n=3&size=10")
            sse = await client.request("GET", "/sse?n=4&interval=10ms")
            trailers = await client.request("GET", "/trailers")
    assert chunked.header(b"transfer-encoding") == b"chunked"
    assert chunked.body == b"chunk 0 c\nchunk 1 c\nchunk 2 c\n"
    assert sse.header(b"content-type") == b"text/event-stream"
    assert sse.body.count(b"data: event ") == 4 and sse.body.endswith(b"id: 3\ndata: event 3\n\n")
    assert trailers.header(b"trailer") == b"X-Body-Sha256, X-Trailer-Note"
    assert dict(trailers.trailers)[b"x-body-sha256"] == hashlib.sha256(trailers.body).hexdigest().encode()
    assert dict(trailers.trailers)[b"x-trailer-note"] == b"sent after the body"


async def test_stream_chunked_sends_separate_chunks_on_the_wire(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "stream")
        request = b"GET /chunked?n=2&size=4 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        data = await raw_exchange(addr, request)
    assert data.endswith(b"\r\n\r\n4\r\nchu\n\r\n4\r\nchu\n\r\n0\r\n\r\n")


@pytest.mark.parametrize("chunked", [False, True])
async def test_stream_large_is_deterministic_with_digest_up_front(nursery: trio.Nursery,
                                                                 chunked: bool) -> None:
    target = "/large?bytes=300001&seed=7" + ("&chunked=1" if chunked else "")
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "stream")
        resp = await fetch(addr, "GET", target)
    assert len(resp.body) == 300001
    digest = hashlib.sha256(resp.body).hexdigest()
    assert resp.header(b"x-body-sha256") == digest.encode() == body_sha256(300001, 7).encode()
    assert resp.body == b"".join(generate_body(300001, 7, block=1000))
    assert (resp.header(b"transfer-encoding") == b"chunked") is chunked
    assert body_sha256(300001, 8) != digest


@pytest.mark.parametrize("nbytes", [5000, (1 << 20) + 123])
async def test_stream_gzip(nursery: trio.Nursery, nbytes: int) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "stream")
        resp = await fetch(addr, "GET", f"/gzip?bytes={nbytes}")
    assert resp.header(b"content-encoding") == b"gzip"
    plain = gzip.decompress(resp.body)
    assert len(plain) == nbytes
    assert len(resp.body) < nbytes // 5  # numbered text lines compress well
    assert resp.header(b"x-uncompressed-sha256") == hashlib.sha256(plain).hexdigest().encode()
    assert plain.startswith(b"line 00000000: the quick brown fox")


async def test_stream_slow_and_trickle_take_their_time(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "stream")
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            await stream.send_all(b"GET /slow?delay=300ms HTTP/1.1\r\nHost: h\r\n\r\n")
            t0 = trio.current_time()
            first = await stream.receive_some(65536)
            slow_wait = trio.current_time() - t0
        t0 = trio.current_time()
        trickle = await fetch(addr, "GET", "/trickle?bytes=5&interval=0.05")
        trickle_time = trio.current_time() - t0
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert slow_wait >= 0.29
    assert trickle.body == b"trick" and trickle_time >= 0.19


async def test_stream_status_and_upload(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "stream")
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            client = Client(stream)
            teapot = await client.request("GET", "/status/418")
            empty = await client.request("GET", "/status/204")
            bad = await client.request("GET", "/status/99")
            upload = await client.request("POST", "/upload", chunks=[b"a" * 100000, b"b"])
            missing = await client.request("GET", "/nope")
    assert teapot.status == 418 and teapot.body == b"status 418\n"
    assert empty.status == 204 and empty.body == b""
    assert bad.status == 400
    assert upload.json() == {"body_length": 100001, "framing": "chunked",
                             "body_sha256": hashlib.sha256(b"a" * 100000 + b"b").hexdigest()}
    assert missing.status == 404
    assert [r.status for r in config.history.records] == [418, 204, 400, 200, 404]


# --- misbehave --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "message"), [
    ("/malformed-status", "illegal status line.*HTTP/1.1 OK"),
    ("/garbage", "illegal status line.*not HTTP"),
    ("/close-mid-body", "without sending complete message body"),
    ("/close-mid-body?chunked=1", "without sending complete message body"),
])
async def test_misbehave_breaks_a_strict_client(nursery: trio.Nursery, path: str, message: str) -> None:
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "misbehave")
        with pytest.raises(h11.RemoteProtocolError, match=message):
            await fetch(addr, "GET", path)
    assert config.history.records[0].target == path


async def test_misbehave_reset_sends_rst(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "misbehave")
        for path in ("/reset", "/reset?after=headers"):
            stream = await trio.open_tcp_stream(*addr)
            async with stream:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
                with pytest.raises(trio.BrokenResourceError) as info:
                    while await stream.receive_some(65536):
                        pass
            assert isinstance(info.value.__cause__, ConnectionResetError)
            assert info.value.__cause__.errno == errno.ECONNRESET
    assert [r.note for r in config.history.records] == ["reset before any answer", "reset after the headers"]


async def test_misbehave_never_answers_until_the_client_leaves(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "misbehave")
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            await stream.send_all(b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n")
            with trio.move_on_after(0.5) as waited:
                await stream.receive_some(65536)  # neither an answer nor a close
            assert waited.cancelled_caught
        [record] = config.history.records
        assert record.status is None and record.note == "never answered"


async def test_misbehave_huge_headers(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "misbehave")
        resp = await fetch(addr, "GET", "/huge-headers?bytes=300000", max_event=1 << 20)
        with pytest.raises(h11.RemoteProtocolError):
            await fetch(addr, "GET", "/huge-headers")  # 256 KiB: above h11's default 64 KiB limit
    huge = [v for k, v in resp.headers if k.startswith(b"x-huge-")]
    assert sum(len(v) for v in huge) == 300000 and resp.body == b"huge\n"


# --- hello ------------------------------------------------------------------------------------------


async def test_hello_is_the_connectors_hello_world_over_plain_http(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        addr, _ = await start(nursery, "hello")
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            client = Client(stream)
            health = await client.request("GET", "/_health")
            uptime = await client.request("GET", "/uptime")
    assert (health.status, health.body) == (200, b"ok")
    assert "startTime" in uptime.json()


# --- history ----------------------------------------------------------------------------------------


async def test_history_file_gets_one_json_line_per_request(nursery: trio.Nursery, tmp_path) -> None:
    path = tmp_path / "history.jsonl"
    with trio.fail_after(TIMEOUT):
        addr, config = await start(nursery, "stream", OriginConfig(history=History(path)))
        await fetch(addr, "GET", "/status/201")
        await fetch(addr, "POST", "/upload", body=b"12345")
        # The line is written when the server has finished the exchange, which can be just after
        # the client has read the whole response.
        while not path.exists() or len(path.read_text().splitlines()) < 2:
            await trio.sleep(0.01)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(d["seq"], d["method"], d["target"], d["status"], d["body_length"]) for d in lines] == [
        (1, "GET", "/status/201", 201, 0), (2, "POST", "/upload", 200, 5)]
    assert lines[1]["headers"][0] == ["Host", "origin.test"]
    assert [r.to_json() for r in config.history.records] == lines
