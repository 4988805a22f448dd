"""connector/diag_network.py without sockets: the traceroute parser over captured output and garbage, the
files the two traceroute jobs write, a traceroute run against stand-in tools, and the pre-checks' report."""

from __future__ import annotations

import json
import shutil
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.connector import diag_network as dn
from tunnel_lab.wire import dns

# `traceroute -I -w 5 -m 5 HOST` and `traceroute6 ...` stdout, captured in `tunnel-lab sandbox` (the regions
# resolve to loopback addresses) from the real cloudflared 2026.8.2's raw-network.txt.
SANDBOX_V4 = (b"traceroute to region1.v2.argotunnel.com (127.0.1.1), 5 hops max, 60 byte packets\n"
              b" 1  127.0.1.1 (127.0.1.1)  0.007 ms  0.001 ms  0.001 ms\n")
SANDBOX_V6 = (b"traceroute to region1.v2.argotunnel.com (2001:db8:1::1), 5 hops max, 80 byte packets\n"
              b" 1  2001:db8:1::1 (2001:db8:1::1)  0.120 ms  0.744 ms  0.744 ms\n")
# Captured in a private network namespace towards a tun device nobody reads (every probe times out).
TIMEOUTS = (b"traceroute to 10.99.0.2 (10.99.0.2), 3 hops max, 60 byte packets\n"
            b" 1  * * *\n 2  * * *\n 3  * * *\n")
# The network.json the real cloudflared wrote for the sandbox run SANDBOX_V4 and SANDBOX_V6 come from
# (region2's lines had the same shape), cut to region1.
REAL_NETWORK_JSON = """{
  "region1.v2.argotunnel.com-v4": [
    {
      "hop": 1,
      "domain": "127.0.1.1 (127.0.1.1)",
      "rtts": [
        7,
        1,
        1
      ]
    }
  ],
  "region1.v2.argotunnel.com-v6": [
    {
      "hop": 1,
      "domain": "2001:db8:1::1 (2001:db8:1::1)",
      "rtts": [
        120,
        744,
        744
      ]
    }
  ]
}
"""


def test_captured_output_decodes_to_hops_with_microseconds() -> None:
    assert dn.decode_output(SANDBOX_V4) == [dn.Hop(1, "127.0.1.1 (127.0.1.1)", (7, 1, 1))]
    assert dn.decode_output(SANDBOX_V6) == [dn.Hop(1, "2001:db8:1::1 (2001:db8:1::1)", (120, 744, 744))]


def test_a_hop_that_never_answered_is_a_star() -> None:
    hops = dn.decode_output(TIMEOUTS)
    assert hops == [dn.Hop(1, "*"), dn.Hop(2, "*"), dn.Hop(3, "*")]
    assert [h.to_json() for h in hops] == [{"hop": n, "domain": "*"} for n in (1, 2, 3)]


@pytest.mark.parametrize(("line", "hop"), [
    # several routers answering one hop, a lost probe among them, traceroute's !H annotation
    (" 2  10.0.0.1 (10.0.0.1)  1.234 ms * 10.0.0.2 (10.0.0.2)  2.5 ms",
     dn.Hop(2, "10.0.0.1 (10.0.0.1) 10.0.0.2 (10.0.0.2)", (1234, 2500))),
    (" 3  gw.example (10.0.0.9)  1.0 ms !H  *  *", dn.Hop(3, "gw.example (10.0.0.9) !H", (1000,))),
    ("4 host 0.0004 ms", dn.Hop(4, "host", (0,))),  # truncated toward zero, as Go's Duration conversion
    ("5\thost\u00a0 1e3 ms\r", dn.Hop(5, "host", (1000000,))),  # Go's Unicode spaces; exponent form
    ("0 host 1 ms", dn.Hop(0, "host", (1000,))),
    ("255 host", dn.Hop(255, "host")),
    ("7 inf nan 1e400 ms", dn.Hop(7, "inf nan 1e400")),  # not finite: kept as words, never an rtt
    ("8 host \u0663.5 ms", dn.Hop(8, "host \u0663.5")),  # Go's numbers are ASCII (Python's float is not)
])
def test_odd_lines_decode_as_cloudflared_decodes_them(line: str, hop: dn.Hop) -> None:
    assert dn.decode_line(line) == hop


