"""lab/services.py over memory streams: the login transfer (held poll, approve, one-time hand-out), Host
routing, the API envelope on the wire, and a connection that sends junk."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from tunnel_lab.lab.api import LabError
from tunnel_lab.lab.loginflow import APPROVED_TTL, MAX_PENDING, LoginTransfers
from tunnel_lab.lab.services import Services, handle_services_connection
from tunnel_lab.lab.store import Store
from tunnel_lab.lab.v4api import LiveConnection, V4Api
from tunnel_lab.lab.v4base import mint_token

KEY = "AbC+/def0123456789="
CALLBACK = "https://login.cloudflareaccess.org/" + KEY
PEM = b"-----BEGIN ARGO TUNNEL TOKEN-----\nxyz\n-----END ARGO TUNNEL TOKEN-----\n"


async def no_live() -> Sequence[LiveConnection]:
    return ()


async def broken_live() -> Sequence[LiveConnection]:
    raise LabError("edge gone")


async def refuse_disconnect(edge_id: str) -> None:
    raise LabError(f"cannot drop {edge_id}")


@pytest.fixture
def services(tmp_path: Path) -> Services:
    issued: list[bytes] = []

    def issue() -> bytes:
        issued.append(PEM)
        return PEM

    return Services(V4Api(tmp_path, Store(tmp_path / "state.db")), no_live, LoginTransfers(issue, hold=40.0),
                    refuse_disconnect)


async def request(services: Services, method: str, host: str, target: str, body: bytes = b"",
                  headers: Sequence[tuple[str, str]] = ()) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection to the services handler."""
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_services_connection, server, services)
        hdrs = [("Host", host), ("Content-Length", str(len(body))), *headers]
        await client.send_all(conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b"")
        await client.send_all(conn.send(h11.Data(data=body)) or b"")
        await client.send_all(conn.send(h11.EndOfMessage()) or b"")
        status, got, data = 0, {}, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await client.receive_some()))
            elif isinstance(event, h11.Response):
                status = event.status_code
                got = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        await client.aclose()
    return status, got, bytes(data)


async def test_login_page_then_approve_wakes_the_held_poll(services: Services,
                                                          autojump_clock: trio.abc.Clock) -> None:
    status, headers, page = await request(
        services, "GET", "dash.cloudflare.com", "/argotunnel?aud=&callback=" + urllib.parse.quote(CALLBACK))
    assert status == 200 and headers["content-type"].startswith("text/html")
    form = re.search(rb'name="callback" value="([^"]+)"', page)
    assert form is not None and form.group(1).decode() == CALLBACK

    results: list[tuple[int, bytes]] = []

    async def poll() -> None:
        status, _, body = await request(services, "GET", "login.cloudflareaccess.org", "/" + KEY)
        results.append((status, body))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(10)  # virtual time: the poll is being held
        assert results == []
        approved = await request(services, "POST", "dash.cloudflare.com", "/argotunnel/approve",
                                 urllib.parse.urlencode({"callback": CALLBACK}).encode(),
                                 [("Content-Type", "application/x-www-form-urlencoded")])
        assert approved[0] == 200
    assert results == [(200, PEM)]
    # Handed out once: the next poll waits again and ends with a "not yet" (404, so cloudflared re-polls).
    assert (await request(services, "GET", "login.cloudflareaccess.org", "/" + KEY))[0] == 404


async def test_poll_without_approval_is_404_after_the_hold(services: Services,
                                                          autojump_clock: trio.abc.Clock) -> None:
    start = trio.current_time()
    status, _, body = await request(services, "GET", "login.cloudflareaccess.org", "/" + KEY)
    assert (status, body) == (404, b"waiting for login\n")
    assert trio.current_time() - start >= 40.0
    assert services.logins.pending == 0  # an unapproved key is not kept after its poll


async def test_unfetched_approvals_expire(services: Services, autojump_clock: trio.abc.Clock) -> None:
    for n in range(MAX_PENDING):
        form = urllib.parse.urlencode({"callback": f"{CALLBACK}{n}"}).encode()
        assert (await request(services, "POST", "dash.cloudflare.com", "/argotunnel/approve", form))[0] == 200
    await trio.sleep(APPROVED_TTL + 1)
    form = urllib.parse.urlencode({"callback": CALLBACK + "late"}).encode()
    assert (await request(services, "POST", "dash.cloudflare.com", "/argotunnel/approve", form))[0] == 200
    assert services.logins.pending == 1


