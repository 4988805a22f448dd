"""The runner namespace's DNS stub: NXDOMAIN except for names a lab registered (an Access team domain)."""

from __future__ import annotations

from tunnel_lab.lab.runner import netns
from tunnel_lab.wire import dns


def ask(name: str, qtype: int) -> dns.Message:
    query = dns.Message(id=7, flags=dns.RD, questions=(dns.Question(name=name, qtype=qtype),))
    answer = netns.stub_answer(dns.encode_message(query))
    assert answer is not None
    return dns.decode_message(answer)


def test_registered_names_are_answered_and_only_while_registered() -> None:
    name = "stubtest.cloudflareaccess.com"
    assert ask(name, dns.A).rcode == dns.NXDOMAIN
    assert netns.register_name(name, "127.77.9.1")
    try:
        assert not netns.register_name(name, "127.77.9.2")  # another lab holds it
        reply = ask("StubTest.cloudflareaccess.com.", dns.A)
        assert reply.rcode == dns.NOERROR and [r.data for r in reply.answers] == ["127.77.9.1"]
        reply = ask(name, dns.AAAA)
        assert reply.rcode == dns.NOERROR and reply.answers == ()
        assert ask("other.cloudflareaccess.com", dns.A).rcode == dns.NXDOMAIN
    finally:
        netns.unregister_name(name, "127.77.9.1")
    assert ask(name, dns.A).rcode == dns.NXDOMAIN
    assert netns.stub_answer(b"junk") is None
