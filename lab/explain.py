"""`tunnel-lab explain [TOPIC]`: a walkthrough of the protocol built from a trace the command just recorded.

`explain TOPIC` starts a small lab (an edge with two data centres, our connector, an origin) with
`--trace` on both sides, does one thing (registers a connection, sends one request) and prints each step
of what crossed the wire: who sent it to whom, what it carried (ids, sizes, header names: all from the
trace), why it is there, and where docs/protocol.md explains it. The annotations are keyed by record kind,
frame type and RPC method; no fact is written here. `--markdown` writes the same text as Markdown with
what changes from run to run (uuids, rays, ports, dates, timings, digests) replaced by placeholders:
docs/walkthroughs/TOPIC.md is that output, and tests/integration/test_explain.py fails when it drifts.

`--protocol quic` runs our connector over QUIC instead (docs/protocol.md §13) and explains the same
topics from that trace: docs/walkthroughs/TOPIC-quic.md. Where the QUIC trace lacks what a topic would
show, the walkthrough says so (`Topic.quic_note`) rather than inventing it.

The pure part (`walkthrough`, `render`, `normalise`) reads records as `lab.trace_view.read_trace` gives
them; `record` is the shell that runs the lab.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnel_lab.lab import trace_view as tv

__all__ = ["PROTOCOLS", "TOPICS", "Topic", "WalkStep", "main", "normalise", "render", "walkthrough"]

PROTOCOLS = ("http2", "quic")

HOSTNAME = "app.lab.test"
REQUEST_PATH = "/hello?lang=en"
RECONNECT_TIMEOUT = 45.0
RECONNECT = "docs/protocol.md §9.4 (reconnects)"
FRAMING = "docs/protocol.md §3.2 (framing)"
QUIC_CONTROL = "docs/protocol.md §13.2 (the control stream over QUIC)"
WS_PATH = "/chat"
WS_MESSAGE = "hello through the tunnel"


@dataclass(frozen=True)
class WalkStep:
    """One step of a walkthrough: `sender` -> `receiver` (equal for a decision taken inside one party)."""

    t: float
    sender: str
    receiver: str
    what: str
    details: tuple[str, ...]
    why: str
    ref: str


@dataclass(frozen=True)
class Topic:
    name: str
    title: str
    intro: str
    action: str  # what `record` does, one line (shown in the walkthrough)
    quic_intro: str = ""  # the intro over QUIC (`--protocol quic`)
    quic_action: str = ""  # when the action reads differently over QUIC
    quic_note: str = ""  # what the QUIC trace cannot show for this topic, said once at the top

    def page(self, protocol: str) -> str:
        """The generated page's file name in docs/walkthroughs/."""
        return f"{self.name}.md" if protocol == "http2" else f"{self.name}-{protocol}.md"


TOPICS: dict[str, Topic] = {
    t.name: t
    for t in (
        Topic("registration", "Registering a tunnel connection",
              "How our connector dials a data centre, and how the edge and the connector set up HTTP/2, "
              "open the control stream, register the connection with a Cap'n Proto call and push the "
              "connector's configuration.",
              "start the edge and our connector (one HA connection), wait until it is ready, stop the "
              "connector",
              quic_intro="How our connector dials a data centre over QUIC (UDP; TLS 1.3 runs inside QUIC's "
              "handshake), opens the connection's first stream as the control stream, and registers the "
              "connection with the same Cap'n Proto calls as over http2: no HTTP/2 layer, no SETTINGS, the "
              "RPC bytes go straight onto the QUIC stream."),
        Topic("request", "One HTTP request through the tunnel",
              "How one eyeball request reaches the origin and comes back: the edge turns it into a new "
              "HTTP/2 stream on the tunnel connection, the connector classifies the stream, sends HTTP/1.1 "
              "to the origin, and returns the origin's answer with its headers serialized into one field.",
              f"start the edge, our connector and the `hello` origin, then `GET http://{HOSTNAME}"
              f"{REQUEST_PATH}` once through the edge's HTTP listener",
              quic_intro="How one eyeball request reaches the origin and comes back over QUIC: the edge "
              "opens a new QUIC stream whose head is a Cap'n Proto ConnectRequest (the method, URL and "
              "header fields as metadata), the connector classifies it, sends HTTP/1.1 to the origin, and "
              "answers on the same stream with a ConnectResponse (the origin's status and header fields as "
              "metadata), then the body."),
        Topic("websocket", "A WebSocket through the tunnel",
              "How a WebSocket upgrade crosses the tunnel: the edge opens a stream marked as a WebSocket, "
              "the connector upgrades its HTTP/1.1 connection to the origin, a 101 comes back as :status "
              "200 with the origin's fields serialized, and from then on DATA frames carry the WebSocket "
              "frames untouched in both directions.",
              f"start the edge, our connector and the `ws-echo` origin, open a WebSocket to "
              f"`ws://{HOSTNAME}{WS_PATH}` through the edge, send one text message ({WS_MESSAGE!r}) and "
              "read its echo (the walkthrough stops at the echo: the close races)",
              quic_intro="How a WebSocket upgrade crosses the tunnel over QUIC: the edge opens a stream "
              "whose ConnectRequest has type websocket, the connector upgrades its HTTP/1.1 connection to "
              "the origin, and a ConnectResponse with HttpStatus 101 comes back; from then on the stream's "
              "bytes are the WebSocket frames, untouched, in both directions.",
              quic_action=f"start the edge, our connector and the `ws-echo` origin, open a WebSocket to "
              f"`ws://{HOSTNAME}{WS_PATH}` through the edge, send one text message ({WS_MESSAGE!r}) and "
              "read its echo",
              quic_note="The trace summarises a QUIC stream's body once per direction, when the stream "
              "ends (length, digest, first bytes), not message by message as the DATA frames of http2 "
              "show it; how the close interleaves changes those sums from run to run. So this walkthrough "
              "stops at the connector's answer to the upgrade: the WebSocket messages are not in it "
              "(`tunnel-lab explain websocket` shows them, as DATA frames, over http2)."),
        Topic("failover", "A dropped connection and the reconnect",
              "What happens when the edge loses a tunnel connection without warning: the connector notices "
              "the TCP connection is gone, dials again, and registers a new connection, telling the edge "
              "how many attempts came before.",
              "start the edge and our connector (one HA connection), drop that connection through the "
              "management API (`POST /faults {\"kind\": \"drop-connection\"}`: the edge closes TCP, no "
              "GOAWAY), and wait until the edge lists a new registered connection (our connector, like "
              "cloudflared, waits a random time of up to 20 s before it dials again after a registered "
              "connection dropped, docs/protocol.md §9.4)",
              quic_intro="What happens when the edge drops a QUIC tunnel connection: unlike a TCP close, "
              "QUIC ends a connection with a CONNECTION_CLOSE frame that carries an error code and a reason, "
              "so the connector is told at once; it dials again and registers a new connection, telling the "
              "edge how many attempts came before.",
              quic_action="start the edge and our connector (one HA connection), drop that connection "
              "through the management API (`POST /faults {\"kind\": \"drop-connection\"}`: over QUIC the "
              "edge closes it with CONNECTION_CLOSE), and wait until the edge lists a new registered "
              "connection (our connector, like cloudflared, waits a random time of up to 20 s before it "
              "dials again after a registered connection dropped, docs/protocol.md §9.4)"),
        Topic("origin-cert-error", "An origin with an expired certificate",
              "What the eyeball gets when the connector cannot trust the origin: the request crosses the "
              "tunnel as usual, the connector's TLS handshake with the origin fails, and the connector "
              "answers the stream itself with a 502, which the edge passes on.",
              f"start the edge, the `hello` origin over HTTPS with the lab's expired certificate, our "
              f"connector trusting the lab CA (originRequest caPool), then `GET http://{HOSTNAME}"
              f"{REQUEST_PATH}` once",
              quic_intro="What the eyeball gets over QUIC when the connector cannot trust the origin: the "
              "request crosses the tunnel as a ConnectRequest as usual, the connector's TLS handshake with "
              "the origin fails, and the connector answers the stream itself with a ConnectResponse that "
              "carries the error, which the edge turns into a 502."),
    )
}


