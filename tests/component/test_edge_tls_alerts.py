"""The HTTPS eyeball listener's TLS refusals reach the client as alerts (issue 11, item 6), and the
on-demand certificate cache is bounded."""

from __future__ import annotations

import ssl

import pytest
import trio

from tests.component.test_edge_support import Address, running_edge, split


async def handshake(edge, server_name: str | None) -> trio.SSLStream:
    host, port = split(edge.bound["https"])
    ctx = edge.pki.client_ssl_context()
    ctx.check_hostname = False
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=server_name)
    try:
        await tls.do_handshake()
    except BaseException:
        await tcp.aclose()
        raise
    return tls


@pytest.mark.parametrize("name", ["a..b", "-x.test", "bad!name.test"])
async def test_an_invalid_sni_name_gets_the_unrecognized_name_alert(tmp_path, name):
    with trio.fail_after(10):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, _nursery):
            with pytest.raises(trio.BrokenResourceError) as caught:
                await handshake(edge, name)
            assert isinstance(caught.value.__cause__, ssl.SSLError)
            assert "UNRECOGNIZED_NAME" in str(caught.value.__cause__).upper()


async def test_no_sni_gets_the_localhost_certificate(tmp_path):
    with trio.fail_after(10):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, _nursery):
            tls = await handshake(edge, None)
            async with tls:
                sans = [v for _, v in tls.getpeercert()["subjectAltName"]]
            assert "localhost" in sans


async def test_on_demand_certificates_are_bounded(tmp_path, caplog):
    with trio.fail_after(30):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),),
                                max_on_demand_certs=3) as (edge, _nursery):
            edge.tunnels.store.create_tunnel("t1")
            edge.tunnels.store.route_dns("t1", "routed.test")
            seen = {}
            for name in ["n1.test", "n2.test", "n3.test", "n4.test", "n5.test", "n1.test", "routed.test"]:
                tls = await handshake(edge, name)
                async with tls:
                    seen[name] = [v for _, v in tls.getpeercert()["subjectAltName"]]
            assert all(name in seen[name] for name in ["n1.test", "n2.test", "n3.test", "routed.test"])
            assert "localhost" in seen["n4.test"] and "n5.test" not in seen["n5.test"]
            hosts = {p.name for p in (edge.pki.dir / "hosts").glob("*.pem")}
            assert not any(n.startswith(("n4", "n5")) for n in hosts)
            assert caplog.text.count("limit max_on_demand_certs") == 1
