"""The edge follows the store while it runs: a deleted tunnel loses its connections; HTTPS for an
unrouted (or invalid) hostname."""

from __future__ import annotations

import logging

import trio

from tests.component.test_edge_eyeball import h2_get, tls_to
from tests.component.test_edge_support import (
    Address,
    connector,
    echo_handler,
    make_tunnel,
    registered,
    running_edge,
)
from tunnel_lab.wire.registration import ConnectionDetails, RegistrationError


async def test_deleting_a_tunnel_closes_its_connections_and_refuses_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tunnel_lab.edge")
    with trio.fail_after(10):
        async with running_edge(tmp_path, store_check_interval=0.05) as (edge, nursery):
            gone = make_tunnel(edge, "gone", "gone.test")
            kept = make_tunnel(edge, "kept", "kept.test")
            doomed = [await registered(nursery, edge, gone, echo_handler, conn_index=i) for i in range(2)]
            survivor = await registered(nursery, edge, kept, echo_handler)
            # an admin deletes the tunnel through another Store on the same database
            from tunnel_lab.lab.store import Store

            with Store(edge.tunnels.db) as other:
                other.delete_tunnel("gone")
            for conn in doomed:
                await conn.closed.wait()
            assert not survivor.closed.is_set()
            assert {c.registration.tunnel_id for c in edge.registry.listed()} == {kept.id}
            lines = [r.getMessage() for r in caplog.records
                     if r.getMessage().startswith("tunnel deleted from the store")]
            assert len(lines) == 2 and all(f"tunnel={gone.id}" in line and "conn=" in line
                                           for line in lines)
            # the connector's re-registration is refused: unknown tunnel
            async with connector(nursery, edge) as again:
                result = await again.register(gone)
                assert result == RegistrationError(cause="Unauthorized: Invalid tunnel secret")
            # the other tunnel still serves
            async with connector(nursery, edge) as fresh:
                assert isinstance(await fresh.register(kept, conn_index=1), ConnectionDetails)


async def test_https_unrouted_host_gets_404_over_verified_tls_h2(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, _):
            tls = await tls_to(edge, "nowhere.test", ["h2"])  # verified against the lab CA
            async with tls:
                assert "nowhere.test" in [v for _, v in tls.getpeercert()["subjectAltName"]]
                assert tls.selected_alpn_protocol() == "h2"
                status, _, body = (await h2_get(tls, "nowhere.test", ["/x"]))["/x"]
            assert status == 404 and b"no tunnel route" in body.lower()
            # the leaf is cached: a second handshake reuses the same context
            ctx = edge.eyeball_certs.host_contexts["nowhere.test"]
            again = await tls_to(edge, "NoWhere.test", ["http/1.1"])
            await again.aclose()
            assert edge.eyeball_certs.host_contexts["nowhere.test"] is ctx


async def test_https_invalid_sni_name_is_refused(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, _):
            try:
                await tls_to(edge, "bad_-.-name..test", ["http/1.1"])
            except trio.BrokenResourceError:
                pass
            else:
                raise AssertionError("an invalid SNI name got a certificate")
            assert not any("bad" in name for name in edge.eyeball_certs.host_contexts)