# ---- annotations: our words, keyed by what a record is -------------------------------------------------

def _headers(r: dict[str, Any], key: str = "headers") -> list[tuple[str, str]]:
    return [(str(p[0]), str(p[1])) for p in r.get(key) or [] if isinstance(p, list) and len(p) == 2]


def _frame_why(r: dict[str, Any]) -> tuple[str, str]:
    ftype, flags = r.get("type"), r.get("flags") or []
    headers = dict(_headers(r))
    stream = r.get("stream")
    if ftype == "SETTINGS":
        if "ACK" in flags:
            return ("acknowledges the peer's SETTINGS: from now on the sender applies them",
                    "docs/protocol.md §2.4")
        return ("each side states its HTTP/2 limits (window, frame size, concurrent streams) before any "
                "stream opens", "docs/protocol.md §2.4")
    if ftype == "WINDOW_UPDATE":
        return ("widens the connection's flow-control window far beyond HTTP/2's 64 KiB default, so bulk "
                "bodies are not throttled", "docs/protocol.md §2.4")
    upgrade = headers.get("cf-cloudflared-proxy-connection-upgrade")
    if ftype == "HEADERS" and upgrade == "websocket":
        return ("the edge opens a new stream marked as a WebSocket (cf-cloudflared-proxy-connection-"
                "upgrade), "
                "with the eyeball's sec-websocket-* fields and no END_STREAM: the stream's body will carry "
                "the eyeball's WebSocket frames", "docs/protocol.md §6.1")
    if ftype == "HEADERS" and upgrade == "control-stream":
        return ("the edge (the HTTP/2 client) opens stream 1 as the control stream; no END_STREAM, because "
                "its body is the edge's half of the RPC byte stream", "docs/protocol.md §3.1")
    if ftype == "HEADERS" and stream == 1:
        return ("the connector accepts the control stream with :status 200; from here both directions of "
                "stream 1 carry Cap'n Proto RPC messages", "docs/protocol.md §3.1")
    if ftype == "HEADERS" and ":method" in headers:
        return ("the edge opens a new stream for the request: the eyeball's method, path and headers, plus "
                "the headers the edge adds (cf-ray, cf-connecting-ip, x-forwarded-*, cf-visitor, cdn-loop)",
                "docs/protocol.md §5.1, §11.2")
    if ftype == "HEADERS" and ":status" in headers and "Upgrade" in dict(_headers(r, "origin_headers")):
        return ("the origin's 101 travels as :status 200; the serialized Upgrade, Connection and "
                "Sec-Websocket-Accept tell the edge the stream is now a WebSocket",
                    "docs/protocol.md §6.1, §5.5")
    if ftype == "HEADERS" and ":status" in headers and '"src":"cloudflared"' in headers.get(
            "cf-cloudflared-response-meta", ""):
        return ("the connector answers the stream itself: it got no response from the origin (refused, "
                "unreachable, a TLS failure, a timeout: the connector's log says which). "
                "cf-cloudflared-response-meta src cloudflared tells the edge the status is the connector's, "
                "not the origin's",
                "docs/protocol.md §5.7")
    if ftype == "HEADERS" and ":status" in headers:
        return ("the connector answers on the same stream: :status is the origin's, and the origin's own "
                "header fields travel base64-serialized in cf-cloudflared-response-headers (decoded in the "
                "last line)",
                "docs/protocol.md §5.4, §5.5")
    if ftype == "DATA" and stream == 1:
        return ("END_STREAM on the control stream: the connector's half of the RPC byte stream ends",
                "docs/protocol.md §3.9")
    if ftype == "DATA" and "END_STREAM" in flags and not r.get("data_length"):
        return ("an empty DATA with END_STREAM: this side of the stream has nothing more to send",
                "docs/protocol.md §6.1")
    if ftype == "DATA" and r.get("_websocket"):
        return ("raw WebSocket frames, relayed without being parsed (the edge's are masked, being a "
                "client's)", "docs/protocol.md §6.1")
    if ftype == "DATA":
        return "the response body; END_STREAM marks its end", "docs/protocol.md §5.6"
    if ftype == "RST_STREAM":
        return (f"the stream is reset ({r.get('error_code')}); the other side sends nothing more on it",
                "docs/protocol.md §9.2")
    if ftype == "GOAWAY":
        return ("the edge closes the connection: no new streams after last_stream",
                "docs/protocol.md §9.2, §9.3")
    return f"an HTTP/2 {ftype} frame", "docs/protocol.md §2.4"


