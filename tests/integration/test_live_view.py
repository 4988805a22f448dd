"""The live view (`GET /live` on the management port) in headless Chromium: it signs in with the API
token, shows a running lab's data centres, tunnel and connection, and updates by itself when a request
passes and when a fault is injected, with no console error on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.chromium import chromium, needs_chromium
from tests.component.test_edge_api import api
from tests.component.test_edge_support import (
    echo_handler,
    http_request,
    make_tunnel,
    registered,
    running_edge,
)

pytestmark = needs_chromium
STEP_TIMEOUT = 90.0


def rows(table: str) -> str:
    """JavaScript: the text of a table's body rows, one line per row."""
    return (f"[...document.querySelectorAll('#{table} tbody tr')].map(r => r.innerText.replace(/\\s+/g, ' '))"
            ".join('\\n')")


def shows(table: str, needle: str) -> str:
    """JavaScript: the table's rows once they contain `needle` (else false)."""
    return f"{rows(table)}.includes({needle!r}) && {rows(table)}"


async def test_the_live_view_follows_a_running_lab(tmp_path: Path) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with running_edge(tmp_path) as (edge, nursery):
            tunnel = make_tunnel(edge, "teach", "app.test")
            await registered(nursery, edge, tunnel, echo_handler)
            api_addr = edge.bound["api"]

            async def in_browser(fn: Any, *args: Any) -> Any:
                return await trio.to_thread.run_sync(fn, *args)

            with chromium(tmp_path / "profile") as page:
                # a wrong token: the sign-in form again, no cookie
                await in_browser(page.navigate, f"http://{api_addr}/live?token=wrong")
                assert "Wrong token" in await in_browser(page.evaluate, "document.body.innerText")
                assert [e for e in page.console_errors if "401" not in e] == []
                page.console_errors.clear()  # the 401 of the wrong token, as expected
                await in_browser(page.navigate, f"http://{api_addr}/live?token={edge.api_token}")
                assert await in_browser(page.evaluate, "location.pathname + location.search") == "/live"
                await in_browser(page.wait_for, "document.getElementById('status').textContent === 'live'")

                connections = await in_browser(page.wait_for, shows("connections", "registered"))
                assert "teach" in connections and "LAB1" in connections
                dcs = await in_browser(page.evaluate, rows("dcs"))
                assert "LAB1 up 1" in dcs and "LAB2 up 0" in dcs
                assert str(tunnel.id) in await in_browser(page.evaluate, rows("tunnels"))

                # a request through the edge appears by itself; clicking it draws its sequence
                answer = await http_request(edge.bound["http"], "GET", "/seen-live", host="app.test")
                assert answer.status == 200
                requests = await in_browser(page.wait_for, shows("requests", "/seen-live"))
                assert "GET app.test /seen-live 200" in requests
                await in_browser(page.evaluate, "document.querySelector('#requests tbody tr.req').click()")
                labels = await in_browser(page.wait_for, "[...document.querySelectorAll('#diagram text')]"
                                          ".map(t => t.textContent).join('|')")
                assert "GET app.test/seen-live" in labels and "origin" in labels
                note = await in_browser(page.evaluate, "document.getElementById('diagram-note').textContent")
                assert "run with --trace for the protocol view" in note

                # a fault: the data centre goes down, its connection goes away, the fault is listed
                status, fault = await api(edge, "POST", "/faults", {"kind": "dc-down", "location": "LAB1"})
                assert status == 200, fault
                dcs = await in_browser(page.wait_for, shows("dcs", "down (fault)"))
                assert "LAB1 down (fault) 0" in dcs
                assert "dc-down" in await in_browser(page.wait_for, shows("faults", "dc-down"))
                assert fault["id"] in await in_browser(page.evaluate, rows("fault-log"))
                await in_browser(page.wait_for, shows("connections", "no connector connected"))
                assert page.console_errors == []
                status, _ = await api(edge, "DELETE", "/faults")
                assert status == 200


TRACED_STEPS = {
    "http2": ["GET /traced?x=1 (Host app.lab.test)", "HEADERS stream 3 GET /traced?x=1",
              "HEADERS stream 3 :status 200", "DATA stream 3", "done: ok"],
    "quic": ["GET /traced?x=1 (Host app.lab.test)", "stream 1 ConnectRequest http http://app.lab.test/traced?x=1",
             "stream 1 ConnectResponse HttpStatus 200", "done: ok"],
}


@pytest.mark.parametrize("protocol", sorted(TRACED_STEPS))
async def test_a_traced_lab_draws_the_request_from_the_protocol_trace(tmp_path: Path, protocol: str) -> None:
    """With `--trace` the diagram is the edge's trace of the request (our connector, a real lab): the
    HEADERS frame that opened the stream on the tunnel (over QUIC the stream's ConnectRequest), the
    answer, the eyeball's outcome."""
    from tunnel_lab.lab.api import open_lab

    async def in_browser(fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    with trio.fail_after(STEP_TIMEOUT):
        async with open_lab(datacentres=2, https=False, state=tmp_path / "state",
                            edge_flags=["--trace", str(tmp_path / "edge.trace.jsonl")]) as lab:
            tunnel = await lab.create_tunnel("app", hostnames=["app.lab.test"])
            origin = await lab.start_origin("hello")
            await lab.start_connector(tunnel, url=origin.url, protocol=protocol)
            with chromium(tmp_path / "profile") as page:
                await in_browser(page.navigate, f"http://{lab.edge.api}/live?token={lab.edge.api_token}")
                await in_browser(page.wait_for, shows("connections", "registered"))
                answer = await lab.request("app.lab.test", "/traced?x=1")
                assert answer.status == 200, answer.error
                await in_browser(page.wait_for, shows("requests", "/traced?x=1"))
                await in_browser(page.evaluate, "document.querySelector('#requests tbody tr.req').click()")
                labels = await in_browser(page.wait_for, "[...document.querySelectorAll('#diagram text')]"
                                          ".map(t => t.textContent).join('|').includes('done: ok') && "
                                          "[...document.querySelectorAll('#diagram text')]"
                                          ".map(t => t.textContent).join('|')")
                # trace-level steps: the stream the edge opened on the tunnel and its answer, in order
                order = TRACED_STEPS[protocol]
                positions = [labels.find(text) for text in order]
                assert -1 not in positions and positions == sorted(positions), labels
                note = await in_browser(page.evaluate, "document.getElementById('diagram-note').textContent")
                assert note.startswith("From the edge's protocol trace"), note
                assert ("h2.frame" if protocol == "http2" else "quic.stream_head") in await in_browser(
                    page.evaluate, rows("trace-records"))
                # a ray the trace never held: a message, the request record's diagram, no error
                await in_browser(page.evaluate, "requests[0].ray = 'f00f00f00f00f00f-LAB1'; "
                                 "select('f00f00f00f00f00f-LAB1')")
                note = await in_browser(page.wait_for, "document.getElementById('diagram-note').textContent"
                                        ".includes('No protocol trace') && "
                                        "document.getElementById('diagram-note').textContent")
                assert "the trace holds no record of f00f00f00f00f00f-LAB1" in note
                assert page.console_errors == []
