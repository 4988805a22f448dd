"""Replay cloudflared's side of the captured control streams against the edge.

The connector bytes of A01 / B01 / D12b (real cloudflared 2026.8.2) go to a running edge over TLS and
HTTP/2; the edge's answers must be the Returns cloudflared accepted, byte for byte, once the random
connection uuid is swapped for the capture's (the edge's location is named "LAB" like the capture's).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import uuid
from pathlib import Path

import pytest
import trio

from tests.component.test_edge_support import ScriptedConnector, dial_edge, running_edge
from tests.golden import VECTORS, VECTORS_GO126
from tunnel_lab.edge.config import Address, TunnelListen
from tunnel_lab.lab import paths
from tunnel_lab.lab.store import Store
from tunnel_lab.wire.capnp import MessageReader, frame_message

# (registration capture, shutdown capture on the same connection or None)
CASES = [(VECTORS / "A01-control-stream-register.json", VECTORS / "A13-sigterm-unregister-answered.json"),
         (VECTORS / "B01-control-stream-register-ingress-config.json",
          VECTORS / "B06-sigterm-unregister-not-answered.json"),
         (VECTORS_GO126 / "D12b-control-stream-register.json", None)]
C2E, E2C = "cloudflared->edge", "edge->cloudflared"


def _seed_store(state: Path, creds_path: Path) -> dict[str, str]:
    creds = json.loads(creds_path.read_text())
    state.mkdir(parents=True, exist_ok=True)
    store = Store(paths.db_path(state))
    # The capture's account tag is fixed inside the registerConnection bytes; give the lab account it.
    with sqlite3.connect(paths.db_path(state)) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'account_tag'", (creds["AccountTag"],))
    store.create_tunnel("captured", tunnel_id=uuid.UUID(creds["TunnelID"]),
                        secret=base64.b64decode(creds["TunnelSecret"]))
    store.close()
    return creds


def _messages(data: bytes) -> list[bytes]:
    reader = MessageReader()
    reader.feed(data)
    out = []
    while (segments := reader.next_message()) is not None:
        out.append(frame_message(segments))
    return out


@pytest.mark.parametrize(("path", "shutdown"), CASES, ids=lambda p: p.name if p else "-")
async def test_edge_answers_the_captured_control_stream(tmp_path, path, shutdown):
    vector = json.loads(path.read_text())
    captured_uuid = uuid.UUID(vector["connection_uuid_sent_by_edge"])
    _seed_store(tmp_path / "state", path.parent / "creds.json")
    entries = vector["capnp"]
    with trio.fail_after(10):
        async with running_edge(tmp_path, tunnel_listens=(TunnelListen("LAB", Address("127.0.0.1", 0)),)
                                ) as (edge, nursery):
            tls = await dial_edge(edge, "LAB")
            conn = ScriptedConnector(tls)
            raw_answers = bytearray()
            arrived = trio.lowlevel.ParkingLot()

            def capture(data: bytes) -> list:  # we play cloudflared's bytes, not an RpcClient
                raw_answers.extend(data)
                arrived.unpark_all()
                return []

            conn.rpc.receive_data = capture  # type: ignore[method-assign]
            await nursery.start(conn.run)
            with trio.fail_after(5):
                while conn.control_headers is None:
                    await trio.sleep(0.01)
            expected: list[bytes] = []
            for entry in entries:
                data = bytes.fromhex(entry["hex"])
                if entry["direction"] == C2E:
                    if not conn.control_answered:
                        conn.h2.send_headers(1, [(b":status", b"200")])
                        conn.control_answered = True
                    conn.h2.send_data(1, data)
                    await conn.flush()
                else:
                    expected.append(data)
            with trio.fail_after(5):
                while len(_messages(bytes(raw_answers))) < len(expected):
                    await arrived.park()
            answers = _messages(bytes(raw_answers))
            registered = edge.registry.listed()
            assert len(registered) == 1
            ours = registered[0].registration.conn_uuid
            answers = [a.replace(ours.bytes, captured_uuid.bytes) for a in answers]
            assert [a.hex() for a in answers] == [e.hex() for e in expected]
            assert registered[0].registration.client_version == "2026.8.2"
            assert json.loads(edge.pushed_configs[str(registered[0].registration.tunnel_id)])["ingress"]
            if shutdown is not None:
                # cloudflared's SIGTERM sequence: unregister (+ Finish, maybe Release, Abort), then
                # END_STREAM and RST_STREAM(NO_ERROR) on the control stream. The edge answers what
                # worked (A13), then drains, sends GOAWAY and closes; cloudflared sends no GOAWAY.
                before = len(answers)
                tail = json.loads(shutdown.read_text())["capnp"]
                want = [bytes.fromhex(e["hex"]) for e in tail if e["direction"] == E2C]
                calls = [bytes.fromhex(e["hex"]) for e in tail if e["direction"] == C2E]
                if want:  # A13: the unregister call, its Return, then the rest (as cloudflared did)
                    conn.h2.send_data(1, calls.pop(0))
                    await conn.flush()
                    while len(_messages(bytes(raw_answers))) < before + len(want):
                        await arrived.park()
                # The rest in one write: the test's h2 (unlike Go's) cannot send after a GOAWAY.
                conn.h2.send_data(1, b"".join(calls))
                conn.h2.end_stream(1)
                conn.h2.reset_stream(1, 0)
                await conn.flush()
                await conn.closed.wait()
                assert conn.goaway is not None and conn.goaway.error_code == 0
                got = _messages(bytes(raw_answers))[before:]
                assert [g.hex() for g in got] == [w.hex() for w in want]  # A13's Return, byte for byte
                assert edge.registry.listed() == []
            await tls.aclose()