_RPC_WHY: dict[str, tuple[str, str]] = {
    "bootstrap": ("asks for the edge's bootstrap capability: the RegistrationServer the next call is "
                  "addressed to", "docs/protocol.md §3.3"),
    "finish": ("tells the other side an answer was received and its question id can be reused",
        "docs/protocol.md §3.3"),
    "release": ("drops the connector's reference to the edge's capability", "docs/protocol.md §3.9"),
    "abort": ("ends the RPC conversation before the stream closes", "docs/protocol.md §3.9"),
}
_METHOD_WHY: dict[tuple[str, str], tuple[str, str]] = {
    ("call", "registerConnection"): (
        "registers this connection: the tunnel's credentials (secret redacted in the trace), the HA index "
        "and the client's identity and features; pipelined on the bootstrap's promised answer",
            "docs/protocol.md §3.4, §3.6"),
    ("return", "registerConnection"): (
        "the edge accepts: the connection's uuid and the data centre's location; the connector counts "
        "the connection ready", "docs/protocol.md §3.7"),
    ("call", "updateLocalConfiguration"): (
        "the connector pushes its local configuration (ingress rules) as JSON, for the dashboard",
        "docs/protocol.md §3.8"),
    ("return", "updateLocalConfiguration"): ("the edge acknowledges the configuration",
        "docs/protocol.md §3.8"),
    ("call", "unregisterConnection"): (
        "the connector is shutting down: it asks the edge to stop sending new requests on this connection "
        "before it closes", "docs/protocol.md §3.9, §9.2"),
    ("return", "unregisterConnection"): (
        "the edge acknowledges the unregistration. Then the connector Finishes the question, Releases the "
        "capability, Aborts the RPC conversation, ends stream 1 (END_STREAM, RST_STREAM) and closes; the "
        "edge sends GOAWAY. How much of that the other side still reads before the socket closes is a "
        "race, so the walkthrough stops here (`tunnel-lab trace show` shows a whole trace)",
            "docs/protocol.md §3.9, §9.2"),
    ("return", "bootstrap"): ("the edge hands out its RegistrationServer capability",
        "docs/protocol.md §3.3"),
}


_CLASSIFIED = {
    "http": "no upgrade field means a plain HTTP request",
    "websocket": "cf-cloudflared-proxy-connection-upgrade: websocket makes it a WebSocket",
    "control": "cf-cloudflared-proxy-connection-upgrade: control-stream makes it the control stream",
    "tcp": "cf-cloudflared-proxy-src makes it a TCP stream (private networks)",
    "configuration": "cf-cloudflared-proxy-connection-upgrade: update-configuration makes it a "
                     "configuration push",
}


def _rpc_why(r: dict[str, Any]) -> tuple[str, str]:
    message, method = str(r.get("message")), str(r.get("method") or "")
    attempts = ((r.get("params") or {}).get("options") or {}).get("num_previous_attempts")
    if (message, method) == ("call", "registerConnection") and attempts:
        why, ref = _METHOD_WHY[(message, method)]
        return (f"{why}; num_previous_attempts {attempts} tells the edge this is a reconnect",
                f"{ref}; {RECONNECT}")
    if (message, method) in _METHOD_WHY:
        return _METHOD_WHY[(message, method)]
    return _RPC_WHY.get(message, (f"a Cap'n Proto {message} message", "docs/protocol.md §3.3"))


def _rpc_details(r: dict[str, Any]) -> tuple[str, ...]:
    out: list[str] = []
    params = r.get("params")
    if isinstance(params, dict) and r.get("method") == "registerConnection":
        auth = params.get("auth") or {}
        options = params.get("options") or {}
        client = options.get("client") or {}
        out += [f"tunnel_id {params.get('tunnel_id')}, conn_index {params.get('conn_index')}",
                f"auth: account_tag {auth.get('account_tag')}, tunnel_secret {auth.get('tunnel_secret')} "
                f"({auth.get('tunnel_secret_length')} bytes)",
                f"client: version {client.get('version')}, arch {client.get('arch')}, client_id "
                f"{client.get('client_id')}",
                f"features: {', '.join(client.get('features') or [])}",
                f"replace_existing {options.get('replace_existing')}, num_previous_attempts "
                f"{options.get('num_previous_attempts')}"]
    elif params is not None:
        out.append(f"params: {json.dumps(params, separators=(',', ':'), sort_keys=True)}")
    results = r.get("results")
    if isinstance(results, dict):
        details = results.get("connection_details")
        if isinstance(details, dict):
            out += [f"{k} {v}" for k, v in details.items()]
        else:
            out.append(f"results: {json.dumps(results, separators=(',', ':'), sort_keys=True)}")
    if r.get("exception"):
        out.append(f"exception: {r['exception']}")
    return tuple(out)