@pytest.mark.parametrize("line", [
    "traceroute to region1.v2.argotunnel.com (127.0.1.1), 5 hops max, 60 byte packets",
    "", "   ", "* * *", "ms", "256 host 1 ms", "-1 host", "+1 host", "x1 host", "٣ host",
    "1 2 3 ms",  # no word left for the domain: "domain must not be empty"
])
def test_lines_that_are_not_hops_are_skipped(line: str) -> None:
    assert dn.decode_line(line) is None


def test_garbage_and_invalid_utf8_never_raise() -> None:
    out = b"\x00\xff\xfe\n 1  \xc3( (10.0.0.1)  1 ms\n\n\x1b[31m\n"
    assert dn.decode_output(out) == [dn.Hop(1, "\ufffd( (10.0.0.1)", (1000,))]


@given(st.binary(max_size=400))
def test_any_bytes_decode_without_an_exception(data: bytes) -> None:
    for hop in dn.decode_output(data):
        assert 0 <= hop.hop <= 255 and hop.domain


def test_a_line_past_gos_scanner_limit_is_an_error() -> None:
    with pytest.raises(dn.TraceDecodeError, match=r"bufio\.Scanner: token too long"):
        dn.decode_output(b" 1  host 1 ms\n" + b"x" * dn.MAX_LINE + b"\n")
    assert dn.decode_output(b"y" * (dn.MAX_LINE - 1) + b"\n") == []


def test_files_match_the_real_cloudflareds() -> None:
    results = [dn.TraceResult(f"region1.v2.argotunnel.com-{v}", tuple(dn.decode_output(out)), out)
               for v, out in (("v4", SANDBOX_V4), ("v6", SANDBOX_V6))]
    body, error = dn.network_json(results[::-1])  # a Go map: the keys come out sorted
    assert (body.decode(), error) == (REAL_NETWORK_JSON, None)
    raw, error = dn.raw_network_text(results)
    assert error is None
    assert raw == (b"region1.v2.argotunnel.com-v4\n" + SANDBOX_V4 + b"\n"
                   b"region1.v2.argotunnel.com-v6\n" + SANDBOX_V6 + b"\n")


def test_failed_runs_are_no_content_and_null_and_fail_both_jobs_with_the_first_error() -> None:
    missing = 'error starting traceroute: exec: "traceroute6": executable file not found in $PATH'
    results = [dn.TraceResult("a-v4", None, b"", None),  # succeeded, printed no hop
               dn.TraceResult("a-v6", None, b"", missing),
               dn.TraceResult("b-v4", None, b"x\n", "error finishing traceroute: exit status 2")]
    raw, error = dn.raw_network_text(results)
    assert raw == b"a-v4\n\na-v6\nno content\nb-v4\nno content\n" and error == missing
    body, error = dn.network_json(results)
    assert json.loads(body) == {"a-v4": None, "a-v6": None, "b-v4": None} and error == missing


def test_json_escapes_as_gos_encoder() -> None:
    hop = dn.Hop(1, "<a&b> é\u2028")
    assert dn.go_json(hop.to_json()) == \
        b'{\n  "hop": 1,\n  "domain": "\\u003ca\\u0026b\\u003e \xc3\xa9\\u2028"\n}\n'


# --- a traceroute run, against stand-in tools on PATH ------------------------------------------------------

SLEEP = shutil.which("sleep") or "/bin/sleep"


