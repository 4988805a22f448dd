"""The live view's routes without a browser: sign-in, the cookie's reach, and the event stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h11
import trio

from tests.component.test_edge_api import api
from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
)
from tunnel_lab.edge.live import COOKIE


async def get(edge: Any, target: str, cookie: str | None = None, method: str = "GET") -> Any:
    headers = [(b"cookie", f"{COOKIE}={cookie}".encode())] if cookie else []
    return await http_request(edge.bound["api"], method, target, host="api", headers=headers)


async def test_sign_in_trades_the_token_for_a_read_only_cookie(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, _):
            form = await get(edge, "/live")
            assert form.status == 200 and b'name="token"' in form.body and b"<script" not in form.body
            wrong = await get(edge, "/live?token=nope")
            assert wrong.status == 401 and b"Wrong token" in wrong.body
            assert wrong.header(b"set-cookie") is None
            ok = await get(edge, f"/live?token={edge.api_token}")
            assert ok.status == 303 and ok.header(b"location") == b"/live"
            cookie = (ok.header(b"set-cookie") or b"").decode()
            assert cookie.startswith(f"{COOKIE}={edge.api_token};")
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/live" in cookie
            page = await get(edge, "/live", cookie=edge.api_token)
            assert page.status == 200 and b"EventSource" in page.body
            assert b"script-src" in (page.header(b"content-security-policy") or b"")
            # the cookie opens the live view only: never the API, never a change
            assert (await get(edge, "/tunnels", cookie=edge.api_token)).status == 401
            assert (await get(edge, "/live", cookie=edge.api_token, method="POST")).status == 405
            assert (await get(edge, "/live/events", cookie="wrong")).status == 401
            assert (await get(edge, "/live/nothing", cookie=edge.api_token)).status == 404


class EventReader:
    """A client of `/live/events`: h11 undoes the chunked framing, this splits the events."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.buffer = bytearray()
        self.head: h11.Response | None = None

    async def open(self, token: str) -> None:
        request = h11.Request(method="GET", target="/live/events",
                              headers=[("host", "api"), ("authorization", f"Bearer {token}")])
        await self.stream.send_all(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))

    async def next(self, want: str) -> dict[str, Any]:
        """Read until an event named `want` arrives; its data."""
        while True:
            while b"\n\n" in self.buffer:
                raw, _, rest = bytes(self.buffer).partition(b"\n\n")
                self.buffer[:] = rest
                fields = dict(line.split(": ", 1) for line in raw.decode().splitlines()
                              if ": " in line and not line.startswith(":"))
                if fields.get("event") == want:
                    return dict(json.loads(fields["data"]))
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                self.head = event
            elif isinstance(event, h11.Data):
                self.buffer += event.data
            else:
                raise AssertionError(f"the event stream ended: {event!r}")


async def test_the_event_stream_follows_requests_faults_and_connections(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_edge(tmp_path) as (edge, nursery):
            tunnel = make_tunnel(edge, "t1", "app.test")
            host, port = edge.bound["api"].rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            events = EventReader(stream)
            await events.open(edge.api_token)
            first = await events.next("state")
            assert events.head is not None and events.head.status_code == 200
            assert dict(events.head.headers)[b"content-type"] == b"text/event-stream"
            assert first["connections"] == [] and first["tunnels"][0]["registered"] == 0
            assert [d["location"] for d in first["data_centres"]] == ["LAB1", "LAB2"]

            await registered(nursery, edge, tunnel, echo_handler)
            state = await events.next("state")
            while not state["connections"] or state["connections"][0]["state"] != "registered":
                state = await events.next("state")
            assert state["tunnels"][0]["registered"] == 1 and state["connections"][0]["age_s"] >= 0

            answer = await http_request(edge.bound["http"], "GET", "/via-live", host="app.test")
            assert answer.status == 200
            request = await events.next("request")
            assert request["path"] == "/via-live" and request["status"] == 200
            assert request["connection"] == state["connections"][0]["id"]

            status, fault = await api(edge, "POST", "/faults", {"kind": "goaway", "location": "LAB1"})
            assert status == 200
            seen = await events.next("fault")
            assert seen["id"] == fault["id"] and seen["kind"] == "goaway" and seen["affected"] == 1
            await stream.aclose()