def _quic_head_why(r: dict[str, Any]) -> tuple[str, tuple[str, ...], str, str]:
    """What a QUIC stream head is (its one-line name, details, why, where): docs/protocol.md §13.3-13.4."""
    meta = _headers(r, "metadata")
    details = tuple(f"{k}: {v}" for k, v in meta)
    stream = r.get("stream")
    if r.get("message") == "ConnectRequest":
        what = f"stream {stream}: ConnectRequest type {r.get('type')}"
        details = (f"dest: {r.get('dest')}", *details)
        if r.get("type") == "websocket":
            return (what, details, "the edge opens a new QUIC stream for the WebSocket: the data-stream "
                    "signature, version 01 and a ConnectRequest of type websocket, with the upgrade in "
                    "HttpHeader:Cf-Cloudflared-Proxy-Connection-Upgrade and the eyeball's Sec-Websocket-* "
                    "fields as metadata; the stream stays open for the frames",
                    "docs/protocol.md §13.3, §13.4, §6.1")
        return (what, details, "the edge opens a new QUIC stream for the request (an id of its own, "
                "server-initiated): the data-stream signature, version 01, then one Cap'n Proto "
                "ConnectRequest: the URL in dest, the method and host in HttpMethod and HttpHost, one "
                "HttpHeader:<Name> per header field (the eyeball's and those the edge adds: cf-ray, "
                "cf-connecting-ip, x-forwarded-*, cf-visitor, cdn-loop); the request body follows",
                "docs/protocol.md §13.3, §13.4, §11.2")
    if r.get("message") == "ConnectResponse":
        what = f"stream {stream}: ConnectResponse"
        status = dict(meta).get("HttpStatus")
        if r.get("error"):
            carried = f" (with HttpStatus {status}, the status it chose)" if status else ""
            return (f"{what} error", (f"error: {r.get('error')}", *details),
                    "the connector answers the stream itself: it got no response from the origin, so the "
                    f"ConnectResponse carries an error text{carried} instead of the origin's answer; the "
                    "edge turns it into a 502 marked as the connector's (cf-cloudflared-response-meta src "
                    "cloudflared)", "docs/protocol.md §13.4")
        if dict(meta).get("HttpHeader:Upgrade", "").lower() == "websocket":
            differs = ("" if status == "101" else f"; here HttpStatus is {status} where cloudflared sends "
                       "the origin's 101 over QUIC (only its http2 writer turns 101 into 200); the edge "
                       "reads both the same way")
            return (f"{what} HttpStatus {status}", details,
                    "the origin accepted the upgrade: its Upgrade, Connection and Sec-Websocket-Accept "
                    "fields come back as metadata, and from now on the stream's bytes are WebSocket frames"
                    + differs, "docs/protocol.md §13.4, §6.1")
        return (f"{what} HttpStatus {status}", details,
                "the connector answers on the same stream: the signature and version again, then a "
                "ConnectResponse with the origin's status (HttpStatus) and one HttpHeader:<Name> per header "
                "field, each in its own metadata entry (over http2 they travel base64-serialized in one "
                "field); the response body follows", "docs/protocol.md §13.3, §13.4")
    return (f"stream {stream}: {r.get('stream_kind')} stream head", details,
            "a QUIC stream's head says what the stream carries", "docs/protocol.md §13.3")