def _tool(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def always_local(ip: str) -> bool:
    return True


def test_a_run_passes_cloudflareds_arguments_and_keeps_stdout_only(tools: Path) -> None:
    _tool(tools, "traceroute",
          f'echo "$@" > {tools}/args\nprintf \'{SANDBOX_V4.decode()}\'\necho noise >&2\n')
    found = dn.run_trace("localhost", True, time.monotonic() + 60, local=always_local)
    assert (tools / "args").read_text() == "-I -w 5 -m 5 localhost\n"
    assert found == dn.TraceResult("localhost-v4", tuple(dn.decode_output(SANDBOX_V4)), SANDBOX_V4)


def test_a_missing_tool_is_reported_as_go_reports_it(tools: Path) -> None:
    found = dn.run_trace("localhost", False, time.monotonic() + 60, local=always_local)
    assert found == dn.TraceResult("localhost-v6", None, b"",
                                   'error starting traceroute: exec: "traceroute6": executable file not '
                                   "found in $PATH")


def test_a_failing_or_killed_tool_and_a_passed_deadline(tools: Path) -> None:
    _tool(tools, "traceroute", "echo partial; exit 2\n")
    assert dn.run_trace("localhost", True, time.monotonic() + 60, local=always_local).error == \
        "error finishing traceroute: exit status 2"
    _tool(tools, "traceroute6", f"exec {SLEEP} 30\n")
    killed = dn.run_trace("localhost", False, time.monotonic() + 0.2, local=always_local)
    assert (killed.hops, killed.raw) == (None, b"")
    assert killed.error == "error finishing traceroute: signal: killed"
    late = dn.run_trace("localhost", True, time.monotonic() - 1, local=always_local)
    assert late.error == "error starting traceroute: context deadline exceeded"


def test_a_host_outside_this_machine_is_not_traced(tools: Path) -> None:
    _tool(tools, "traceroute", f"touch {tools}/ran\n")
    found = dn.run_trace("localhost", True, time.monotonic() + 60, local=lambda ip: False)
    assert found.error is not None and "resolves to 127.0.0.1, outside this machine" in found.error
    assert not (tools / "ran").exists()


def test_the_four_runs_in_cloudflareds_order() -> None:
    seen = []

    def fake(host: str, v4: bool, deadline: float) -> dn.TraceResult:
        seen.append((host, v4))
        return dn.TraceResult(f"{host}-{'v4' if v4 else 'v6'}", None, b"")

    names = [r.name for r in dn.gather_traces(0.0, fake)]
    assert names == ["region1.v2.argotunnel.com-v4", "region1.v2.argotunnel.com-v6",
                     "region2.v2.argotunnel.com-v4", "region2.v2.argotunnel.com-v6"]
    assert sorted(seen) == sorted(dn.TRACE_TARGETS)


def test_is_local_knows_loopback_and_refuses_the_rest() -> None:
    assert dn.is_local("127.0.0.1") and dn.is_local("::1") and dn.is_local("127.9.9.9")
    assert not dn.is_local("192.0.2.1") and not dn.is_local("not an address")


# --- the pre-checks report (pure parts) --------------------------------------------------------------------

def test_dns_rows_label_the_regions_by_region_flag() -> None:
    groups = [[("127.0.1.1", 7844)], [("127.0.2.1", 7844)], [("127.0.3.1", 7844)]]
    rows = dn.dns_rows("", groups)
    assert [(addrs, r.target, r.status) for addrs, r in rows] == [
        ([("127.0.1.1", 7844)], "region1.v2.argotunnel.com", dn.PASS),
        ([("127.0.2.1", 7844)], "region2.v2.argotunnel.com", dn.PASS)]  # a third target is ignored
    assert [r.target for _, r in dn.dns_rows("us", groups)] == ["us-region1.v2.argotunnel.com",
                                                                 "us-region2.v2.argotunnel.com"]
    assert dn.srv_name("fed") == "_fed-v2-origintunneld._tcp.argotunnel.com"


def test_dns_failure_rows_carry_the_error_and_the_dig_advice() -> None:
    rows = dn.dns_rows("", "lookup failed")
    assert rows[0][1].to_json() == {
        "Type": 0, "Component": "DNS Resolution", "Target": "region1.v2.argotunnel.com", "ProbeStatus": 1,
        "Details": "lookup failed",
        "Action": "Ensure your DNS resolver can resolve 'region1.v2.argotunnel.com'. Run: dig A "
                  "region1.v2.argotunnel.com @1.1.1.1. If that fails, contact your network administrator."}
    one = dn.dns_rows("", [[("127.0.1.1", 7844)], []])
    assert [(r.status, r.details) for _, r in one] == [(dn.PASS, "DNS Resolved successfully"),
                                                      (dn.FAIL, "No addresses returned")]


def test_one_address_of_each_family_is_probed() -> None:
    group = [("2001:db8::1", 7844), ("127.0.1.1", 7844), ("2001:db8::2", 7844), ("127.0.1.2", 7844)]
    assert dn.probe_addresses(group) == [("127.0.1.1", 7844), ("2001:db8::1", 7844)]


def _rows(kind: int, *statuses: int) -> list[dn.CheckResult]:
    return [dn.CheckResult(kind, "t", s, "") for s in statuses]


@pytest.mark.parametrize(("quic", "http2", "suggested"), [
    ((dn.PASS, dn.PASS), (dn.PASS, dn.PASS), dn.PROTOCOL_QUIC),
    ((dn.PASS, dn.FAIL), (dn.PASS, dn.PASS), dn.PROTOCOL_HTTP2),
    ((dn.PASS, dn.SKIP), (dn.FAIL, dn.PASS), dn.PROTOCOL_QUIC),  # a skipped row beside a passed one
    ((dn.SKIP, dn.SKIP), (dn.SKIP, dn.SKIP), None),
    ((dn.FAIL,), (dn.FAIL,), None),
])
def test_suggested_protocol(quic: tuple[int, ...], http2: tuple[int, ...], suggested: int | None) -> None:
    assert dn.suggested_protocol(_rows(dn.QUIC, *quic), _rows(dn.HTTP2, *http2)) == suggested


def test_report_has_gos_field_names_and_order() -> None:
    rows = [dn.probe_result(dn.QUIC, "region1.v2.argotunnel.com", False),
            dn.probe_result(dn.MANAGEMENT_API, "api.cloudflare.com:443", True)]
    text = dn.report_json("00000000-0000-4000-8000-000000000000", rows, dn.PROTOCOL_HTTP2).decode()
    doc = json.loads(text)
    assert list(doc) == ["RunID", "Results", "SuggestedProtocol"] and doc["SuggestedProtocol"] == 0
    assert list(doc["Results"][0]) == ["Type", "Component", "Target", "ProbeStatus", "Details", "Action"]
    assert doc["Results"] == [
        {"Type": 1, "Component": "UDP Connectivity", "Target": "region1.v2.argotunnel.com", "ProbeStatus": 1,
         "Details": "QUIC connection failed",
         "Action": "Allow outbound QUIC traffic on port 7844 or use HTTP2."},
        {"Type": 3, "Component": "Cloudflare API", "Target": "api.cloudflare.com:443", "ProbeStatus": 0,
         "Details": "API is reachable", "Action": ""}]
    assert text.endswith("}\n") and '\n  "Results": [\n    {\n      "Type": 1,' in text


def test_discovery_errors_read_as_gos() -> None:
    def exchange(query: bytes) -> bytes:
        q = dns.decode_message(query)
        answers: tuple[dns.Record, ...] = ()
        if q.questions[0].qtype == dns.SRV:
            answers = (dns.Record(name=q.questions[0].name, rtype=dns.SRV, ttl=60, data=dns.SrvData(
                priority=1, weight=1, port=7844, target="region1.v2.argotunnel.com")),)
        elif q.questions[0].qtype == dns.A:
            answers = (dns.Record(name=q.questions[0].name, rtype=dns.A, ttl=60, data="127.0.1.1"),)
        return dns.encode_message(dns.reply(q, answers=answers))

    assert dn.discover_groups(exchange, "127.0.0.1:53", "_v2-origintunneld._tcp.argotunnel.com") == \
        [[("127.0.1.1", 7844)]]

    def nothing(query: bytes) -> bytes:
        q = dns.decode_message(query)
        return dns.encode_message(dns.reply(q, rcode=dns.NXDOMAIN))

    with pytest.raises(OSError, match=r"^Could not lookup srv records on _x\._tcp: lookup _x\._tcp on "
                                      r"127\.0\.0\.1:53: no such host$"):
        dn.discover_groups(nothing, "127.0.0.1:53", "_x._tcp")
