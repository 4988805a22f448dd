"""The live view (`GET /live` on the management port) in headless Chromium: it signs in with the API
token, shows a running lab's data centres, tunnel and connection, and updates by itself when a request
passes and when a fault is injected, with no console error on the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
