"""connector/diag_network.run_prechecks with scripted probes on trio's autojump clock: the rows and their
order, the retries and their delays, the per-probe and suite deadlines, DNS failures, and the refusal to
probe anything outside this machine."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from tunnel_lab.connector import diag_network as dn

GROUPS = [[("127.0.1.1", 7844), ("127.0.1.2", 7844), ("2001:db8:1::1", 7844)],
          [("127.0.2.1", 7844), ("2001:db8:2::1", 7844)]]


class Script:
    """Probes that answer as told and record each call (and when, on the trio clock)."""

    def __init__(self, *, quic: bool = True, http2: bool = True, api: bool = True,
                 groups: dn.Groups | Exception = GROUPS, hang: bool = False, dns_delay: float = 0.0) -> None:
        self.answers = {"quic": quic, "http2": http2, "api": api}
        self.groups = groups
        self.hang = hang
        self.dns_delay = dns_delay
        self.calls: list[tuple[str, str, float]] = []
        self.lookups: list[str] = []

    def probes(self, *, local: bool = True) -> dn.Probes:
        def probe(kind: str) -> dn.Probe:
            async def run(ip: str, port: int) -> bool:
                self.calls.append((kind, f"{ip}:{port}", trio.current_time()))
                if self.hang:
                    await trio.sleep_forever()
                return self.answers[kind]
            return run

        async def discover(name: str) -> dn.Groups:
            self.lookups.append(name)
            await trio.sleep(self.dns_delay)
            if isinstance(self.groups, Exception):
                raise self.groups
            return self.groups

        async def api_addresses() -> list[str]:
            return ["127.0.3.1"]

        return dn.Probes(discover=discover, quic=probe("quic"), http2=probe("http2"), api=probe("api"),
                         api_addresses=api_addresses, local=lambda ip: local)

    def count(self, kind: str) -> Counter[str]:
        return Counter(target for k, target, _ in self.calls if k == kind)


def summary(rows: list[dn.CheckResult]) -> list[tuple[int, str, int]]:
    return [(r.type, r.target, r.status) for r in rows]


async def test_all_passing(autojump_clock: trio.abc.Clock) -> None:
    script = Script()
    rows, suggested = await dn.run_prechecks("", script.probes())
    r1, r2 = "region1.v2.argotunnel.com", "region2.v2.argotunnel.com"
    assert summary(rows) == [(dn.DNS, r1, dn.PASS), (dn.DNS, r2, dn.PASS), (dn.QUIC, r1, dn.PASS),
                             (dn.QUIC, r2, dn.PASS), (dn.HTTP2, r1, dn.PASS), (dn.HTTP2, r2, dn.PASS),
                             (dn.MANAGEMENT_API, "api.cloudflare.com:443", dn.PASS)]
    assert suggested == dn.PROTOCOL_QUIC
    # one IPv4 and one IPv6 address of each region, each once; the API once
    both = Counter(["127.0.1.1:7844", "2001:db8:1::1:7844", "127.0.2.1:7844", "2001:db8:2::1:7844"])
    assert script.count("quic") == both and script.count("http2") == both
    assert script.count("api") == Counter({"127.0.3.1:443": 1})
    assert script.lookups == ["_v2-origintunneld._tcp.argotunnel.com"]


async def test_a_refused_quic_is_tried_three_times_and_http2_is_suggested(
        autojump_clock: trio.abc.Clock) -> None:
    script = Script(quic=False)
    start = trio.current_time()
    rows, suggested = await dn.run_prechecks("", script.probes())
    assert suggested == dn.PROTOCOL_HTTP2
    quic = [r for r in rows if r.type == dn.QUIC]
    assert [(r.status, r.details, r.action) for r in quic] == [
        (dn.FAIL, "QUIC connection failed", "Allow outbound QUIC traffic on port 7844 or use HTTP2.")] * 2
    assert set(script.count("quic").values()) == {3}
    times = [t - start for k, target, t in script.calls if k == "quic" and target == "127.0.1.1:7844"]
    assert times == pytest.approx([0.0, 1.0, 3.0])  # retried after 1 s, then 2 s
    # regions and addresses one after the other: 4 x (1 s + 2 s), as the real binary took in the sandbox
    assert trio.current_time() - start == pytest.approx(12.0)


async def test_dns_failure_skips_the_transports(autojump_clock: trio.abc.Clock) -> None:
    script = Script(groups=OSError("Could not lookup srv records on _us-v2-origintunneld._tcp.argotunnel.com"
                                   ": lookup failed"))
    rows, suggested = await dn.run_prechecks("us", script.probes())
    assert suggested is None
    assert len(script.lookups) == 3 and set(script.lookups) == {"_us-v2-origintunneld._tcp.argotunnel.com"}
    assert [(r.type, r.status, r.details) for r in rows] == [
        (dn.DNS, dn.FAIL, str(script.groups)), (dn.DNS, dn.FAIL, str(script.groups)),
        (dn.QUIC, dn.SKIP, "DNS prerequisite failed"), (dn.QUIC, dn.SKIP, "DNS prerequisite failed"),
        (dn.HTTP2, dn.SKIP, "DNS prerequisite failed"), (dn.HTTP2, dn.SKIP, "DNS prerequisite failed"),
        (dn.MANAGEMENT_API, dn.PASS, "API is reachable")]
    assert [r.target for r in rows[:2]] == ["us-region1.v2.argotunnel.com", "us-region2.v2.argotunnel.com"]
    assert not script.count("quic") and not script.count("http2")


async def test_silent_probes_fail_at_5_s_and_the_suite_ends_at_its_deadline(
        autojump_clock: trio.abc.Clock) -> None:
    script = Script(hang=True)
    start = trio.current_time()
    rows, suggested = await dn.run_prechecks("", script.probes())
    assert trio.current_time() - start == pytest.approx(dn.SUITE_TIMEOUT)
    assert suggested is None
    assert {r.status for r in rows if r.type != dn.DNS} == {dn.FAIL}
    first = [t - start for k, target, t in script.calls if k == "quic" and target == "127.0.1.1:7844"]
    assert first == pytest.approx([0.0, 6.0, 13.0])  # 5 s each, then 1 s and 2 s of backoff


async def test_nothing_outside_this_machine_is_probed(autojump_clock: trio.abc.Clock) -> None:
    script = Script()
    with pytest.raises(dn.OutsideError, match=r"^region1\.v2\.argotunnel\.com resolves to 127\.0\.1\.1, "
                                              r"2001:db8:1::1, outside this machine"):
        await dn.run_prechecks("", script.probes(local=False))
    assert script.calls == []


async def test_a_slow_discovery_is_waited_for_and_the_probes_fail(autojump_clock: trio.abc.Clock) -> None:
    # as cloudflared's, whose DNS discovery takes no deadline: the rows are there, the probes out of time
    script = Script(dns_delay=20.0)
    rows, suggested = await dn.run_prechecks("", script.probes())
    assert [r.status for r in rows] == [dn.PASS, dn.PASS] + [dn.FAIL] * 5 and suggested is None
    assert script.calls == [] and len(script.lookups) == 1