def _step(r: dict[str, Any], start: float, protocol: str = "http2") -> WalkStep | None:
    """The walkthrough step for one record, or None for a record the walkthrough leaves out."""
    kind, comp = r["kind"], r.get("component")
    outgoing = (comp == "edge") == (r.get("dir") == "out")
    sender, receiver = ("Edge", "Connector") if outgoing else ("Connector", "Edge")
    t = r["t"]
    quic = protocol == "quic"
    if kind == "tls.handshake" and r.get("side") == "quic":
        seen = [f"ALPN {r.get('alpn') or 'none'}"]
        if r.get("sni"):
            seen.append(f"SNI {r.get('sni')}")
        if r.get("peer_subject"):
            seen.append(f"edge certificate: {r.get('peer_subject')}, issued by {r.get('peer_issuer')}")
        return WalkStep(t, "Connector", "Edge", f"QUIC handshake ({r.get('version')} inside)", tuple(seen),
                        "the connector dials the data centre over UDP (the same port as the TCP listener); "
                        "QUIC's handshake carries TLS 1.3 with ALPN argotunnel, and the connector checks the "
                        "edge's certificate against the CA it was given (--cacert)", "docs/protocol.md §13.1")
    if kind == "quic.stream_head":
        return WalkStep(t, sender, receiver, *_quic_head_why(r))
    if kind == "quic.body":
        return WalkStep(t, sender, receiver, f"body of stream {r.get('stream')}: {r.get('length')} bytes",
                        (f"sha256 {r.get('sha256')}", f"first bytes {r.get('head', '')!r}"),
                        "after its head, the stream carries the body as plain bytes until FIN; the trace "
                        "summarises it (length, digest, first bytes) once the stream ends in that direction",
                        "docs/protocol.md §13.3; docs/trace.md")
    if kind == "quic.closed":
        return WalkStep(t, "Edge", "Connector", f"CONNECTION_CLOSE error_code {r.get('error_code')}",
                        (f"reason: {r.get('reason')}",),
                        "the edge ends the QUIC connection with a CONNECTION_CLOSE frame (an error code and "
                        "a reason): unlike a TCP drop, the connector is told at once; it dials again after "
                        "a random backoff", "docs/protocol.md §13.5, §9.4")
    if kind == "tls.handshake":
        tls = [f"SNI {r.get('sni')}, ALPN {r.get('alpn') or 'none'}"]
        if r.get("peer_subject"):
            tls.append(f"edge certificate: {r.get('peer_subject')}, issued by {r.get('peer_issuer')}")
        return WalkStep(t, "Connector", "Edge", f"TLS handshake: {r.get('version')} {r.get('cipher')}",
                        tuple(tls),
                        "the connector dials the data centre and is the TLS client; it checks the edge's "
                        "certificate against the CA it was given (--cacert)", "docs/protocol.md §2.1, §2.3")
    if kind == "h2.preface":
        return WalkStep(t, sender, receiver, "HTTP/2 client connection preface", (),
                        "the edge is the HTTP/2 client on this connection, although the connector dialled "
                        "it: the edge opens streams, the connector serves them", "docs/protocol.md §2.1")
    if kind == "h2.frame":
        if r.get("type") == "WINDOW_UPDATE" and r.get("stream") not in (0, None):
            return None  # per-stream credit: timing-dependent; docs/protocol.md §2.4 explains the mechanism
        if r.get("type") == "DATA" and r.get("stream") == 1 and "END_STREAM" not in (r.get("flags") or []):
            # how RPC messages are batched into DATA frames depends on timing; each message's own
            # step gives its size
            return None
        what = f"{r.get('type')} on stream {r.get('stream')}"
        flags = r.get("flags") or []
        if flags:
            what += f" [{'|'.join(flags)}]"
        details: list[str] = []
        if r.get("settings"):
            details.append(" ".join(f"{k}={v}" for k, v in r["settings"].items()))
        for key in ("increment", "data_length", "error_code", "last_stream"):
            if key in r:
                details.append(f"{key} {r[key]}")
        details += [f"{name}: {value}" for name, value in _headers(r)]
        if "origin_headers" in r:
            details.append("cf-cloudflared-response-headers decodes to: "
                           + ", ".join(f"{n}: {v}" for n, v in _headers(r, "origin_headers")))
        why, ref = _frame_why(r)
        return WalkStep(t, sender, receiver, what, tuple(details), why, ref)
    if kind == "rpc.message":
        what = f"Cap'n Proto {r.get('message')}"
        if r.get("method"):
            what += f" {r['method']}"
        for key, label in (("question", "question"), ("answer", "answer")):
            if key in r:
                what += f" ({label} {r[key]})"
        why, ref = _rpc_why(r)
        where = f"on QUIC stream {r.get('stream')}" if quic else f"in DATA on stream {r.get('stream')}"
        size = (f"{r['size']} bytes, {where}",) if "size" in r else ()
        return WalkStep(t, sender, receiver, what, size + _rpc_details(r), why,
                        f"{ref}; {QUIC_CONTROL if quic else FRAMING}")
    if kind == "h2.body":
        return WalkStep(t, sender, receiver, f"body of stream {r.get('stream')}: {r.get('length')} bytes",
                        (f"sha256 {r.get('sha256')}", f"first bytes {r.get('head', '')!r}"),
                        "the trace summarises each body (length, digest, first bytes) instead of copying it",
                        "docs/trace.md")
    if kind == "eyeball.request":
        return WalkStep(t, "Eyeball", "Edge", f"{r.get('method')} {r.get('target')} (Host {r.get('host')}, "
                        f"{r.get('scheme')})", tuple(f"{n}: {v}" for n, v in _headers(r)),
                        "a visitor's request reaches the data centre; the edge finds the tunnel routed "
                        "for the hostname and picks one of its connections, and gives the request a ray id",
                        "docs/protocol.md §11.2")
    if kind == "stream.classified" and quic:
        return WalkStep(t, "Connector", "Connector", f"stream {r.get('stream')} classified as "
                        f"{r.get('stream_kind')}", (),
                        "the connector decides what the stream is from the ConnectRequest's type (http, "
                        "websocket or tcp), where over http2 it reads the cf-cloudflared-proxy-* fields",
                        "docs/protocol.md §4.1, §13.4")
    if kind == "stream.classified":
        return WalkStep(t, "Connector", "Connector", f"stream {r.get('stream')} classified as "
                        f"{r.get('stream_kind')}", (),
                        "the connector decides what the stream is from its pseudo-headers and the "
                        "cf-cloudflared-proxy-* fields: " + _CLASSIFIED.get(str(r.get("stream_kind")), ""),
                        "docs/protocol.md §4.1")
    if kind == "origin.request":
        return WalkStep(t, "Connector", "Origin", f"{r.get('method')} {r.get('target')} "
                        f"HTTP/{r.get('http_version')}", tuple(f"{n}: {v}" for n, v in _headers(r)),
                        "the connector matches the ingress rules and sends the origin an HTTP/1.1 request "
                        + ("built from the ConnectRequest's dest and metadata (the edge's cf-* fields are "
                           "kept)" if quic else "built from the stream's headers (the edge's cf-* fields are "
                           "kept)"),
                        "docs/protocol.md §4.3, §13.4" if quic else "docs/protocol.md §4.3, §5.2")
    if kind == "origin.response":
        return WalkStep(t, "Origin", "Connector", f"HTTP/{r.get('http_version')} {r.get('status')} "
                        f"{r.get('reason', '')}".rstrip(), tuple(f"{n}: {v}" for n, v in _headers(r)),
                        "the origin answers the connector over HTTP/1.1", "docs/protocol.md §5.2, §5.9")
    if kind == "eyeball.response":
        return WalkStep(t, "Edge", "Eyeball", f"{r.get('status')}",
                        tuple(f"{n}: {v}" for n, v in _headers(r)),
                        ("the edge gives the eyeball the origin's status and header fields (from the "
                         "ConnectResponse's metadata), plus cf-ray" if quic else
                         "the edge gives the eyeball the origin's status and header fields (decoded from "
                         "the serialized field), plus cf-ray"),
                        "docs/protocol.md §13.4" if quic else "docs/protocol.md §5.5")
    if kind == "explain.gap":
        return WalkStep(t, "Edge", "Connector", f"(nothing on the wire) {r['first']} is closed",
                        (f"{r['first']}: last record at +{(r['last'] - start) * 1000:.1f} ms (nothing "
                         "after it)",
                         f"the connector's next TLS handshake at +{(r['next'] - start) * 1000:.1f} ms"),
                        "drop-connection closes the TCP connection without a GOAWAY, so no frame says so: "
                        "the connector learns it when its read fails, and dials again after a random backoff",
                        "docs/protocol.md §9.4")
    if kind == "eyeball.done":
        return WalkStep(t, "Edge", "Edge", f"request done: {r.get('status')} {r.get('outcome')} in "
                        f"{r.get('duration_ms')} ms", (),
                        "the edge records the outcome in its request history (GET /history, the live view)",
                        "docs/edge.md")
    return None


def _first_conn(records: Sequence[dict[str, Any]]) -> str | None:
    for r in records:
        if r.get("component") == "edge" and r["kind"] == "tls.handshake":
            return str(r.get("conn"))
    return None


