"""The edge for remotely managed tunnels over http2: configuration push on registration and through the
management API, and management.argotunnel.com routed to a connector of the token's tunnel."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import trio

from tests.component.test_edge_support import (
    _OPEN,
    ScriptedConnector,
    ServerStream,
    dial_edge,
    echo_handler,
    http_request,
    make_tunnel,
    running_edge,
    wait_history,
)
from tunnel_lab.lab.api import management_call
from tunnel_lab.lab.remote_config import RemoteConfigs, management_key
from tunnel_lab.wire import mgmt_token

CONFIG = {"ingress": [{"hostname": "app.test", "service": "http://127.0.0.1:1"},
                      {"service": "http_status:404"}]}
MANAGEMENT = "management.argotunnel.com"


class ConfigTaker:
    """A connector's side of update-configuration streams: applies newer versions, echoes the rest."""

    def __init__(self) -> None:
        self.version = -1
        self.received: list[dict[str, Any]] = []
        self.changed = trio.Event()

    async def __call__(self, s: ServerStream) -> None:
        if s.header(b"cf-cloudflared-proxy-connection-upgrade") != b"update-configuration":
            await echo_handler(s)
            return
        body = json.loads(await s.read_all())
        self.received.append(body)
        self.version = max(self.version, body["version"])
        answer = json.dumps({"lastAppliedVersion": self.version, "err": None}).encode()
        await s.respond(200, [(b"content-type", b"text/plain; charset=utf-8")])
        await s.send(answer, end=True)
        self.changed.set()
        self.changed = trio.Event()


async def connect(nursery: trio.Nursery, edge: Any, tunnel: Any, handler: Any, *,
                  connector_id: uuid.UUID, conn_index: int = 0) -> tuple[ScriptedConnector, Any]:
    tls = await dial_edge(edge)
    _OPEN.append(tls)  # closed by running_edge
    conn = ScriptedConnector(tls, handler)
    await nursery.start(conn.run)
    return conn, await conn.register(tunnel, conn_index=conn_index, connector_id=connector_id)


async def test_a_remotely_managed_tunnel_gets_its_configuration_at_registration_and_on_change(tmp_path):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            configs = RemoteConfigs(edge.config.state_dir)
            configs.put(str(t.id), CONFIG)
            taker = ConfigTaker()
            changed = taker.changed
            _, details = await connect(nursery, edge, t, taker, connector_id=uuid.uuid4())
            assert details.tunnel_is_remotely_managed is True
            await changed.wait()
            assert taker.received == [{"version": 1, "config": CONFIG}]
            # a new version through the management API reaches the running connector
            update = configs.put(str(t.id), {"ingress": [{"service": "http_status:503"}]})
            answer = await management_call(edge.bound["api"], edge.api_token, "POST",
                                           f"/tunnels/{t.id}/configuration", update.push_body())
            assert [(a["lastAppliedVersion"], a["err"]) for a in answer] == [(2, None)]
            assert taker.received[-1] == {"version": 2, "config": update.config}
            # a tunnel without a remote configuration stays locally managed
            other = make_tunnel(edge, "t2", "other.test")
            _, plain = await connect(nursery, edge, other, echo_handler, connector_id=uuid.uuid4())
            assert plain.tunnel_is_remotely_managed is False


async def test_a_push_goes_once_to_each_connector(tmp_path):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            one, two = ConfigTaker(), ConfigTaker()
            first = uuid.uuid4()
            await connect(nursery, edge, t, one, connector_id=first, conn_index=0)
            await connect(nursery, edge, t, one, connector_id=first, conn_index=1)
            await connect(nursery, edge, t, two, connector_id=uuid.uuid4())
            answer = await management_call(edge.bound["api"], edge.api_token, "POST",
                                           f"/tunnels/{t.id}/configuration", {"version": 5, "config": CONFIG})
            assert sorted(a["lastAppliedVersion"] for a in answer) == [5, 5]
            assert len(one.received) == 1 and len(two.received) == 1


def token_for(edge: Any, tunnel_id: str, *, key: Any = None, now: float | None = None) -> str:
    return mgmt_token.mint(key or management_key(edge.config.state_dir), tunnel_id=tunnel_id,
                           account_tag="acct", actor="someone", resource="logs",
                           now=time.time() if now is None else now)


async def test_management_requests_reach_the_named_connector_of_the_tokens_tunnel(tmp_path):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            wanted = uuid.uuid4()
            seen: list[str] = []

            def tagged(tag: str) -> Any:
                async def handler(s: ServerStream) -> None:
                    seen.append(tag)
                    await echo_handler(s)
                return handler

            await connect(nursery, edge, t, tagged("a"), connector_id=uuid.uuid4())
            await connect(nursery, edge, t, tagged("b"), connector_id=wanted)
            token = token_for(edge, str(t.id))
            target = f"/logs?access_token={token}&connector_id={wanted}"
            r = await http_request(edge.bound["http"], "GET", target, host=MANAGEMENT)
            assert r.status == 200 and seen == ["b"]
            headers = dict(json.loads(r.body)["headers"])
            # forwarded unchanged: the connector's own management rule matches this Host and reads the token
            assert headers[":authority"] == "management.argotunnel.com"
            assert headers[":path"] == target
            r = await http_request(edge.bound["http"], "GET", f"/ping?access_token={token}",
                                   host=MANAGEMENT)
            assert r.status == 200 and len(seen) == 2
            history = await wait_history(edge, 2)
            assert all("access_token" not in h["path"] for h in history), history  # a credential


async def test_management_refusals_in_the_shape_tail_prints(tmp_path):
    with trio.fail_after(20):
        async with running_edge(tmp_path) as (edge, nursery):
            t = make_tunnel(edge, "t1", "app.test")
            idle = make_tunnel(edge, "t2", "idle.test")
            await connect(nursery, edge, t, echo_handler, connector_id=uuid.uuid4())

            async def ask(query: str) -> tuple[int, int, str]:
                r = await http_request(edge.bound["http"], "GET", f"/logs{query}", host=MANAGEMENT)
                body = json.loads(r.body)
                assert body["success"] is False and r.header(b"content-type") == b"application/json"
                (error,) = body["errors"]
                return r.status, error["code"], error["message"]

            assert await ask("") == (400, 1001, "missing access_token query parameter")
            forged = token_for(edge, str(t.id), key=mgmt_token.new_key())
            assert (await ask(f"?access_token={forged}"))[:2] == (401, 1002)
            expired = token_for(edge, str(t.id), now=time.time() - 2 * mgmt_token.LIFETIME)
            assert await ask(f"?access_token={expired}") == (
                401, 1002, "invalid management token: token expired")
            good = token_for(edge, str(t.id))
            assert (await ask(f"?access_token={good}&connector_id=nope"))[:2] == (400, 1003)
            status, code, message = await ask(f"?access_token={good}&connector_id={uuid.uuid4()}")
            assert (status, code) == (530, 1004) and str(t.id) in message
            assert (await ask(f"?access_token={token_for(edge, str(idle.id))}"))[:2] == (530, 1004)
            assert (await ask(f"?access_token={token_for(edge, str(uuid.uuid4()))}"))[:2] == (530, 1004)