async def test_bad_login_links(services: Services) -> None:
    evil = await request(services, "GET", "dash.cloudflare.com", "/argotunnel?callback=https://evil/x")
    assert evil[0] == 400
    bad = await request(services, "POST", "dash.cloudflare.com", "/argotunnel/approve", b"callback=nope")
    assert bad[0] == 400
    assert (await request(services, "GET", "dash.cloudflare.com", "/elsewhere"))[0] == 404
    assert (await request(services, "GET", "login.cloudflareaccess.org", "/"))[0] == 404


async def test_pending_logins_are_bounded(services: Services) -> None:
    for n in range(MAX_PENDING):
        form = urllib.parse.urlencode({"callback": f"{CALLBACK}{n}"}).encode()
        assert (await request(services, "POST", "dash.cloudflare.com", "/argotunnel/approve", form))[0] == 200
    form = urllib.parse.urlencode({"callback": CALLBACK + "x"}).encode()
    assert (await request(services, "POST", "dash.cloudflare.com", "/argotunnel/approve", form))[0] == 503


async def test_api_on_the_wire(services: Services, tmp_path: Path) -> None:
    token = mint_token(tmp_path)
    account = services.api.store.account_tag
    status, headers, body = await request(services, "GET", "api.cloudflare.com",
                                          f"/client/v4/accounts/{account}/cfd_tunnel",
                                          headers=[("Authorization", f"Bearer {token}")])
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["result_info"]["total_count"] == 0
    missing = await request(services, "GET", "api.cloudflare.com",
                            f"/client/v4/accounts/{account}/cfd_tunnel")
    assert missing[0] == 400 and json.loads(missing[2])["errors"][0]["code"] == 9106


async def test_api_without_the_edge_is_503_not_an_empty_list(services: Services, tmp_path: Path) -> None:
    token = mint_token(tmp_path)
    broken = Services(services.api, broken_live, services.logins, services.disconnect)
    status, _, body = await request(broken, "GET", "api.cloudflare.com",
                                    f"/client/v4/accounts/{services.api.store.account_tag}/cfd_tunnel",
                                    headers=[("Authorization", f"Bearer {token}")])
    assert status == 503 and "edge gone" in json.loads(body)["errors"][0]["message"]


async def test_junk_gets_a_400_and_the_handler_returns(services: Services) -> None:
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_services_connection, server, services)
            await client.send_all(b"\x16\x03\x01 not http\r\n\r\n")
            answer = bytearray()
            while b"\r\n\r\n" not in answer:
                answer += await client.receive_some()
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_quick_tunnel_endpoint(services: Services) -> None:
    status, headers, body = await request(services, "POST", "api.trycloudflare.com", "/tunnel",
                                          headers=[("Content-Type", "application/json")])
    result = json.loads(body)["result"]
    assert status == 200 and headers["content-type"] == "application/json"
    assert services.api.store.resolve_hostname(result["hostname"]) is not None
    assert (await request(services, "GET", "api.trycloudflare.com", "/tunnel"))[0] == 404


async def test_cleanup_drops_through_the_edge_or_says_so(services: Services, tmp_path: Path) -> None:
    token = mint_token(tmp_path)
    tunnel = services.api.store.create_tunnel("app")
    live_conn = LiveConnection(tunnel_id=str(tunnel.id), connector_id="c1", conn_index=0, edge_id="e1",
                               location="LAB1", remote="127.0.0.1:1", client_version="x", arch="y",
                               features=(), registered_at=0.0)
    dropped: list[str] = []

    async def one_live() -> Sequence[LiveConnection]:
        return (live_conn,)

    async def drop(edge_id: str) -> None:
        dropped.append(edge_id)

    target = f"/client/v4/accounts/{tunnel.account_tag}/cfd_tunnel/{tunnel.id}/connections"
    auth = [("Authorization", f"Bearer {token}")]
    working = Services(services.api, one_live, services.logins, drop)
    assert (await request(working, "DELETE", "api.cloudflare.com", target, headers=auth))[0] == 200
    assert dropped == ["e1"]
    failing = Services(services.api, one_live, services.logins, refuse_disconnect)
    status, _, body = await request(failing, "DELETE", "api.cloudflare.com", target, headers=auth)
    assert status == 503 and "cannot drop e1" in json.loads(body)["errors"][0]["message"]


async def test_a_body_over_the_limit_is_413_and_nothing_is_made(services: Services, tmp_path: Path) -> None:
    token = mint_token(tmp_path)
    target = f"/client/v4/accounts/{services.api.store.account_tag}/cfd_tunnel"
    body = json.dumps({"name": "big", "tunnel_secret": "A" * 70_000}).encode()
    status, _, answer = await request(services, "POST", "api.cloudflare.com", target, body,
                                      [("Authorization", f"Bearer {token}")])
    assert status == 413 and json.loads(answer)["errors"][0]["code"] == 1004
    assert services.api.store.list_tunnels() == []