def _tls_in_place(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records, each of the connector's TLS handshakes timed no later than the edge's record of the
    same handshake (the Nth of each side's): the connector's is written once its TLS object reports the
    handshake done, which may be after the edge's first frames."""
    edge_tls = [r["t"] for r in records if r.get("component") == "edge" and r["kind"] == "tls.handshake"]
    out, n = [], 0
    for r in records:
        if r.get("component") == "connector" and r["kind"] == "tls.handshake":
            if n < len(edge_tls):
                r = {**r, "t": min(r["t"], edge_tls[n])}
            n += 1
        out.append(r)
    return sorted(out, key=lambda r: r["t"])


def _failover(ordered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    conns = [str(r.get("conn")) for r in ordered
             if r.get("component") == "edge" and r["kind"] == "tls.handshake"]
    if len(conns) < 2:
        return []
    first, second = conns[0], conns[1]

    def registration(r: dict[str, Any], conn: str) -> bool:
        return (r.get("component") == "edge" and r.get("conn") == conn and r["kind"] == "rpc.message"
                and r.get("method") == "registerConnection")

    def setup(r: dict[str, Any]) -> bool:
        return (r.get("component") == "edge" and r.get("conn") == second
                and (r["kind"] == "h2.preface" or (r["kind"] == "h2.frame" and r.get("type") == "HEADERS"
                                                    and r.get("stream") == 1)
                     or (r["kind"] == "rpc.message" and r.get("message") == "bootstrap")))

    chosen = [r for r in ordered
              if (r.get("component") == "connector" and r["kind"] == "tls.handshake"
                  and r.get("conn") in ("connector#0.0", "connector#0.1"))
              or registration(r, first) or registration(r, second) or setup(r)]
    # over QUIC the drop is a CONNECTION_CLOSE, which the connector's trace records as received
    closed = [r for r in ordered if r.get("component") == "connector" and r["kind"] == "quic.closed"
              and r.get("conn") == "connector#0.0"]
    chosen += closed[:1]
    # over http2 the drop itself sends nothing (no GOAWAY, no RST): what the trace shows is the silence
    # between the first connection's last record and the second's handshake
    last_first = max((r["t"] for r in ordered if r.get("conn") in (first, "connector#0.0")), default=None)
    second_tls = next((r for r in chosen if r.get("conn") == "connector#0.1"), None)
    if not closed and last_first is not None and second_tls is not None:
        chosen.append({"kind": "explain.gap", "t": second_tls["t"] - 1e-6, "first": first, "second": second,
                       "last": last_first, "next": second_tls["t"]})
    return sorted(chosen, key=lambda r: r["t"])


def walkthrough(topic: str, records: Sequence[dict[str, Any]], protocol: str = "http2") -> list[WalkStep]:
    """The steps of `topic` in the merged records of the edge's and the connector's traces, recorded over
    `protocol` (http2 or quic).

    Each frame and RPC message is in both traces; the walkthrough takes them from the edge's (which
    sees both directions) and takes from the connector's what only it knows: its TLS view of the edge's
    certificate, the stream classification and the origin side (and over QUIC the CONNECTION_CLOSE it
    received)."""
    ordered = _tls_in_place(sorted(records, key=lambda r: r["t"]))
    if topic == "failover":
        chosen = _failover(ordered)
    elif topic == "registration":
        conn = _first_conn(ordered)
        chosen = [r for r in ordered
                  if (r.get("component") == "connector" and r["kind"] == "tls.handshake"
                      and r.get("conn") == "connector#0.0")
                  or (r.get("component") == "edge" and r.get("conn") == conn
                      and r["kind"] in ("h2.preface", "h2.frame", "rpc.message")
                      and r.get("stream") in (0, 1, None))]
        # The walkthrough ends with the edge's answer to updateLocalConfiguration: whether the connector
        # Finishes that question before it calls unregisterConnection (and so which question id the call
        # gets), and how much of the teardown each side still reads before the close, are races.
        end = next((i for i, r in enumerate(chosen) if r["kind"] == "rpc.message"
                    and r.get("message") == "return" and r.get("method") == "updateLocalConfiguration"), None)
        if end is None:
            end = next((i for i, r in enumerate(chosen) if r["kind"] == "rpc.message" and r.get("message")
                        == "return" and r.get("method") == "unregisterConnection"), None)
        call = next((i for i, r in enumerate(chosen) if r["kind"] == "rpc.message"
                     and r.get("message") == "call" and r.get("method") == "updateLocalConfiguration"), None)
        if end is not None and call is not None and call < end:
            # the connector does not wait for that answer to start its teardown: what it sent meanwhile
            # (over QUIC an unregisterConnection may overtake the answer) is left out with the rest
            chosen = [*chosen[:call + 1], chosen[end]]
        else:
            chosen = chosen if end is None else chosen[:end + 1]
    elif topic in ("request", "websocket", "origin-cert-error"):
        ray = next((r["ray"] for r in ordered if r["kind"] == "eyeball.request" and r.get("ray")), None)
        if ray is None:
            return []
        chosen = [r for r in ordered if r.get("ray") == ray
                  and ((r.get("component") == "edge") == r["kind"].startswith(("eyeball.", "h2.", "quic.")))]
        # a stream opened as a WebSocket carries WebSocket frames in its DATA: mark them for `_frame_why`
        ws = {r.get("stream") for r in chosen if r["kind"] == "h2.frame" and ["cf-cloudflared-proxy-"
              "connection-upgrade", "websocket"] in (r.get("headers") or [])}
        chosen = [{**r, "_websocket": True} if r.get("stream") in ws else r for r in chosen]
        if topic == "websocket" and protocol == "quic":
            # a QUIC body is summarised once, at the stream's end, after the close that races: stop at
            # the answer to the upgrade (Topic.quic_note says so)
            end = next((i for i, r in enumerate(chosen) if r["kind"] == "quic.stream_head"
                        and r.get("message") == "ConnectResponse"), None)
            chosen = chosen if end is None else chosen[:end + 1]
        elif topic == "websocket":
            # ends with the echo: how the close handshake and the stream's end interleave (a close frame
            # back or not, END_STREAM or RST_STREAM first) changes from run to run
            end = next((i for i, r in enumerate(chosen) if r.get("_websocket") and r["kind"] == "h2.frame"
                        and r.get("type") == "DATA" and r.get("component") == "edge"
                        and r.get("dir") == "in"), None)
            chosen = chosen if end is None else chosen[:end + 1]
    else:
        raise ValueError(f"unknown topic {topic!r}")
    start = chosen[0]["t"] if chosen else 0.0
    steps = [s for s in (_step(r, start, protocol) for r in chosen) if s is not None]
    return sorted(steps, key=_order_key(steps))


def _order_key(steps: Sequence[WalkStep]) -> Callable[[WalkStep], tuple[float, int]]:
    """Wire order, except where the order is a race that changes from run to run: the two SETTINGS
    acknowledgements, which cross on the wire, are shown together, the edge's first, where the later of
    them was seen. Over QUIC, the summary of the response body (written when the stream's FIN arrives)
    comes after the response the eyeball got: whether head and body reach the edge in one read is a race,
    and the edge hands the head on before the body ends. The connector's Finish of question 0 crosses the
    edge's registerConnection answer: it is shown after it."""
    acks = [s for s in steps if s.what.startswith("SETTINGS") and "ACK" in s.what]
    # placed where the connector's acknowledgement was seen: it answers the edge's SETTINGS before it
    # answers the control stream, while the edge's own may leave late (after the registration, under load)
    ack_t = max((s.t for s in acks if s.sender == "Connector"), default=max((s.t for s in acks), default=0.0))
    # the connector's acknowledgement may share its timestamp (one read) with its SETTINGS before it and
    # the control stream's HEADERS after it: their order in the trace decides the side
    position = {id(s): i for i, s in enumerate(steps)}
    ack_at = max((position[id(s)] for s in acks if s.t == ack_t), default=-1)
    answered = next((s.t for s in steps if s.sender == "Edge" and s.receiver == "Eyeball"), None)
    bodies = [s for s in steps if s.ref.startswith("docs/protocol.md §13.3; docs/trace.md")
              and s.sender == "Connector" and answered is not None and s.t < answered]
    # the connector's Finish of the bootstrap question and the edge's registerConnection answer cross on
    # the wire: the Finish is shown after the answer
    returned = next((s.t for s in steps if s.what.startswith("Cap'n Proto return registerConnection")), None)
    finish0 = [s for s in steps if s.sender == "Connector" and s.what == "Cap'n Proto finish (question 0)"
               and returned is not None]

    def key(step: WalkStep) -> tuple[float, int]:
        if step in acks:
            return (ack_t, 1 if step.sender == "Edge" else 2)
        if step in bodies:
            return (answered or step.t, 4)
        if step in finish0 and returned is not None and step.t < returned:
            return (returned, 5)
        return (step.t, 0 if step.t != ack_t or position[id(step)] < ack_at else 3)

    return key


# ---- rendering and normalisation -----------------------------------------------------------------------

def render(topic: Topic, steps: Sequence[WalkStep], *, markdown: bool, protocol: str = "http2") -> str:
    """The walkthrough as terminal text, or as Markdown (for docs/walkthroughs/)."""
    start = min((s.t for s in steps), default=0.0)
    lines: list[str] = []
    quic = protocol == "quic"
    title = f"{topic.title} (over QUIC)" if quic else topic.title
    intro = topic.quic_intro if quic else topic.intro
    action = ((topic.quic_action or topic.action) + ", with our connector over QUIC (`--protocol quic`)"
              if quic else topic.action)
    note = [f"Note: {topic.quic_note}", ""] if quic and topic.quic_note else []
    command = f"tunnel-lab explain {topic.name}" + (f" --protocol {protocol}" if quic else "")
    if markdown:
        lines += [f"# Walkthrough: {title}", "",
                  f"<!-- generated by `{command} --markdown`; do not edit: "
                  "tests/integration/test_explain.py regenerates it -->", "",
                  intro, "", f"What the run did: {action}. Every step below comes from the "
                  "protocol trace of that run (docs/trace.md); values that change from run to run are "
                  "shown as `<placeholders>`. Section numbers (§) point into "
                  "[docs/protocol.md](../protocol.md).", "", *note]
    else:
        lines += [title, "=" * len(title), "", intro, "",
                  f"What this run did: {action}.",
                  "Section numbers (§) point into docs/protocol.md.", "", *note]
    for n, step in enumerate(steps, 1):
        arrow = step.sender if step.sender == step.receiver else f"{step.sender} -> {step.receiver}"
        when = f"+{(step.t - start) * 1000:.1f} ms"
        if markdown:
            lines.append(f"{n}. **{arrow}**: `{step.what}` ({when})")
            lines += [f"    - `{d}`" for d in step.details]
            lines.append(f"    - *Why:* {step.why} ({step.ref})")
        else:
            lines.append(f"{n:>3}. {when:>11}  {arrow}: {step.what}")
            lines += [f"{'':18}{d}" for d in step.details]
            lines.append(f"{'':18}why: {step.why} ({step.ref})")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


_NORMALISE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<uuid>"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<sha256>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<hex32>"),
    (re.compile(r"\b[0-9a-f]{16}(?=-[A-Z][A-Z0-9]*\b)"), "<ray>"),
    (re.compile(r"((?:127\.\d+\.\d+\.\d+)|localhost|\[::1\]):\d+\b"), r"\1:<port>"),
    (re.compile(r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT"), "<date>"),
    (re.compile(r"(Testing cert #)[A-Za-z0-9_-]+"), r"\1<serial>"),
    (re.compile(r"[+-]*\d+(?:\.\d+)? ms\b"), "<ms>"),
    # base64 of the origin's fields, its Date among them; the next detail line shows them decoded
    (re.compile(r"(cf-cloudflared-response-headers: )[A-Za-z0-9+/=_:;-]+"), r"\1<base64>"),
    # a fresh random key per WebSocket, and the accept value derived from it
    (re.compile(r"((?i:sec-websocket-key|sec-websocket-accept): )[A-Za-z0-9+/=]+"), r"\1<base64>"),
    # a client's WebSocket frame (FIN, opcode; mask bit set): a random mask, so random bytes
    (re.compile(r"first bytes ['\"](\\\\x8[0-9a-f]\\\\x[89a-f][0-9a-f])[^`\n]*"), r"first bytes \1<masked>"),
)


def normalise(text: str) -> str:
    """`text` with what changes from run to run replaced by placeholders (see the table above)."""
    for pattern, replacement in _NORMALISE:
        text = pattern.sub(replacement, text)
    return text


# ---- the shell: run a lab, record, explain -------------------------------------------------------------

async def record(topic: str, workdir: Path, protocol: str = "http2") -> list[dict[str, Any]]:
    """Run the lab for `topic` with tracing on, our connector over `protocol`; the merged records of the
    edge's and connector's traces. Raises `LabError` (with the components' last log lines) when the lab
    cannot do it."""
    from tunnel_lab.lab.api import LabError, open_lab

    edge_trace, connector_trace = workdir / "edge.trace.jsonl", workdir / "connector.trace.jsonl"
    actions: dict[str, Callable[[Any], Awaitable[None]]] = {}

    def start_connector(lab: Any, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return lab.start_connector(*args, protocol=protocol, **kwargs)

    async def registration(lab: Any) -> None:
        tunnel = await lab.create_tunnel("app", hostnames=[HOSTNAME])
        origin = await lab.start_origin("hello")
        await start_connector(lab, tunnel, url=origin.url, flags=["--trace", str(connector_trace)])
        await lab.stop("connector")

    async def request(lab: Any) -> None:
        tunnel = await lab.create_tunnel("app", hostnames=[HOSTNAME])
        origin = await lab.start_origin("hello")
        await start_connector(lab, tunnel, url=origin.url, flags=["--trace", str(connector_trace)])
        response = await lab.request(HOSTNAME, REQUEST_PATH)
        if response.error is not None:
            raise LabError(f"the request through the tunnel failed: {response.error}", lab.log_tails())

    async def websocket(lab: Any) -> None:
        tunnel = await lab.create_tunnel("app", hostnames=[HOSTNAME])
        origin = await lab.start_origin("ws-echo")
        await start_connector(lab, tunnel, url=origin.url, flags=["--trace", str(connector_trace)])
        result = await lab.websocket(HOSTNAME, WS_PATH, [WS_MESSAGE])
        if result.error is not None or result.status != 101:
            raise LabError(f"the WebSocket through the tunnel failed: status {result.status}, "
                           f"{result.error}", lab.log_tails())

    async def failover(lab: Any) -> None:
        import trio

        tunnel = await lab.create_tunnel("app", hostnames=[HOSTNAME])
        origin = await lab.start_origin("hello")
        await start_connector(lab, tunnel, url=origin.url, flags=["--trace", str(connector_trace)])
        before = {c["id"] for c in await lab.connections()}
        await lab.fault("drop-connection", tunnel_id=tunnel.id)
        # the edge's own list says when the connector has registered a new connection; after a registered
        # connection drops, the connector waits a random time below 20 s first (docs/connector.md, Knobs)
        with trio.move_on_after(RECONNECT_TIMEOUT):
            while not [c for c in await lab.connections() if c["id"] not in before and c["tunnel_id"]]:
                await trio.sleep(0.05)
            return
        raise LabError(f"the connector did not register a new connection within {RECONNECT_TIMEOUT:g}s of "
                       "the drop", lab.log_tails())

    async def origin_cert_error(lab: Any) -> None:
        tunnel = await lab.create_tunnel("app", hostnames=[HOSTNAME])
        origin = await lab.start_origin("hello", tls="expired")
        await start_connector(lab, tunnel, url=origin.url, origin_request={"caPool": str(lab.ca)},
                                  flags=["--trace", str(connector_trace)])
        response = await lab.request(HOSTNAME, REQUEST_PATH)
        if response.error is not None:
            raise LabError(f"the request through the tunnel failed: {response.error}", lab.log_tails())

    actions = {"registration": registration, "request": request, "websocket": websocket,
               "failover": failover, "origin-cert-error": origin_cert_error}
    async with open_lab(datacentres=2, https=False, state=workdir / "state",
                        edge_flags=["--trace", str(edge_trace)]) as lab:
        await actions[topic](lab)
    files = []
    for path in (edge_trace, connector_trace):
        with path.open(encoding="utf-8", errors="replace") as fh:
            files.append(tv.read_trace(fh, str(path)))
    return tv.merge(files)


USAGE = "tunnel-lab explain [TOPIC] [--protocol http2|quic] [--markdown] [--keep DIR]"


def _topics() -> str:
    lines = ["topics:"] + [f"  {t.name:<18} {t.title}" for t in TOPICS.values()]
    return "\n".join(lines)


def _usage() -> str:
    return (f"usage: {USAGE}\n\n{_topics()}\n\nStarts a small lab with tracing on, does one thing and "
            "explains, step by step, what crossed the wire (docs/walkthroughs/README.md).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunnel-lab explain", usage=USAGE, epilog=_topics(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="A protocol walkthrough built from a run recorded now.")
    p.add_argument("topic", nargs="?", help="what to explain (without one: the list of topics)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="http2",
                   help="the tunnel's transport: http2 (default) or quic (docs/protocol.md §13)")
    p.add_argument("--markdown", action="store_true",
                   help="Markdown with run-specific values as placeholders (docs/walkthroughs/TOPIC.md, "
                        "TOPIC-quic.md)")
    p.add_argument("--keep", metavar="DIR",
                   help="record in DIR and keep the traces and logs there (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `tunnel-lab explain`."""
    import trio

    from tunnel_lab.wire.errors import TunnelLabError

    args = build_parser().parse_args(argv)
    if args.topic is None:
        print(_usage())
        return 0
    if args.topic not in TOPICS:
        print(f"tunnel-lab explain: unknown topic {args.topic!r}; topics: {', '.join(TOPICS)}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tunnel-lab-explain-") as tmp:
        workdir = Path(args.keep).absolute() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            records = trio.run(record, args.topic, workdir, args.protocol)
        except (TunnelLabError, OSError) as exc:
            print(f"tunnel-lab explain: the lab for {args.topic!r} over {args.protocol} failed: {exc}",
                  file=sys.stderr)
            return 1
    steps = walkthrough(args.topic, records, args.protocol)
    if not steps:
        print(f"tunnel-lab explain: the trace of the run holds no step of {args.topic!r} over "
              f"{args.protocol}", file=sys.stderr)
        return 1
    text = render(TOPICS[args.topic], steps, markdown=args.markdown, protocol=args.protocol)
    print(normalise(text) if args.markdown else text, end="")
    return 0
