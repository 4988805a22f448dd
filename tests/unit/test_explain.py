"""`tunnel-lab explain`'s pure part on a trace recorded from a real run (tests/unit/traces/request.*: the
edge's and our connector's traces of `tunnel-lab explain request --keep DIR`): the steps, their facts,
the annotations, the normalisation that keeps docs/walkthroughs/ stable, and the command's bad input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tunnel_lab.lab import explain
from tunnel_lab.lab import trace_view as tv
from tunnel_lab.lab.api import LabError

TRACES = Path(__file__).parent / "traces"


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    files = []
    for name in ("request.edge.trace.jsonl", "request.connector.trace.jsonl"):
        with (TRACES / name).open(encoding="utf-8") as fh:
            trace = tv.read_trace(fh, name)
        assert trace.problems == []
        files.append(trace)
    return tv.merge(files)


def _one(records: list[dict[str, Any]], kind: str, **fields: Any) -> dict[str, Any]:
    found = [r for r in records if r["kind"] == kind and all(r.get(k) == v for k, v in fields.items())]
    assert found, (kind, fields)
    return found[0]


def test_request_steps_follow_the_request_across_the_four_parties(records: list[dict[str, Any]]) -> None:
    steps = explain.walkthrough("request", records)
    arrows = [(s.sender, s.receiver) for s in steps]
    assert arrows == [
        ("Eyeball", "Edge"),         # eyeball.request
        ("Edge", "Connector"),       # HEADERS on a new stream
        ("Connector", "Connector"),  # classification
        ("Connector", "Origin"),     # HTTP/1.1 request
        ("Origin", "Connector"),     # HTTP/1.1 response
        ("Connector", "Edge"),       # response HEADERS
        ("Connector", "Edge"),       # DATA
        ("Connector", "Edge"),       # body summary
        ("Edge", "Eyeball"),         # response
        ("Edge", "Edge"),            # done
    ]
    eyeball = _one(records, "eyeball.request")
    ray = eyeball["ray"]
    headers = _one(records, "h2.frame", component="edge", type="HEADERS", ray=ray, dir="out")
    body = _one(records, "h2.body", component="edge", ray=ray)
    # the facts are the trace's
    assert steps[0].what == f"GET {eyeball['target']} (Host {eyeball['host']}, http)"
    assert steps[1].what.startswith(f"HEADERS on stream {headers['stream']}")
    assert f"cf-ray: {ray}" in steps[1].details
    assert steps[2].what == f"stream {headers['stream']} classified as http"
    assert steps[7].what == f"body of stream {headers['stream']}: {body['length']} bytes"
    assert any(d.startswith("cf-cloudflared-response-headers decodes to: Content-Type: text/html")
               for d in steps[5].details)
    # and every step says why, with a pointer into docs/protocol.md or the page that explains it
    refs = [s.ref for s in steps]
    assert refs[1] == "docs/protocol.md §5.1, §11.2" and refs[2] == "docs/protocol.md §4.1"
    assert refs[3] == "docs/protocol.md §4.3, §5.2" and refs[5] == "docs/protocol.md §5.4, §5.5"
    assert all(s.why for s in steps)


def test_registration_steps_and_their_facts(records: list[dict[str, Any]]) -> None:
    steps = explain.walkthrough("registration", records)
    whats = [s.what for s in steps]
    assert whats[0].startswith("TLS handshake: TLSv1.3")
    assert whats[1] == "HTTP/2 client connection preface" and steps[1].sender == "Edge"
    call = _one(records, "rpc.message", component="edge", method="registerConnection", message="call")
    answer = _one(records, "rpc.message", component="edge", method="registerConnection", message="return")
    i = whats.index("Cap'n Proto call registerConnection (question 1)")
    assert steps[i].sender == "Connector" and steps[i].ref.startswith("docs/protocol.md §3.4, §3.6")
    assert f"tunnel_id {call['params']['tunnel_id']}, conn_index 0" in steps[i].details
    assert f"{call['size']} bytes, in DATA on stream 1" in steps[i].details
    assert any("tunnel_secret <redacted>" in d for d in steps[i].details)
    j = whats.index("Cap'n Proto return registerConnection (answer 1)")
    assert f"uuid {answer['results']['connection_details']['uuid']}" in steps[j].details
    assert whats.index("Cap'n Proto bootstrap (question 0)") < i < j
    # what follows the configuration push (Finish or not, the question id of unregisterConnection, the
    # teardown) is a race: the walkthrough stops at the edge's answer to the push
    assert whats.index("Cap'n Proto call updateLocalConfiguration (question 1)") > j
    assert whats[-1] == "Cap'n Proto return updateLocalConfiguration (answer 1)"
    # control-stream DATA frames are folded into the messages they carry (their batching is a race)
    assert not any(w.startswith("DATA on stream 1") and "END_STREAM" not in w for w in whats)
    # the two SETTINGS acknowledgements cross on the wire: shown together, the edge's first
    acks = [i for i, w in enumerate(whats) if w == "SETTINGS on stream 0 [ACK]"]
    assert len(acks) == 2 and acks[1] == acks[0] + 1 and steps[acks[0]].sender == "Edge"
    # only the first connection's stream 0 and 1: nothing of the request
    assert not any("stream 3" in w for w in whats)


def test_failover_shows_the_silent_drop_and_the_second_registration() -> None:
    files = []
    for name in ("failover.edge.trace.jsonl", "failover.connector.trace.jsonl"):
        with (TRACES / name).open(encoding="utf-8") as fh:
            files.append(tv.read_trace(fh, name))
    records = tv.merge(files)
    steps = explain.walkthrough("failover", records)
    whats = [s.what for s in steps]
    calls = [r for r in records if r["kind"] == "rpc.message" and r.get("component") == "edge"
             and r.get("method") == "registerConnection" and r.get("message") == "call"]
    answers = [r for r in records if r["kind"] == "rpc.message" and r.get("component") == "edge"
               and r.get("method") == "registerConnection" and r.get("message") == "return"]
    assert len(calls) == 2 and len(answers) == 2
    gap = whats.index("(nothing on the wire) edge#1 is closed")
    assert steps[gap].ref == "docs/protocol.md §9.4"
    assert whats[gap + 1].startswith("TLS handshake")  # the reconnect follows the silence
    register = [i for i, w in enumerate(whats) if w == "Cap'n Proto call registerConnection (question 1)"]
    assert len(register) == 2 and register[0] < gap < register[1]
    assert "replace_existing False, num_previous_attempts 1" in steps[register[1]].details
    assert "this is a reconnect" in steps[register[1]].why
    assert "docs/protocol.md §9.4" in steps[register[1]].ref
    uuids = [f"uuid {a['results']['connection_details']['uuid']}" for a in answers]
    assert uuids[0] != uuids[1]
    assert uuids[0] in steps[register[0] + 1].details and uuids[1] in steps[-1].details


def test_markdown_is_normalised_to_placeholders(records: list[dict[str, Any]]) -> None:
    for name in ("registration", "request"):
        text = explain.normalise(explain.render(explain.TOPICS[name], explain.walkthrough(name, records),
                                                markdown=True))
        volatile = {r.get("tunnel") for r in records} | {r.get("conn_uuid") for r in records}
        volatile |= {r.get("ray") for r in records} | {r.get("sha256") for r in records}
        volatile |= {r.get("remote") for r in records} | {r.get("edge") for r in records}
        for value in volatile - {None}:
            assert value not in text, (name, value)
        assert not re.search(r"\d+\.\d+ ms", text)
        assert not re.search(r"127\.0\.0\.1:\d", text)
        assert "<uuid>" in text and "<ms>" in text
        assert text.startswith(f"# Walkthrough: {explain.TOPICS[name].title}\n")
        assert explain.normalise(text) == text  # placeholders are not normalised again


@pytest.mark.parametrize(("raw", "expected"), [
    ("tunnel 5c10e8a4-0b1e-4c4e-9d7a-1f2e3d4c5b6a", "tunnel <uuid>"),
    ("cf-ray: 39dc47424f89f53b-LAB1", "cf-ray: <ray>-LAB1"),
    ("metrics 127.0.0.1:40123 and [::1]:8080", "metrics 127.0.0.1:<port> and [::1]:<port>"),
    ("date: Fri, 04 Dec 2026 21:14:42 GMT", "date: <date>"),
    ("+58.4 ms, in 60.632 ms", "<ms>, in <ms>"),
    ("sha256 " + "ab" * 32, "sha256 <sha256>"),
    ("account_tag " + "0f" * 16, "account_tag <hex32>"),
    ("OU=Testing cert #fBWE0SINzPnAb1t3-_Lzvx, CN=x", "OU=Testing cert #<serial>, CN=x"),
    ("cf-cloudflared-response-headers: Q29udGVudC1UeXBl:dGV4dA;RGF0ZQ:RnJp",
     "cf-cloudflared-response-headers: <base64>"),
    ("sec-websocket-key: 7exrFf37JDMEeZiaVbYO8Q==, Sec-Websocket-Accept: Kr5Q2hxtNo5EEgqnrtoDF/Z4c1g=",
     "sec-websocket-key: <base64>, Sec-Websocket-Accept: <base64>"),
    # a client's masked WebSocket frame is random; a server's (no mask bit) is kept
    ("`first bytes '\\\\x81\\\\x98\\\\xb7I0'`", "`first bytes \\\\x81\\\\x98<masked>`"),
    ("`first bytes '\\\\x81\\x18hello'`", "`first bytes '\\\\x81\\x18hello'`"),
    ("Content-Length: 1449, stream 3, HTTP/1.1 200", "Content-Length: 1449, stream 3, HTTP/1.1 200"),
])
def test_normalise(raw: str, expected: str) -> None:
    assert explain.normalise(raw) == expected


def test_no_topic_lists_the_topics(capsys: pytest.CaptureFixture[str]) -> None:
    assert explain.main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in explain.TOPICS)


def test_unknown_topic_is_refused_with_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert explain.main(["handshake"]) == 2
    err = capsys.readouterr().err
    assert "unknown topic 'handshake'" in err and "registration, request" in err


def test_a_lab_that_fails_says_why_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    async def failing(topic: str, workdir: Path, protocol: str) -> list[dict[str, Any]]:
        raise LabError("edge did not start: exited with code 1",
                       {"edge": ["edge: cannot listen on 127.0.0.1:1: permission denied"]})

    monkeypatch.setattr(explain, "record", failing)
    assert explain.main(["request"]) == 1
    err = capsys.readouterr().err
    assert "the lab for 'request' over http2 failed: edge did not start" in err
    assert "--- edge (last lines)\nedge: cannot listen on 127.0.0.1:1: permission denied" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def quic_records() -> list[dict[str, Any]]:
    files = []
    for name in ("request-quic.edge.trace.jsonl", "request-quic.connector.trace.jsonl"):
        with (TRACES / name).open(encoding="utf-8") as fh:
            trace = tv.read_trace(fh, name)
        assert trace.problems == []
        files.append(trace)
    return tv.merge(files)


def test_request_over_quic_is_a_connect_request_and_response(quic_records: list[dict[str, Any]]) -> None:
    steps = explain.walkthrough("request", quic_records, "quic")
    whats = [s.what for s in steps]
    head = _one(quic_records, "quic.stream_head", component="edge", message="ConnectRequest")
    answer = _one(quic_records, "quic.stream_head", component="edge", message="ConnectResponse")
    stream = head["stream"]
    assert whats[1] == f"stream {stream}: ConnectRequest type http"
    assert steps[1].sender == "Edge" and steps[1].ref == "docs/protocol.md §13.3, §13.4, §11.2"
    assert f"dest: {head['dest']}" in steps[1].details
    assert f"HttpHeader:Cf-Ray: {head['ray']}" in steps[1].details
    assert whats[2] == f"body of stream {stream}: 0 bytes"  # a GET's empty body, ended by FIN
    i = whats.index("stream 1: ConnectResponse HttpStatus 200")
    assert steps[i].sender == "Connector" and "each in its own metadata entry" in steps[i].why
    assert [f"{k}: {v}" for k, v in answer["metadata"]] == list(steps[i].details)
    # the response body's summary (written at FIN) after what the eyeball got: that order is a race
    assert [(s.sender, s.receiver) for s in steps[i + 1:]] == [("Edge", "Eyeball"), ("Connector", "Edge"),
                                                               ("Edge", "Edge")]
    assert steps[i + 1].ref == "docs/protocol.md §13.4"
    assert not any("HEADERS" in w or "DATA" in w for w in whats)


def test_registration_over_quic_runs_the_rpc_on_stream_0(quic_records: list[dict[str, Any]]) -> None:
    steps = explain.walkthrough("registration", quic_records, "quic")
    assert steps[0].what == "QUIC handshake (TLSv1.3 inside)" and steps[0].ref == "docs/protocol.md §13.1"
    assert "ALPN argotunnel" in steps[0].details
    call = _one(quic_records, "rpc.message", component="edge", method="registerConnection", message="call")
    i = [s.what for s in steps].index("Cap'n Proto call registerConnection (question 1)")
    assert f"{call['size']} bytes, on QUIC stream 0" in steps[i].details
    assert steps[i].ref.endswith("docs/protocol.md §13.2 (the control stream over QUIC)")
    assert steps[-1].what == "Cap'n Proto return updateLocalConfiguration (answer 1)"


def test_quic_pages_are_named_and_titled_apart(quic_records: list[dict[str, Any]]) -> None:
    topic = explain.TOPICS["request"]
    assert topic.page("http2") == "request.md" and topic.page("quic") == "request-quic.md"
    text = explain.render(topic, explain.walkthrough("request", quic_records, "quic"), markdown=True,
                          protocol="quic")
    assert text.startswith("# Walkthrough: One HTTP request through the tunnel (over QUIC)\n")
    assert "`tunnel-lab explain request --protocol quic --markdown`" in text
    assert all(t.quic_intro for t in explain.TOPICS.values())


def test_races_do_not_change_the_registration_page(records: list[dict[str, Any]],
                                                   quic_records: list[dict[str, Any]]) -> None:
    # the edge's SETTINGS ACK leaving late (after the registration call) does not move the acks
    call = _one(records, "rpc.message", component="edge", method="registerConnection", message="call")
    late = [{**r, "t": call["t"] + 1e-4} if r["kind"] == "h2.frame" and r.get("type") == "SETTINGS"
            and r.get("component") == "edge" and r.get("dir") == "out" and "ACK" in (r.get("flags") or [])
            else r for r in records]
    assert ([s.what for s in explain.walkthrough("registration", late)]
            == [s.what for s in explain.walkthrough("registration", records)])
    # over QUIC an unregisterConnection overtaking the configuration's answer is left out
    config = _one(quic_records, "rpc.message", component="edge", method="updateLocalConfiguration",
                  message="call")
    unregister = {**config, "t": config["t"] + 1e-6, "question": 0, "method": "unregisterConnection",
                  "params": None}
    whats = [s.what for s in explain.walkthrough("registration", [*quic_records, unregister], "quic")]
    assert whats == [s.what for s in explain.walkthrough("registration", quic_records, "quic")]
    assert not any("unregisterConnection" in w for w in whats)
